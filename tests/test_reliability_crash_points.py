"""Crash points: the process dies at each step of the write, snapshot and gc paths.

The test-only fault layer (`cowfs.faults`, COWFS_FAULTS=crash=POINT) ends
the daemon or the gc process with os._exit at a named step -- no cleanup,
no flush, like a power cut of that process. After each crash: lazy
unmount, fsck clean, mount again, and every byte fsynced before the crash
is there (rule 6). What the interrupted operation did is all or nothing.
"""

import contextlib
import errno
import os
import subprocess

import pytest

from cowfs import faults
from helpers import Mount, cowfs, fsck_clean, wait_gone
from test_reliability_io import mount_with_faults, read_file

WRITE_POINTS = ["pack.written", "pack.synced", "fold.before", "fold.after"]
GC_POINTS = ["gc.copied", "gc.moved", "gc.dropping"]


def detach_dead_mount(mount: Mount) -> None:
    wait_gone(mount.pid)
    subprocess.run(["fusermount3", "-u", "-z", mount.path], capture_output=True)
    mount.pid = None


def crashing_mount(store: str, workdir: str, point: str) -> tuple[Mount, str]:
    """A mount that dies at `point` once armed; no periodic commit may get there first."""
    arm = os.path.join(workdir, "arm")
    mount = mount_with_faults(store, os.path.join(workdir, "mnt"), f"crash={point}@1,armed_by={arm}",
                              "--commit-interval", "3600")
    return mount, arm


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_crash_at_each_step_of_fsync_keeps_every_fsynced_byte(store, workdir, point):
    mount, arm = crashing_mount(store, workdir, point)
    before, during = os.urandom(300_000), os.urandom(200_000)
    try:
        os.mkdir(f"{mount.path}/dir")
        with open(f"{mount.path}/dir/before", "wb") as f:
            f.write(before)
            os.fsync(f.fileno())
        os.link(f"{mount.path}/dir/before", f"{mount.path}/link")
        fd = os.open(f"{mount.path}/during", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            open(arm, "w").close()
            os.write(fd, during)
            with pytest.raises(OSError) as exc:
                os.fsync(fd)                  # the daemon dies while answering it
            assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), exc.value
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)                  # ENOTCONN: the mount is dead
        detach_dead_mount(mount)
        fsck_clean(store)
        mount.mount()
        assert read_file(f"{mount.path}/dir/before") == before
        assert os.stat(f"{mount.path}/link").st_nlink == 2
        got = read_file(f"{mount.path}/during")
        if point == "fold.after":
            assert got == during, "committed before the crash, so it must be there"
        else:
            assert got == b"", "nothing of the unsynced write may appear half-way"
    finally:
        mount.close()
    fsck_clean(store)


@pytest.mark.parametrize("point", ["commit.before", "commit.after"])
def test_crash_while_a_mounted_volume_takes_a_snapshot(store, workdir, point):
    mount, arm = crashing_mount(store, workdir, point)
    data = os.urandom(100_000)
    try:
        with open(f"{mount.path}/f", "wb") as f:
            f.write(data)                     # acknowledged, not fsynced: the snapshot covers it
        open(arm, "w").close()
        result = cowfs("snapshot", store, "main@s1", check=False)
        assert result.returncode != 0
        detach_dead_mount(mount)
        fsck_clean(store)
        snapshot_exists = "main@s1" in cowfs("list", store).stdout
        assert snapshot_exists == (point == "commit.after")
        mount.mount()
        if snapshot_exists:
            assert read_file(f"{mount.path}/f") == data
    finally:
        mount.close()
    fsck_clean(store)


@pytest.fixture
def half_dead_pack(store, workdir):
    """A pack whose first half is dead (file removed), second half a live file.

    The daemon is killed right after the unlink: a daemon gives freed blocks
    back by itself once the unlink is synced, and this pack must still hold
    them, as after a crash, for gc to compact it."""
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    live = os.urandom(400_000)
    try:
        for name, data in (("dead", os.urandom(400_000)), ("live", live)):
            with open(f"{mount.path}/{name}", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        os.unlink(f"{mount.path}/dead")
        mount.kill9()
    finally:
        mount.close()
    return mount, live


@pytest.mark.parametrize("point", GC_POINTS)
def test_crash_at_each_step_of_gc_compaction_loses_nothing(store, half_dead_pack, point):
    mount, live = half_dead_pack
    packs_before = sorted(os.listdir(os.path.join(store, "packs")))
    result = cowfs("gc", store, check=False, env={**os.environ, "COWFS_FAULTS": f"crash={point}"})
    assert result.returncode == faults.CRASH_EXIT_STATUS, result.stdout + result.stderr
    fsck_clean(store)
    assert cowfs("fsck", store, "--verify-data", check=False).returncode == 0
    mount.mount()
    try:
        assert read_file(f"{mount.path}/live") == live
    finally:
        mount.close()
    cowfs("gc", store)                        # a later gc finishes the job
    fsck_clean(store)
    assert packs_before[0] not in os.listdir(os.path.join(store, "packs"))
    mount.mount()
    try:
        assert read_file(f"{mount.path}/live") == live
    finally:
        mount.close()
    fsck_clean(store)
