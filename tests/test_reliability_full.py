"""Full disk: the store on a small ext4 filesystem (a loop-mounted image).

What a user does when a store fills must work in the same mount: deleting
the file that filled it (unlink, truncate, rename over it, DROP TABLE)
succeeds, the space comes back by itself (freed chunks are punched out of
their packs once the freeing commit is durable; the daemon also runs gc),
new writes then succeed and survive a remount byte for byte. Nothing
committed is lost on the way, gc works on a full store, and `cowfs df`
names the snapshots that hold deleted data. The levels of free space
(reserve, grace) are described in `cowfs/space.py`.
"""

import errno
import json
import os
import subprocess
import time

import pytest

from cowfs import space
from helpers import Mount, cowfs, daemon_stats, fsck_clean

pytestmark = pytest.mark.slow

MIB = 1 << 20
IMAGE_BYTES = 300 * MIB
KEEP_BYTES = 20 * MIB
FILL_BYTES = 400 * MIB            # more than the image: the fill must hit ENOSPC
WAIT_S = 60                       # upper bound for space to come back; never a timing assertion


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def disk(workdir):
    """A 300 MiB ext4 filesystem; unmounted and its loop device detached, also on failure."""
    image = os.path.join(workdir, "disk.img")
    mountpoint = os.path.join(workdir, "disk")
    os.mkdir(mountpoint)
    _run("truncate", "-s", str(IMAGE_BYTES), image)
    assert _run("mkfs.ext4", "-q", "-F", image).returncode == 0
    result = _run("mount", "-o", "loop", image, mountpoint)
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint
    finally:
        if _run("umount", mountpoint).returncode != 0:
            _run("umount", "-l", mountpoint)
        for line in _run("losetup", "-j", image).stdout.splitlines():
            _run("losetup", "-d", line.split(":", 1)[0])


@pytest.fixture
def full_store(disk, workdir):
    """A store on `disk` with `keep` fsynced and `fill` written until ENOSPC (as
    `dd conv=fsync` does); yields (store, mount, keep bytes)."""
    store = os.path.join(disk, "store")
    cowfs("init", store)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    keep = os.urandom(KEEP_BYTES)
    try:
        write_file(f"{mount.path}/keep", keep)
        assert fill_until_enospc(f"{mount.path}/fill") > 0
        yield store, mount, keep
    finally:
        mount.close()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fill_until_enospc(path: str, total_bytes: int = FILL_BYTES) -> int:
    """Write `total_bytes` in 1 MiB steps, then fsync; ENOSPC must come (at a
    write or at the fsync). Returns the bytes written before it."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < total_bytes:
            os.write(fd, os.urandom(MIB))
            written += MIB
        os.fsync(fd)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
        return written
    finally:
        os.close(fd)
    raise AssertionError(f"wrote and fsynced {written} bytes on a {IMAGE_BYTES}-byte disk")


def free_bytes(disk: str) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def wait_for_free(disk: str, at_least: int) -> int:
    """Wait until the filesystem has `at_least` bytes free; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while free_bytes(disk) < at_least:
        assert time.monotonic() < deadline, (f"only {free_bytes(disk)} bytes free after {WAIT_S} s; "
                                             f"expected {at_least}")
        time.sleep(0.2)
    return free_bytes(disk)


def ordinary_space_back(disk: str) -> int:
    """Free bytes at which ordinary writes of 20 MiB fit again (above reserve and grace)."""
    st = os.statvfs(disk)
    return space.reserve_bytes(st) + space.grace_bytes(st) + KEEP_BYTES + 8 * MIB


# --- deleting on a full store ------------------------------------------------------------------

def test_rm_of_the_file_that_filled_the_store_frees_its_space_in_the_same_mount(full_store, disk):
    """The issue's sequence: keep, fill until ENOSPC, rm fill, write again, unmount (exit 0)."""
    store, mount, keep = full_store
    os.unlink(f"{mount.path}/fill")                 # the first thing anyone does; it must work
    assert daemon_stats(store)["dirty_bytes"] == 0, "the buffers of the deleted file were kept"
    wait_for_free(disk, ordinary_space_back(disk))  # no remount, no gc run by hand
    new = os.urandom(KEEP_BYTES)
    write_file(f"{mount.path}/new", new)
    mount.umount()                                  # exit 0: every buffered write saved
    fsck_clean(store)
    mount.mount()
    assert read_file(f"{mount.path}/keep") == keep
    assert read_file(f"{mount.path}/new") == new
    assert not os.path.exists(f"{mount.path}/fill")


def test_truncate_and_rename_over_the_full_file_free_space(full_store, disk, workdir):
    store, mount, keep = full_store
    os.truncate(f"{mount.path}/fill", 0)            # DROP TABLE / TRUNCATE do this
    assert os.path.getsize(f"{mount.path}/fill") == 0
    wait_for_free(disk, ordinary_space_back(disk))
    small = os.urandom(100_000)
    write_file(f"{mount.path}/small", small)
    assert fill_until_enospc(f"{mount.path}/fill2") > 0
    os.rename(f"{mount.path}/small", f"{mount.path}/fill2")     # rename over the big file
    wait_for_free(disk, ordinary_space_back(disk))
    again = os.urandom(KEEP_BYTES)
    write_file(f"{mount.path}/again", again)
    with open(f"{mount.path}/fill", "r+b") as f:    # ftruncate down to a cut inside a chunk
        f.write(b"x" * 30_000)
        f.truncate(12_345)
        os.fsync(f.fileno())
    mount.umount()
    fsck_clean(store)
    mount.mount()
    assert read_file(f"{mount.path}/keep") == keep
    assert read_file(f"{mount.path}/fill2") == small
    assert read_file(f"{mount.path}/again") == again
    assert read_file(f"{mount.path}/fill") == b"x" * 12_345


def test_gc_on_a_full_store_never_fails_with_a_traceback_and_frees_what_is_dead(full_store, disk):
    store, mount, keep = full_store
    result = cowfs("gc", store, check=False)        # 100 % full of live data
    assert result.returncode in (0, 7), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 1
    if result.returncode == 7:
        assert "delete files or destroy snapshots" in result.stderr
    fsck_clean(store)
    os.unlink(f"{mount.path}/fill")
    result = cowfs("gc", store)                     # dead packs and ranges go without new space
    assert "Traceback" not in result.stderr
    wait_for_free(disk, ordinary_space_back(disk))
    fsck_clean(store)
    assert read_file(f"{mount.path}/keep") == keep


def test_a_file_open_when_the_store_filled_fails_its_fsyncs_until_space_is_back(disk, workdir):
    """The grace is for the writes buffered when the store filled and for a
    crash recovery. A writer that keeps writing through the handles it had
    open (PostgreSQL's WAL file) gets ENOSPC at every fsync instead of using
    the grace up; a file opened afterwards (the restarted server's) may use
    it; once deleting has brought space back, the old handle works again."""
    store = os.path.join(disk, "store")
    cowfs("init", store)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        wal = os.open(f"{mount.path}/wal", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(wal, b"a" * 8192, 0)
            os.fsync(wal)
            assert fill_until_enospc(f"{mount.path}/fill") > 0       # the grace opens
            os.pwrite(wal, b"b" * 8192, 0)
            with pytest.raises(OSError) as refused:
                os.fsync(wal)
            assert refused.value.errno == errno.ENOSPC
            write_file(f"{mount.path}/recovery", b"r" * 8192)       # opened after: the grace
            again = os.open(f"{mount.path}/wal", os.O_WRONLY)
            try:
                os.pwrite(again, b"c" * 8192, 0)
                os.fsync(again)
            finally:
                os.close(again)
            os.unlink(f"{mount.path}/fill")
            st = os.statvfs(disk)
            wait_for_free(disk, space.reserve_bytes(st) + 2 * space.grace_bytes(st) + MIB)
            os.pwrite(wal, b"d" * 8192, 0)
            os.fsync(wal)                                             # space is back
        finally:
            os.close(wal)
        mount.umount()
        fsck_clean(store)
        mount.mount()
        assert read_file(f"{mount.path}/wal") == b"d" * 8192
        assert read_file(f"{mount.path}/recovery") == b"r" * 8192
    finally:
        mount.close()
    fsck_clean(store)


def test_a_snapshot_holding_the_deleted_data_is_named_by_df_and_destroying_it_frees_the_space(
        disk, workdir):
    store = os.path.join(disk, "store")
    cowfs("init", store)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        big = 120 * MIB
        with open(f"{mount.path}/big", "wb") as f:
            for _ in range(big // MIB):
                f.write(os.urandom(MIB))
            os.fsync(f.fileno())
        cowfs("snapshot", store, "main@before-cleanup")
        before = free_bytes(disk)
        os.unlink(f"{mount.path}/big")
        time.sleep(6)                               # a commit interval: nothing may come back
        assert free_bytes(disk) < before + 8 * MIB, "the snapshot's data was freed"
        report = json.loads(cowfs("df", store, "--json").stdout)
        assert report["snapshot_held_bytes"] >= big
        frees = {item["name"]: item["frees_bytes"] for item in report["items"]}
        assert frees["main@before-cleanup"] >= big
        text = cowfs("df", store).stdout
        assert "main@before-cleanup" in text.split("held only by snapshots", 1)[1].splitlines()[0]
        assert fill_until_enospc(f"{mount.path}/fill") > 0
        os.unlink(f"{mount.path}/fill")
        cowfs("destroy", store, "main@before-cleanup")      # the space comes back at once
        wait_for_free(disk, ordinary_space_back(disk) + big // 2)
        after = os.urandom(KEEP_BYTES)
        write_file(f"{mount.path}/after", after)
        mount.umount()
        fsck_clean(store)
        mount.mount()
        assert read_file(f"{mount.path}/after") == after
    finally:
        mount.close()
    fsck_clean(store)


# --- PostgreSQL on a full disk -------------------------------------------------------------------

PG_IMAGE_BYTES = 400 * MIB
# A DBA sizes WAL to the disk; with the default 1 GB the whole fill would be
# redone at the restart.
PG_SETTINGS = dict(max_wal_size="48MB", min_wal_size="32MB", checkpoint_timeout="30s")
FILL_SQL = ("INSERT INTO filler SELECT (SELECT string_agg(md5(random()::text || g::text || s::text), '') "
            "FROM generate_series(1, 250) s) FROM generate_series(1, 1000) g")


def _fill_until_postgres_fails(pg) -> None:
    from cowfs.pg import PgError
    for _ in range(PG_IMAGE_BYTES // (8 * MIB) + 10):
        try:
            pg.psql(FILL_SQL)
        except PgError:
            return
    raise AssertionError("PostgreSQL filled the store without an error")


def _serving(pg) -> bool:
    """After the PANIC the postmaster restarts by itself (crash recovery in the
    grace); if it gave up, the DBA starts it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            pg.psql("SELECT 1")
            return True
        except Exception:
            if not pg.is_running():
                pg.start(pg.port, pg.socket_dir, settings=PG_SETTINGS)
            time.sleep(0.5)
    return False


@pytest.mark.postgres
def test_postgres_fills_the_store_then_drop_table_gives_the_space_back(workdir, pg14_bin):
    """PostgreSQL fills the store (PANIC), restarts, DROP TABLE frees the space
    and writes work; then the same with a snapshot holding the table: df
    names it and destroying it frees the space. Every acknowledged ledger
    row and the other table survive."""
    from cowfs.pg import PgServer, free_port
    from test_crash import Ledger
    image, disk_dir = os.path.join(workdir, "pgdisk.img"), os.path.join(workdir, "pgdisk")
    os.mkdir(disk_dir)
    _run("truncate", "-s", str(PG_IMAGE_BYTES), image)
    assert _run("mkfs.ext4", "-q", "-F", image).returncode == 0
    assert _run("mount", "-o", "loop", image, disk_dir).returncode == 0
    store = os.path.join(disk_dir, "store")
    mount = Mount(store, os.path.join(workdir, "mnt"))
    pg, ledgers = None, []
    try:
        cowfs("init", store)
        mount.mount()
        pg = PgServer(pg14_bin, os.path.join(mount.path, "pgdata"))
        pg.initdb(data_checksums=True)
        pg.start(free_port(), os.path.join(workdir, "pgrun"), settings=PG_SETTINGS)
        pg.psql("CREATE TABLE ledger (n bigint PRIMARY KEY); "
                "CREATE TABLE keep AS SELECT g AS n, md5(g::text) AS t FROM generate_series(1, 50000) g")
        keep_sum = pg.psql("SELECT md5(string_agg(t, '' ORDER BY n)) FROM keep")
        acked = set()
        for round_no, snapshot in enumerate((None, "main@full")):
            pg.psql("CREATE TABLE filler (t text); ALTER TABLE filler ALTER t SET STORAGE EXTERNAL")
            ledger = Ledger(pg, 1 + round_no * 1_000_000, os.path.join(workdir, "ledger.err"))
            ledgers.append(ledger)
            ledger.wait_acked(20)
            _fill_until_postgres_fails(pg)
            ledger.finish()
            acked |= set(ledger.acked)
            with open(pg.log_path) as f:
                assert "No space left on device" in f.read()
            assert _serving(pg), "PostgreSQL did not come back on the full store"
            if snapshot:
                cowfs("snapshot", store, snapshot)
            pg.psql("DROP TABLE filler; CHECKPOINT")
            if snapshot:
                time.sleep(6)
                report = json.loads(cowfs("df", store, "--json").stdout)
                frees = {item["name"]: item["frees_bytes"] for item in report["items"]}
                assert frees[snapshot] >= 64 * MIB, frees
                assert report["snapshot_held_bytes"] >= 64 * MIB
                cowfs("destroy", store, snapshot)
            st = os.statvfs(disk_dir)
            wait_for_free(disk_dir, space.reserve_bytes(st) + space.grace_bytes(st) + 64 * MIB)
            pg.psql(f"INSERT INTO ledger VALUES ({-1 - round_no}); "
                    "CREATE TABLE after_full AS SELECT g FROM generate_series(1, 100000) g; "
                    "DROP TABLE after_full; CHECKPOINT")
            present = {int(n) for n in pg.psql("SELECT n FROM ledger WHERE n > 0").split()}
            missing = sorted(acked - present)
            assert not missing, f"{len(missing)} acknowledged rows lost, first {missing[:10]}"
            assert pg.psql("SELECT md5(string_agg(t, '' ORDER BY n)) FROM keep") == keep_sum
        pg.amcheck()
        pg.stop("fast")
        pg = None
        mount.umount()
        fsck_clean(store)
    finally:
        for ledger in ledgers:
            ledger.finish()
        if pg is not None:
            pid = pg.postmaster_pid()
            if pid is not None:
                from test_crash import kill_server_tree
                kill_server_tree(pid)
        mount.close()
        if _run("umount", disk_dir).returncode != 0:
            _run("umount", "-l", disk_dir)
        for line in _run("losetup", "-j", image).stdout.splitlines():
            _run("losetup", "-d", line.split(":", 1)[0])


def test_lmdb_commit_refused_by_a_full_filesystem_counts_as_full_disk_not_io_error(workdir):
    """LMDB reports its short page write as EIO; the free space tells a full disk apart.

    A full disk keeps the volume usable (the commit is retried once space is
    back); any other LMDB commit failure stops it (rule 3).
    """
    import lmdb
    from cowfs.commit import is_full_disk
    tiny = os.path.join(workdir, "tiny")
    os.mkdir(tiny)
    assert _run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", tiny).returncode == 0
    try:
        env = lmdb.open(os.path.join(tiny, "meta"), map_size=1 << 30)
        try:
            with pytest.raises(lmdb.Error) as exc:
                for _ in range(10_000):
                    with env.begin(write=True) as txn:
                        for _ in range(50):
                            txn.put(os.urandom(16), os.urandom(2000))
            assert is_full_disk(exc.value, os.path.join(tiny, "meta"))
            with env.begin(write=True) as txn:       # LMDB aborted cleanly: still usable
                txn.put(b"k", b"v")
        finally:
            env.close()
    finally:
        _run("umount", tiny)
    assert not is_full_disk(lmdb.Error("mdb_txn_commit: Input/output error"), workdir)
