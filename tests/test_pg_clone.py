"""A snapshot of a running PostgreSQL cluster clones into a second, independent server.

While pgbench and a ledger client (numbered rows recorded only after their
COMMIT returned) run on the live volume, the volume is snapshotted and
cloned. A second server started on the mounted clone recovers (the snapshot
is crash-consistent, rule 5) and holds every row committed before the
snapshot was requested; the live server keeps running, its clients see no
error. Then both servers run pgbench at the same time, each on its own
volume, and both clusters pass pg_amcheck.
"""

import os

import pytest

from cowfs.pg import PgServer, free_port
from helpers import Mount, cowfs, fsck_clean
from pg_helpers import start_ledger_cluster
from test_crash import Client, Ledger

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SCALE = 2
CLIENTS = 2
LEDGER_ROWS_BEFORE = 200
LEDGER_ROWS_AFTER = 100


@pytest.fixture
def servers(mounted, store, workdir, pg14_bin):
    """The live server on 'main' and, once a test mounts it, a clone server; all stopped after."""
    live = PgServer(pg14_bin, os.path.join(mounted.path, "pgdata"))
    clone_mount = Mount(store, os.path.join(workdir, "clone-mnt"), volume="rehearsal")
    clone = PgServer(pg14_bin, os.path.join(clone_mount.path, "pgdata"))
    started = []
    try:
        yield live, clone, clone_mount, started
    finally:
        for server in reversed(started):
            server.stop("fast")
        clone_mount.close()


def pgbench_ok(client: Client) -> None:
    returncode = client.wait()
    output = "\n".join(client.lines[-15:])
    assert returncode == 0, f"{client.name} failed:\n{output}"
    # pgbench 14 exits non-zero when a client aborted; say which error it was.
    assert "aborted" not in output and "ERROR" not in output, output


def test_snapshot_of_running_cluster_clones_into_second_server(servers, store, workdir):
    live, clone, clone_mount, started = servers
    socket_dir = os.path.join(workdir, "pgrun")
    start_ledger_cluster(live, socket_dir, started, SCALE)

    load = Client(live, "pgbench", "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", "30", "postgres")
    ledger = Ledger(live, 1, os.path.join(workdir, "ledger.err"))
    try:
        ledger.wait_acked(LEDGER_ROWS_BEFORE)
        acked_before_snapshot = list(ledger.acked)      # copied before the request is made
        cowfs("snapshot", store, "main@busy")
        ledger.wait_acked(len(acked_before_snapshot) + LEDGER_ROWS_AFTER)
    finally:
        ledger.finish()
    assert ledger.proc.returncode is not None

    cowfs("clone", store, "main@busy", "rehearsal")
    clone_mount.mount()
    # The snapshot holds the live postmaster's pid file; that postmaster is
    # alive, so PostgreSQL would refuse the data directory until it goes.
    os.unlink(os.path.join(clone.data_dir, "postmaster.pid"))
    clone.start(free_port(exclude={live.port}), socket_dir)
    started.append(clone)

    in_clone = {int(n) for n in clone.psql("SELECT n FROM ledger").split()}
    missing = sorted(set(acked_before_snapshot) - in_clone)
    assert not missing, f"{len(missing)} rows committed before the snapshot are missing: {missing[:10]}"
    in_live = {int(n) for n in live.psql("SELECT n FROM ledger").split()}
    assert set(ledger.acked) <= in_live
    assert len(in_live) > len(in_clone), "rows committed after the snapshot must not be in the clone"
    assert not (in_clone - in_live), "the clone has rows the live cluster never committed"
    pgbench_ok(load)     # the live server and its clients ran through, unaffected

    # Both servers under load at once, each on its own volume and daemon.
    on_live = Client(live, "pgbench", "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", "8", "postgres")
    on_clone = Client(clone, "pgbench", "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", "8", "postgres")
    pgbench_ok(on_live)
    pgbench_ok(on_clone)
    clone.psql("INSERT INTO ledger VALUES (-1)")
    assert live.psql("SELECT count(*) FROM ledger WHERE n = -1") == "0"
    live.amcheck()
    clone.amcheck()

    clone.stop("fast")
    started.remove(clone)
    clone_mount.umount()
    fsck_clean(store)
