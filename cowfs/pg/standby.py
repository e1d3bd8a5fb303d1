"""A streaming standby on a cowfs volume, and clones of its snapshots started as primaries.

The following volume
    holds the standby's data directory and, at its root, the record
    ``.cowfs-follow.json`` (state, the primary's conninfo without password,
    slot, data directory, port): what `cowfs pg follow` (again) and `cowfs
    pg status` start from.

Why the connection is not in the data directory
    The standby is started with ``-c primary_conninfo=... -c
    primary_slot_name=...`` on its command line, never with them in
    ``postgresql.auto.conf`` (``pg_basebackup -R`` would put them there). A
    snapshot of the volume, and so every clone, then carries no way to
    reach the primary: a clone started by hand stays an unconnected
    standby, and can never take the slot from the real standby (the
    primary would then throw away WAL the real standby still needs) nor
    show the primary a connection. The command line is also recorded in
    ``postmaster.opts``; a clone's copy is removed (`detach`).

A clone of a standby's snapshot (`start_clone`)
    ``standby.signal`` becomes ``recovery.signal`` with ``restore_command
    = false``: PostgreSQL runs archive recovery over the WAL in the clone's
    ``pg_wal`` (everything the standby had received), finds its end, picks
    a new timeline and opens read-write, a primary of its own. Its
    end-of-recovery checkpoint is where the snapshot ends (the online
    cutover's S0, as for a crash-recovered clone). Without the rename
    PostgreSQL would stay a standby; with ``pg_ctl promote`` it would not
    write that checkpoint (fast promotion).
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import cluster, replication
from .server import PgServer

RECORD_NAME = ".cowfs-follow.json"
STANDBY_SIGNAL = "standby.signal"
RECOVERY_SIGNAL = "recovery.signal"
STREAM_TIMEOUT_S = 120.0
PROMOTE_TIMEOUT_S = 3600.0          # replaying a lot of WAL takes a while
POLL_S = 0.1
# Recovery of a clone: the WAL in pg_wal only, never an archive or the primary.
PROMOTE_SETTINGS = {"restore_command": "false"}
# The standby: read-only queries (cowfs pg status) whatever the primary's file says.
STANDBY_SETTINGS = {"hot_standby": "on"}
_CONNECTION_SETTINGS = ("primary_conninfo", "primary_slot_name")


@dataclass
class FollowRecord:
    """What a following volume remembers about its standby."""

    volume: str
    pgdata: str
    bin_dir: str
    primary: str                  # the conninfo without password
    slot: str
    port: int
    socket_dir: str
    system_id: str
    state: str = "copying"        # copying | following
    started: str = ""             # when the base backup started (UTC)
    base_backup: dict = field(default_factory=dict)

    def save(self, mountpoint: str) -> None:
        """Atomically; a crash leaves the old record or this one."""
        path = os.path.join(mountpoint, RECORD_NAME)
        with open(f"{path}.tmp", "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)


def load_record(mountpoint: str) -> Optional[FollowRecord]:
    try:
        with open(os.path.join(mountpoint, RECORD_NAME)) as f:
            return FollowRecord(**json.load(f))
    except FileNotFoundError:
        return None


def forget_record(mountpoint: str) -> None:
    try:
        os.unlink(os.path.join(mountpoint, RECORD_NAME))
    except FileNotFoundError:
        pass


# --- the standby ------------------------------------------------------------------------------

def make_standby(server: PgServer) -> None:
    """Mark a fresh base backup as a standby (``standby.signal``, owned like the directory)."""
    _touch_owned(os.path.join(server.data_dir, STANDBY_SIGNAL), server.data_dir)


def start_standby(server: PgServer, record: FollowRecord, conninfo: str) -> None:
    settings = dict(STANDBY_SETTINGS, primary_conninfo=conninfo, primary_slot_name=record.slot)
    server.start(record.port, record.socket_dir, settings=settings)


def wait_streaming(server: PgServer, timeout_s: float = STREAM_TIMEOUT_S) -> str:
    """Until the WAL receiver streams from the primary; its received position."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = server.psql("SELECT status, flushed_lsn FROM pg_stat_wal_receiver")
        if row.startswith("streaming|"):
            return row.split("|")[1]
        if time.monotonic() > deadline:
            raise server.error(f"the standby did not stream from the primary within "
                               f"{timeout_s:g} s (WAL receiver: {row or 'not running'})")
        time.sleep(POLL_S)


def running_standby(bin_dir: str, data_dir: str) -> Optional[PgServer]:
    """A handle on the standby if it runs (aimed where its postmaster.pid says), else None."""
    server = PgServer(bin_dir, data_dir)
    pid = cluster.read_pid_file(data_dir)
    if pid is None or not server.is_running():
        return None
    server.port, server.socket_dir = pid.port, pid.socket_dir
    return server


def local_state(server: PgServer) -> dict:
    """What the standby itself knows: receiver status, received and replayed WAL, last replay."""
    row = server.psql(
        "SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'stopped'), "
        "pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), "
        "(SELECT latest_end_lsn FROM pg_stat_wal_receiver), "
        "extract(epoch FROM now() - pg_last_xact_replay_timestamp()), pg_is_in_recovery()")
    status, received, replayed, primary_end, since_replay_s, in_recovery = row.split("|")
    return dict(receiver=status, received_lsn=received or None, replay_lsn=replayed or None,
                primary_end_lsn=primary_end or None,
                since_last_replayed_commit_s=float(since_replay_s) if since_replay_s else None,
                in_recovery=in_recovery == "t")


def lag(server: PgServer, local: dict, primary_lsn: Optional[str],
        replay_lag_s: Optional[float]) -> dict:
    """Replay lag in bytes and seconds.

    Bytes: the primary's current WAL position (or, when it cannot be asked,
    the end it last reported to the WAL receiver) minus what the standby
    replayed. Seconds: pg_stat_replication's ``replay_lag`` on the primary
    (how long the last WAL took to be replayed); 0 with nothing left to
    replay; else the age of the last replayed commit (an upper bound).
    """
    target = primary_lsn or local["primary_end_lsn"]
    if not target or not local["replay_lsn"]:
        return dict(bytes=None, seconds=None, measured_against=None)
    behind = int(float(server.psql(f"SELECT greatest(0, pg_wal_lsn_diff('{target}', "
                                   f"'{local['replay_lsn']}'))")))
    if replay_lag_s is not None:
        seconds = replay_lag_s
    elif behind == 0:
        seconds = 0.0
    else:
        seconds = local["since_last_replayed_commit_s"]
    return dict(bytes=behind, seconds=None if seconds is None else round(seconds, 3),
                measured_against="primary's current WAL position" if primary_lsn
                else "the primary's WAL end as last reported to the standby")


# --- clones of a standby's snapshots ---------------------------------------------------------

def is_standby(data_dir: str) -> bool:
    return os.path.exists(os.path.join(data_dir, STANDBY_SIGNAL))


def detach(data_dir: str, mountpoint: Optional[str] = None) -> bool:
    """Turn a clone of a standby into a cluster that recovers and promotes itself on start.

    Idempotent; False when the data directory is not a standby's. Removes
    every way the clone could reach the primary: connection settings in
    postgresql.auto.conf (ALTER SYSTEM, pg_basebackup -R), the standby's
    command line in postmaster.opts, and the clone's copy of the record.
    """
    if not is_standby(data_dir):
        return False
    _drop_connection_settings(os.path.join(data_dir, "postgresql.auto.conf"))
    try:
        os.unlink(os.path.join(data_dir, "postmaster.opts"))
    except FileNotFoundError:
        pass
    _touch_owned(os.path.join(data_dir, RECOVERY_SIGNAL), data_dir)
    os.unlink(os.path.join(data_dir, STANDBY_SIGNAL))
    if mountpoint is not None:
        forget_record(mountpoint)
    return True


def start_clone(server: PgServer, port: int, socket_dir: str, settings: dict,
                mountpoint: Optional[str] = None) -> str:
    """Start a server on a clone; a standby's clone is recovered and promoted first.

    Returns a phrase for a report ('' for a clone of a primary, which needs
    nothing but crash recovery).
    """
    detached = detach(server.data_dir, mountpoint)
    server.start(port, socket_dir, settings={**settings, **(PROMOTE_SETTINGS if detached else {})})
    if not detached:
        return ""
    wait_promoted(server)
    dropped = drop_slots(server)
    timeline = server.psql("SELECT timeline_id FROM pg_control_checkpoint()")
    return (f"a standby's snapshot: recovered to the end of its WAL and promoted to a primary of "
            f"its own (timeline {timeline}, no connection to the primary"
            + (f"; dropped the copied slots {', '.join(dropped)})" if dropped else ")"))


def wait_promoted(server: PgServer, timeout_s: float = PROMOTE_TIMEOUT_S) -> None:
    """Until recovery has ended (``pg_ctl -w`` returns as soon as read-only queries work)."""
    deadline = time.monotonic() + timeout_s
    while server.psql("SELECT pg_is_in_recovery()") == "t":
        if time.monotonic() > deadline:
            raise server.error(f"the clone was still recovering after {timeout_s:g} s")
        time.sleep(POLL_S)


def drop_slots(server: PgServer) -> list:
    """Drop slots a standby may have carried (PostgreSQL 17 can sync logical ones to it)."""
    dropped = replication.drop_logical_slots(server)
    physical = server.psql("SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'physical'")
    for name in physical.splitlines():
        server.psql(f"SELECT pg_drop_replication_slot({replication.literal(name)})")
    return dropped + physical.splitlines()


def _drop_connection_settings(path: str) -> None:
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    kept = [line for line in lines if line.split("=", 1)[0].strip() not in _CONNECTION_SETTINGS]
    if kept == lines:
        return
    st = os.stat(path)
    with open(f"{path}.cowfs-tmp", "w") as f:
        f.writelines(kept)
    os.chown(f"{path}.cowfs-tmp", st.st_uid, st.st_gid)
    os.chmod(f"{path}.cowfs-tmp", st.st_mode & 0o777)
    os.replace(f"{path}.cowfs-tmp", path)


def _touch_owned(path: str, like: str) -> None:
    """An empty file owned like ``like`` (PostgreSQL must be able to remove it), mode 0600."""
    st = os.stat(like)
    with open(path, "w"):
        pass
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, 0o600)

