"""Full disk: the store on a small ext4 filesystem (a loop-mounted image).

Writing until the disk is full gives ENOSPC to the writer's fsync, the
daemon keeps serving, nothing committed is lost, and after freeing space
(destroy + gc) the same buffered data is written and new writes work.
Pack writes stop at a reserve (packs.RESERVE_*) so that the metadata
commits that free space still fit on a "full" disk.
"""

import errno
import os
import subprocess

import pytest

from helpers import Mount, cowfs, fsck_clean

pytestmark = pytest.mark.slow

IMAGE_BYTES = 96 << 20
WRITE_STEP_BYTES = 1 << 20
BIG_FILE_BYTES = 30 << 20


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def small_fs(workdir):
    """A 96 MiB ext4 filesystem; unmounted and its loop device detached, also on failure."""
    image = os.path.join(workdir, "disk.img")
    mountpoint = os.path.join(workdir, "disk")
    os.mkdir(mountpoint)
    _run("truncate", "-s", str(IMAGE_BYTES), image)
    result = _run("mkfs.ext4", "-q", "-F", image)
    assert result.returncode == 0, result.stderr
    result = _run("mount", "-o", "loop", image, mountpoint)
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint
    finally:
        if _run("umount", mountpoint).returncode != 0:
            _run("umount", "-l", mountpoint)
        for line in _run("losetup", "-j", image).stdout.splitlines():
            _run("losetup", "-d", line.split(":", 1)[0])


def write_until_full(path: str) -> tuple[int, int]:
    """Append 1 MiB steps with an fsync each until one fails; (fd, bytes fsynced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    synced = 0
    for _ in range(IMAGE_BYTES // WRITE_STEP_BYTES + 10):
        os.write(fd, os.urandom(WRITE_STEP_BYTES))
        try:
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return fd, synced
        synced += WRITE_STEP_BYTES
    os.close(fd)
    raise AssertionError(f"wrote {synced} bytes to a {IMAGE_BYTES}-byte disk without ENOSPC")


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_full_disk_gives_enospc_keeps_committed_data_and_recovers_after_destroy_and_gc(
        small_fs, workdir):
    store = os.path.join(small_fs, "store")
    cowfs("init", store)
    mount = Mount(store, os.path.join(workdir, "mnt"))
    kept = os.urandom(500_000)
    try:
        # A snapshot holds a big file the head no longer has: space to free later.
        mount.mount()
        with open(f"{mount.path}/big", "wb") as f:
            f.write(os.urandom(BIG_FILE_BYTES))
        mount.umount()
        cowfs("snapshot", store, "main@old")
        mount.mount()
        os.unlink(f"{mount.path}/big")
        with open(f"{mount.path}/kept", "wb") as f:
            f.write(kept)
            os.fsync(f.fileno())

        fd, synced = write_until_full(f"{mount.path}/filler")
        try:
            assert synced > 0
            with pytest.raises(OSError) as exc:
                os.fsync(fd)                      # still full: still an error, never a success
            assert exc.value.errno == errno.ENOSPC
            assert read_file(f"{mount.path}/kept") == kept
            fsck_clean(store)                     # the committed state is consistent meanwhile

            cowfs("destroy", store, "main@old")
            cowfs("gc", store)
            os.fsync(fd)                          # space is back: the buffered step is written
        finally:
            os.close(fd)
        with open(f"{mount.path}/after", "wb") as f:
            f.write(b"writes work again")
            os.fsync(f.fileno())
        filler_bytes = os.path.getsize(f"{mount.path}/filler")
        mount.umount()
        fsck_clean(store)
        mount.mount()
        assert read_file(f"{mount.path}/kept") == kept
        assert os.path.getsize(f"{mount.path}/filler") == filler_bytes == synced + WRITE_STEP_BYTES
        assert read_file(f"{mount.path}/after") == b"writes work again"
    finally:
        mount.close()
    fsck_clean(store)


# --- PostgreSQL on a full disk -------------------------------------------------------------------

PG_IMAGE_BYTES = 288 << 20
# More than the daemon may hold buffered (filesystem.DIRTY_LIMIT_BYTES): the
# writes PostgreSQL made before the disk filled are flushed first once space
# is back, and recovery still needs room after them.
PG_BALLAST_BYTES = 112 << 20
FILL_SQL = ("INSERT INTO filler SELECT (SELECT string_agg(md5(random()::text || g::text || s::text), '') "
            "FROM generate_series(1, 250) s) FROM generate_series(1, 1000) g")


@pytest.mark.postgres
def test_postgres_on_a_full_disk_stops_and_recovers_every_commit_after_destroy_and_gc(
        workdir, pg14_bin):
    from cowfs.pg import PgError, PgServer, free_port
    from test_crash import Ledger, kill_server_tree, wait_reaped
    image, disk = os.path.join(workdir, "pgdisk.img"), os.path.join(workdir, "pgdisk")
    os.mkdir(disk)
    _run("truncate", "-s", str(PG_IMAGE_BYTES), image)
    assert _run("mkfs.ext4", "-q", "-F", image).returncode == 0
    assert _run("mount", "-o", "loop", image, disk).returncode == 0
    store = os.path.join(disk, "store")
    mount = Mount(store, os.path.join(workdir, "mnt"))
    pg, postmaster_pid, ledger = None, None, None
    try:
        cowfs("init", store)
        mount.mount()
        with open(f"{mount.path}/ballast", "wb") as f:
            for _ in range(PG_BALLAST_BYTES // WRITE_STEP_BYTES):
                f.write(os.urandom(WRITE_STEP_BYTES))
        mount.umount()
        cowfs("snapshot", store, "main@old")          # the only holder of the ballast
        mount.mount()
        os.unlink(f"{mount.path}/ballast")
        pg = PgServer(pg14_bin, os.path.join(mount.path, "pgdata"))
        pg.initdb(data_checksums=True)
        pg.start(free_port(), os.path.join(workdir, "pgrun"))
        postmaster_pid = pg.postmaster_pid()
        pg.psql("CREATE TABLE ledger (n bigint PRIMARY KEY); CREATE TABLE filler (t text); "
                "ALTER TABLE filler ALTER t SET STORAGE EXTERNAL")
        ledger = Ledger(pg, 1, os.path.join(workdir, "ledger.err"))
        ledger.wait_acked(50)
        for _ in range(PG_IMAGE_BYTES // (8 << 20) + 10):
            try:
                pg.psql(FILL_SQL)
            except PgError:
                break
        else:
            raise AssertionError("PostgreSQL filled the disk without an error")
        wait_reaped(postmaster_pid)                   # PANIC on the failed fsync; it stays down
        postmaster_pid = None
        ledger.finish()
        with open(pg.log_path) as f:
            assert "No space left on device" in f.read()
        assert mount.pid is not None and os.path.exists(f"/proc/{mount.pid}"), "the daemon died"
        cowfs("destroy", store, "main@old")
        cowfs("gc", store)
        pg.start(pg.port, pg.socket_dir)              # crash recovery, now with space
        postmaster_pid = pg.postmaster_pid()
        present = {int(n) for n in pg.psql("SELECT n FROM ledger").split()}
        missing = sorted(set(ledger.acked) - present)
        assert not missing, f"{len(missing)} acknowledged rows lost, first {missing[:10]}"
        pg.psql("TRUNCATE filler; INSERT INTO ledger VALUES (-1)")   # writes work again
        pg.amcheck()
        pg.stop("fast")
        postmaster_pid = None
        mount.umount()
        fsck_clean(store)
    finally:
        if ledger is not None:
            ledger.finish()
        if postmaster_pid is not None:
            kill_server_tree(postmaster_pid)
        mount.close()
        if _run("umount", disk).returncode != 0:
            _run("umount", "-l", disk)
        for line in _run("losetup", "-j", image).stdout.splitlines():
            _run("losetup", "-d", line.split(":", 1)[0])


def test_lmdb_commit_refused_by_a_full_filesystem_counts_as_full_disk_not_io_error(workdir):
    """LMDB reports its short page write as EIO; the free space tells a full disk apart.

    A full disk keeps the volume usable (the commit is retried once space is
    back); any other LMDB commit failure stops it (rule 3).
    """
    import lmdb
    from cowfs.filesystem import is_full_disk
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
