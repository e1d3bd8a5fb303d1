"""Self-tests of the power-cut disk (tests/powercut.py): it loses exactly what it should.

Each test writes through a real FUSE mount of `PowerCutDisk`, cuts the power,
mounts a fresh instance on the same backing directory and looks at what is
left. The last tests put real users on it: an LMDB environment written by
another process through repeated cuts, and a cowfs store with a cowfs mount
on top.
"""

import errno
import fcntl
import mmap
import os
import random
import subprocess
import sys

import pytest

from cowfs.packs import fsync_dir
from helpers import fsck_clean
from powercut import SECTOR_BYTES, PowerCutDisk, is_mounted
from powercut_cowfs import Stack
from powercut_workers import Writer, lmdb_check, wait_pending


@pytest.fixture
def disk(workdir):
    with PowerCutDisk(workdir) as disk:
        yield disk


def write_file(path: str, data: bytes, offset: int = 0, sync=None, create: bool = True) -> None:
    """pwrite `data` (one write(2)); `sync` is None, os.fsync or os.fdatasync."""
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        if sync is not None:
            sync(fd)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def cut_and_remount(disk: PowerCutDisk, **options) -> dict:
    report = disk.cut(**options)
    disk.remount()
    return report


# --- data -------------------------------------------------------------------------------------

def test_fsynced_bytes_survive_and_unsynced_writes_and_truncates_do_not(disk):
    old, new = os.urandom(20_000), os.urandom(5_000)
    write_file(f"{disk.path}/synced", old, sync=os.fsync)
    write_file(f"{disk.path}/datasynced", old, sync=os.fdatasync)
    write_file(f"{disk.path}/synced", new, offset=1_000, create=False)       # pending
    os.truncate(f"{disk.path}/datasynced", 3)                                # pending
    write_file(f"{disk.path}/grown", old, sync=os.fsync)
    write_file(f"{disk.path}/grown", new, offset=20_000, create=False)       # pending append
    expected_now = old[:1_000] + new + old[6_000:]
    assert read_file(f"{disk.path}/synced") == expected_now, "reads must see pending writes"
    assert read_file(f"{disk.path}/datasynced") == old[:3]
    assert os.stat(f"{disk.path}/grown").st_size == 25_000
    report = cut_and_remount(disk)
    # The kernel may split a write(2) at page boundaries: one pending op per request.
    assert report["pending_ops"] >= 3 and report["kept"] == [] and report["torn"] is None
    assert read_file(f"{disk.path}/synced") == old
    assert read_file(f"{disk.path}/datasynced") == old
    assert read_file(f"{disk.path}/grown") == old


def test_an_fsync_makes_only_its_own_file_durable(disk):
    a, b = os.urandom(9_000), os.urandom(9_000)
    for name in ("a", "b"):
        write_file(f"{disk.path}/{name}", b"", sync=os.fsync)
    write_file(f"{disk.path}/a", a, create=False)
    write_file(f"{disk.path}/b", b, create=False, sync=os.fsync)
    cut_and_remount(disk)
    assert read_file(f"{disk.path}/a") == b""
    assert read_file(f"{disk.path}/b") == b


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_torn_last_write_leaves_a_prefix_of_whole_sectors(disk, seed):
    old = bytes(range(256)) * 256                                  # 64 KiB, synced
    new = os.urandom(40_000)
    offset = 1_000                                                 # not sector aligned
    write_file(f"{disk.path}/f", old, sync=os.fsync)
    write_file(f"{disk.path}/f", os.urandom(3_000), offset=50_000, create=False)   # earlier, dropped
    write_file(f"{disk.path}/f", new, offset=offset, create=False)                 # the last write
    report = cut_and_remount(disk, tear=True, seed=seed)
    torn = report["torn"]
    assert (torn["path"], torn["offset"], torn["length"]) == ("f", offset, len(new))
    applied = torn["applied_bytes"]
    assert 0 < applied < len(new) and (offset + applied) % SECTOR_BYTES == 0, torn
    assert read_file(f"{disk.path}/f") == old[:offset] + new[:applied] + old[offset + applied:]


def test_keep_random_persists_a_seeded_subset_of_whole_writes(disk):
    block = 4096
    old = bytes(16 * block)
    write_file(f"{disk.path}/f", old, sync=os.fsync)
    news = [os.urandom(block) for _ in range(16)]
    for i, data in enumerate(news):
        write_file(f"{disk.path}/f", data, offset=i * block, create=False)
    report = cut_and_remount(disk, keep="random", seed=7)
    kept = {op["offset"] // block for op in report["kept"]}
    rng = random.Random(7)                     # each pending write kept with probability 1/2
    assert kept == {i for i in range(16) if rng.random() < 0.5}
    assert 0 < len(kept) < 16, "seed 7 keeps some writes and drops others"
    got = read_file(f"{disk.path}/f")
    for i in range(16):
        assert got[i * block:(i + 1) * block] == (news[i] if i in kept else old[:block]), i


# --- names ------------------------------------------------------------------------------------

def test_new_names_vanish_unless_the_file_or_its_directory_was_fsynced(disk):
    p = disk.path
    os.mkdir(f"{p}/dir")
    fsync_dir(p)                                         # dir is durable from here on
    write_file(f"{p}/unsynced", b"x")                    # vanishes
    write_file(f"{p}/own-fsync", b"y", sync=os.fsync)    # stays: its own fsync
    write_file(f"{p}/dir/in-dir", b"z")                  # stays, empty: its directory is
    fsync_dir(f"{p}/dir")                                # fsynced, its data is not
    os.symlink("target", f"{p}/dir/link")                # created after that fsync: vanishes
    os.mkdir(f"{p}/newdir")                              # never made durable: vanishes with
    write_file(f"{p}/newdir/f", b"w", sync=os.fsync)     # a file fsynced inside it
    report = cut_and_remount(disk)
    assert sorted(os.listdir(p)) == ["dir", "own-fsync"]
    assert sorted(os.listdir(f"{p}/dir")) == ["in-dir"]
    assert read_file(f"{p}/own-fsync") == b"y"
    assert read_file(f"{p}/dir/in-dir") == b"", "the name was durable, its data was not"
    assert sorted(report["vanished"]) == ["dir/link", "newdir", "unsynced"]


def test_a_rename_over_an_old_file_is_undone_when_the_new_file_was_never_durable(disk):
    p = disk.path
    write_file(f"{p}/config", b"old", sync=os.fsync)
    write_file(f"{p}/config.tmp", b"new")
    os.rename(f"{p}/config.tmp", f"{p}/config")          # no fsync anywhere
    write_file(f"{p}/other", b"old", sync=os.fsync)
    write_file(f"{p}/other.tmp", b"new", sync=os.fsync)  # the new file is durable ...
    os.rename(f"{p}/other.tmp", f"{p}/other")            # ... so the rename is kept
    report = cut_and_remount(disk)
    assert report["restored"] == ["config"]
    assert sorted(os.listdir(p)) == ["config", "other"]
    assert read_file(f"{p}/config") == b"old"
    assert read_file(f"{p}/other") == b"new"


def test_unlink_and_rename_of_durable_files_are_durable_at_once(disk):
    p = disk.path
    for name in ("a", "b"):
        write_file(f"{p}/{name}", name.encode(), sync=os.fsync)
    os.unlink(f"{p}/a")
    os.rename(f"{p}/b", f"{p}/c")
    cut_and_remount(disk)
    assert os.listdir(p) == ["c"] and read_file(f"{p}/c") == b"b"


# --- what LMDB and cowfs need -----------------------------------------------------------------

def test_flushes_are_counted_per_path_and_an_o_dsync_write_is_one_and_durable(disk):
    p = disk.path
    os.mkdir(f"{p}/d")
    write_file(f"{p}/d/f", b"1", sync=os.fsync)
    write_file(f"{p}/d/f", b"2", sync=os.fdatasync)
    fsync_dir(f"{p}/d")
    fd = os.open(f"{p}/dsync", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    try:
        os.write(fd, b"written with O_DSYNC")
    finally:
        os.close(fd)
    fsync_dir(p)
    counts = disk.flush_counts(reset=True)
    assert counts["paths"] == {"d/f": {"fsync": 1, "fdatasync": 1}, "d": {"fsyncdir": 1},
                               "dsync": {"fdatasync": 1}, ".": {"fsyncdir": 1}}
    assert (counts["total"], counts["fsync"], counts["fdatasync"], counts["fsyncdir"]) == (5, 1, 2, 2)
    assert disk.flush_counts()["total"] == 0, "reset"
    cut_and_remount(disk)
    assert read_file(f"{p}/dsync") == b"written with O_DSYNC"


LOCK_PROBE = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
try:
    if sys.argv[2] == "flock":
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
except BlockingIOError:
    sys.exit(11)
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks_held_by_one_process_stop_another(disk, kind):
    """The server implements no lock requests, so the kernel keeps the locks (as LMDB and cowfs need)."""
    path = f"{disk.path}/lock"
    write_file(path, b"\0", sync=os.fsync)
    probe = lambda: subprocess.run([sys.executable, "-c", LOCK_PROBE, path, kind]).returncode  # noqa: E731
    assert probe() == 0, "nobody holds the lock yet"
    with open(path, "r+b") as f:
        if kind == "flock":
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            fcntl.lockf(f, fcntl.LOCK_EX, 1, 0)
        assert probe() == 11, "a second process got a lock the first one holds"
    assert probe() == 0


def test_statvfs_exclusive_create_and_shared_mmaps_pass_through(disk):
    st, backing = os.statvfs(disk.path), os.statvfs(disk.backing)
    assert (st.f_bsize, st.f_blocks) == (backing.f_bsize, backing.f_blocks)
    path = f"{disk.path}/m"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with pytest.raises(FileExistsError):
            os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.pwrite(fd, bytes(8192), 0)
        shared = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        reader = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            shared[0:5] = b"mmap!"                     # like LMDB's lock.mdb
            assert reader[0:5] == b"mmap!"
            os.pwrite(fd, b"pwrite", 4096)             # like LMDB's data.mdb: read through the map
            assert reader[4096:4102] == b"pwrite"
            shared.flush()                             # msync: the kernel writes the page to us
        finally:
            shared.close()
            reader.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    cut_and_remount(disk)
    got = read_file(path)
    assert got[0:5] == b"mmap!" and got[4096:4102] == b"pwrite"


@pytest.mark.parametrize("metasync", [True, False], ids=["metasync", "nometasync+env.sync"])
def test_lmdb_keeps_every_acknowledged_commit_and_never_half_of_one_through_cuts(disk, metasync):
    env_dir = os.path.join(disk.path, "env")
    os.mkdir(env_dir)
    fsync_dir(disk.path)
    last = -1
    cuts = [dict(), dict(tear=True, seed=11), dict(tear=True, keep="random", seed=12),
            dict(keep="random", seed=13)]
    for i, cut in enumerate(cuts):
        writer = Writer("lmdb", env_dir, str(last + 1), *([] if metasync else ["--nometasync"]))
        try:
            writer.wait_acked(last + 15 + 3 * i)
            wait_pending(disk, "env/data.mdb")           # the cut lands inside a commit
            disk.cut(kill=[writer.pid], **cut)
        finally:
            writer.close()
        disk.remount()
        last = lmdb_check(env_dir)
        assert last >= writer.acked, f"commit {writer.acked} was acknowledged, the environment ends at {last}"


# --- cowfs on the disk ------------------------------------------------------------------------

# Device flushes of one fsync of an 8 KiB overwrite of an existing file: one
# record in the volume's intent log, one fdatasync of it (before the log: a
# pack fdatasync, the LMDB commit's data pages and the environment sync).
FLUSHES_PER_FSYNC = {"logs/vol-1.log": {"fdatasync": 1}}


def counts_by_store_part(counts: dict) -> dict:
    """{'packs': {...}, 'meta/data.mdb': {...}} from per-path counts under store/."""
    out = {}
    for path, kinds in counts["paths"].items():
        part = "packs" if path.startswith("store/packs") else path.removeprefix("store/")
        for kind, n in kinds.items():
            out.setdefault(part, {}).setdefault(kind, 0)
            out[part][kind] += n
    return out


def test_cowfs_runs_on_the_disk_and_one_fsync_costs_the_known_flushes(disk, workdir):
    stack = Stack(disk, workdir).init()
    try:
        mount = stack.mount()                       # no periodic commit: only the fsync commits
        data = os.urandom(100_000)
        write_file(f"{mount.path}/f", data, sync=os.fsync)             # creates the first pack
        page = os.urandom(8192)
        disk.flush_counts(reset=True)
        write_file(f"{mount.path}/f", page, offset=16384, create=False, sync=os.fsync)
        assert counts_by_store_part(disk.flush_counts()) == FLUSHES_PER_FSYNC
        stack.umount()
        fsck_clean(stack.store)
        mount = stack.mount()
        assert read_file(f"{mount.path}/f") == data[:16384] + page + data[24576:]
        stack.umount()
    finally:
        stack.close()
    fsck_clean(stack.store)


def test_teardown_detaches_the_mount_and_stops_the_server_after_a_failure(workdir):
    with pytest.raises(RuntimeError, match="test body failed"):
        with PowerCutDisk(workdir) as disk:
            pid = disk.pid
            write_file(f"{disk.path}/f", b"x")
            raise RuntimeError("test body failed")
    assert not is_mounted(disk.path)
    with pytest.raises(OSError) as exc:
        os.kill(pid, 0)
    assert exc.value.errno == errno.ESRCH, "the server process is still there"
