"""The mount daemon: one process per mounted volume.

Lifecycle: open the store, take the volume lock (one read-write user at a
time), free orphans a crashed predecessor left, mount, write the registry
entry, create the control socket, and only then tell whoever waits (the
`cowfs mount` that started us, systemd) that the mount is ready; a failure
at any of these steps unmounts again and is reported in one line. Then
serve until unmounted, commit everything, release the lock.

The registry, the ready protocol and unmounting from outside live in
`mounting`, shared with the CLI and the service.
"""

import errno
import logging
import os
import signal
import time
from typing import Optional

import lmdb
import pyfuse3
import trio

from . import (control, intent_log, log_replay, logs, mounting, policy, schema, scheduling, snapshots,
               volumes)
from .errors import BusyError, CowfsError, FsError, NotFoundError, StoreIOError, UsageError
# Re-exported for the callers that reach mounts through the daemon module
# (pg/workspace, tests/helpers, bench/harness); new code uses `mounting`.
from .mounting import FUSE_TYPE, find_mount, read_registry, unmount  # noqa: F401
from .filesystem import Filesystem
from .counted_ops import CountedOps
from .group_commit import GroupCommitter
from .log_writer import LogWriter
from .space_keeper import SpaceKeeper
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_COMMIT_INTERVAL_S = 5.0
# Kernel read-ahead of the mount. FUSE mounts get 128 KiB, so a sequential
# reader has one 128 KiB request in flight at a time. At 4 MiB the kernel
# sends 1 MiB requests (the largest libfuse negotiates) several at a time,
# which large-read threads serve in parallel (fuse_ops.OFFLOAD_READ_MIN_CHUNKS),
# each one pread per run of chunks. Measured here, 256 MiB read after
# drop_caches: 192-203 MB/s at 128 KiB; 278-419 MB/s at 1 MiB; 401-426 MB/s at
# 4-8 MiB. Random readers are unaffected (read-ahead only grows for
# sequential access).
READ_AHEAD_KIB = 4096
READ_AHEAD_CHECKS = 20
READ_AHEAD_CHECK_INTERVAL_S = 0.25


# --- checks before mounting --------------------------------------------------------------

def check_mountpoint(mountpoint: str) -> str:
    mnt = os.path.abspath(mountpoint)
    if not os.path.exists(mnt):
        raise NotFoundError(f"mountpoint {mnt} does not exist; create it with 'mkdir -p {mnt}'")
    if not os.path.isdir(mnt):
        raise UsageError(f"mountpoint {mnt} is not a directory")
    if find_mount(mnt) is not None:
        raise BusyError(f"{mnt} is already a mount point; unmount it first or pick another directory")
    return mnt


# --- serving ------------------------------------------------------------------------------

async def _periodic_flush(fs: Filesystem, committer: GroupCommitter, interval_s: float) -> None:
    """Bound what a daemon crash can lose without fsync, like a page cache."""
    while True:
        await trio.sleep(interval_s)
        try:
            await committer.sync()      # in the worker thread, like an fsync
            fs.store.packs.drop_unlinked()
        except Exception as exc:
            if fs.stopped is not None:
                # Rule 3: logged once where it failed; every later fsync
                # fails with EIO, so there is nothing left to flush here.
                return
            # A full disk: the data stays buffered and the pack clean; the
            # next fsync retries it and reports any failure to its caller.
            log.warning("background flush failed (%s); data stays buffered", exc)


async def _unmount_on_signal(mountpoint: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting %s", signum, mountpoint)
            # A plain unmount lets the kernel write back its dirty pages to us
            # first; while we await it, this loop keeps serving them.
            result = await trio.run_process(["fusermount3", "-u", mountpoint], check=False,
                                            capture_stderr=True)
            if result.returncode != 0:
                log.warning("unmount failed (%s); detaching lazily",
                            result.stderr.decode(errors="replace").strip())
                await trio.run_process(["fusermount3", "-u", "-z", mountpoint], check=False)


def _syncfs(path: str) -> None:
    """syncfs(2): the kernel writes its cached dirty pages of the mount to us."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


# --- scheduled snapshots ----------------------------------------------------------------------

SCHEDULER_BACKOFF_S = 5.0


async def _scheduler(fs: Filesystem, mountpoint: str) -> None:
    """Automatic snapshots of the mounted volume by its policy, pruning after each.

    The policy is re-read at every tick (at least once a second), so
    `cowfs policy` takes effect without a remount. Nothing here may take the
    mount down: a failed step is logged and retried later.
    """
    pol = None
    while True:
        await trio.sleep(policy.tick_interval_s(pol))
        try:
            pol = await _scheduled_step(fs, mountpoint)
        except Exception:
            log.exception("scheduled snapshot of volume id %d failed; retrying later", fs.vol_id)
            await trio.sleep(SCHEDULER_BACKOFF_S)


async def _scheduled_step(fs: Filesystem, mountpoint: str) -> Optional[policy.Policy]:
    pol, due = scheduling.due(fs.store, fs.vol_id, time.time_ns())
    if due:
        # Rule 5, as for `cowfs snapshot`: the kernel hands over its cached
        # writes, then flush and snapshot commit in one transaction.
        await trio.to_thread.run_sync(_syncfs, mountpoint)
        scheduling.step(fs.store, fs.vol_id, time.time_ns(),
                        take=lambda name: fs.snapshot(name, flags=schema.SNAP_FLAG_AUTO))
    return pol


def _control_handler(fs: Filesystem, committer: GroupCommitter, mountpoint: str,
                     keeper: Optional[SpaceKeeper]):
    async def handle(request: dict) -> dict:
        op = request.get("op")
        if op == "release-pack":
            fs.release_pack()        # so that a `cowfs gc` can reach its dead bytes
            return dict(ok=True)
        if op in ("snapshot", "flush"):
            # Every write acknowledged before this request is in the kernel's
            # cache or ours: take both (rule 5). syncfs runs in a thread, as
            # its writes come back to this event loop.
            await trio.to_thread.run_sync(_syncfs, mountpoint)
            if op == "flush":
                await committer.sync()
                return dict(ok=True)
            return dict(ok=True, gen=fs.snapshot(request["name"]))
        if op == "stats":
            return dict(ok=True, **_stats(fs, committer, keeper))
        return dict(ok=False, error=f"unknown request {op!r}", exit_code=2)
    return handle


# The FUSE adapter of this process's mount (one mount per daemon process),
# whose operation figures `stats` reports.
_mounted_ops: Optional[CountedOps] = None


def _stats(fs: Filesystem, committer: GroupCommitter, keeper: Optional[SpaceKeeper]) -> dict:
    """The `stats` answer. `figures` is passed through as it is by `cowfs status`
    and `cowfs metrics` (names ending in _total are counters, others gauges):
    a figure added here shows up there without other changes."""
    ops = _mounted_ops
    figures = dict(dirty_bytes=fs.dirty_bytes, cached_inodes=len(fs.inodes), head_gen=fs.chain[0][1],
                   fsync_requests_total=committer.requests, flush_jobs_total=fs.flush_jobs,
                   gc_runs_total=0 if keeper is None else keeper.runs,
                   errors_total=logs.errors.count, **scheduling.figures(),
                   **({} if ops is None else ops.figures()), **_log_figures(fs.log, committer))
    return dict(pid=os.getpid(), figures=figures, stopped=fs.stopped,
                last_error=logs.errors.last or None, last_error_ns=logs.errors.last_ns or None,
                fsync_latency=None if ops is None else ops.fsync_latency.snapshot(),
                fuse_requests={} if ops is None else dict(ops.requests),
                # the names of before `figures`, kept for existing callers
                dirty_bytes=fs.dirty_bytes, sync_requests=committer.requests, flush_jobs=fs.flush_jobs)


async def _serve(fs: Filesystem, committer: GroupCommitter, mountpoint: str, dev: str,
                 commit_interval_s: float, listener, log_size_bytes: Optional[int]) -> None:
    async with trio.open_nursery() as nursery:
        if not fs.read_only:
            nursery.start_soon(_start_log, fs, log_size_bytes)
        nursery.start_soon(_set_read_ahead, dev)
        nursery.start_soon(_periodic_flush, fs, committer, commit_interval_s)
        nursery.start_soon(_unmount_on_signal, mountpoint)
        keeper = None
        if not fs.read_only:
            keeper = SpaceKeeper(fs)
            nursery.start_soon(keeper.run)
            nursery.start_soon(_scheduler, fs, mountpoint)
        if listener is not None:
            nursery.start_soon(control.serve, listener, _control_handler(fs, committer, mountpoint, keeper))
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _log_figures(writer: Optional[LogWriter], committer: GroupCommitter) -> dict:
    """The intent log's figures for `stats` (counters end in _total)."""
    if writer is None:
        return dict(log_enabled=0, log_syncs_total=committer.log_syncs)
    return dict(log_enabled=1, log_syncs_total=committer.log_syncs, log_records_total=writer.records,
                log_batches_total=writer.batches, log_written_bytes_total=writer.bytes_written,
                log_used_bytes=writer.used_bytes, log_capacity_bytes=writer.capacity_bytes)


async def _start_log(fs: Filesystem, size_bytes: Optional[int]) -> None:
    """Give the volume its intent log. The file is made at the first
    read-write mount (or when --log-size asks for another size: after the
    replay at mount it holds nothing), in a thread, as writing its zeros
    takes a moment: until then, and for good if it cannot be made (a full
    disk) or with --log-size 0, every fsync is a fold -- three device
    flushes instead of one, nothing else changes."""
    store = fs.store
    path = intent_log.log_path(store.logs_dir, fs.vol_id)
    if size_bytes == 0:
        return
    try:
        if not os.path.exists(path) or (size_bytes and os.path.getsize(path) != size_bytes):
            await trio.to_thread.run_sync(intent_log.create_file, path, fs.vol_id, store.uuid,
                                          size_bytes or intent_log.LOG_BYTES)
        with fs.env.begin() as txn:
            state = intent_log.read_state(txn, fs.env, fs.vol_id)
        writer = LogWriter(path, state, fs.env, store.chunks, on_failure=fs.log_failed)
    except OSError as exc:
        log.warning("volume id %d has no intent log (%s): every fsync commits to the packs "
                    "directly", fs.vol_id, exc)
        return
    writer.on_synced_count = fs.note_synced
    fs.log = writer


def _mount_options(volume: str, read_only: bool) -> set:
    options = set(pyfuse3.default_options)           # default_permissions
    options |= {f"fsname=cowfs:{volume}", "subtype=cowfs", "allow_other", "noatime"}
    if read_only:
        options.add("ro")
    return options


async def _set_read_ahead(dev: str) -> None:
    """Best effort: only root may change it, and a smaller value is only slower.

    The kernel sets the mount's read-ahead when it receives the reply to
    FUSE's INIT request, which this event loop sends once it runs; so set it
    after that, and check for a few seconds that it stayed set."""
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    for _ in range(READ_AHEAD_CHECKS):
        await trio.sleep(READ_AHEAD_CHECK_INTERVAL_S)
        try:
            with open(path) as f:
                if int(f.read()) >= READ_AHEAD_KIB:
                    continue
            with open(path, "w") as f:
                f.write(str(READ_AHEAD_KIB))
        except (OSError, ValueError) as exc:
            log.info("read-ahead stays at the kernel default (%s: %s)", path, exc)
            return


def run(store_path: str, mountpoint: str, volume: str, ready_fd: Optional[int] = None,
        commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
        log_size_bytes: Optional[int] = None, xattrs: bool = True) -> int:
    """Mount and serve until unmounted; returns the process exit code."""
    ready = mounting.Readiness(ready_fd)
    try:
        store, lock, fs, mnt = _prepare(store_path, mountpoint, volume)
    except CowfsError as exc:
        return ready.failed(exc)
    try:
        return _mount_and_serve(store, fs, mnt, volume, commit_interval_s, ready, log_size_bytes, xattrs)
    except CowfsError as exc:
        return ready.failed(exc)
    finally:
        lock.release()
        store.close()


def _mount_and_serve(store: Store, fs: Filesystem, mnt: str, volume: str, commit_interval_s: float,
                     ready: mounting.Readiness, log_size_bytes: Optional[int], xattrs: bool) -> int:
    global _mounted_ops
    committer = GroupCommitter(fs)
    _mounted_ops = CountedOps(fs, committer, xattrs)
    try:
        pyfuse3.init(_mounted_ops, mnt, _mount_options(volume, fs.read_only))
    except RuntimeError as exc:
        raise BusyError(f"mounting {mnt} failed ({exc}); is /dev/fuse usable?") from exc
    try:
        dev, listener = _start_services(store, fs, mnt, volume, commit_interval_s)
    except Exception as exc:
        # Nothing was served yet, so nothing is buffered: unmount, so that a
        # failed start never leaves a dead mount behind.
        pyfuse3.close(unmount=True)
        if isinstance(exc, CowfsError):
            raise
        raise CowfsError(f"starting volume {volume} at {mnt} failed after the FUSE mount ({exc}); "
                         "it was unmounted again and nothing was written; the daemon's log has "
                         "the details") from exc
    ready.ok(f"volume {volume} of {store.path} mounted at {mnt} (pid {os.getpid()})")
    try:
        return _serve_until_unmounted(fs, committer, mnt, dev, commit_interval_s, listener, ready,
                                      log_size_bytes)
    finally:
        if listener is not None:
            listener.close()
            control.remove(store.run_dir, fs.vol_id)


def _start_services(store: Store, fs: Filesystem, mnt: str, volume: str, commit_interval_s: float):
    """The registry entry and the control socket: (dev, listener or None).

    Undoes its own steps when a later one fails.
    """
    dev = find_mount(mnt)["dev"]
    mounting.write_registry(dev, dict(pid=os.getpid(), store=store.path, volume=volume, mountpoint=mnt,
                                      status="mounted", started_ns=time.time_ns(),
                                      read_only=fs.read_only, commit_interval_s=commit_interval_s))
    try:
        listener = None if fs.read_only else control.listen(store.run_dir, fs.vol_id)
    except BaseException:
        mounting.forget_registry(dev)
        raise
    return dev, listener


def _prepare(store_path: str, mountpoint: str, target: str):
    """Open, check and lock; `target` is VOL (read-write) or VOL@SNAP (read-only)."""
    vol_name, snap = snapshots.parse_target(target)
    # Namespace commits skip their own meta-page flush; every path that
    # acknowledges durability syncs the environment (rule 2, rule 5).
    store = Store.open(store_path, metasync=False)
    try:
        mnt = check_mountpoint(mountpoint)
        with store.env.begin() as txn:
            vol_id = volumes.volume_id(txn, store.env, vol_name)
            gen = None if snap is None else snapshots.snapshot_gen(txn, store.env, vol_id, vol_name, snap)
        if snap is None:
            lock = store.lock_volume(vol_id, vol_name, f"mounted at {mnt}")
            _replay(store, vol_id, vol_name, lock)
        else:
            lock = store.lock_snapshot(vol_id, gen, target, exclusive=False, holder=f"mounted at {mnt}")
            _recheck_snapshot(store, vol_id, vol_name, snap, gen, lock)
    except BaseException:
        store.close()
        raise
    try:
        fs = Filesystem(store, vol_id, read_only=snap is not None, as_of_gen=gen)
        if snap is None:
            fs.recover_orphans()
    except BaseException:
        lock.release()
        store.close()
        raise
    return store, lock, fs, mnt


def _replay(store: Store, vol_id: int, vol_name: str, lock) -> None:
    """Before serving: the writes a crashed predecessor acknowledged through
    the intent log go into LMDB (and the log starts a new epoch)."""
    try:
        store.prepare_for_logs()
        log_replay.replay(store, vol_id)
    except (OSError, lmdb.Error) as exc:
        lock.release()
        raise StoreIOError(f"replaying the intent log of volume {vol_name} failed: {exc}; "
                           "nothing was changed, check the disk and mount again") from exc


def _recheck_snapshot(store: Store, vol_id: int, vol_name: str, snap: str, gen: int, lock) -> None:
    """The snapshot may have been destroyed between the lookup and our shared lock."""
    with store.env.begin() as txn:
        try:
            now_gen = snapshots.snapshot_gen(txn, store.env, vol_id, vol_name, snap)
        except NotFoundError:
            now_gen = None
    if now_gen != gen:
        lock.release()
        raise NotFoundError(f"snapshot {vol_name}@{snap} was destroyed or renamed while mounting; "
                            "'cowfs list STORE' shows the snapshots")


def _serve_until_unmounted(fs: Filesystem, committer: GroupCommitter, mnt: str, dev: str,
                           commit_interval_s: float, listener, ready: mounting.Readiness,
                           log_size_bytes: Optional[int]) -> int:
    unmounted = False
    try:
        trio.run(_serve, fs, committer, mnt, dev, commit_interval_s, listener, log_size_bytes)
        unmounted = True
    finally:
        ready.stopping(f"{mnt} unmounted; committing buffered writes")
        error = _final_flush(fs)        # a fold that covers every intent-log record
        if fs.log is not None:
            fs.log.close()
        pyfuse3.close(unmount=not unmounted)
        if error is not None:
            mounting.write_json(mounting.final_status_path(os.getpid()), dict(mountpoint=mnt, error=error))
        else:
            log.info("%s unmounted; every buffered write is committed", mnt)   # status.CLEAN_EXIT
        mounting.forget_registry(dev)
    return 0 if error is None else StoreIOError.exit_code


def _final_flush(fs: Filesystem) -> Optional[str]:
    fs.unmounting = True
    try:
        try:
            fs.sync_all()      # rule 2: also the metadata of earlier namespace commits
        except FsError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The last chance for these writes: the grace (`space`) exists
            # for exactly this.
            fs.store.packs.space.open_grace()
            fs.sync_all()
        return None
    except Exception as exc:
        # Rule 3: `cowfs umount` reports this (exit 7) instead of success.
        log.error("final flush failed: buffered writes were NOT saved: %s", exc)
        return f"final flush failed, buffered writes were not saved: {exc}"
