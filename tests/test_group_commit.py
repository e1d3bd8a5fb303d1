"""Group commit: fsyncs share intent-log flushes, folds run in a worker thread.

The daemon's fault layer (`cowfs.faults`, tests only) makes every pack
fdatasync (``pack_sync_delay``) or intent-log fdatasync (``log_sync_delay``)
slow once the test arms it, which holds a flush in flight long enough to
act during it: the event loop must keep serving reads, buffered writes and
namespace changes during a fold, fsyncs must not wait for a fold (the log is
their own lane), fsyncs that arrive while the log flushes must share its
next flush, and a write into a chunk that is being folded must not lose
either version. Everything else is the real daemon on a real mount. The
assertions are about order and counts, never about durations.
"""

import os
import threading
import time

from cowfs import control
from helpers import cowfs, daemon_stats, fsck_clean, wait_for_log
from test_reliability_io import mount_with_faults

SLOW_SYNC_MS = 2500
CHUNK = 8192


def wait_for_flush_start(store: str, flush_jobs_before: int) -> None:
    """Until the daemon has begun a flush (it then sleeps in the slow fdatasync)."""
    deadline = time.monotonic() + 60
    while daemon_stats(store)["flush_jobs"] <= flush_jobs_before:
        assert time.monotonic() < deadline, "no flush started"
        time.sleep(0.01)


class VolumeFlush(threading.Thread):
    """`flush` of the whole volume through its daemon (every file, like the
    periodic commit), in a thread; `.done` tells whether it returned. Not an
    fsync of a file: the kernel holds that file's inode lock during an fsync,
    so renaming or linking it would wait in the kernel, not in cowfs."""

    def __init__(self, store: str):
        super().__init__(daemon=True)
        # Resolved here: one process must not open an LMDB environment twice at once.
        self.run_dir, self.vol_id = os.path.join(store, "run"), daemon_stats(store)["vol_id"]
        self.error = None
        self.done = threading.Event()

    def run(self):
        try:
            control.request(self.run_dir, self.vol_id, {"op": "flush"})
        except Exception as exc:
            self.error = exc
        self.done.set()


def volume_flush_in_flight(store: str, arm: str) -> VolumeFlush:
    """Arm the slow disk and start a flush of every file; returns once it sleeps in the pack sync."""
    open(arm, "w").close()
    before = daemon_stats(store)
    flusher = VolumeFlush(store)
    flusher.start()
    wait_for_flush_start(store, before["flush_jobs"])
    return flusher


def wait_done(flusher) -> None:
    flusher.join(120)
    assert flusher.done.is_set() and flusher.error is None, flusher.error


class Fsync(threading.Thread):
    """fsync of one file in a thread; `.done` tells whether it returned."""

    def __init__(self, path: str, data: bytes = b"", offset: int = 0):
        super().__init__(daemon=True)
        self.path, self.data, self.offset = path, data, offset
        self.error = None
        self.done = threading.Event()

    def run(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if self.data:
                    os.pwrite(fd, self.data, self.offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc
        self.done.set()


def slow_mount(store: str, workdir: str, slow: str = "pack_sync_delay"):
    """A mount whose pack syncs (folds) or log syncs (`slow`) are slow once armed."""
    arm = os.path.join(workdir, "arm")
    mount = mount_with_faults(store, os.path.join(workdir, "mnt"),
                              f"{slow}={SLOW_SYNC_MS},armed_by={arm}",
                              "--commit-interval", "3600")
    wait_for_log(store)
    return mount, arm


def test_reads_and_writes_are_served_while_a_fold_is_in_flight(store, workdir):
    mount, arm = slow_mount(store, workdir)
    try:
        old = os.urandom(4 * CHUNK)
        with open(os.path.join(mount.path, "old"), "wb") as f:
            f.write(old)
            os.fsync(f.fileno())
        mount.umount()                    # a cold page cache: reads of "old" reach the daemon
        mount, arm = slow_mount(store, workdir)
        with open(os.path.join(mount.path, "new"), "wb") as f:
            f.write(os.urandom(3 * CHUNK))
        flusher = volume_flush_in_flight(store, arm)
        with open(os.path.join(mount.path, "old"), "rb") as f:
            assert f.read() == old
        with open(os.path.join(mount.path, "newer"), "wb") as f:
            f.write(os.urandom(CHUNK))
        assert os.stat(os.path.join(mount.path, "new")).st_size == 3 * CHUNK
        assert not flusher.done.is_set(), "the read or write waited for the fold"
        wait_done(flusher)
        os.unlink(arm)
    finally:
        mount.close()
    fsck_clean(store)


def test_an_fsync_never_waits_for_the_fold_in_flight(store, workdir):
    """PostgreSQL's WAL fsync has a lane of its own: while a fold of every
    file sleeps in its pack sync, an fsync is answered from the intent log."""
    mount, arm = slow_mount(store, workdir)
    try:
        with open(os.path.join(mount.path, "data"), "wb") as f:
            f.write(os.urandom(8 * CHUNK))           # buffered: the fold takes it
        flusher = volume_flush_in_flight(store, arm)
        wal = os.urandom(CHUNK)
        fsync = Fsync(os.path.join(mount.path, "wal"), wal)
        fsync.start()
        fsync.join(120)
        assert fsync.done.is_set() and fsync.error is None, fsync.error
        assert not flusher.done.is_set(), "the fsync waited for the fold"
        wait_done(flusher)
        os.unlink(arm)
        mount.kill9()                               # the fsync was acknowledged: it survives
        mount.mount()
        with open(os.path.join(mount.path, "wal"), "rb") as f:
            assert f.read() == wal
    finally:
        mount.close()
    fsck_clean(store)


def test_fsyncs_arriving_during_a_log_flush_share_the_next_one(store, workdir):
    mount, arm = slow_mount(store, workdir, slow="log_sync_delay")
    payloads = {f"f{i}": os.urandom(2 * CHUNK + i) for i in range(5)}
    try:
        for name in payloads:
            open(os.path.join(mount.path, name), "wb").close()
        before = daemon_stats(store)
        open(arm, "w").close()
        first = Fsync(os.path.join(mount.path, "f0"), payloads["f0"])
        first.start()
        deadline = time.monotonic() + 60
        while daemon_stats(store)["log_records_total"] == before["log_records_total"]:
            assert time.monotonic() < deadline, "the first record was never queued"
            time.sleep(0.01)
        others = [Fsync(os.path.join(mount.path, name), payloads[name])
                  for name in sorted(payloads)[1:]]
        for thread in others:
            thread.start()
        for thread in [first] + others:
            thread.join(120)
            assert thread.done.is_set() and thread.error is None, thread.error
        after = daemon_stats(store)
        assert after["log_syncs_total"] - before["log_syncs_total"] == 5
        assert after["log_records_total"] - before["log_records_total"] == 5
        assert after["log_batches_total"] - before["log_batches_total"] == 2, (before, after)
        assert after["flush_jobs"] == before["flush_jobs"], "an fsync folded"
        os.unlink(arm)
        mount.kill9()
        mount.mount()
        for name, data in payloads.items():
            with open(os.path.join(mount.path, name), "rb") as f:
                assert f.read() == data, name
    finally:
        mount.close()
    fsck_clean(store)


def test_a_write_into_a_chunk_being_folded_keeps_both_versions(store, workdir):
    """A write into a chunk frozen in the fold in flight lands in a fresh
    buffer filled from the frozen one -- not from the store, which does not
    have the frozen bytes yet."""
    mount, arm = slow_mount(store, workdir)
    other = os.path.join(mount.path, "other")
    first = os.urandom(2 * CHUNK)
    patch = b"P" * 100
    try:
        with open(other, "wb") as f:
            f.write(first)            # close hands the pages to the daemon: buffered there
        flusher = volume_flush_in_flight(store, arm)
        fd = os.open(other, os.O_WRONLY)
        os.pwrite(fd, patch, CHUNK + 50)    # inside the second chunk, frozen in the fold
        os.close(fd)                        # the kernel writes the page back now
        assert not flusher.done.is_set(), "the write waited for the fold"
        wait_done(flusher)
        os.unlink(arm)
        mount.umount()
        mount.mount()
        expected = bytearray(first)
        expected[CHUNK + 50:CHUNK + 150] = patch
        with open(other, "rb") as f:
            assert f.read() == bytes(expected)
    finally:
        mount.close()
    fsck_clean(store)


def test_namespace_changes_during_a_flush_do_not_wait_for_it_and_stay_consistent(store, workdir):
    """A rename, a link, a create and an unlink commit on the event loop while
    the flush is in flight (a namespace change writes no chunk, so it need
    not wait), and the flush merges its frozen data onto the records as
    committed: the new link count and names survive a remount."""
    mount, arm = slow_mount(store, workdir)
    try:
        data = os.urandom(3 * CHUNK)
        with open(os.path.join(mount.path, "a"), "wb") as f:
            f.write(data)                                # buffered, frozen by the flush
        flusher = volume_flush_in_flight(store, arm)
        os.rename(os.path.join(mount.path, "a"), os.path.join(mount.path, "b"))
        os.link(os.path.join(mount.path, "b"), os.path.join(mount.path, "c"))
        with open(os.path.join(mount.path, "gone"), "wb") as f:
            f.write(b"x" * 10)
        os.unlink(os.path.join(mount.path, "gone"))
        assert not flusher.done.is_set(), "a namespace change waited for the flush in flight"
        wait_done(flusher)
        os.unlink(arm)
        mount.umount()
        mount.mount()
        assert sorted(os.listdir(mount.path)) == ["b", "c"]
        assert os.stat(os.path.join(mount.path, "b")).st_nlink == 2, "the flush undid the link"
        for name in ("b", "c"):
            with open(os.path.join(mount.path, name), "rb") as f:
                assert f.read() == data
        result = cowfs("umount", mount.path)
        assert result.returncode == 0
    finally:
        mount.close()
    fsck_clean(store)


def test_a_file_deleted_while_its_flush_is_in_flight_leaves_nothing_behind(store, workdir):
    """The flush froze the file's buffers; the unlink commits meanwhile and
    the flush then finds no inode record and skips it: no chunk reference,
    no inode comes back (fsck counts every reference)."""
    mount, arm = slow_mount(store, workdir)
    try:
        with open(os.path.join(mount.path, "doomed"), "wb") as f:
            f.write(os.urandom(5 * CHUNK))              # buffered, frozen by the flush
        flusher = volume_flush_in_flight(store, arm)
        os.unlink(os.path.join(mount.path, "doomed"))
        assert not flusher.done.is_set(), "the unlink waited for the flush in flight"
        wait_done(flusher)
        os.unlink(arm)
        mount.umount()
        fsck_clean(store)
        mount.mount()
        assert os.listdir(mount.path) == []
    finally:
        mount.close()
    fsck_clean(store)


def test_writing_more_than_the_dirty_limit_flushes_in_the_background(store, workdir):
    """Past DIRTY_LIMIT_BYTES a write starts a flush nobody waits for; past
    twice that it waits. Nothing fsynced yet, the data must still all arrive."""
    from cowfs.filesystem import DIRTY_LIMIT_BYTES
    mount, _arm = slow_mount(store, workdir)     # not armed: a normal disk
    path = os.path.join(mount.path, "big")
    block = 1 << 20
    total_blocks = 5 * DIRTY_LIMIT_BYTES // block
    try:
        before = daemon_stats(store)
        with open(path, "wb") as f:
            for i in range(total_blocks):
                f.write(i.to_bytes(8, "little") * (block // 8))
            f.flush()
            os.fsync(f.fileno())
        after = daemon_stats(store)
        # The one fsync needs one flush; the rest were started by writes.
        assert after["sync_requests"] - before["sync_requests"] == 1
        assert after["flush_jobs"] - before["flush_jobs"] >= 2, (before, after)
        assert after["dirty_bytes"] == 0
        mount.umount()
        mount.mount()
        with open(path, "rb") as f:
            for i in range(total_blocks):
                assert f.read(block) == i.to_bytes(8, "little") * (block // 8), f"block {i}"
    finally:
        mount.close()
    fsck_clean(store)


def test_an_fsync_logs_its_own_file_not_the_others(store, workdir):
    """Like a local filesystem: fsync(B) makes B durable -- one record with
    B's chunks only -- and leaves A's buffered writes to A's own fsync (or
    the periodic commit, or unmount). After a kill -9 the fsynced files are
    there (replayed from the log), the other is not."""
    mount, _arm = slow_mount(store, workdir)      # not armed; no periodic commit
    a, b, c = (os.path.join(mount.path, name) for name in "abc")
    a_data, b_data = os.urandom(4 * CHUNK), os.urandom(3 * CHUNK)
    try:
        with open(a, "wb") as f:
            f.write(a_data)                       # close hands it to the daemon, buffered
        with open(c, "wb") as f:
            f.write(os.urandom(5 * CHUNK))        # never fsynced
        before = daemon_stats(store)
        with open(b, "wb") as f:
            f.write(b_data)
            os.fsync(f.fileno())
        after = daemon_stats(store)
        assert after["log_records_total"] - before["log_records_total"] == 1
        logged = after["log_written_bytes_total"] - before["log_written_bytes_total"]
        assert 3 * CHUNK <= logged < 4 * CHUNK + 4096, f"fsync(b) logged {logged} bytes"
        fd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)                          # fsyncdir: namespace only
        finally:
            os.close(fd)
        with open(a, "rb+") as f:
            os.fsync(f.fileno())
        mount.kill9()                             # a and b were fsynced: both survive
        mount.mount()
        for path, data in ((a, a_data), (b, b_data)):
            with open(path, "rb") as f:
                assert f.read() == data
        assert os.path.getsize(c) == 0, "an unsynced file came back with data"
    finally:
        mount.close()
    fsck_clean(store)
