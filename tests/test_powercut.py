"""Power cuts under today's commit path: the store on a disk that loses unsynced writes.

`kill -9` (tests/test_reliability_crash_points.py) keeps the page cache, so
it cannot show what a power loss does to the commit order. Here the store
lives on a `PowerCutDisk` (tests/powercut.py); the daemon dies at a crash
point of cowfs/faults.py (or keeps running), then the disk's power is cut
-- with the last write torn or not -- and everything is checked after a
fresh disk comes up: fsck clean, every fsynced byte there, acknowledged
snapshots there with their exact content, nothing half-done visible.

The crash point lists are the extension points, one per trigger: an fsync
(one intent-log record: ``LOG_POINTS``), a fold of every file (the daemon's
`flush` request: ``FOLD_POINTS``), a snapshot, gc, and the replay at mount
(``replay.middle``); every cut kind runs at each.

A seeded random sequence (writes, fsyncs, truncates, renames, unlinks,
snapshots, clones, gc, cuts) is checked against `powercut_model.Model`.
The long variant runs only when ``COWFS_POWERCUT_SEEDS`` (e.g. ``100-109``) is
set, with ``COWFS_POWERCUT_STEPS`` steps each (default 300; 10 x 300 took 6.5
minutes here); a failure prints its seed and last operations.
"""

import contextlib
import errno
import json
import os
import random

import pytest

from cowfs import faults
from cowfs.packs import fsync_dir
from helpers import cowfs, daemon_stats, fsck_clean
from powercut_cowfs import stack_on_disk, fsck_verify_data
from powercut_model import Model
from powercut_workers import Writer, records_present, wait_pending

# Crash points reached by an fsync of a file (one intent-log record), in path order.
LOG_POINTS = ["log.written", "log.synced"]
# Crash points reached by a fold (packs and LMDB), in path order.
FOLD_POINTS = ["pack.written", "pack.synced", "fold.before", "fold.after"]
# Crash points reached by a snapshot of a mounted volume.
SNAPSHOT_POINTS = ["commit.before", "commit.after"]
# Crash points of a gc pass (its own process, a fully synced environment).
GC_POINTS = ["gc.copied", "gc.moved", "gc.dropping"]
# How the power goes: drop every unsynced write, or tear the last one as well.
CUTS = {"drop": dict(), "tear": dict(tear=True, seed=5)}
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)


@pytest.fixture
def stack(workdir):
    with stack_on_disk(workdir) as stack:
        yield stack


def write(path: str, data: bytes, offset: int = 0, sync=os.fsync) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        if sync is not None:
            sync(fd)
    finally:
        os.close(fd)


def read(path: str):
    """The bytes of a file, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def fsync_dying(fd: int) -> None:
    """An fsync whose daemon dies at the armed crash point: it must not succeed."""
    with pytest.raises(OSError) as exc:
        os.fsync(fd)
    assert exc.value.errno in DEAD_MOUNT_ERRNOS, exc.value
    with contextlib.suppress(OSError):
        os.close(fd)


def flush_dying(stack, volume: str = "main") -> None:
    """A fold of every file through the daemon's `flush` request; the daemon dies in it."""
    from cowfs import control
    vol_id = daemon_stats(stack.store, volume)["vol_id"]
    with pytest.raises(Exception):
        control.request(os.path.join(stack.store, "run"), vol_id, {"op": "flush"})


def armed(stack, point: str) -> tuple:
    """The volume mounted with `point` armed by a file; (mount, arm path)."""
    arm = os.path.join(stack.workdir, "arm")
    return stack.mount(faults=f"crash={point}@1,armed_by={arm}"), arm


# --- crash points + power cut -------------------------------------------------------------------

@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("point", LOG_POINTS)
def test_power_cut_at_each_step_of_fsync_keeps_every_fsynced_byte(stack, point, cut):
    mount, arm = armed(stack, point)
    before, during = os.urandom(300_000), os.urandom(200_000)
    os.mkdir(f"{mount.path}/dir")
    write(f"{mount.path}/dir/before", before)
    os.link(f"{mount.path}/dir/before", f"{mount.path}/link")
    fsync_dir(mount.path)                                   # the link is acknowledged too
    write(f"{mount.path}/unsynced", os.urandom(50_000), sync=None)
    fd = os.open(f"{mount.path}/during", os.O_WRONLY | os.O_CREAT, 0o644)
    open(arm, "w").close()
    os.write(fd, during)
    fsync_dying(fd)
    stack.power_cut(**CUTS[cut])
    stack.power_back()
    mount = stack.mount()
    assert read(f"{mount.path}/dir/before") == before
    assert os.stat(f"{mount.path}/link").st_nlink == 2
    assert read(f"{mount.path}/during") in (None, b"", during), "the unacknowledged fsync is all or nothing"
    assert read(f"{mount.path}/unsynced") in (None, b""), "never committed, so never bytes"
    stack.umount()
    fsck_clean(stack.store)


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("point", FOLD_POINTS)
def test_power_cut_at_each_step_of_a_fold_keeps_the_log_and_commits_all_or_nothing(stack, point, cut):
    """The fold dies, the power goes; the mount after it (no fsck first)
    replays the log: the fsynced file is there, the buffered one whole or not at all."""
    mount, arm = armed(stack, point)
    logged, buffered = os.urandom(200_000), os.urandom(100_000)
    write(f"{mount.path}/logged", logged)                   # one record, not folded
    write(f"{mount.path}/buffered", buffered, sync=None)
    open(arm, "w").close()
    flush_dying(stack)
    stack.power_cut(**CUTS[cut])
    stack.power_back(fsck=False)
    mount = stack.mount()
    assert read(f"{mount.path}/logged") == logged
    assert read(f"{mount.path}/buffered") in (b"", buffered), "a fold is all or nothing"
    stack.umount()
    fsck_clean(stack.store)


@pytest.mark.parametrize("cut", CUTS)
def test_power_cut_in_the_middle_of_a_replay_replays_again_and_never_twice(stack, cut):
    """Records in the log, the power goes; the next mount dies in its replay
    (chunks staged and synced, nothing committed) and the power goes again;
    the mount after that replays everything once (fsck counts references)."""
    mount = stack.mount()
    files = {f"f{i}": os.urandom(40_000 + i) for i in range(3)}
    for name, data in files.items():
        write(f"{mount.path}/{name}", data)
    stack.power_cut(**CUTS[cut])
    stack.power_back(fsck=False)
    with pytest.raises(AssertionError):
        stack.mount(faults="crash=replay.middle")
    stack.power_cut(**CUTS[cut])
    stack.power_back(fsck=False)
    mount = stack.mount()
    for name, data in files.items():
        assert read(f"{mount.path}/{name}") == data, name
    stack.umount()
    fsck_clean(stack.store)


@pytest.mark.parametrize("point", FOLD_POINTS)
def test_power_cut_in_the_first_flush_of_a_daemon_leaves_a_writable_volume(stack, point):
    """The first fold of a daemon allocates a pack (an LMDB commit without meta sync), creates and
    fsyncs its file, then appends: a cut in between must not make the next mount unwritable."""
    mount = stack.mount()
    before = os.urandom(100_000)
    write(f"{mount.path}/before", before)
    stack.umount()                                          # the next daemon starts a new pack
    mount, arm = armed(stack, point)
    write(f"{mount.path}/during", os.urandom(50_000), sync=None)
    open(arm, "w").close()
    flush_dying(stack)
    stack.power_cut()
    stack.power_back()
    mount = stack.mount()
    after = os.urandom(100_000)
    write(f"{mount.path}/after", after)     # was EIO: the pack id's allocation was lost, not its file
    assert read(f"{mount.path}/before") == before
    stack.umount()
    fsck_clean(stack.store)
    mount = stack.mount()
    assert read(f"{mount.path}/after") == after
    stack.umount()


def snapshot_tree(stack, snap: str) -> dict:
    """{name: bytes} of a snapshot, read through a read-only mount of it."""
    mount = stack.mount(f"main@{snap}")
    try:
        return {name: read(os.path.join(mount.path, name)) for name in os.listdir(mount.path)}
    finally:
        stack.umount(f"main@{snap}")


def snapshot_names(store: str) -> set:
    return {row["name"] for row in json.loads(cowfs("list", store, "--json").stdout)}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("point", SNAPSHOT_POINTS)
def test_power_cut_while_a_mounted_volume_takes_a_snapshot(stack, point, cut):
    mount, arm = armed(stack, point)
    first, second, other = os.urandom(120_000), os.urandom(120_000), os.urandom(30_000)
    write(f"{mount.path}/f", first, sync=None)                # acknowledged, not fsynced
    cowfs("snapshot", stack.store, "main@s0")
    write(f"{mount.path}/f", second, sync=None)
    write(f"{mount.path}/g", other, sync=None)
    open(arm, "w").close()
    assert cowfs("snapshot", stack.store, "main@s1", check=False).returncode != 0
    stack.power_cut(**CUTS[cut])
    stack.power_back()
    names = snapshot_names(stack.store)
    assert "main@s0" in names, "an acknowledged snapshot was lost"
    assert snapshot_tree(stack, "s0") == {"f": first}
    if "main@s1" in names:
        assert snapshot_tree(stack, "s1") == {"f": second, "g": other}
    mount = stack.mount()
    head = {name: read(os.path.join(mount.path, name)) for name in os.listdir(mount.path)}
    if "main@s1" in names:
        assert head == {"f": second, "g": other}, "the head is behind a durable snapshot of it"
    else:
        assert head["f"] in (first, second) and head.get("g") in (None, b"", other)
    stack.umount()
    fsck_clean(stack.store)


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("point", GC_POINTS)
def test_power_cut_after_gc_crashed_at_each_step_loses_nothing(stack, point, cut):
    mount = stack.mount()
    live = os.urandom(400_000)
    for name, data in (("dead", os.urandom(400_000)), ("live", live)):
        write(f"{mount.path}/{name}", data)
    stack.umount()                                          # folded: both files in one pack
    mount = stack.mount()
    os.unlink(f"{mount.path}/dead")
    # The daemon dies before its next environment sync, which would punch the
    # dead file's blocks out of the pack itself: gc has a half-dead pack to
    # compact. gc's own commits make the unlink durable (rule 4) first.
    stack.mounts.pop("main").kill9()
    result = cowfs("gc", stack.store, check=False, env={**os.environ, "COWFS_FAULTS": f"crash={point}"})
    assert result.returncode == faults.CRASH_EXIT_STATUS, result.stdout + result.stderr
    stack.power_cut(**CUTS[cut])
    stack.power_back()
    fsck_verify_data(stack.store)
    mount = stack.mount()
    assert read(f"{mount.path}/live") == live
    stack.umount()
    cowfs("gc", stack.store)                                # a later gc finishes the job
    fsck_verify_data(stack.store)
    mount = stack.mount()
    assert read(f"{mount.path}/live") == live
    stack.umount()


# --- the power goes while the daemon works ------------------------------------------------------

STREAM_CUTS = [dict(), dict(tear=True, seed=21), dict(tear=True, keep="random", seed=22)]


def test_power_cuts_during_a_stream_of_fdatasyncs_keep_every_acknowledged_record(stack):
    """A WAL-like writer: record n, fdatasync, 'acked n'; the power goes while the daemon
    writes its intent log, or commits a fold (its LMDB file has writes pending), three
    times, each cut of another kind."""
    acked = -1
    for round_no, cut in enumerate(STREAM_CUTS):
        mount = stack.mount()
        path = f"{mount.path}/records"
        writer = Writer("records", path, str(acked + 1))
        try:
            writer.wait_acked(acked + 20)
            wait_pending(stack.disk, ("store/logs/vol-1.log", "store/meta/data.mdb")[round_no % 2])
            stack.power_cut(writers=[writer.pid], **cut)
        finally:
            writer.close()
        stack.power_back()
        mount = stack.mount()
        present = records_present(read(path))
        assert present > writer.acked, f"record {writer.acked} was acknowledged, {present} records are there"
        acked = present - 1
        stack.umount()
    fsck_clean(stack.store)


BALANCES_SQL = """SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),
                 (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(delta) FROM pgbench_history)"""


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_keeps_every_acknowledged_commit_through_power_cuts(stack, pg14_bin):
    """A ledger of numbered commits beside pgbench; the power goes three times while the
    daemon commits. After each: fsck clean, crash recovery, every acknowledged row there,
    pgbench's balances agree; pg_amcheck at the end."""
    from cowfs.pg import PgServer, free_port
    from test_crash import Client, Ledger, kill_server_tree, wait_reaped
    mount = stack.mount()
    pg = PgServer(pg14_bin, os.path.join(mount.path, "pgdata"))
    port, socket_dir = free_port(), os.path.join(stack.workdir, "pgrun")
    pg.initdb(data_checksums=True)
    pg.start(port, socket_dir)
    postmaster = pg.postmaster_pid()
    try:
        pg.pgbench_init(1)
        pg.psql("CREATE TABLE ledger (n bigint PRIMARY KEY)")
        acked, first = set(), 1
        for cut in STREAM_CUTS:
            ledger = Ledger(pg, first, os.path.join(stack.workdir, "ledger.err"))
            bench = Client(pg, "pgbench", "-n", "-c", "2", "-T", "600", "postgres")
            try:
                ledger.wait_acked(100)
                wait_pending(stack.disk, "store/meta/data.mdb")
                stack.power_cut(**cut)
            finally:
                kill_server_tree(postmaster)          # its mount died under it
                wait_reaped(postmaster)
                postmaster = None
                bench.kill()
                ledger.finish()
            acked |= set(ledger.acked)
            first = ledger.sent + 1
            stack.power_back()
            stack.mount()
            pg.start(port, socket_dir)                # crash recovery
            postmaster = pg.postmaster_pid()
            present = {int(n) for n in pg.psql("SELECT n FROM ledger").split()}
            missing = sorted(acked - present)
            assert not missing, f"{len(missing)} acknowledged rows lost, first {missing[:10]}"
            sums = pg.psql(BALANCES_SQL).split("|")
            assert len({int(x or 0) for x in sums}) == 1, f"pgbench balances disagree: {sums}"
        pg.amcheck()
        pg.stop("fast")
        postmaster = None
    finally:
        if postmaster is not None:
            kill_server_tree(postmaster)
    stack.umount()
    fsck_clean(stack.store)


# --- a random sequence against the model -------------------------------------------------------

NAMES = [f"f{i}" for i in range(6)]
MAX_OFFSET = 48 * 1024
MAX_WRITE = 20 * 1024
MAX_CLONES = 2


class Sequence:
    """One seeded run: operations on the volume `main` of `stack`, the model alongside."""

    def __init__(self, stack, seed: int):
        self.stack, self.rng, self.model = stack, random.Random(seed), Model()
        self.mount = stack.mount()
        self.snapshots = 0
        self.unchecked: list = []                 # snapshots not yet read back after a cut
        self.log: list = []

    def path(self, name: str) -> str:
        return os.path.join(self.mount.path, name)

    def step(self) -> None:
        ops = [(self.op_write, 35), (self.op_fsync, 15), (self.op_truncate, 7), (self.op_rename, 7),
               (self.op_unlink, 5), (self.op_fsyncdir, 3), (self.op_snapshot, 5), (self.op_clone, 2),
               (self.op_gc, 3), (self.op_cut, 4)]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        op()

    def existing(self):
        return self.rng.choice(sorted(self.model.files)) if self.model.files else None

    def op_write(self) -> None:
        name, offset = self.rng.choice(NAMES), self.rng.randrange(MAX_OFFSET)
        data = self.rng.randbytes(self.rng.randrange(1, MAX_WRITE))
        self.log.append(f"write {name} {offset}+{len(data)}")
        write(self.path(name), data, offset, sync=None)
        self.model.write(name, offset, data)

    def op_fsync(self) -> None:
        name = self.existing()
        if name is None:
            return
        self.log.append(f"fsync {name}")
        fd = os.open(self.path(name), os.O_WRONLY)
        try:
            (os.fsync if self.rng.random() < 0.5 else os.fdatasync)(fd)
        finally:
            os.close(fd)
        self.model.fsync(name)

    def op_truncate(self) -> None:
        name = self.existing()
        if name is None:
            return
        size = self.rng.randrange(MAX_OFFSET)
        self.log.append(f"truncate {name} {size}")
        os.truncate(self.path(name), size)
        self.model.truncate(name, size)

    def op_rename(self) -> None:
        old, new = self.existing(), self.rng.choice(NAMES)
        if old is None or old == new:
            return
        self.log.append(f"rename {old} {new}")
        os.rename(self.path(old), self.path(new))
        self.model.rename(old, new)

    def op_unlink(self) -> None:
        name = self.existing()
        if name is None:
            return
        self.log.append(f"unlink {name}")
        os.unlink(self.path(name))
        self.model.unlink(name)

    def op_fsyncdir(self) -> None:
        self.log.append("fsyncdir")
        fsync_dir(self.mount.path)
        self.model.fsyncdir()

    def op_snapshot(self) -> None:
        snap = f"s{self.snapshots}"
        self.snapshots += 1
        self.log.append(f"snapshot {snap}")
        cowfs("snapshot", self.stack.store, f"main@{snap}")
        self.model.snapshot(snap)
        self.unchecked.append(snap)

    def op_clone(self) -> None:
        if not self.model.snapshots or len(self.model.clones) >= MAX_CLONES:
            return
        snap, clone = self.rng.choice(sorted(self.model.snapshots)), f"clone{len(self.model.clones)}"
        self.log.append(f"clone {snap} {clone}")
        cowfs("clone", self.stack.store, f"main@{snap}", clone)
        self.model.clones[clone] = snap
        self.unchecked.append(clone)

    def op_gc(self) -> None:
        self.log.append("gc")
        cowfs("gc", self.stack.store)

    def op_cut(self) -> None:
        cut = dict(tear=self.rng.random() < 0.5, keep="random" if self.rng.random() < 0.3 else None,
                   seed=self.rng.randrange(1 << 30))
        self.log.append(f"cut {cut}")
        self.stack.power_cut(**cut)
        self.stack.power_back()                   # fsck clean
        self.mount = self.stack.mount()
        found = {name: read(self.path(name)) for name in os.listdir(self.mount.path)}
        self.model.recover(found)
        self.check_points(self.unchecked + self.older_point())
        self.unchecked = []

    def older_point(self) -> list:
        """One earlier snapshot or clone, read back again after this cut."""
        points = sorted(self.model.snapshots) + sorted(self.model.clones)
        return [self.rng.choice(points)] if points else []

    def check_points(self, points: list) -> None:
        for point in points:
            if point in self.model.clones:
                expected, volume = self.model.snapshots[self.model.clones[point]], point
            else:
                expected, volume = self.model.snapshots[point], f"main@{point}"
            mount = self.stack.mount(volume)
            try:
                got = {name: read(os.path.join(mount.path, name)) for name in os.listdir(mount.path)}
            finally:
                self.stack.umount(volume)
            assert got == expected, f"{volume} does not hold what the head held when it was taken"

    def finish(self) -> None:
        self.op_cut()
        self.check_points(sorted(self.model.snapshots) + sorted(self.model.clones))
        self.stack.umount()
        fsck_clean(self.stack.store)


def run_sequence(workdir: str, seed: int, steps: int) -> None:
    with stack_on_disk(workdir) as stack:
        sequence = Sequence(stack, seed)
        try:
            for _ in range(steps):
                sequence.step()
            sequence.finish()
        except BaseException as exc:
            exc.add_note(f"seed {seed}; last operations: {sequence.log[-25:]}")
            raise


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_and_power_cuts_agree_with_the_model(workdir, seed):
    run_sequence(workdir, seed, steps=100)


@pytest.mark.slow
@pytest.mark.skipif("COWFS_POWERCUT_SEEDS" not in os.environ,
                    reason="long variant, on request: COWFS_POWERCUT_SEEDS=100-109 [COWFS_POWERCUT_STEPS=300]")
def test_random_operations_and_power_cuts_agree_with_the_model_long(workdir):
    lo, _, hi = os.environ["COWFS_POWERCUT_SEEDS"].partition("-")
    steps = int(os.environ.get("COWFS_POWERCUT_STEPS", "300"))
    for seed in range(int(lo), int(hi or lo) + 1):
        os.makedirs(os.path.join(workdir, f"seed-{seed}"))
        run_sequence(os.path.join(workdir, f"seed-{seed}"), seed, steps)
