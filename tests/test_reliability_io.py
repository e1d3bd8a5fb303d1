"""I/O errors: the fsync covering the data fails, and no later fsync succeeds for it.

A test-only fault layer (`cowfs.faults`, switched on by the COWFS_FAULTS
environment variable of the mount daemon) makes the N-th pack write or
fdatasync fail once, after the test armed it by creating a file. The
rest -- the pack writer, the filesystem, the FUSE gate, the daemon -- is the
real product on a real FUSE mount.

Rule 3 of the design: a failed flush is reported to the caller of fsync and
never reported as a success later. After a failed pack sync the kernel may
have dropped the pages, so the volume stops (every later fsync, write and
change gets EIO) until it is mounted again; committed data stays readable.
A full disk is different: the pack write is undone, nothing was dropped, the
data stays buffered, and a later fsync really writes it.
"""

import errno
import os
import subprocess

import pytest

from cowfs import control, errors
from helpers import Mount, cowfs, daemon_pid, daemon_stats, fsck_clean, wait_for_log


def mount_with_faults(store: str, mountpoint: str, spec: str, *mount_args: str) -> Mount:
    """Mount through `cowfs mount` with a fault plan for its daemon (tests only)."""
    os.makedirs(mountpoint, exist_ok=True)
    cowfs("mount", store, mountpoint, *mount_args, env={**os.environ, "COWFS_FAULTS": spec})
    mount = Mount(store, mountpoint)
    mount.pid = daemon_pid(mountpoint)
    return mount


def write_file(path: str, data: bytes, fsync: bool = True) -> int:
    """Write `data` to a new file; returns the still-open descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    if fsync:
        os.fsync(fd)
    return fd


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_errno(code: int, func, *args) -> None:
    with pytest.raises(OSError) as exc:
        func(*args)
    assert exc.value.errno == code, exc.value


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def request_flush(store: str) -> None:
    """A fold of every file through the daemon (what the periodic commit does)."""
    control.request(os.path.join(store, "run"), daemon_stats(store)["vol_id"], {"op": "flush"})


def fail_by(trigger: str, store: str, fd: int, code: int) -> None:
    """The armed fault meets `trigger`: an fsync (the intent log, or a fold
    without a log) or a fold of every file (packs and LMDB)."""
    if trigger == "fsync":
        assert_errno(code, os.fsync, fd)
    else:
        with pytest.raises(errors.CowfsError) as exc:
            request_flush(store)
        assert exc.value.exit_code == errors.EXIT_IO, exc.value


# (fault, what meets it, extra mount arguments)
IO_FAULTS = [("log_sync=EIO@1", "fsync", ()), ("log_write=EIO@1", "fsync", ()),
             ("pack_sync=EIO@1", "fold", ()), ("pack_write=EIO@1", "fold", ()),
             ("pack_sync=EIO@1", "fsync", ("--log-size", "0"))]


@pytest.mark.parametrize("fault,trigger,mount_args", IO_FAULTS)
def test_failed_io_must_fail_every_later_fsync_until_remount(store, workdir, fault, trigger, mount_args):
    arm = os.path.join(workdir, "arm")
    mount = mount_with_faults(store, os.path.join(workdir, "mnt"), f"{fault},armed_by={arm}",
                              "--commit-interval", "3600", *mount_args)
    if not mount_args:
        wait_for_log(store)
    committed = os.urandom(200_000)
    try:
        os.close(write_file(f"{mount.path}/committed", committed))
        open(arm, "w").close()
        fd = write_file(f"{mount.path}/lost", os.urandom(100_000), fsync=False)
        try:
            fail_by(trigger, store, fd, errno.EIO)
            os.unlink(arm)                              # the fault is gone ...
            assert_errno(errno.EIO, os.fsync, fd)       # ... still no late success
            assert_errno(errno.EIO, os.fdatasync, fd)
        finally:
            os.close(fd)
        other = os.open(f"{mount.path}/committed", os.O_RDONLY)
        try:
            assert_errno(errno.EIO, os.fsync, other)    # the whole volume stopped
        finally:
            os.close(other)
        assert_errno(errno.EIO, os.mkdir, f"{mount.path}/newdir")
        assert read_file(f"{mount.path}/committed") == committed
        assert alive(mount.pid), "the daemon died of an I/O error"
        result = cowfs("umount", mount.path, check=False)
        assert result.returncode == errors.EXIT_IO, result.stderr
        assert "buffered writes were not saved" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        mount.close()
    fsck_clean(store)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()    # no faults: a restart
    try:
        assert read_file(f"{mount.path}/committed") == committed
        with open(f"{mount.path}/after", "wb") as f:
            f.write(b"writes work again")
            os.fsync(f.fileno())
    finally:
        mount.close()
    fsck_clean(store)


@pytest.mark.parametrize("trigger,mount_args", [("fold", ()), ("fsync", ("--log-size", "0"))])
def test_full_disk_on_pack_write_fails_and_a_retry_stores_the_data(store, workdir, trigger, mount_args):
    """ENOSPC: the write was undone and the bytes kept, so a later commit is
    honest. With the log the fsync succeeds (the log is preallocated) and the
    fold that meets the full disk leaves the data logged and buffered."""
    arm = os.path.join(workdir, "arm")
    # No periodic commit: it could meet the one-time fault before the test does.
    mount = mount_with_faults(store, os.path.join(workdir, "mnt"), f"pack_write=ENOSPC@1,armed_by={arm}",
                              "--commit-interval", "3600", *mount_args)
    if not mount_args:
        wait_for_log(store)
    data = os.urandom(150_000)
    try:
        open(arm, "w").close()
        fd = write_file(f"{mount.path}/f", data, fsync=trigger == "fold")
        try:
            fail_by(trigger, store, fd, errno.ENOSPC)
            os.fsync(fd)                                # space came back: really written now
            request_flush(store)
        finally:
            os.close(fd)
        assert alive(mount.pid)
        mount.umount()
    finally:
        mount.close()
    fsck_clean(store)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        assert read_file(f"{mount.path}/f") == data
    finally:
        mount.close()
    fsck_clean(store)


def test_snapshot_of_a_stopped_volume_is_refused_with_exit_code_io(store, workdir):
    arm = os.path.join(workdir, "arm")
    mount = mount_with_faults(store, os.path.join(workdir, "mnt"), f"pack_sync=EIO@1,armed_by={arm}")
    try:
        open(arm, "w").close()
        fd = write_file(f"{mount.path}/f", os.urandom(50_000), fsync=False)
        try:
            fail_by("fold", store, fd, errno.EIO)
        finally:
            os.close(fd)
        result = cowfs("snapshot", store, "main@after-error", check=False)
        assert result.returncode == errors.EXIT_IO, result.stderr
        assert "stopped accepting writes" in result.stderr
        assert "after-error" not in cowfs("list", store).stdout
    finally:
        mount.close()
    fsck_clean(store)


# --- PostgreSQL on a volume whose pack sync fails ------------------------------------------------

@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_stops_on_a_failed_sync_and_a_restart_recovers_every_commit(store, workdir, pg14_bin):
    """PostgreSQL's fsync gets EIO, it PANICs and stays down; nothing acknowledged is lost."""
    from cowfs.pg import PgServer, free_port
    from test_crash import Ledger, kill_server_tree, wait_reaped
    arm = os.path.join(workdir, "arm")
    mount = mount_with_faults(store, os.path.join(workdir, "mnt"), f"pack_sync=EIO@1,armed_by={arm}")
    pg = PgServer(pg14_bin, os.path.join(mount.path, "pgdata"))
    postmaster_pid, ledger = None, None
    try:
        pg.initdb(data_checksums=True)
        pg.start(free_port(), os.path.join(workdir, "pgrun"))
        postmaster_pid = pg.postmaster_pid()
        pg.psql("CREATE TABLE ledger (n bigint PRIMARY KEY)")
        ledger = Ledger(pg, 1, os.path.join(workdir, "ledger.err"))
        ledger.wait_acked(50)
        open(arm, "w").close()                  # the next pack sync fails
        wait_reaped(postmaster_pid)             # PANIC, crash recovery fails again: it stops
        postmaster_pid = None
        with open(pg.log_path) as f:
            server_log = f.read()
        assert "PANIC" in server_log and "Input/output error" in server_log, server_log[-3000:]
        ledger.finish()
        assert alive(mount.pid), "the daemon died of an I/O error"
        result = cowfs("umount", mount.path, check=False)
        assert result.returncode == errors.EXIT_IO, result.stderr
        fsck_clean(store)
        mount.mount()                            # the fault is gone: a restart
        pg.start(pg.port, pg.socket_dir)
        postmaster_pid = pg.postmaster_pid()
        present = {int(n) for n in pg.psql("SELECT n FROM ledger").split()}
        missing = sorted(set(ledger.acked) - present)
        assert not missing, f"{len(missing)} acknowledged rows lost, first {missing[:10]}"
        assert present <= set(range(1, ledger.sent + 1))
        pg.amcheck()
        pg.stop("fast")
        postmaster_pid = None
    finally:
        if ledger is not None:
            ledger.finish()
        if postmaster_pid is not None:
            kill_server_tree(postmaster_pid)
        mount.close()
    fsck_clean(store)


def test_a_slow_final_flush_never_takes_the_registry_entry_of_the_next_mount(store, workdir):
    """The kernel gives a FUSE mount's device number to the next mount as soon
    as the first is gone; a daemon still writing its final flush must then
    neither remove nor overwrite the newcomer's registry entry, and `cowfs
    umount` of the newcomer must still wait for *its* final flush."""
    from helpers import mount_entry, wait_gone
    slow = mount_with_faults(store, os.path.join(workdir, "slow"), "pack_sync_delay=3000")
    other_store = os.path.join(workdir, "other")
    cowfs("init", other_store)
    newcomer = Mount(other_store, os.path.join(workdir, "new"))
    try:
        old_dev = mount_entry(slow.path)["dev"]
        os.close(write_file(f"{slow.path}/f", os.urandom(100_000), fsync=False))
        subprocess.run(["fusermount3", "-u", slow.path], check=True)   # its daemon flushes slowly now
        newcomer.mount()
        if mount_entry(newcomer.path)["dev"] != old_dev:
            pytest.skip("another mount took the freed device number first")
        wait_gone(slow.pid)
        slow.pid = None
        assert daemon_pid(newcomer.path) == newcomer.pid, "the slow daemon removed the newcomer's entry"
        newcomer.umount()
    finally:
        newcomer.close()
        slow.close()
    fsck_clean(store)
    fsck_clean(other_store)
