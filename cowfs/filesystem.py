"""POSIX filesystem logic of one mounted volume, on inode numbers and bytes.

No pyfuse3 here: `fuse_ops` adapts these methods to FUSE. Every method is
synchronous, so each runs atomically with respect to other trio tasks.
Developer rule: do not add an ``await`` (or a thread hop) inside a method of
this class. The write path relies on the chunk buffers not changing between
staging them and clearing them after the commit.

State model
-----------
The in-memory `Inode` is the truth for the mounted head of the volume; the
catalog holds what was last committed. Data writes and time/mode changes only
touch memory (``dirty``); namespace operations (create, link, unlink, rename,
rmdir, truncate, xattrs) commit at once. Any commit that writes an inode
record also writes that inode's buffered chunks in the same transaction, so a
committed size never exposes bytes that were not committed with it.

Durability (DESIGN rules, cited in code by number):
 1. chunk bytes are synced in their pack before the LMDB commit naming them;
 2. fsync/fdatasync/fsyncdir return after one commit covering every
    buffered write of the volume (group commit: one pack sync + one LMDB
    commit for all files) -- namespace operations are already committed;
 3. a failed flush raises to the fsync caller and is never reported as a
    success later. A full disk (a pack write or the LMDB commit refused for
    space) leaves the data buffered and the pack clean, so a later fsync
    rewrites all of it durably and may succeed. Any other failure (a failed
    pack fdatasync, an I/O error) *stops* the volume: every later fsync,
    write and change fails with EIO until remount (`VolumeStoppedError`),
    because the kernel may have dropped the pages an earlier fsync covered;
 6. nothing is committed that refers to bytes not yet durable.
"""

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from typing import Callable, Iterable, Optional

import lmdb

from . import catalog, faults, schema, snapshots, volumes
from .chunks import ChunkBatch, is_zero
from .errors import FsError, VolumeStoppedError
from .packs import PackSyncError
from .store import Store

log = logging.getLogger(__name__)

NAME_MAX_BYTES = 255
XATTR_VALUE_MAX_BYTES = 64 * 1024
# Beyond this much buffered, a write starts a flush in the background (the
# loop keeps taking writes into fresh buffers meanwhile); beyond twice it,
# the write waits for a flush: buffered memory stays under 2x this.
DIRTY_LIMIT_BYTES = 32 << 20
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# LMDB reports a short page write -- what a full filesystem gives -- as EIO.
# Below this much free space, an LMDB write error counts as a full disk.
LMDB_FULL_DISK_SLACK_BYTES = 1 << 20


class MetadataSyncError(OSError):
    """Syncing the LMDB environment failed: like a failed pack sync, the
    kernel may have dropped pages of earlier commits, so it never counts as
    a full disk that a retry could honestly fix (rule 3)."""


def sync_environment(env) -> None:
    try:
        env.lmdb.sync(True)
    except lmdb.Error as exc:
        raise MetadataSyncError(errno.EIO, f"syncing the metadata failed: {exc}") from exc


def is_full_disk(exc: BaseException, meta_dir: str) -> bool:
    """Did a flush fail only for lack of space, with nothing acknowledged lost?"""
    if isinstance(exc, (PackSyncError, MetadataSyncError)):
        return False             # rule 3: a failed sync is never retried into a success
    if isinstance(exc, lmdb.MapFullError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in FULL_DISK_ERRNOS
    if isinstance(exc, lmdb.Error):
        try:
            st = os.statvfs(meta_dir)
        except OSError:
            return False
        return st.f_bfree * st.f_frsize < LMDB_FULL_DISK_SLACK_BYTES
    return False


def stage_buffers(buffers: dict, size: int, chunk_size: int, batch: ChunkBatch) -> dict:
    """Add the chunk buffers of one file (of `size` bytes) to `batch`:
    {chunk_index: chunk_id, or None for an all-zero chunk (a hole)}.

    The buffers are not copied: callers keep them unchanged until the batch
    is applied (a FlushJob's frozen buffers; a `_change`, which runs without
    yielding to the event loop)."""
    chunk_ids = {}
    indices, datas = [], []
    for idx, buf in buffers.items():
        length = max(min(chunk_size, size - idx * chunk_size), 0)
        data = memoryview(buf)[:length]
        if is_zero(data):
            chunk_ids[idx] = None
        else:
            indices.append(idx)
            datas.append(data)
    chunk_ids.update(zip(indices, batch.add_many(datas, stable=True)))
    return chunk_ids


def write_chunk_map(txn, env, chain, batch: ChunkBatch, ino: int, chunk_ids: dict) -> None:
    """Point the chunk map of `ino` at `chunk_ids`, with reference counts."""
    for idx, chunk_id in chunk_ids.items():
        key = schema.chunk_key(ino, idx)
        if chunk_id is None:   # a hole: all-zero chunks are not stored
            old = catalog.delete(txn, env, chain, schema.KIND_CHUNK, key)
        else:
            old = catalog.put(txn, env, chain, schema.KIND_CHUNK, key, chunk_id)
            batch.ref(chunk_id)
        if old is not None:
            batch.unref(old)


class FlushJob:
    """One group commit, frozen on the event loop and run in a worker thread.

    `Filesystem.begin_flush` moves every dirty inode's chunk buffers out of
    `Inode.dirty` into `Inode.flushing` and copies its attributes and the
    version chain into the job. `run` then uses only those frozen copies,
    the chunk store and LMDB, so the event loop keeps serving reads and
    buffered writes (into fresh `dirty` buffers) while the device flushes.
    The loop never commits or appends to the pack while a job is in flight:
    every other commit path first waits for it (`Filesystem._settle_inflight`).
    """

    def __init__(self, fs: "Filesystem", entries: list, chain: list, sync_env: bool,
                 to_reclaim: list):
        self.env = fs.env
        self.chunks = fs.store.chunks
        self.chunk_size = fs.chunk_size
        self.entries = entries   # [(inode, frozen buffers, attrs copy)]
        self.chain = chain
        self.sync_env = sync_env
        # Chunk entries freed by earlier commits, given back once this job
        # synced the environment (rule 4); then this job's own.
        self.to_reclaim = to_reclaim
        self.reclaimed = False
        self.done = threading.Event()
        self.error: Optional[BaseException] = None      # what `run` raised
        self.outcome: Optional[FsError] = None          # what the fsync callers get
        self.finished = False                           # `Filesystem.finish_flush` ran

    def run(self) -> None:
        """Worker thread: pack sync, commit, environment sync (rules 1, 2)."""
        try:
            if self.entries:
                self._commit()
            if self.sync_env:
                # The daemon's environment skips the meta-page flush at
                # commit (schema.Env metasync=False): sync before answering.
                sync_environment(self.env)
                self.chunks.reclaim(self.to_reclaim, synced=True)
                self.reclaimed = True
        except BaseException as exc:      # handed to the loop by finish_flush
            self.error = exc
        finally:
            self.done.set()

    def _commit(self) -> None:
        batch = self.chunks.batch()
        staged = [(inode.ino, attrs, inode.target,
                   stage_buffers(frozen, attrs["size"], self.chunk_size, batch))
                  for inode, frozen, attrs in self.entries]
        batch.sync()                                    # rule 1
        batch.prepare_commit()
        txn = self.env.begin(write=True)
        try:
            for ino, attrs, target, chunk_ids in staged:
                write_chunk_map(txn, self.env, self.chain, batch, ino, chunk_ids)
                catalog.put(txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(ino),
                            schema.pack_inode(attrs, target))
            batch.apply(txn)
        except BaseException:
            txn.abort()
            raise
        faults.point("commit.before")
        txn.commit()                                    # the commit point (rule 2)
        faults.point("commit.after")
        self.to_reclaim = self.to_reclaim + batch.freed_locations


class ReadPlan:
    """The stored part of a read, fetched outside the event loop if large.

    Holds copies of the buffered chunks it needs and the pack locations of
    the stored ones, so `fetch` touches no `Filesystem` state: a write that
    lands meanwhile is simply not part of this read (as if it came after).
    """

    def __init__(self, chunks, chunk_size: int, offset: int, end: int):
        self.chunks = chunks
        self.chunk_size = chunk_size
        self.offset, self.end = offset, end
        self.memory: dict[int, bytes] = {}      # chunk index -> buffered bytes (copy)
        self.stored: tuple = ([], [], [])      # chunk indices, ids, (pack, offset, length)

    @property
    def stored_chunks(self) -> int:
        return len(self.stored[0])

    def fetch(self) -> bytes:
        cs, offset, end = self.chunk_size, self.offset, self.end
        if offset >= end:
            return b""
        indices, ids, locations = self.stored
        chunks = dict(self.memory)
        chunks.update(zip(indices, self.chunks.read_located(ids, locations)))
        parts = []
        for idx in range(offset // cs, (end - 1) // cs + 1):
            base = idx * cs
            data = chunks.get(idx, b"")
            lo, hi = max(offset, base) - base, min(end, base + cs) - base
            piece = data[lo:hi]
            if len(piece) < hi - lo:      # short chunk or hole: zeros
                piece += bytes(hi - lo - len(piece))
            parts.append(piece)
        return b"".join(parts)


class Inode:
    __slots__ = ("ino", "attrs", "target", "lookups", "opens", "dirty", "flushing",
                 "in_job", "attrs_dirty", "purged")

    def __init__(self, ino: int, attrs: dict, target: bytes = b""):
        self.ino = ino
        self.attrs = attrs
        self.target = target               # symlink target
        self.lookups = 0                   # kernel references (lookup/forget)
        self.opens = 0                     # open file handles
        self.dirty: dict[int, bytearray] = {}   # chunk_index -> full-size chunk buffer
        # Buffers frozen into the FlushJob in flight (read-only until it ends);
        # newer writes go to `dirty`, which reads consult first.
        self.flushing: dict[int, bytearray] = {}
        # Part of the FlushJob in flight (even with attributes only): it must
        # stay the cached object, or a reload would show the old record.
        self.in_job = False
        self.attrs_dirty = False
        self.purged = False                # records deleted; only kernel references remain

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attrs["mode"])

    def buffered(self, idx: int) -> Optional[bytearray]:
        """The newest buffered bytes of chunk `idx` (written, or frozen in the
        flush in flight), or None if the store has the current version."""
        buf = self.dirty.get(idx)
        return self.flushing.get(idx) if buf is None else buf


class _Change:
    """One namespace transaction: pending attribute changes, applied after commit."""

    def __init__(self, fs: "Filesystem", txn, batch: ChunkBatch, flushing: set[int]):
        self.fs = fs
        self.txn = txn
        self.batch = batch
        self.flushing = flushing
        # ino -> (inode, attributes before, attributes to write)
        self.pending: dict[int, tuple[Inode, dict, dict]] = {}
        self.created: list[Inode] = []
        self.purged: list[Inode] = []

    def attrs(self, inode: Inode) -> dict:
        """The attribute record this change writes for `inode`, for the body
        to change; the fields it changes reach the cached inode after the
        commit.

        A file whose buffered writes this change does not commit starts from
        its *committed* record: only the fields the body changes (nlink,
        ctime) are written, its buffered data and size stay buffered. So a
        namespace change never needs space for other data (a full disk can
        always unlink, rename over, link), and never commits a size ahead of
        the data committed with it."""
        entry = self.pending.get(inode.ino)
        if entry is None:
            if inode.is_dir or inode.ino in self.flushing or inode.ino not in self.fs.dirty_inos:
                base = dict(inode.attrs)
            else:
                base = self.fs._committed_attrs(self.txn, inode)
            entry = self.pending[inode.ino] = (inode, base, dict(base))
        return entry[2]

    def create(self, ino: int, attrs: dict, target: bytes = b"") -> Inode:
        inode = Inode(ino, attrs, target)
        self.created.append(inode)
        self.fs._put_inode_record(self.txn, ino, attrs, target)
        return inode

    def put(self, kind: bytes, record_key: bytes, payload: bytes) -> None:
        catalog.put(self.txn, self.fs.env, self.fs.chain, kind, record_key, payload)

    def delete(self, kind: bytes, record_key: bytes) -> Optional[bytes]:
        return catalog.delete(self.txn, self.fs.env, self.fs.chain, kind, record_key)

    def purge(self, inode: Inode) -> None:
        """Delete every record of an inode (its last link and last open are gone)."""
        fs, txn = self.fs, self.txn
        ino_key = schema.inode_key(inode.ino)
        for record_key, _ in catalog.scan(txn, fs.env, fs.chain, schema.KIND_CHUNK, ino_key):
            old = self.delete(schema.KIND_CHUNK, record_key)
            if old is not None:
                self.batch.unref(old)
        for record_key, _ in catalog.scan(txn, fs.env, fs.chain, schema.KIND_XATTR, ino_key):
            self.delete(schema.KIND_XATTR, record_key)
        self.delete(schema.KIND_INODE, ino_key)
        txn.delete(schema.orphan_key(fs.vol_id, inode.ino), db=fs.env.orphans)
        self.purged.append(inode)


class Filesystem:
    def __init__(self, store: Store, vol_id: int, read_only: bool = False,
                 as_of_gen: Optional[int] = None):
        self.store = store
        self.env = store.env
        self.chunk_size = store.chunk_size
        self.vol_id = vol_id
        self.read_only = read_only
        with self.env.begin() as txn:
            self.chain = catalog.volume_chain(txn, self.env, vol_id, as_of_gen)
        self.inodes: dict[int, Inode] = {}
        self.dirty_inos: set[int] = set()
        self.dirty_bytes = 0
        self._dir_handles: dict[int, list[tuple[bytes, int]]] = {}
        self._next_dir_fh = 1
        self.stopped: Optional[str] = None     # why the volume stopped (rule 3), or None
        self._inflight: Optional[FlushJob] = None
        # Commits since the environment was last synced (the daemon's
        # commits leave the meta page unflushed: schema.Env metasync=False).
        self.unsynced_commits = 0
        # Chunk entries freed by commits not yet synced: their blocks go back
        # to the filesystem after the next environment sync (rule 4).
        self._to_reclaim: list[tuple[int, int, int]] = []
        self.flush_jobs = 0                     # FlushJobs run (for `stats`)
        # Set by the daemon's group committer: starts a flush without waiting.
        self.background_flush: Optional[Callable[[], None]] = None
        # Set by the daemon: told how many chunk bytes a commit freed (their
        # last reference went), so that a nearly full store gets them back.
        self.on_space_freed: Optional[Callable[[int], None]] = None

    # --- loading -----------------------------------------------------------------

    def get(self, ino: int, txn=None) -> Inode:
        inode = self.inodes.get(ino)
        if inode is not None:
            return inode
        with contextlib.ExitStack() as stack:
            if txn is None:
                txn = stack.enter_context(self.env.begin())
            raw = catalog.get(txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(ino))
        if raw is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        attrs, target = schema.unpack_inode(raw)
        inode = Inode(ino, attrs, target)
        self.inodes[ino] = inode
        return inode

    def _child_ino(self, txn, parent: Inode, name: bytes) -> Optional[int]:
        raw = catalog.get(txn, self.env, self.chain, schema.KIND_DENTRY,
                          schema.dentry_key(parent.ino, name))
        return None if raw is None else schema.read_u64(raw)

    def _maybe_evict(self, inode: Inode) -> None:
        if (inode.lookups <= 0 and inode.opens <= 0 and inode.ino not in self.dirty_inos
                and not inode.in_job and inode.ino != schema.ROOT_INO
                and self.inodes.get(inode.ino) is inode):
            del self.inodes[inode.ino]

    def _check_writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS, "snapshot mounts are read-only")
        if self.stopped is not None:
            raise VolumeStoppedError(self.stopped)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX_BYTES:
            raise FsError(errno.ENAMETOOLONG, name[:40].decode(errors="replace"))

    def _dir(self, ino: int) -> Inode:
        inode = self.get(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino}")
        return inode

    # --- commits -------------------------------------------------------------------

    def _put_inode_record(self, txn, ino: int, attrs: dict, target: bytes) -> None:
        catalog.put(txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(ino),
                    schema.pack_inode(attrs, target))

    def _committed_attrs(self, txn, inode: Inode) -> dict:
        """The attributes of `inode` as last committed (its buffered changes aside)."""
        raw = catalog.get(txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(inode.ino))
        return dict(inode.attrs) if raw is None else schema.unpack_inode(raw)[0]

    def _stage(self, inodes: Iterable[Inode], batch: ChunkBatch,
               stage_below: dict[int, int]) -> list[tuple[Inode, dict]]:
        """Append buffered chunks of `inodes` to the pack: {chunk_index: chunk_id | None}.

        stage_below: ino -> first chunk index not to store (a truncate drops
        the buffered chunks past its cut instead of writing them)."""
        staged = []
        for inode in inodes:
            buffers = inode.dirty
            limit = stage_below.get(inode.ino)
            if limit is not None:
                buffers = {idx: buf for idx, buf in buffers.items() if idx < limit}
            staged.append((inode, stage_buffers(buffers, inode.attrs["size"], self.chunk_size, batch)))
        return staged

    def _write_chunk_map(self, txn, batch: ChunkBatch, ino: int, chunk_ids: dict) -> None:
        write_chunk_map(txn, self.env, self.chain, batch, ino, chunk_ids)

    @contextlib.contextmanager
    def _change(self, flush: Iterable[Inode] = (), extra_chunks: Iterable = (),
                stage_below: Optional[dict[int, int]] = None, use_reserve: bool = False):
        """A committed change that also writes the buffers of `flush` inodes.

        A namespace change (no `flush`) writes no chunk at all, so it works
        on a full disk: its LMDB commit fits in the space reserve that chunk
        writes leave free (`space`).
        extra_chunks: (inode, chunk_index, bytes) to store in the same commit.
        stage_below: see `_stage`. use_reserve: the chunks of this change
        may use the space reserve (a truncate, which frees more than it
        writes). Errors of the body (EEXIST...) abort it and change nothing;
        errors of the flush itself go through `_flush_guard` (rule 3).
        """
        self._settle_inflight()
        self._check_writable()
        flush = list({inode.ino: inode for inode in flush}.values())
        batch = self.store.chunks.batch(use_reserve=use_reserve)
        with self._flush_guard():
            staged = self._stage(flush, batch, stage_below or {})
            extra = {}
            for inode, idx, data in extra_chunks:
                extra.setdefault(inode.ino, (inode, {}))[1][idx] = None if is_zero(data) else batch.add(data)
            batch.sync()                                # rule 1
            batch.prepare_commit()
        txn = self.env.begin(write=True)
        try:
            change = _Change(self, txn, batch, {inode.ino for inode in flush})
            yield change
            self._finish_change(txn, batch, change, staged, extra)
            with self._flush_guard():
                batch.apply(txn)
        except BaseException:
            txn.abort()
            raise
        with self._flush_guard():
            faults.point("commit.before")
            txn.commit()                                # the commit point (rule 2)
        faults.point("commit.after")
        self.unsynced_commits += 1
        self._to_reclaim.extend(batch.freed_locations)
        self._after_commit(change, staged)
        if batch.freed_bytes and self.on_space_freed is not None:
            self.on_space_freed(batch.freed_bytes)

    @contextlib.contextmanager
    def _flush_guard(self):
        """Sort a failed flush: full disk (retry later is honest) or stop (rule 3)."""
        try:
            yield
        except (OSError, lmdb.Error) as exc:
            raise self._flush_failed(exc) from exc

    def _flush_failed(self, exc: BaseException) -> FsError:
        """The error for the callers of a failed flush; stops the volume unless
        the disk was only full (rule 3)."""
        if is_full_disk(exc, os.path.join(self.store.path, "meta")):
            log.warning("volume %d: flush failed, disk full (%s); data stays buffered. Delete "
                        "files (their space comes back by itself) or destroy snapshots that "
                        "hold deleted data: 'cowfs df %s' names them", self.vol_id, exc,
                        self.store.path)
            if self.on_space_freed is not None:
                self.on_space_freed(0)        # a full disk: space deleted earlier may be reclaimable
            return FsError(errno.ENOSPC, f"store {self.store.path} is full ({exc}); delete files "
                                         f"or destroy snapshots ('cowfs df {self.store.path}' "
                                         "shows what frees space)")
        if self.stopped is None:
            self.stopped = f"flushing volume {self.vol_id} of {self.store.path} failed: {exc}"
            log.error("%s; the volume stops accepting writes until remounted (rule 3)", self.stopped)
        return VolumeStoppedError(self.stopped)

    # --- group commit off the event loop (see FlushJob) ----------------------------------

    def begin_flush(self, inos: Optional[set[int]] = None) -> FlushJob:
        """Freeze the buffered writes of `inos` (None: of every file) and the
        unsynced commits into a job that a worker thread runs
        (`FlushJob.run`); `finish_flush` ends it."""
        self._settle_inflight()
        if self.stopped is not None:
            raise VolumeStoppedError(self.stopped)     # rule 3: never a late success
        chosen = [self.inodes[ino]         # look up all first: nothing below may raise
                  for ino in (self.dirty_inos if inos is None else self.dirty_inos & inos)]
        entries = []
        for inode in chosen:         # never purged ones: `_mark_dirty` keeps them out
            self.dirty_inos.discard(inode.ino)
            entries.append((inode, inode.dirty, dict(inode.attrs)))
            inode.flushing, inode.dirty = inode.dirty, {}
            inode.attrs_dirty = False
            inode.in_job = True
        job = FlushJob(self, entries, list(self.chain),
                       sync_env=bool(entries) or self.unsynced_commits > 0,
                       to_reclaim=self._to_reclaim)
        self.unsynced_commits = 0
        self._to_reclaim = []
        self._inflight = job
        self.flush_jobs += 1
        return job

    def finish_flush(self, job: FlushJob) -> None:
        """On the event loop, after `job.run`: the buffers it committed are
        clean; if it failed they are buffered again and the error (ENOSPC, or
        EIO once the volume stopped: rule 3) is raised. Idempotent."""
        if not job.finished:
            job.finished = True
            if self._inflight is job:
                self._inflight = None
            if job.error is None:
                for inode, frozen, _ in job.entries:
                    self._release_frozen(inode, frozen)
            else:
                job.outcome = self._flush_failed(job.error)
                self._rebuffer(job)
            if not job.reclaimed:
                self._to_reclaim.extend(job.to_reclaim)      # after the next sync
        if job.outcome is not None:
            raise job.outcome

    def _release_frozen(self, inode: Inode, frozen: dict) -> None:
        self.dirty_bytes -= len(frozen) * self.chunk_size
        if inode.flushing is frozen:
            inode.flushing = {}
        inode.in_job = False
        self._maybe_evict(inode)

    def _rebuffer(self, job: FlushJob) -> None:
        """A failed job's writes are buffered again: a later fsync after a full
        disk writes them (rule 3), and reads of a stopped volume still see them."""
        for inode, frozen, _ in job.entries:
            newer = inode.dirty
            inode.dirty = frozen
            inode.flushing = {}
            inode.in_job = False
            for idx, buf in newer.items():     # written during the flush: newer bytes
                if idx in frozen:
                    self.dirty_bytes -= self.chunk_size
                frozen[idx] = buf
            if not inode.purged:
                self._mark_dirty(inode)
        self.unsynced_commits += 1

    def _settle_inflight(self) -> None:
        """Wait for the job in flight, if any, and apply its outcome.

        Every commit path on the event loop calls this first, so a job never
        runs beside another commit or pack append of this volume. The job's
        error belongs to the fsync callers waiting for it; this caller goes on
        (a stopped volume refuses it in `_check_writable`)."""
        job = self._inflight
        if job is None:
            return
        job.done.wait()
        with contextlib.suppress(FsError):
            self.finish_flush(job)

    def _finish_change(self, txn, batch, change: _Change, staged, extra) -> None:
        purged = {inode.ino for inode in change.purged}
        for inode, chunk_ids in staged:
            if inode.ino not in purged and not inode.purged:
                self._write_chunk_map(txn, batch, inode.ino, chunk_ids)
        for ino, (inode, chunk_ids) in extra.items():
            if ino not in purged:
                self._write_chunk_map(txn, batch, ino, chunk_ids)
        for inode, _ in staged:
            if inode.ino not in purged and inode.ino not in change.pending and not inode.purged:
                self._put_inode_record(txn, inode.ino, inode.attrs, inode.target)
        for ino, (inode, _before, attrs) in change.pending.items():
            if ino not in purged:
                self._put_inode_record(txn, ino, attrs, inode.target)

    def _after_commit(self, change: _Change, staged) -> None:
        for inode, before, after in change.pending.values():
            for field, value in after.items():
                if before[field] != value:
                    inode.attrs[field] = value
        for inode in change.created:
            self.inodes[inode.ino] = inode
        for inode, _ in staged:
            self.dirty_bytes -= len(inode.dirty) * self.chunk_size
            inode.dirty.clear()
            inode.attrs_dirty = False
            self.dirty_inos.discard(inode.ino)
        for inode in change.purged:
            inode.purged = True
            self.dirty_bytes -= len(inode.dirty) * self.chunk_size
            inode.dirty.clear()
            self.dirty_inos.discard(inode.ino)
        for inode, _ in staged:
            self._maybe_evict(inode)

    def flush_all(self) -> None:
        """Commit every buffered write of the volume (group commit, rule 2)."""
        self._settle_inflight()
        if self.stopped is not None:
            raise VolumeStoppedError(self.stopped)     # rule 3: never a late success
        if not self.dirty_inos:
            return
        with self._change(flush=[self.inodes[ino] for ino in self.dirty_inos]):
            pass

    def snapshot(self, name: str, flags: int = 0) -> int:
        """Flush and record a snapshot in one transaction (rule 5); returns its gen.

        The caller first makes the kernel hand over its cached writes (syncfs).
        flags: schema.SNAP_FLAG_AUTO for a scheduled snapshot, recorded in the
        same transaction (a crash never leaves it looking manual).
        """
        self._settle_inflight()     # a failed job's writes are buffered again: take them too
        dirty = [self.inodes[ino] for ino in self.dirty_inos]
        with self._change(flush=dirty) as ch:
            gen = snapshots.take(ch.txn, self.env, self.vol_id, name, flags=flags)
        self._sync_metadata()       # rule 5: durable when the command returns
        # Chunk maps of the flush above were written at `gen`, inside the
        # snapshot; from now on writes create new versions at gen + 1.
        self.chain[0] = (self.vol_id, gen + 1)
        return gen

    def release_pack(self) -> None:
        """Close the pack this daemon appends to. gc leaves a pack alone
        while a process appends to it, so the dead bytes of a file deleted
        from it are out of gc's reach until then; the next write starts a
        new pack."""
        self._settle_inflight()
        self.store.chunks.close_writer()

    def sync_all(self) -> None:
        """Rule 2: everything acknowledged before is committed and durable.

        The daemon's environment does not flush the meta page at each commit
        (`schema.Env`, metasync=False), so even with nothing buffered an earlier
        namespace commit (create, rename...) may not be durable yet: always
        sync the environment after the group commit."""
        self.flush_all()
        self._sync_metadata()

    def _sync_metadata(self) -> None:
        # A failed sync stops the volume like a failed commit (rule 3).
        with self._flush_guard():
            sync_environment(self.env)
        self.unsynced_commits = 0
        to_reclaim, self._to_reclaim = self._to_reclaim, []
        self.store.chunks.reclaim(to_reclaim, synced=True)

    # --- attributes ------------------------------------------------------------------

    def lookup(self, parent_ino: int, name: bytes) -> Inode:
        inode = self.lookup_or_none(parent_ino, name)
        if inode is None:
            raise FsError(errno.ENOENT, name.decode(errors="replace"))
        return inode

    def lookup_or_none(self, parent_ino: int, name: bytes) -> Optional[Inode]:
        """The child named `name` (one more kernel reference), or None."""
        self._check_name(name)
        parent = self._dir(parent_ino)
        with self.env.begin() as txn:
            child_ino = self._child_ino(txn, parent, name)
            if child_ino is None:
                return None
            inode = self.get(child_ino, txn)
        inode.lookups += 1
        return inode

    def remember(self, inode: Inode) -> None:
        """The kernel took a reference (readdirplus entry)."""
        inode.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        inode = self.inodes.get(ino)
        if inode is not None:
            inode.lookups -= count
            self._maybe_evict(inode)

    def setattr(self, ino: int, mode=None, uid=None, gid=None, size=None,
                atime_ns=None, mtime_ns=None) -> Inode:
        self._check_writable()
        inode = self.get(ino)
        if size is not None and size != inode.attrs["size"]:
            if inode.is_dir:
                raise FsError(errno.EISDIR, f"inode {ino}")
            self._truncate(inode, size)
        now_ns = time.time_ns()
        changes = dict(mode=None if mode is None else (inode.attrs["mode"] & ~0o7777) | (mode & 0o7777),
                       uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns)
        changed = False
        for field, value in changes.items():
            if value is not None:
                inode.attrs[field] = value
                changed = True
        if changed:
            inode.attrs["ctime_ns"] = now_ns
            self._mark_dirty(inode)
        return inode

    def _mark_dirty(self, inode: Inode) -> None:
        inode.attrs_dirty = True
        if not inode.purged:
            # The kernel may still send a setattr (times) for a file whose
            # last link and last open are gone; its records stay deleted.
            self.dirty_inos.add(inode.ino)

    def _truncate(self, inode: Inode, new_size: int) -> None:
        """Change the size; committed at once, with the inode's buffered
        chunks below the cut. Buffered chunks past the cut are dropped, not
        written: truncating to zero (DROP TABLE, `: > file`) needs no space
        for data, so it works on a full disk and frees what no snapshot holds."""
        cs = self.chunk_size
        self._settle_inflight()       # the flush in flight may hold chunks past the cut
        old_size = inode.attrs["size"]
        stage_below = None
        extra = []
        if new_size < old_size:
            stage_below = -(-new_size // cs)
            if new_size % cs:
                # Bytes beyond the size must read as zeros if the file grows again.
                idx = new_size // cs
                extra.append((inode, idx, self._chunk_bytes(inode, idx)[: new_size % cs]))
                stage_below = idx
        # Only the cut chunk is written when nothing below it is buffered: it
        # may use the space reserve (a shrinking truncate frees more than that).
        surviving = [idx for idx in inode.dirty if stage_below is None or idx < stage_below]
        with self._change(flush=[inode], extra_chunks=extra,
                          stage_below=None if stage_below is None else {inode.ino: stage_below},
                          use_reserve=stage_below is not None and not surviving) as ch:
            if new_size < old_size:
                self._drop_chunks_from(ch, inode, -(-new_size // cs))
            attrs = ch.attrs(inode)
            attrs["size"] = new_size
            attrs["mtime_ns"] = attrs["ctime_ns"] = time.time_ns()

    def _drop_chunks_from(self, ch: _Change, inode: Inode, first_index: int) -> None:
        start = schema.chunk_key(inode.ino, first_index)
        for record_key, _ in catalog.scan(ch.txn, self.env, self.chain, schema.KIND_CHUNK,
                                          schema.inode_key(inode.ino), start_key=start):
            old = ch.delete(schema.KIND_CHUNK, record_key)
            if old is not None:
                ch.batch.unref(old)

    # --- data ----------------------------------------------------------------------------

    def _stored_chunk(self, txn, ino: int, idx: int) -> bytes:
        chunk_id = catalog.get(txn, self.env, self.chain, schema.KIND_CHUNK, schema.chunk_key(ino, idx))
        if chunk_id is None:
            return b""
        return self.store.chunks.read(txn, chunk_id)

    def _chunk_bytes(self, inode: Inode, idx: int) -> bytes:
        buf = inode.buffered(idx)
        if buf is not None:
            return bytes(buf)
        with self.env.begin() as txn:
            return self._stored_chunk(txn, inode.ino, idx)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        return self.plan_read(ino, offset, size).fetch()

    def plan_read(self, ino: int, offset: int, size: int) -> "ReadPlan":
        """On the event loop: copy what memory holds, locate the stored
        chunks; `ReadPlan.fetch` then reads them, in any thread."""
        inode = self.get(ino)
        cs = self.chunk_size
        end = min(offset + size, inode.attrs["size"])
        plan = ReadPlan(self.store.chunks, cs, offset, max(end, offset))
        if offset >= end:
            return plan
        wanted_idx, wanted_ids = [], []
        with self.env.begin() as txn:
            for idx in range(offset // cs, (end - 1) // cs + 1):
                buf = inode.buffered(idx)
                if buf is not None:
                    plan.memory[idx] = bytes(buf)
                    continue
                chunk_id = catalog.get(txn, self.env, self.chain, schema.KIND_CHUNK,
                                       schema.chunk_key(inode.ino, idx))
                if chunk_id is not None:        # else a hole: zeros
                    wanted_idx.append(idx)
                    wanted_ids.append(chunk_id)
            # Located now, in the transaction that found the ids: a chunk an
            # overwrite frees meanwhile keeps its bytes until gc runs.
            plan.stored = (wanted_idx, wanted_ids, self.store.chunks.locate_many(txn, wanted_ids))
        return plan

    def write(self, ino: int, offset: int, data: bytes) -> int:
        self._check_writable()
        inode = self.get(ino)
        if self.dirty_bytes > 2 * DIRTY_LIMIT_BYTES:
            # Too much buffered: flush before taking more. If that fails (a
            # full disk), this write is refused *unbuffered*, so memory stays
            # bounded while the disk is full.
            self.flush_all()
        cs = self.chunk_size
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            idx, within = divmod(offset + pos, cs)
            n = min(cs - within, len(data) - pos)
            buf = inode.dirty.get(idx)
            if buf is None and n == cs:
                inode.dirty[idx] = bytearray(view[pos:pos + n])   # whole chunk: no read
                self.dirty_bytes += cs
            else:
                if buf is None:
                    buf = bytearray(self._chunk_bytes(inode, idx).ljust(cs, b"\0"))
                    inode.dirty[idx] = buf
                    self.dirty_bytes += cs
                buf[within:within + n] = view[pos:pos + n]
            pos += n
        attrs = inode.attrs
        attrs["size"] = max(attrs["size"], offset + len(data))
        attrs["mtime_ns"] = attrs["ctime_ns"] = time.time_ns()
        self._mark_dirty(inode)
        if self.dirty_bytes > DIRTY_LIMIT_BYTES and self.background_flush is not None:
            self.background_flush()      # the loop keeps taking writes meanwhile
        return len(data)

    # --- namespace ---------------------------------------------------------------------

    def _new_attrs(self, parent: Inode, mode: int, uid: int, gid: int, rdev: int = 0) -> dict:
        now_ns = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        if parent.attrs["mode"] & stat.S_ISGID:    # BSD group semantics of setgid dirs
            gid = parent.attrs["gid"]
            if is_dir:
                mode |= stat.S_ISGID
        return dict(mode=mode, uid=uid, gid=gid, nlink=2 if is_dir else 1, rdev=rdev, size=0,
                    atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                    parent_ino=parent.ino if is_dir else 0)

    def make(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
             rdev: int = 0, target: bytes = b"") -> Inode:
        """mknod, mkdir, create and symlink: a new inode under a new name."""
        self._check_writable()
        self._check_name(name)
        parent = self._dir(parent_ino)
        attrs = self._new_attrs(parent, mode, uid, gid, rdev)
        if target:
            attrs["size"] = len(target)
        with self._change() as ch:
            if self._child_ino(ch.txn, parent, name) is not None:
                raise FsError(errno.EEXIST, name.decode(errors="replace"))
            ino = volumes.allocate_ino(ch.txn, self.env, self.vol_id)
            inode = ch.create(ino, attrs, target)
            ch.put(schema.KIND_DENTRY, schema.dentry_key(parent.ino, name), schema.u64(ino))
            parent_attrs = ch.attrs(parent)
            if inode.is_dir:
                parent_attrs["nlink"] += 1
            parent_attrs["mtime_ns"] = parent_attrs["ctime_ns"] = attrs["ctime_ns"]
        inode.lookups += 1
        return inode

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Inode:
        self._check_writable()
        self._check_name(new_name)
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM, "hard links to directories are not allowed")
        parent = self._dir(new_parent_ino)
        with self._change() as ch:
            if self._child_ino(ch.txn, parent, new_name) is not None:
                raise FsError(errno.EEXIST, new_name.decode(errors="replace"))
            ch.put(schema.KIND_DENTRY, schema.dentry_key(parent.ino, new_name), schema.u64(ino))
            now_ns = time.time_ns()
            attrs = ch.attrs(inode)
            attrs["nlink"] += 1
            attrs["ctime_ns"] = now_ns
            parent_attrs = ch.attrs(parent)
            parent_attrs["mtime_ns"] = parent_attrs["ctime_ns"] = now_ns
        inode.lookups += 1
        return inode

    def _drop_link(self, ch: _Change, inode: Inode) -> None:
        """One name of `inode` is gone; free it when no name and no open remains."""
        attrs = ch.attrs(inode)
        attrs["nlink"] = 0 if inode.is_dir else attrs["nlink"] - 1
        attrs["ctime_ns"] = time.time_ns()
        if attrs["nlink"] > 0:
            return
        if inode.opens > 0:
            # Unlinked while open: data lives until the last close; the orphan
            # record lets the next mount free it if we crash before that.
            ch.txn.put(schema.orphan_key(self.vol_id, inode.ino), b"", db=self.env.orphans)
        else:
            ch.purge(inode)

    def _is_empty_dir(self, txn, inode: Inode) -> bool:
        return not catalog.scan(txn, self.env, self.chain, schema.KIND_DENTRY,
                                schema.inode_key(inode.ino))

    def remove(self, parent_ino: int, name: bytes, is_dir: bool) -> None:
        """unlink (is_dir False) or rmdir (is_dir True)."""
        self._check_writable()
        parent = self._dir(parent_ino)
        with self.env.begin() as txn:
            child_ino = self._child_ino(txn, parent, name)
            if child_ino is None:
                raise FsError(errno.ENOENT, name.decode(errors="replace"))
            child = self.get(child_ino, txn)
            if child.is_dir != is_dir:
                raise FsError(errno.ENOTDIR if is_dir else errno.EISDIR, name.decode(errors="replace"))
            if is_dir and not self._is_empty_dir(txn, child):
                raise FsError(errno.ENOTEMPTY, name.decode(errors="replace"))
        with self._change() as ch:
            ch.delete(schema.KIND_DENTRY, schema.dentry_key(parent.ino, name))
            self._drop_link(ch, child)
            parent_attrs = ch.attrs(parent)
            if is_dir:
                parent_attrs["nlink"] -= 1
            parent_attrs["mtime_ns"] = parent_attrs["ctime_ns"] = time.time_ns()

    def _is_ancestor(self, txn, ancestor_ino: int, ino: int) -> bool:
        """Is `ancestor_ino` one of the directories on the path from `ino` up to the root?"""
        while True:
            if ino == ancestor_ino:
                return True
            if ino == schema.ROOT_INO:
                return False
            ino = self.get(ino, txn).attrs["parent_ino"]

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int) -> None:
        self._check_writable()
        self._check_name(new_name)
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent, new_parent = self._dir(old_parent_ino), self._dir(new_parent_ino)
        with self.env.begin() as txn:
            src_ino = self._child_ino(txn, old_parent, old_name)
            if src_ino is None:
                raise FsError(errno.ENOENT, old_name.decode(errors="replace"))
            dst_ino = self._child_ino(txn, new_parent, new_name)
            src = self.get(src_ino, txn)
            dst = None if dst_ino is None else self.get(dst_ino, txn)
            self._check_rename(txn, src, dst, new_parent, flags)
        if src_ino == dst_ino:
            return      # two names of one file: POSIX says do nothing
        with self._change() as ch:
            ch.delete(schema.KIND_DENTRY, schema.dentry_key(old_parent.ino, old_name))
            ch.put(schema.KIND_DENTRY, schema.dentry_key(new_parent.ino, new_name), schema.u64(src_ino))
            now_ns = time.time_ns()
            if dst is not None:
                self._drop_link(ch, dst)
                if dst.is_dir:
                    ch.attrs(new_parent)["nlink"] -= 1
            if src.is_dir and old_parent.ino != new_parent.ino:
                ch.attrs(src)["parent_ino"] = new_parent.ino
                ch.attrs(old_parent)["nlink"] -= 1
                ch.attrs(new_parent)["nlink"] += 1
            ch.attrs(src)["ctime_ns"] = now_ns
            for parent in (old_parent, new_parent):
                attrs = ch.attrs(parent)
                attrs["mtime_ns"] = attrs["ctime_ns"] = now_ns

    def _check_rename(self, txn, src: Inode, dst: Optional[Inode], new_parent: Inode, flags: int) -> None:
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST, "target exists (RENAME_NOREPLACE)")
            if dst.ino == src.ino:
                return
            if dst.is_dir and not src.is_dir:
                raise FsError(errno.EISDIR, "cannot replace a directory with a non-directory")
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR, "cannot replace a non-directory with a directory")
            if dst.is_dir and not self._is_empty_dir(txn, dst):
                raise FsError(errno.ENOTEMPTY, "target directory is not empty")
        if src.is_dir and self._is_ancestor(txn, src.ino, new_parent.ino):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")

    def readlink(self, ino: int) -> bytes:
        inode = self.get(ino)
        if not stat.S_ISLNK(inode.attrs["mode"]):
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return inode.target

    # --- open files ----------------------------------------------------------------------

    def open(self, ino: int, writable: bool, truncate: bool = False) -> Inode:
        """An open file handle; `truncate` is O_TRUNC.

        The kernel passes O_TRUNC to us instead of sending a setattr (FUSE's
        atomic O_TRUNC) and already shows the file as empty, so ignoring the
        flag would bring the old bytes back at the next mount.
        """
        if writable or truncate:
            self._check_writable()
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino}")
        if truncate and inode.attrs["size"] != 0:
            self._truncate(inode, 0)
        inode.opens += 1
        return inode

    def release(self, ino: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.opens -= 1
        if inode.opens == 0 and inode.attrs["nlink"] == 0 and not inode.purged:
            with self._change() as ch:
                ch.purge(inode)
        self._maybe_evict(inode)

    def recover_orphans(self) -> int:
        """Free inodes that were unlinked while open when the last daemon died."""
        prefix = schema.u64(self.vol_id)
        with self.env.begin() as txn:
            inos = [schema.read_u64(bytes(k), 8) for k, _ in txn.cursor(db=self.env.orphans)
                    if bytes(k).startswith(prefix)]
        for ino in inos:
            inode = self.get(ino)
            with self._change() as ch:
                if inode.attrs["nlink"] == 0:
                    ch.purge(inode)
                else:
                    ch.txn.delete(schema.orphan_key(self.vol_id, ino), db=self.env.orphans)
            self._maybe_evict(inode)
        return len(inos)

    # --- directories ------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_handles[fh] = None
        return fh

    def _listing(self, fh: int, ino: int) -> list[tuple[bytes, int]]:
        listing = self._dir_handles.get(fh)
        if listing is None:
            # A stable listing per handle: offsets stay valid while entries change.
            with self.env.begin() as txn:
                entries = catalog.scan(txn, self.env, self.chain, schema.KIND_DENTRY,
                                       schema.inode_key(ino))
            listing = [(schema.dentry_name(k), schema.read_u64(v)) for k, v in entries]
            self._dir_handles[fh] = listing
        return listing

    def readdir(self, fh: int, ino: int, start: int):
        """Yield (name, inode, next_offset) from offset `start`."""
        listing = self._listing(fh, ino)
        for offset in range(start, len(listing)):
            name, child_ino = listing[offset]
            try:
                inode = self.get(child_ino)
            except FsError:
                continue        # removed since the listing was taken
            yield name, inode, offset + 1

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # --- extended attributes ---------------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._check_name(name)
        if len(value) > XATTR_VALUE_MAX_BYTES:
            raise FsError(errno.E2BIG, "extended attribute value too large")
        inode = self.get(ino)
        with self._change() as ch:
            ch.put(schema.KIND_XATTR, schema.xattr_key(ino, name), value)
            ch.attrs(inode)["ctime_ns"] = time.time_ns()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.xattr_or_none(ino, name)
        if value is None:
            raise FsError(errno.ENODATA, name.decode(errors="replace"))
        return value

    def xattr_or_none(self, ino: int, name: bytes) -> bytes | None:
        """The xattr value, or None when absent: the kernel asks for
        security.capability before every write (no S_NOSEC), so a miss must
        not cost an exception through several layers."""
        self.get(ino)
        with self.env.begin() as txn:
            return catalog.get(txn, self.env, self.chain, schema.KIND_XATTR, schema.xattr_key(ino, name))

    def listxattr(self, ino: int) -> list[bytes]:
        self.get(ino)
        with self.env.begin() as txn:
            entries = catalog.scan(txn, self.env, self.chain, schema.KIND_XATTR, schema.inode_key(ino))
        return [k[8:-1] for k, _ in entries]

    def removexattr(self, ino: int, name: bytes) -> None:
        inode = self.get(ino)
        self.getxattr(ino, name)
        with self._change() as ch:
            ch.delete(schema.KIND_XATTR, schema.xattr_key(ino, name))
            ch.attrs(inode)["ctime_ns"] = time.time_ns()

    # --- whole filesystem ----------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.store.path)
