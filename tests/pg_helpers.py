"""Shared parts of the PostgreSQL workflow tests: a live 14 cluster on a cowfs mount.

`LiveCluster` is what a user has before an upgrade: a store, a volume
``live`` mounted at ``<workdir>/mnt``, a PostgreSQL 14 cluster in
``pgdata`` on it, serving on a Unix socket. Teardown stops every server
and unmounts every mount of the test's store (also those a failed command
left behind), then checks fsck.
"""

import json
import math
import os
import shutil
import subprocess
import threading
import time

from cowfs import daemon
from cowfs.pg import PgServer, free_port
from helpers import Mount, cowfs, fsck_clean

PGDATA = "pgdata"
SCALE = 1
CLIENTS = 2
BENCH_ROUND_S = 3


class LiveCluster:
    def __init__(self, workdir: str, pg14_bin: str, pg16_bin: str):
        self.workdir, self.pg14_bin, self.pg16_bin = workdir, pg14_bin, pg16_bin
        self.store = os.path.join(workdir, "store")
        self.mnt = os.path.join(workdir, "mnt")
        self.socket_dir = os.path.join(workdir, "pgrun")
        self.port = free_port()
        self.mount = Mount(self.store, self.mnt, "live")
        self._remove: list = []
        self.server = PgServer(pg14_bin, os.path.join(self.mnt, PGDATA))

    def create(self) -> "LiveCluster":
        cowfs("init", self.store)
        cowfs("rename", self.store, "main", "live")
        self.mount.mount()
        self.server.initdb()
        self.start()
        self.server.pgbench_init(SCALE)
        return self

    def start(self) -> None:
        self.server.start(self.port, self.socket_dir)

    def client(self, bin_dir: str = None) -> PgServer:
        """A PgServer handle for whatever server now serves MNT/pgdata (14 or 16)."""
        server = PgServer(bin_dir or self.pg16_bin, os.path.join(self.mnt, PGDATA))
        server.port, server.socket_dir = self.port, self.socket_dir
        return server

    def remove_later(self, path: str) -> None:
        self._remove.append(path)

    def pg(self, *args, check=False, timeout=600):
        return cowfs("pg", *args, check=check, timeout=timeout)

    def close(self) -> None:
        """Stop every server on a mount of our store, unmount them all, fsck."""
        for mnt in store_mounts(self.store):
            for dirpath in (os.path.join(mnt, PGDATA),):
                if os.path.exists(os.path.join(dirpath, "postmaster.pid")):
                    subprocess.run([os.path.join(self.pg16_bin, "pg_ctl"), "stop", "-D", dirpath,
                                    "-m", "immediate", "-w"], capture_output=True, user="postgres")
            result = cowfs("umount", mnt, check=False, timeout=120)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        for path in self._remove:
            shutil.rmtree(path, ignore_errors=True)
        fsck_clean(self.store)


def store_mounts(store: str) -> list:
    """Mount points of every cowfs daemon serving a volume of ``store``."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] != daemon.FUSE_TYPE:
                continue
            mnt = daemon._unescape(left.split()[4])
            info = daemon.read_registry(left.split()[2])
            if info and info.get("store") == os.path.abspath(store):
                mounts.append(mnt)
    return mounts


def start_ledger_cluster(server: PgServer, socket_dir: str, started: list, scale: int) -> None:
    """A new cluster with data checksums, started (and added to `started` for the teardown),
    holding pgbench's tables at `scale` and the table `ledger` of `test_crash.Ledger`."""
    server.initdb(data_checksums=True)
    server.start(free_port(), socket_dir)
    started.append(server)
    server.pgbench_init(scale)
    server.psql("CREATE TABLE ledger (n bigint PRIMARY KEY)")


class PgbenchLoop:
    """pgbench in rounds of a few seconds until stopped; every round must succeed."""

    def __init__(self, server: PgServer):
        self.server = server
        self.transactions = 0
        self.rounds = 0
        self.failures: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "PgbenchLoop":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # -n: no vacuum, which would also truncate pgbench_history between rounds.
                result = self.server.pgbench(CLIENTS, seconds=BENCH_ROUND_S, extra_args=["-n"])
                self.transactions += result.transactions
                self.rounds += 1
            except Exception as exc:          # recorded, asserted by the test
                self.failures.append(str(exc))
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


FINGERPRINT_SQL = """
SELECT count(*), sum(abalance), md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid))
  FROM pgbench_accounts;
SELECT count(*), sum(tbalance), md5(string_agg(tid || ':' || tbalance, ',' ORDER BY tid))
  FROM pgbench_tellers;
SELECT count(*), sum(bbalance), md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid))
  FROM pgbench_branches;
SELECT count(*), sum(delta) FROM pgbench_history;
"""


def fingerprint(server: PgServer) -> dict:
    rows = server.psql(FINGERPRINT_SQL).splitlines()
    return {table: row.split("|") for table, row in
            zip(["accounts", "tellers", "branches", "history"], rows)}


def assert_pgbench_consistent(fp: dict, transactions: int) -> None:
    """Exactly what pgbench committed: one history row per transaction, balances agree."""
    assert int(fp["history"][0]) == transactions, (fp, transactions)
    sums = {table: int(values[1] or 0) for table, values in fp.items()}
    assert len(set(sums.values())) == 1, f"pgbench balances disagree: {sums}"


def wait_for(condition, timeout_s: float = 120) -> None:
    """Poll until ``condition()`` holds; fail the test after ``timeout_s`` (not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached within {timeout_s} s"
        time.sleep(0.05)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def volume_names(store: str) -> set:
    return {row["name"] for row in json.loads(cowfs("list", store, "--json").stdout)}


def step(report: dict, name: str) -> dict:
    matches = [s for s in report["steps"] if s["name"] == name]
    assert matches, f"no step {name} in {[s['name'] for s in report['steps']]}"
    return matches[0]


def bisect_bound(candidates: int) -> int:
    return math.ceil(math.log2(candidates + 1))


def assert_one_line_error(result, exit_code: int, *needles) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
