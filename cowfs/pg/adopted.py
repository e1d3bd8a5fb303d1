"""The online cutover of a primary that is not on cowfs, through the cowfs standby following it.

When VOL is a following volume (`cowfs pg follow`), `cowfs pg cutover
--online` works as for a live volume, with three differences (online.py
asks this module):

- the *old* server is the real primary, in its own data directory on its
  own disks (``SHOW data_directory``; it must be on this machine, since
  the switch stops it and starts it again on a side port). Nothing of it
  moves: it serves until the switch, follows the new server during the
  window, and stays where it is;
- the clone comes from a snapshot of the standby, taken once the standby
  has received the WAL up to the point where the cutover's logical slots
  were created on the primary (`wait_standby_caught_up`): the slots must
  see every transaction the clone misses, as they do for a snapshot of
  the live volume. The clone is promoted (standby.start_clone); its
  end-of-recovery checkpoint is where replication starts;
- `finish-cutover`, once the old primary follows, also ends the physical
  standby: it is stopped, its slot on the old primary dropped, the follow
  record removed (`stop_physical_standby`); the volume and its snapshots
  stay. After a rollback the standby follows the old primary on.

During the window the physical standby keeps its conninfo: after the
cutover its connection attempts reach the new server and are refused
("system identifier differs") until finish-cutover; after a rollback it
reconnects to the old primary, whose slot kept the WAL it needs.
"""

import os
import time
from typing import Optional

from ..errors import CowfsError, UsageError
from . import replication, standby
from .report import Report
from .server import PgServer
from .upstream import Upstream

CATCH_UP_TIMEOUT_S = 3600.0
POLL_S = 0.05


def _standby_server(record: standby.FollowRecord, mnt: str) -> PgServer:
    return PgServer(record.bin_dir, os.path.join(mnt, record.pgdata))


def primary_data_dir(record: standby.FollowRecord, mnt: str, pgdata: str) -> str:
    """Where the primary that VOL follows keeps its data; it must be on this machine."""
    if record.pgdata != pgdata:
        raise UsageError(f"the standby's data directory is {record.pgdata} on the volume, not "
                         f"{pgdata}; give --pgdata {record.pgdata}")
    upstream = Upstream(record.primary, _standby_server(record, mnt))
    try:
        data_dir = upstream.sql("SHOW data_directory")
    except CowfsError as exc:
        raise UsageError(f"an online cutover of a followed primary needs an SQL session on it as a "
                         f"superuser with the conninfo the standby uses: {exc}") from None
    if not os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        raise UsageError(f"the primary {upstream.shown} keeps its data in {data_dir}, which is not "
                         "on this machine (or it is not running): the switch stops it and starts "
                         "it again on a side port, so run the cutover on the primary's machine")
    return data_dir


def wait_standby_caught_up(report: Report, mnt: str, primary: PgServer,
                           timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
    """Until the standby has received (and flushed) the primary's WAL up to its position now."""
    record = standby.load_record(mnt)
    with report.step("standby-catches-up") as step:
        server = standby.running_standby(record.bin_dir, os.path.join(mnt, record.pgdata))
        if server is None:
            raise UsageError(f"the standby on {mnt} does not run; 'cowfs pg follow' starts it")
        target = primary.psql("SELECT pg_current_wal_lsn()")
        started = time.monotonic()
        while server.psql(f"SELECT coalesce(pg_last_wal_receive_lsn() >= '{target}', false)") != "t":
            if time.monotonic() - started > timeout_s:
                raise server.error(f"the standby did not receive the primary's WAL up to {target} "
                                   f"within {timeout_s:g} s")
            time.sleep(POLL_S)
        step.detail = (f"the standby has the primary's WAL up to {target} (the cutover's slots "
                       f"begin before it) after {time.monotonic() - started:.2f} s")


def stop_physical_standby(mnt: str, old_primary: PgServer) -> Optional[str]:
    """End the standby on VOL once its primary is the old one that follows; a detail line.

    None when the volume holds no follow record (a live volume, or done already).
    """
    record = standby.load_record(mnt)
    if record is None:
        return None
    server = _standby_server(record, mnt)
    server.stop("fast")
    replication.drop_slot(old_primary, record.slot)
    standby.forget_record(mnt)
    return f"the standby on {mnt} stopped, its slot {record.slot} dropped on the old primary"
