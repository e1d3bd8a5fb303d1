"""Concurrency: two daemons under pgbench while gc and scheduled snapshots run.

The live volume and a clone of it are mounted by two daemons, each serving
its own PostgreSQL server. Both run pgbench at once while both daemons take
scheduled snapshots every second (and prune them) and `cowfs gc` runs in a
loop beside them. No client sees an error, no gc pass fails, fsck is clean
and both clusters pass pg_amcheck with pgbench's balance invariant intact.
"""

import os
import subprocess
import sys
import threading

import pytest

from cowfs.pg import PgServer, free_port
from helpers import REPO, Mount, cowfs, fsck_clean
from test_crash import Client

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BENCH_SECONDS = "12"
CLIENTS = "2"


class GcLoop:
    """`cowfs gc` again and again in a thread until stopped; remembers failed passes."""

    def __init__(self, store: str):
        self.store, self.passes, self.failures = store, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            result = subprocess.run([sys.executable, "-m", "cowfs", "gc", self.store, "--min-dead", "0.05"],
                                    cwd=REPO, capture_output=True, text=True, timeout=300)
            self.passes += 1
            if result.returncode != 0:
                self.failures.append(result.stderr.strip())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)


def balances_agree(pg: PgServer) -> None:
    sums = pg.psql("""SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM
                      pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches),
                      (SELECT coalesce(sum(delta), 0) FROM pgbench_history)""").split("|")
    assert len(set(sums)) == 1, f"pgbench balances disagree: {sums}"


def bench_ok(client: Client) -> None:
    returncode = client.wait()
    output = "\n".join(client.lines[-15:])
    assert returncode == 0 and "aborted" not in output and "ERROR" not in output, output


def test_two_daemons_under_pgbench_with_gc_and_scheduled_snapshots(mounted, store, workdir, pg14_bin):
    live = PgServer(pg14_bin, os.path.join(mounted.path, "pgdata"))
    clone_mount = Mount(store, os.path.join(workdir, "clone-mnt"), volume="rehearsal")
    clone = PgServer(pg14_bin, os.path.join(clone_mount.path, "pgdata"))
    socket_dir = os.path.join(workdir, "pgrun")
    started, gc_loop = [], None
    try:
        live.initdb(data_checksums=True)
        live.start(free_port(), socket_dir)
        started.append(live)
        live.pgbench_init(1)
        cowfs("snapshot", store, "main@base")
        cowfs("clone", store, "main@base", "rehearsal")
        clone_mount.mount()
        os.unlink(os.path.join(clone.data_dir, "postmaster.pid"))   # the live postmaster's
        clone.start(free_port(exclude={live.port}), socket_dir)
        started.append(clone)
        for volume in ("main", "rehearsal"):
            cowfs("policy", store, volume, "--every", "1s", "--keep", "3")
        gc_loop = GcLoop(store)
        benches = [Client(pg, "pgbench", "-n", "-c", CLIENTS, "-j", CLIENTS, "-T", BENCH_SECONDS, "postgres")
                   for pg in (live, clone)]
        for bench in benches:
            bench_ok(bench)
        gc_loop.stop()
        assert gc_loop.passes > 0 and not gc_loop.failures, gc_loop.failures
        for volume in ("main", "rehearsal"):
            cowfs("policy", store, volume, "--off")
        listed = cowfs("list", store).stdout
        assert "main@auto-" in listed and "rehearsal@auto-" in listed, listed
        fsck_clean(store)                         # while both are mounted and serving
        for pg in (live, clone):
            balances_agree(pg)
            pg.amcheck()
    finally:
        if gc_loop is not None:
            gc_loop.stop()
        for pg in reversed(started):
            pg.stop("fast")
        clone_mount.close()
    fsck_clean(store)
