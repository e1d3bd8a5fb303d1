"""Crash points: the process dies at each step of the fsync, fold, replay, snapshot and gc paths.

The test-only fault layer (`cowfs.faults`, COWFS_FAULTS=crash=POINT) ends
the daemon or the gc process with os._exit at a named step -- no cleanup,
no flush. A killed process keeps the page cache, so these tests prove the
steps' atomicity, not their order on the device: tests/test_powercut.py
cuts the power at the same points. After each crash: lazy unmount, fsck
clean (or a mount first: either replays the intent log), mount again, and
every byte fsynced before the crash is there (rule 6). What the interrupted
operation did is all or nothing.
"""

import contextlib
import errno
import os
import subprocess

import pytest

from cowfs import faults
from cowfs import control
from helpers import Mount, cowfs, daemon_stats, fsck_clean, wait_for_log, wait_gone
from test_reliability_io import mount_with_faults, read_file

# An fsync is one intent-log record; a fold (periodic commit, snapshot,
# unmount, a full log) moves buffered writes to packs and LMDB.
LOG_POINTS = ["log.written", "log.synced"]
FOLD_POINTS = ["pack.written", "pack.synced", "fold.before", "fold.after"]
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
    wait_for_log(store)
    return mount, arm


@pytest.mark.parametrize("point", LOG_POINTS)
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
        if point == "log.synced":
            assert got == during, "the record was durable before the crash, so it must be there"
        else:
            # Written, not synced: the kernel still has it after a kill (a power
            # cut may drop it, tests/test_powercut.py), never half of it.
            assert got in (b"", during), "the unacknowledged write appeared half-way"
    finally:
        mount.close()
    fsck_clean(store)


def flush_dying(store: str) -> None:
    """A fold of every file through the daemon's `flush` request; the daemon dies in it."""
    stats = daemon_stats(store)
    with pytest.raises(Exception):
        control.request(os.path.join(store, "run"), stats["vol_id"], {"op": "flush"})


@pytest.mark.parametrize("point", FOLD_POINTS)
def test_crash_at_each_step_of_a_fold_keeps_the_log_and_commits_all_or_nothing(store, workdir, point):
    """The fold dies; the next mount (no fsck before it) replays the log: the
    fsynced file is there, the buffered one is there whole or not at all."""
    mount, arm = crashing_mount(store, workdir, point)
    logged, buffered = os.urandom(300_000), os.urandom(200_000)
    try:
        with open(f"{mount.path}/logged", "wb") as f:
            f.write(logged)
            os.fsync(f.fileno())                  # one intent-log record, not yet folded
        with open(f"{mount.path}/buffered", "wb") as f:
            f.write(buffered)                     # acknowledged by write(2) only
        open(arm, "w").close()
        flush_dying(store)
        detach_dead_mount(mount)
        mount.mount()                             # the mount replays the log itself
        assert read_file(f"{mount.path}/logged") == logged
        got = read_file(f"{mount.path}/buffered")
        if point == "fold.after":
            assert got == buffered, "committed before the crash, so it must be there"
        else:
            assert got == b"", "nothing of the unfolded write may appear half-way"
    finally:
        mount.close()
    fsck_clean(store)


def test_a_crash_in_the_middle_of_replay_replays_again_and_never_twice(store, workdir):
    """A daemon dies with records in its log; the next mount dies while
    replaying them (chunks staged, nothing committed); the one after replays
    them all, and a mount after that finds nothing more to replay: fsck's
    exact reference counts show nothing was applied twice."""
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    wait_for_log(store)
    files = {f"f{i}": os.urandom(50_000 + i) for i in range(4)}
    try:
        for name, data in files.items():
            with open(f"{mount.path}/{name}", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        with open(f"{mount.path}/f0", "r+b") as f:
            f.write(b"rewritten")                 # a second record of the same file
            f.flush()
            os.fsync(f.fileno())
        files["f0"] = b"rewritten" + files["f0"][len(b"rewritten"):]
        mount.kill9()
        result = cowfs("mount", store, mount.path, check=False,
                       env={**os.environ, "COWFS_FAULTS": "crash=replay.middle"})
        assert result.returncode != 0, "the mount was ready although its replay died"
        subprocess.run(["fusermount3", "-u", "-z", mount.path], capture_output=True)
        for _ in range(2):                        # replays, then finds nothing to replay
            mount.mount()
            for name, data in files.items():
                assert read_file(f"{mount.path}/{name}") == data, name
            mount.kill9()
            fsck_clean(store)
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
        mount.umount()                            # folded: both files in one pack
        mount.mount()
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
