"""Shared parts of the PostgreSQL workflow tests: a live cluster on a cowfs mount, PgBouncer.

`LiveCluster` is what a user has before an upgrade: a store, a volume
``live`` mounted at ``<workdir>/mnt``, a PostgreSQL cluster (14 unless
told otherwise) in ``pgdata`` on it, serving on a Unix socket. Teardown
stops every server and unmounts every mount of the test's store (also those
a failed command left behind), then checks fsck.

`Bouncer` is a PgBouncer of the test's own (transaction pooling) in front
of it, run as the postgres user and stopped by its pid.

`PlainPrimary` is a cluster on a plain directory, the primary a cowfs
standby follows (test_pg_follow.py).
"""

import json
import math
import os
import shutil
import subprocess
import threading
import time

from cowfs import mounting
from cowfs.pg import PgServer, free_port, pgbouncer
from cowfs.pg.workspace import pid_file_is_its_own
from helpers import Mount, cowfs, fsck_clean

PGDATA = "pgdata"
SCALE = 1
CLIENTS = 2
BENCH_ROUND_S = 3


# What an online cutover needs of the live server (see cowfs/pg/preconditions.py).
LOGICAL_SETTINGS = {"wal_level": "logical", "max_replication_slots": 10, "max_wal_senders": 10,
                    "max_prepared_transactions": 2}


class LiveCluster:
    def __init__(self, workdir: str, old_bin: str, new_bin: str, settings: dict = None):
        self.workdir, self.old_bin, self.new_bin = workdir, old_bin, new_bin
        self.settings = settings or {}
        self.store = os.path.join(workdir, "store")
        self.mnt = os.path.join(workdir, "mnt")
        self.socket_dir = os.path.join(workdir, "pgrun")
        self.port = free_port()
        self.mount = Mount(self.store, self.mnt, "live")
        self._remove: list = []
        self.server = PgServer(old_bin, os.path.join(self.mnt, PGDATA))

    def create(self) -> "LiveCluster":
        cowfs("init", self.store)
        cowfs("rename", self.store, "main", "live")
        self.mount.mount()
        self.server.initdb()
        self.configure(self.settings)
        self.start()
        self.server.pgbench_init(SCALE)
        return self

    def configure(self, settings: dict) -> None:
        """Append settings to postgresql.conf (the last line of a name wins); take effect at start."""
        with open(os.path.join(self.server.data_dir, "postgresql.conf"), "a") as f:
            f.writelines(f"{name} = '{value}'\n" for name, value in settings.items())

    def start(self) -> None:
        self.server.start(self.port, self.socket_dir)

    def restart(self, settings: dict) -> None:
        self.server.stop("fast")
        self.configure(settings)
        self.start()

    def client(self, bin_dir: str = None) -> PgServer:
        """A PgServer handle for whatever server now serves the live endpoint."""
        server = PgServer(bin_dir or self.new_bin, os.path.join(self.mnt, PGDATA))
        server.port, server.socket_dir = self.port, self.socket_dir
        return server

    def remove_later(self, path: str) -> None:
        self._remove.append(path)

    def pg(self, *args, check=False, timeout=600):
        return cowfs("pg", *args, check=check, timeout=timeout)

    def close(self) -> None:
        """Stop every server on a mount of our store, unmount them all, fsck."""
        stop_store_servers(self.store, self.new_bin)
        for path in self._remove:
            shutil.rmtree(path, ignore_errors=True)
        fsck_clean(self.store)


class Bouncer:
    """Our own PgBouncer (transaction pooling) in front of the live endpoint."""

    def __init__(self, workdir: str, live: LiveCluster):
        self.directory = os.path.join(workdir, "pgbouncer")
        self.port = free_port(exclude=(live.port,))
        self.proc = pgbouncer.start(self.directory, server_socket_dir=live.socket_dir,
                                    server_port=live.port, port=self.port)
        self.console = f"host={self.directory} port={self.port} user=postgres"

    def client(self, bin_dir: str) -> PgServer:
        """psql & co. through PgBouncer (as a client application sees the database)."""
        server = PgServer(bin_dir, self.directory)
        server.port, server.socket_dir = self.port, self.directory
        return server

    def stop(self) -> None:
        pgbouncer.stop(self.proc)


def store_mounts(store: str) -> list:
    """Mount points of every cowfs daemon serving a volume of ``store``."""
    return [m["mountpoint"] for m in mounting.cowfs_mounts()
            if m["registry"] and m["registry"].get("store") == os.path.abspath(store)]


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


class PlainPrimary:
    """A primary on a plain directory (not cowfs), as the cluster a user adopts has.

    Replication settings as a standby needs them; ``log_connections`` so a
    test can see every connection the primary accepted. ``hba`` lines come
    first in pg_hba.conf (initdb's trust lines for the postgres user follow).
    """

    def __init__(self, workdir: str, bin_dir: str, name: str = "primary", settings: dict = None,
                 hba: tuple = ()):
        self.bin_dir = bin_dir
        self.root = os.path.join(workdir, name)
        os.makedirs(self.root)
        shutil.chown(self.root, "postgres", "postgres")
        self.server = PgServer(bin_dir, os.path.join(self.root, "data"),
                               log_path=os.path.join(self.root, "postgresql.log"))
        self.socket_dir = os.path.join(self.root, "run")
        self.settings = dict(STANDBY_PRIMARY_SETTINGS, **(settings or {}))
        self.hba = hba

    def create(self, scale: int = SCALE) -> "PlainPrimary":
        self.server.initdb()
        with open(os.path.join(self.server.data_dir, "postgresql.conf"), "a") as f:
            f.writelines(f"{name} = '{value}'\n" for name, value in self.settings.items())
        hba = os.path.join(self.server.data_dir, "pg_hba.conf")
        with open(hba) as f:
            rest = f.read()
        with open(hba, "w") as f:
            f.writelines(f"{line}\n" for line in self.hba)
            f.write(rest)
        self.server.start(free_port(), self.socket_dir)
        if scale:
            self.server.pgbench_init(scale)
        return self

    def conninfo(self, **extra) -> str:
        options = {"host": self.socket_dir, "port": self.server.port, "user": "postgres", **extra}
        return " ".join(f"{key}={value}" for key, value in options.items())

    def slots(self) -> dict:
        """{slot name: active} on the primary."""
        rows = self.server.psql("SELECT slot_name, active FROM pg_replication_slots").splitlines()
        return {name: active == "t" for name, active in (row.split("|") for row in rows)}

    def log_size(self) -> int:
        return os.path.getsize(self.server.log_path)

    def log_since(self, offset: int) -> str:
        with open(self.server.log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.server.data_dir, "postmaster.pid")):
            self.server.stop("fast")


# What a streaming standby needs of its primary (docs/postgres.md, "Adopting an existing cluster").
STANDBY_PRIMARY_SETTINGS = {"wal_level": "replica", "max_wal_senders": 10,
                            "max_replication_slots": 10, "log_connections": "on"}


def stop_store_servers(store: str, bin_dir: str) -> None:
    """Stop every PostgreSQL server on a mount of ``store`` and unmount them all (teardown)."""
    for mnt in store_mounts(store):
        data_dir = os.path.join(mnt, PGDATA)
        # A clone never started holds its origin's pid file: pg_ctl would stop the origin.
        if os.path.exists(os.path.join(data_dir, "postmaster.pid")) and pid_file_is_its_own(data_dir):
            subprocess.run([os.path.join(bin_dir, "pg_ctl"), "stop", "-D", data_dir, "-m",
                            "immediate", "-w"], capture_output=True, user="postgres")
        if cowfs("umount", mnt, check=False, timeout=120).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
