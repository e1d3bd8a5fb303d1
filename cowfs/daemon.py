"""The mount daemon: one process per mounted volume.

Lifecycle: open the store, take the volume lock (one read-write user at a
time), free orphans a crashed predecessor left, mount, tell the waiting
``cowfs mount`` that the mount is usable, serve until unmounted, flush,
release the lock.

A registry file per mount (``/run/cowfs/<dev>.json``, keyed by the mount's
device number from /proc/self/mountinfo) lets ``cowfs umount MOUNTPOINT``
find the daemon without knowing the store; a daemon whose final flush
failed leaves ``final-<pid>.json`` beside it for ``umount`` to report (keyed
by pid: the kernel hands the device number to the next mount as soon as
this one is gone, and a daemon removes only an entry that is still its own).
Reading mountinfo never sends a request to a FUSE daemon, so a hung daemon
cannot hang ``umount``.
"""

import errno
import json
import logging
import os
import signal
import subprocess
import time
from typing import Optional

import lmdb
import pyfuse3
import trio

from . import admin, control, intent_log, log_replay, policy, schema, snapshots, volumes
from .errors import BusyError, CowfsError, FsError, NotFoundError, StoreIOError, UsageError
from .filesystem import Filesystem
from .fuse_ops import FuseOps
from .group_commit import GroupCommitter
from .log_writer import LogWriter
from .space_keeper import SpaceKeeper
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_COMMIT_INTERVAL_S = 5.0
FUSE_TYPE = "fuse.cowfs"
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


# --- mount table and registry ---------------------------------------------------------

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(mountpoint: str) -> Optional[dict]:
    """The mountinfo entry of a mount point (the last one, if stacked), or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if _unescape(fields[4]) == mountpoint:
                found = dict(dev=fields[2], mountpoint=mountpoint, fstype=rfields[0],
                             source=_unescape(rfields[1]))
    return found


def registry_dir() -> str:
    base = "/run" if os.access("/run", os.W_OK) else (os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    path = os.path.join(base, "cowfs" if base == "/run" else f"cowfs-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def registry_path(dev: str) -> str:
    return os.path.join(registry_dir(), dev.replace(":", "_") + ".json")


def read_registry(dev: str) -> Optional[dict]:
    try:
        with open(registry_path(dev)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_registry(dev: str, info: dict) -> None:
    _write_json(registry_path(dev), info)


def _write_json(path: str, info: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def final_status_path(pid: int) -> str:
    """Where a daemon that ends with an error leaves it for `cowfs umount`.

    Keyed by pid, not by the mount's device number: the kernel gives that
    number to the next FUSE mount as soon as this one is gone, while this
    daemon may still be writing its final flush."""
    return os.path.join(registry_dir(), f"final-{pid}.json")


def _forget_registry(dev: str) -> None:
    """Remove the registry entry of `dev` if it is still ours (the number may
    belong to a newer mount already)."""
    info = read_registry(dev)
    if info is not None and info.get("pid") == os.getpid():
        try:
            os.unlink(registry_path(dev))
        except OSError:
            pass


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
    with fs.env.begin() as txn:
        pol = policy.get(txn, fs.env, fs.vol_id)
        last_ns = None if pol is None else admin.last_auto_ns(txn, fs.env, fs.vol_id)
    if pol is None or not policy.is_due(pol, last_ns, time.time_ns()):
        return pol
    # Rule 5, as for `cowfs snapshot`: the kernel hands over its cached
    # writes, then flush and snapshot commit in one transaction.
    await trio.to_thread.run_sync(_syncfs, mountpoint)
    with fs.env.begin() as txn:
        name = admin.free_snapshot_name(txn, fs.env, fs.vol_id, policy.auto_name(time.time_ns()))
        vol_name = volumes.volume_record(txn, fs.env, fs.vol_id)["name"]
    fs.snapshot(name, flags=schema.SNAP_FLAG_AUTO)
    result = admin.prune_volume(fs.store, fs.vol_id, vol_name)
    log.info("scheduled snapshot %s@%s; pruned %d (%d bytes freed)%s", vol_name, name,
             len(result["destroy"]), result["frees_bytes"],
             f", {len(result['skipped'])} in use" if result["skipped"] else "")
    return pol


def _control_handler(ops: FuseOps, mountpoint: str, keeper: Optional[SpaceKeeper]):
    fs, committer = ops.fs, ops.committer

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
            return dict(ok=True, pid=os.getpid(), dirty_bytes=fs.dirty_bytes,
                        cached_inodes=len(fs.inodes), head_gen=fs.chain[0][1],
                        sync_requests=committer.requests, flush_jobs=fs.flush_jobs,
                        gc_runs=0 if keeper is None else keeper.runs,
                        log_syncs=committer.log_syncs, fuse_requests=dict(ops.requests),
                        **_log_stats(fs.log))
        return dict(ok=False, error=f"unknown request {op!r}", exit_code=2)
    return handle


async def _serve(ops: FuseOps, mountpoint: str, dev: str,
                 commit_interval_s: float, listener, log_size_bytes: Optional[int]) -> None:
    fs, committer = ops.fs, ops.committer
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
            nursery.start_soon(control.serve, listener, _control_handler(ops, mountpoint, keeper))
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _log_stats(writer: Optional[LogWriter]) -> dict:
    if writer is None:
        return dict(log_enabled=False)
    return dict(log_enabled=True, log_records=writer.records, log_batches=writer.batches,
                log_bytes_written=writer.bytes_written, log_used_bytes=writer.used_bytes,
                log_capacity_bytes=writer.capacity_bytes)


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


class _Ready:
    """Tells the `cowfs mount` that started us how mounting went."""

    def __init__(self, fd: Optional[int]):
        self._fd = fd

    def send(self, text: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, text.encode() + b"\n")
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None


def run(store_path: str, mountpoint: str, volume: str, ready_fd: Optional[int] = None,
        commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
        log_size_bytes: Optional[int] = None, xattrs: bool = True) -> int:
    """Mount and serve until unmounted; returns the process exit code."""
    ready = _Ready(ready_fd)
    try:
        store, lock, fs, mnt = _prepare(store_path, mountpoint, volume)
    except CowfsError as exc:
        ready.send(f"ERR {exc.exit_code} {exc}")
        log.error("%s", exc)
        return exc.exit_code
    status = 0
    try:
        try:
            ops = FuseOps(fs, GroupCommitter(fs), xattrs)
            pyfuse3.init(ops, mnt, _mount_options(volume, fs.read_only))
        except RuntimeError as exc:
            raise BusyError(f"mounting {mnt} failed ({exc}); is /dev/fuse usable?") from exc
        dev = find_mount(mnt)["dev"]
        _write_registry(dev, dict(pid=os.getpid(), store=store.path, volume=volume,
                                  mountpoint=mnt, status="mounted"))
        # The control socket before "ready": commands may talk to the volume
        # as soon as `cowfs mount` returned.
        listener = None if fs.read_only else control.listen(store.run_dir, fs.vol_id)
        ready.send("OK")
        log.info("volume %s of %s mounted at %s (pid %d)", volume, store.path, mnt, os.getpid())
        try:
            status = _serve_until_unmounted(ops, mnt, dev, commit_interval_s, listener,
                                            log_size_bytes)
        finally:
            if listener is not None:
                listener.close()
                control.remove(store.run_dir, fs.vol_id)
    except CowfsError as exc:
        ready.send(f"ERR {exc.exit_code} {exc}")
        log.error("%s", exc)
        status = exc.exit_code
    finally:
        lock.release()
        store.close()
    return status


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


def _serve_until_unmounted(ops: FuseOps, mnt: str, dev: str,
                           commit_interval_s: float, listener, log_size_bytes: Optional[int]) -> int:
    fs = ops.fs
    unmounted = False
    try:
        trio.run(_serve, ops, mnt, dev, commit_interval_s, listener, log_size_bytes)
        unmounted = True
    finally:
        error = _final_flush(fs)        # a fold that covers every intent-log record
        if fs.log is not None:
            fs.log.close()
        pyfuse3.close(unmount=not unmounted)
        if error is not None:
            _write_json(final_status_path(os.getpid()), dict(mountpoint=mnt, error=error))
        _forget_registry(dev)
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


# --- unmounting (called by the CLI) --------------------------------------------------------

def unmount(mountpoint: str, timeout_s: float = 600.0) -> None:
    mnt = os.path.abspath(mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        raise NotFoundError(f"{mnt} is not mounted")
    if entry["fstype"] != FUSE_TYPE:
        raise UsageError(f"{mnt} is not a cowfs mount (it is {entry['fstype']})")
    info = read_registry(entry["dev"])
    result = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip()
        if "busy" in detail.lower():
            raise BusyError(f"{mnt} is busy; stop the processes using it (see 'fuser -vm {mnt}') "
                            "and try again")
        raise CowfsError(f"unmounting {mnt} failed: {detail}")
    if info is not None:
        _wait_for_exit(info["pid"], timeout_s, mnt)
        try:
            with open(final_status_path(info["pid"])) as f:
                final = json.load(f)
        except (OSError, ValueError):
            return
        os.unlink(final_status_path(info["pid"]))
        raise StoreIOError(f"{mnt}: {final.get('error')}")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _wait_for_exit(pid: int, timeout_s: float, mnt: str) -> None:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            raise BusyError(f"the daemon of {mnt} (pid {pid}) is still flushing after {timeout_s:.0f} s; "
                            "it keeps going, check its log")
        time.sleep(0.02)
