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
