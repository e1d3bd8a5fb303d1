"""SIGKILL of the cowfs daemon under a running PostgreSQL loses no acknowledged commit.

While a client inserts numbered rows (recording each number only after its
COMMIT returned) and pgbench runs, the daemon is killed with SIGKILL. After
a lazy unmount and a new mount, `cowfs fsck` is clean, PostgreSQL starts and
recovers, and every recorded row is present. Each test crashes at another
point of the run; everything it acknowledged must survive (DESIGN rule 6).

With the daemon gone, PostgreSQL's next I/O on the mount fails, so the
postmaster and its children are killed by pid (read from postmaster.pid
before the crash) before the store is checked and mounted again.
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from cowfs.pg import PgServer, free_port
from helpers import REPO, Mount, cowfs, fsck_clean, tree_snapshot

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SCALE = 2
INIT_SCALE = 5             # the crash during `pgbench -i` needs a load that takes a while
CLIENTS = 4
WAIT_S = 120               # upper bound for any awaited event; never a timing assertion


# --- processes beside the test ---------------------------------------------------------------

class Client:
    """A client program whose merged output lines are collected while it runs."""

    def __init__(self, pg: PgServer, program: str, *args: str):
        self.name = f"{program} {' '.join(args)}"
        self.proc = pg.popen(program, *pg.connection_args(), *args, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str) -> str:
        """The first output line matching ``pattern``; fails if the program ends without one."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"{self.name} printed no line matching {pattern!r}:\n"
                             + "\n".join(self.lines[-20:]))

    def wait(self) -> int:
        returncode = self.proc.wait(timeout=WAIT_S)
        self._reader.join(timeout=WAIT_S)
        return returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


class Ledger:
    """Inserts 1, 2, 3, ... one row per transaction through one psql session.

    A number goes into `acked` only after psql printed the marker that
    follows its INSERT; psql runs the marker only once the server answered
    the autocommitted INSERT, i.e. after its COMMIT was durable.
    """

    def __init__(self, pg: PgServer, first: int, stderr_path: str):
        self.sent = first - 1          # highest number handed to psql
        self.acked: list[int] = []
        self._stop = threading.Event()
        with open(stderr_path, "a") as stderr:
            self.proc = pg.popen("psql", *pg.connection_args(), "-d", "postgres", "-XAtq",
                                 "-v", "ON_ERROR_STOP=1", stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                n = self.sent + 1
                self.proc.stdin.write(f"INSERT INTO ledger VALUES ({n});\n\\echo ack {n}\n")
                self.proc.stdin.flush()
                self.sent = n
                if self.proc.stdout.readline() != f"ack {n}\n":
                    return                  # the server or psql went away
                self.acked.append(n)
        except (BrokenPipeError, OSError, ValueError):
            return

    def wait_acked(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(self.acked) < count:
            assert self._thread.is_alive(), f"the ledger client stopped after {len(self.acked)} rows"
            assert time.monotonic() < deadline, f"only {len(self.acked)} ledger rows in {WAIT_S} s"
            time.sleep(0.01)

    def finish(self) -> None:
        """Stop inserting and end psql (killing it if its server is gone)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
        self._thread.join(timeout=WAIT_S)
        assert not self._thread.is_alive()


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _process_state(pid: int) -> str:
    """'R', 'S', 'D', 'T', 'Z'...; 'X' once the process is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def wait_reaped(pid: int) -> None:
    """Wait until a killed process is reaped, not only a zombie.

    A postmaster killed by us is an orphan whose zombie init reaps (on this
    machine after up to ~2 s); PostgreSQL refuses to start while the pid in
    postmaster.pid still exists, and a zombie does.
    """
    deadline = time.monotonic() + WAIT_S
    while _process_state(pid) != "X":
        assert time.monotonic() < deadline, f"process {pid} was not reaped within {WAIT_S} s"
        time.sleep(0.02)


def kill_server_tree(postmaster_pid: int) -> None:
    """SIGKILL a postmaster and its children and wait until all are gone.

    The postmaster is stopped first so it cannot fork a replacement (it
    restarts children after a crash) while the children are being killed.
    """
    try:
        os.kill(postmaster_pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    while _process_state(postmaster_pid) not in ("T", "Z", "X"):
        time.sleep(0.001)
    children = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and _parent_pid(int(entry)) == postmaster_pid:
                children.append(int(entry))
        except (OSError, ValueError):
            pass
    for pid in children + [postmaster_pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in children + [postmaster_pid]:
        wait_reaped(pid)


# --- the cluster under test -----------------------------------------------------------------

class Cluster:
    """PostgreSQL on the mount, the clients beside it, and the crash/recover cycle."""

    def __init__(self, pg: PgServer, mount, store: str, workdir: str):
        self.pg, self.mount, self.store, self.workdir = pg, mount, store, workdir
        self.port, self.socket_dir = free_port(), os.path.join(workdir, "pgrun")
        self.postmaster_pid = None
        self.clients: list[Client] = []
        self.ledger = None
        self.acked: set[int] = set()     # over the whole test
        self.sent = 0

    def start(self) -> None:
        self.pg.start(self.port, self.socket_dir)
        # Read now: after the crash, postmaster.pid is on a dead mount.
        self.postmaster_pid = self.pg.postmaster_pid()

    def client(self, program: str, *args: str) -> Client:
        client = Client(self.pg, program, *args)
        self.clients.append(client)
        return client

    def start_ledger(self) -> Ledger:
        self.ledger = Ledger(self.pg, self.sent + 1, os.path.join(self.workdir, "ledger.err"))
        return self.ledger

    def crash_and_recover(self) -> None:
        """Kill the daemon, the server and the clients; fsck; mount; recover."""
        self.mount.kill9()
        self.kill_everything()
        fsck_clean(self.store)
        self.mount.mount()
        self.start()

    def kill_everything(self) -> None:
        if self.postmaster_pid is not None:
            kill_server_tree(self.postmaster_pid)
            self.postmaster_pid = None
        for client in self.clients:
            client.kill()
        self.clients = []
        if self.ledger is not None:
            self.ledger.finish()
            self.acked.update(self.ledger.acked)
            self.sent = self.ledger.sent
            self.ledger = None

    def assert_ledger_complete(self) -> None:
        present = {int(n) for n in self.pg.psql("SELECT n FROM ledger").split()}
        missing = sorted(self.acked - present)
        assert not missing, (f"{len(missing)} of {len(self.acked)} acknowledged ledger rows are "
                             f"lost after the crash, first {missing[:10]}")
        phantoms = sorted(present - set(range(1, self.sent + 1)))
        assert not phantoms, f"ledger rows that were never inserted: {phantoms[:10]}"

    def assert_pgbench_consistent(self, scale: int) -> None:
        counts = self.pg.psql("""
            SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_branches),
                   (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),
                   (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),
                   (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),
                   (SELECT coalesce(sum(delta), 0) FROM pgbench_history)""").split("|")
        accounts, branches, *sums = map(int, counts)
        print("DEBUG acked", len(self.acked), "sent", self.sent, "counts", counts)
        # The load is one transaction: all of it or nothing.
        assert (accounts, branches) in ((0, 0), (scale * 100_000, scale)), counts
        assert len(set(sums)) == 1, f"pgbench balances disagree after recovery: {sums}"

    def assert_recovered(self, scale: int) -> None:
        assert self.acked, "the ledger acknowledged nothing before the crash; the test proves nothing"
        self.assert_ledger_complete()
        self.assert_pgbench_consistent(scale)
        self.pg.amcheck()


@pytest.fixture
def cluster(mounted, store, workdir, pg14_bin):
    """A started cluster with a ledger table; everything stopped or killed afterwards."""
    pg = PgServer(pg14_bin, os.path.join(mounted.path, "pgdata"))
    cluster = Cluster(pg, mounted, store, workdir)
    try:
        pg.initdb(data_checksums=True)
        cluster.start()
        pg.psql("CREATE TABLE ledger (n bigint PRIMARY KEY)")
        yield cluster
    finally:
        postmaster_pid = cluster.postmaster_pid
        try:
            for client in cluster.clients:
                client.kill()
            if postmaster_pid is not None:
                pg.stop("fast")
        except Exception:
            if postmaster_pid is not None:
                kill_server_tree(postmaster_pid)
            raise
        finally:
            if cluster.ledger is not None:
                cluster.ledger.finish()


# --- crash points ----------------------------------------------------------------------------

def test_crash_while_pgbench_loads_its_tables(cluster):
    """Killed in the middle of the load's COPY: the load is all or nothing."""
    cluster.start_ledger().wait_acked(50)
    load = cluster.client("pgbench", "-i", "-s", str(INIT_SCALE), "postgres")
    load.wait_for(r"^100000 of \d+ tuples")
    cluster.crash_and_recover()
    cluster.assert_recovered(INIT_SCALE)


def test_crash_while_pgbench_runs(cluster):
    cluster.pg.pgbench_init(SCALE)
    cluster.start_ledger().wait_acked(50)
    bench = cluster.client("pgbench", "-c", str(CLIENTS), "-j", "2", "-T", "600", "-P", "1",
                           "postgres")
    bench.wait_for(r"^progress: 2\.")
    cluster.crash_and_recover()
    cluster.assert_recovered(SCALE)


def test_crash_right_after_a_checkpoint(cluster):
    """A checkpoint fsyncs every data file; the crash hits the files it just made durable."""
    cluster.pg.pgbench_init(SCALE)
    cluster.start_ledger().wait_acked(50)
    bench = cluster.client("pgbench", "-c", str(CLIENTS), "-j", "2", "-T", "600", "-P", "1",
                           "postgres")
    bench.wait_for(r"^progress: 1\.")
    cluster.pg.psql("CHECKPOINT")
    cluster.crash_and_recover()
    cluster.assert_recovered(SCALE)


def test_crash_while_a_database_is_created(cluster):
    """CREATE DATABASE copies a directory tree file by file and fsyncs it."""
    cluster.pg.pgbench_init(SCALE)
    cluster.start_ledger().wait_acked(50)
    base_dir = os.path.join(cluster.pg.data_dir, "base")
    databases_before = set(os.listdir(base_dir))
    cluster.client("psql", "-d", "postgres", "-c", "CREATE DATABASE copied")
    deadline = time.monotonic() + WAIT_S
    while set(os.listdir(base_dir)) == databases_before and time.monotonic() < deadline:
        time.sleep(0.002)
    cluster.crash_and_recover()
    cluster.assert_recovered(SCALE)
    databases = cluster.pg.psql("SELECT datname FROM pg_database").split()
    print("DEBUG databases", databases)
    if "copied" in databases:
        cluster.pg.psql("SELECT count(*) FROM pg_class", database="copied")


# --- SIGKILL at random moments of a mixed workload -------------------------------------------

RANDOM_ROUNDS = 20
FROZEN_CHECKED = 3          # snapshots whose whole tree is compared across later crashes


def _side_job(cluster, round_no: int, snapshots_taken: list):
    """A cowfs command running beside PostgreSQL while the crash comes: snapshot, clone or gc."""
    store = cluster.store
    kind = ("snapshot", "gc", "clone", "snapshot+gc")[round_no % 4]
    if kind == "clone" and not snapshots_taken:
        kind = "snapshot"
    if kind == "clone":
        args = ["clone", store, f"main@{snapshots_taken[-1]}", f"clone{round_no}"]
    elif kind == "gc":
        args = ["gc", store, "--min-dead", "0.1"]
    else:
        args = ["snapshot", store, f"main@r{round_no}"]
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    extra = None
    if kind == "snapshot+gc":
        extra = subprocess.Popen([sys.executable, "-m", "cowfs", "gc", store], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return kind, args, proc, extra


def _frozen_tree(store: str, workdir: str, snap: str) -> dict:
    mount = Mount(store, os.path.join(workdir, "frozen"), volume=f"main@{snap}").mount()
    try:
        return tree_snapshot(mount.path)
    finally:
        mount.close()


def test_sigkill_at_random_moments_of_pgbench_ledger_snapshots_clones_and_gc(cluster):
    """Rule 6 at 20 random moments; the seed is printed (COWFS_CRASH_SEED repeats a run)."""
    seed = int(os.environ.get("COWFS_CRASH_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"COWFS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    cluster.pg.pgbench_init(1)
    taken: list[str] = []
    frozen: dict[str, dict] = {}
    for round_no in range(RANDOM_ROUNDS):
        cluster.start_ledger().wait_acked(10)
        # -n: no vacuum, which would TRUNCATE pgbench_history and make the
        # balance check of earlier rounds meaningless.
        cluster.client("pgbench", "-n", "-c", "2", "-j", "2", "-T", "600", "postgres")
        kind, args, proc, extra = _side_job(cluster, round_no, taken)
        time.sleep(rng.uniform(0.0, 1.5))            # the random moment of the kill
        cluster.crash_and_recover()
        for job in (proc, extra):
            if job is not None:
                job.wait(timeout=WAIT_S)
        if args[0] == "snapshot" and proc.returncode == 0:
            taken.append(args[2].split("@")[1])
            if len(frozen) < FROZEN_CHECKED:
                frozen[taken[-1]] = _frozen_tree(cluster.store, cluster.workdir, taken[-1])
        cluster.assert_recovered(1)
    listed = cowfs("list", cluster.store).stdout
    assert all(f"main@{snap}" in listed for snap in taken), (taken, listed)
    for snap, tree in frozen.items():
        assert _frozen_tree(cluster.store, cluster.workdir, snap) == tree, f"snapshot {snap} changed"
