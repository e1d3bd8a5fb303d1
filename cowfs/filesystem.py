"""POSIX filesystem logic of one mounted volume, on inode numbers and bytes.

No pyfuse3 here: `fuse_ops` adapts these methods to FUSE. Every method is
synchronous, so each runs atomically with respect to other trio tasks.
Developer rule: do not add an ``await`` (or a thread hop) inside a method of
this class. The write path relies on the chunk buffers not changing between
staging them and clearing them after the commit.

The parts, one module each: `inode` (the in-memory state of a file),
`namespace` (create, link, unlink, rename, directories, xattrs: committed at
once, no chunk written), this module (the inode cache, attributes, reads
and writes, truncate, and the orchestration of commits: folds, snapshots,
unmount), `flush_job` (a fold of frozen buffers, in a worker thread),
`commit` (the one commit pipeline all of them go through), `read_plan`.

Durability (DESIGN rules, cited in code by number):
 1. chunk bytes are synced in their pack before the LMDB commit naming them;
 2. fsync/fdatasync/fsyncdir return after a commit covering the file's
    buffered writes (and every earlier namespace change) is durable;
 3. a failed flush raises to the fsync caller and is never reported as a
    success later. A full disk (a pack write or the LMDB commit refused for
    space) leaves the data buffered and the pack clean, so a later fsync
    rewrites all of it durably and may succeed. Any other failure (a failed
    pack fdatasync, an I/O error) *stops* the volume: every later fsync,
    write and change fails with EIO until remount (`VolumeStoppedError`),
    because the kernel may have dropped the pages an earlier fsync covered;
 4. freed chunk bytes go back to the filesystem only once the commit that
    freed them is durable (`ChunkStore.reclaim` after an environment sync);
 5. a snapshot commits every buffered write first;
 6. nothing is committed that refers to bytes not yet durable.
"""

import contextlib
import errno
import logging
import os
import time
from typing import Callable, Optional

import lmdb

from . import catalog, schema, snapshots
from .commit import Commit, FileUpdate, is_full_disk, sync_environment
from .errors import FsError, VolumeStoppedError
from .flush_job import FlushJob
from . import intent_log, log_writer
from .chunks import is_zero
from .inode import Inode
from .intent_log import LogState
from .log_writer import Batch
from .namespace import NAME_MAX_BYTES, NamespaceOps, _Change
from .read_plan import ReadPlan
from .store import Store

log = logging.getLogger(__name__)

# Beyond this much buffered, a write starts a flush in the background (the
# loop keeps taking writes into fresh buffers meanwhile); beyond twice it,
# the write waits for a flush: buffered memory stays under 2x this.
DIRTY_LIMIT_BYTES = 32 << 20
# An fsync whose record would take more than this fraction of the intent log
# folds instead (a large write goes to the packs directly, like ZFS's large
# blocks); past LOG_FOLD_FRACTION in use, a fold starts in the background.
LOG_BYPASS_FRACTION = 0.125
LOG_FOLD_FRACTION = 0.5
# Freed chunk space is punched out of the packs in batches of this much
# (or at once when the store is low on space, or at unmount).
RECLAIM_BATCH_BYTES = 64 << 20


class Filesystem(NamespaceOps):
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
        # Open files: fh -> (ino, the store's fill count when opened), see `namespace.fsync_target`.
        self._file_handles: dict[int, tuple[int, int]] = {}
        self._next_file_fh = 1
        self.stopped: Optional[str] = None     # why the volume stopped (rule 3), or None
        self._inflight: Optional[FlushJob] = None
        # Changes committed (namespace, truncate, snapshot), and how many of
        # them the last completed environment sync covers: the daemon's
        # commits leave the meta page unflushed (schema.Env metasync=False),
        # so an fsync, and every intent-log record, first needs them synced.
        self.commit_count = 0
        self.synced_count = 0
        # The volume's intent log (`log_writer`), when the daemon has one.
        self.log = None
        # Chunk entries freed by commits: their blocks go back to the
        # filesystem after an environment sync (rule 4), in batches (`_reclaim_due`).
        self._to_reclaim: list[tuple[int, int, int]] = []
        self.flush_jobs = 0                     # FlushJobs run (for `stats`)
        self.unmounting = False                 # the final flush: give back every freed byte
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

    def has_uncommitted(self, inode: Inode) -> bool:
        """Buffered writes or attributes, or some frozen in the fold in flight?"""
        return inode.ino in self.dirty_inos or inode.in_job

    def _put_inode_record(self, txn, ino: int, attrs: dict, target: bytes) -> None:
        catalog.put(txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(ino),
                    schema.pack_inode(attrs, target))

    def _committed_attrs(self, txn, inode: Inode) -> dict:
        """The attributes of `inode` as last committed (its buffered changes aside)."""
        raw = catalog.get(txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(inode.ino))
        return dict(inode.attrs) if raw is None else schema.unpack_inode(raw)[0]

    @contextlib.contextmanager
    def _change(self, update: Optional[FileUpdate] = None, use_reserve: bool = False):
        """One committed change: the body's records, and the chunks of `update`.

        A namespace change (no `update`) writes no chunk, so it works on a
        full disk (its LMDB commit fits in the reserve, see `space`) and
        runs beside the fold in flight (see `flush_job`). A change with an
        update (a truncate) first waits for that fold: one pack appender at
        a time. use_reserve: the update's chunks may use the space reserve.
        Errors of the body (EEXIST...) abort it and change nothing; errors
        of the commit go through `_flush_guard` (rule 3).
        """
        updates = [] if update is None else [update]
        if updates:
            self._settle_inflight()
        self._check_writable()
        commit = Commit(self.env, self.store.chunks, self.chain, self.chunk_size, use_reserve)
        with self._flush_guard():
            commit.stage(updates)
            commit.make_durable()                       # rule 1
        txn = self.env.begin(write=True)
        try:
            change = _Change(self, txn, commit.batch, {u.ino for u in updates})
            yield change
            commit.write(txn)
            change.write_records()
        except BaseException:
            txn.abort()
            raise
        with self._flush_guard():
            freed = commit.finish(txn)                  # the commit point (rule 2)
        self.commit_count += 1
        self._to_reclaim.extend(freed)
        change.apply_to_cache()
        self._after_change(change, updates)
        if commit.batch.freed_bytes and self.on_space_freed is not None:
            self.on_space_freed(commit.batch.freed_bytes)

    def _after_change(self, change: _Change, updates: list) -> None:
        for update in updates:           # committed whole: what is left buffered is stale
            inode = self.inodes[update.ino]
            self._drop_buffers(inode)
        for inode in change.purged:
            inode.purged = True
            self._drop_buffers(inode)
        for update in updates:
            self._maybe_evict(self.inodes[update.ino])

    def _drop_buffers(self, inode: Inode) -> None:
        self.dirty_bytes -= len(inode.dirty) * self.chunk_size
        inode.dirty.clear()
        inode.attrs_dirty = False
        self.dirty_inos.discard(inode.ino)

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

    # --- folds: group commit off the event loop (see flush_job) --------------------------

    def begin_flush(self, inos: Optional[set[int]] = None, sync_env: bool = True) -> FlushJob:
        """Freeze the buffered writes of `inos` (None: of every file) and the
        unsynced commits into a job that a worker thread runs
        (`FlushJob.run`); `finish_flush` ends it."""
        self._settle_inflight()
        if self.stopped is not None:
            raise VolumeStoppedError(self.stopped)     # rule 3: never a late success
        chosen = [self.inodes[ino]         # look up all first: nothing below may raise
                  for ino in (self.dirty_inos if inos is None else self.dirty_inos & inos)]
        log_cover = None
        if inos is None and self.log is not None:
            # Every record reserved so far holds data that is in these
            # buffers (or committed already): replay starts after them.
            log_cover = (self.vol_id, LogState(self.log.epoch, self.log.next_seq, self.log.head,
                                               self.log.next_seq))
        entries = []
        for inode in chosen:         # never purged ones: `_mark_dirty` keeps them out
            self.dirty_inos.discard(inode.ino)
            entries.append((inode, inode.dirty, dict(inode.attrs)))
            inode.flushing, inode.dirty = inode.dirty, {}
            inode.attrs_dirty = False
            inode.in_job = True
        sync_env = sync_env and (bool(entries) or log_cover is not None
                                 or self.commit_count > self.synced_count)
        job = FlushJob(self.env, self.store.chunks, self.chunk_size, entries, list(self.chain),
                       sync_env=sync_env, to_reclaim=self._reclaim_due() if sync_env else [],
                       log_cover=log_cover, synced_count=self.commit_count)
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
                if job.sync_env:
                    self.synced_count = max(self.synced_count, job.synced_count)
                if job.log_cover is not None and job.sync_env:
                    self.log.folded(job.log_cover[1].start_offset)
            else:
                job.outcome = self._flush_failed(job.error)
                self._rebuffer(job)
            if job.sync_env and not job.reclaimed:
                self._to_reclaim.extend(job.to_reclaim)      # after the next sync
        if job.outcome is not None:
            raise job.outcome

    def _release_frozen(self, inode: Inode, frozen: dict) -> None:
        self.dirty_bytes -= len(frozen) * self.chunk_size
        # Committed: a chunk not written again since needs no record any more.
        inode.unlogged.difference_update(idx for idx in frozen if idx not in inode.dirty)
        if inode.flushing is frozen:
            inode.flushing = {}
        inode.in_job = False
        self._maybe_evict(inode)

    def _rebuffer(self, job: FlushJob) -> None:
        """A failed job's writes are buffered again: a later fsync after a full
        disk writes them (rule 3), and reads of a stopped volume still see them.
        A file deleted meanwhile has nothing to write any more."""
        for inode, frozen, _ in job.entries:
            inode.flushing = {}
            inode.in_job = False
            if inode.purged:
                self.dirty_bytes -= len(frozen) * self.chunk_size
                continue
            newer = inode.dirty
            inode.dirty = frozen
            for idx, buf in newer.items():     # written during the flush: newer bytes
                if idx in frozen:
                    self.dirty_bytes -= self.chunk_size
                frozen[idx] = buf
            self._mark_dirty(inode)

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

    def flush_all(self, sync_env: bool = True) -> None:
        """Commit every buffered write of the volume, inline (a fold on the
        loop; rule 2 with `sync_env`)."""
        job = self.begin_flush(None, sync_env)
        job.run()
        self.finish_flush(job)

    def snapshot(self, name: str, flags: int = 0) -> int:
        """Commit every buffered write, then record a snapshot (rule 5); returns its gen.

        Nothing runs on the loop between the two commits, so the snapshot
        holds every write acknowledged before it. The caller first makes the
        kernel hand over its cached writes (syncfs).
        flags: schema.SNAP_FLAG_AUTO for a scheduled snapshot, recorded in the
        same transaction as the snapshot (a crash never leaves it looking manual).
        """
        self.flush_all(sync_env=False)
        with self._change() as ch:
            gen = snapshots.take(ch.txn, self.env, self.vol_id, name, flags=flags)
        self._sync_metadata()       # rule 5: durable when the command returns
        # Chunk maps committed above were written at `gen`, inside the
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
        """Rule 2: everything acknowledged before is committed and durable,
        also earlier namespace commits (the daemon's environment does not
        flush the meta page at each commit, `schema.Env` metasync=False)."""
        self.flush_all(sync_env=False)
        self._sync_metadata()

    def _sync_metadata(self) -> None:
        # A failed sync stops the volume like a failed commit (rule 3).
        with self._flush_guard():
            sync_environment(self.env)
        self.synced_count = self.commit_count
        self.store.chunks.reclaim(self._reclaim_due(), synced=True)

    def _reclaim_due(self) -> list:
        """The freed chunk entries to punch out at the sync about to happen:
        all of them once they add up to RECLAIM_BATCH_BYTES or the store is
        low on space; none before (each punch is a journalled filesystem
        change, and files rewritten all the time -- PostgreSQL's statistics
        -- would cost one at every commit). At unmount, everything."""
        pending = sum(length for _pack, _offset, length in self._to_reclaim)
        if not pending or (pending < RECLAIM_BATCH_BYTES and not self.store.packs.space.low()
                           and not self.unmounting):
            return []
        due, self._to_reclaim = self._to_reclaim, []
        return due

    # --- the intent log: an fsync as one record (see intent_log, log_writer) ------------

    def log_sync(self, ino: int) -> Optional[int]:
        """Queue what an fsync of `ino` needs: the file's changes since its
        last record as a new record, and an environment sync first if a
        namespace change is not durable yet. Returns the writer's ticket to
        wait for, or None when the log cannot take it (full, or a record
        larger than LOG_BYPASS_FRACTION of the log: then a fold covers it)."""
        if self.stopped is not None:
            raise VolumeStoppedError(self.stopped)     # rule 3: never a late success
        inode = self.get(ino)
        log = self.log
        needs_env_sync = self.commit_count > self.synced_count
        if not inode.unlogged and not inode.attrs_unlogged:
            if not needs_env_sync:
                return inode.log_ticket             # 0, or the batch of its last record
            return self._submit_log(Batch(), needs_env_sync)
        parts = self._log_payload(inode)
        payload_bytes = sum(len(part) for part in parts)
        if payload_bytes > LOG_BYPASS_FRACTION * log.capacity_bytes:
            return None
        reserved = log.reserve(log_writer.record_bytes(payload_bytes))
        if reserved is None:
            return None
        seq, offset, wrap = reserved
        batch = Batch(writes=wrap + [(offset, intent_log.encode(intent_log.KIND_INODE, log.epoch,
                                                                seq, parts))], last_seq=seq)
        inode.unlogged.clear()
        inode.attrs_unlogged = False
        inode.logged_seq = seq
        inode.log_ticket = self._submit_log(batch, needs_env_sync)
        if log.used_bytes > LOG_FOLD_FRACTION * log.capacity_bytes and self.background_flush:
            self.background_flush()         # fold early: a full log would make fsyncs fold
        return inode.log_ticket

    def _log_payload(self, inode: Inode) -> list:
        """The record of `inode`: its data attributes and every chunk changed
        since its last record, copied (up to the file's size; b"" for zeros)."""
        cs, size = self.chunk_size, inode.attrs["size"]
        chunks = {}
        for idx in sorted(inode.unlogged):
            buf = inode.buffered(idx)
            length = max(min(cs, size - idx * cs), 0)
            if buf is None or length == 0:
                continue            # past the end, or committed with the file's truncate
            data = bytes(memoryview(buf)[:length])
            chunks[idx] = b"" if is_zero(data) else data
        return intent_log.InodeUpdate(inode.ino, inode.attrs, chunks).payload_parts()

    def _submit_log(self, batch: Batch, needs_env_sync: bool) -> int:
        if needs_env_sync:
            batch.sync_env, batch.synced_count = True, self.commit_count
            batch.to_reclaim = self._reclaim_due()
        return self.log.submit(batch)

    def note_synced(self, synced_count: int) -> None:
        """An environment sync made the first `synced_count` changes durable."""
        self.synced_count = max(self.synced_count, synced_count)

    def log_failed(self, exc: BaseException) -> FsError:
        """Writing or syncing the intent log failed: the volume stops (rule 3),
        whatever the errno -- the log is preallocated, so not even ENOSPC is
        a full disk a retry could honestly fix. Returns what waiters get."""
        if self.stopped is None:
            self.stopped = f"writing the intent log of volume {self.vol_id} of {self.store.path} failed: {exc}"
            log.error("%s; the volume stops accepting writes until remounted (rule 3)", self.stopped)
        return VolumeStoppedError(self.stopped)

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
            inode.attrs_unlogged = True
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
        self._settle_inflight()       # the fold in flight may hold chunks past the cut
        chunks = dict(inode.dirty)
        drop_from = None
        if new_size < inode.attrs["size"]:
            drop_from = -(-new_size // cs)
            chunks = {idx: buf for idx, buf in chunks.items() if idx < drop_from}
            if new_size % cs:
                # Bytes beyond the size must read as zeros if the file grows again.
                idx = new_size // cs
                chunks[idx] = self._chunk_bytes(inode, idx)[: new_size % cs]
        # Only the cut chunk is written when nothing below it is buffered: it
        # may use the space reserve (a shrinking truncate frees more than that).
        surviving = [idx for idx in inode.dirty if drop_from is None or idx < drop_from]
        update = FileUpdate(inode.ino, new_size, chunks, drop_from=drop_from)
        with self._change(update, use_reserve=drop_from is not None and not surviving) as ch:
            attrs = ch.attrs(inode)
            attrs["size"] = new_size
            attrs["mtime_ns"] = attrs["ctime_ns"] = time.time_ns()
            if inode.logged_seq:
                # This commit holds the file's whole state: replay must not
                # apply its older records over it (a truncated tail would
                # come back).
                ch.txn.put(schema.log_fence_key(self.vol_id, inode.ino),
                           schema.pack_le_u64(inode.logged_seq), db=self.env.logs)
        inode.unlogged.clear()
        inode.attrs_unlogged = False

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
        first, last = offset // cs, (end - 1) // cs
        with self.env.begin() as txn:
            stored = {schema.chunk_index_of(key): chunk_id for key, chunk_id in catalog.get_range(
                txn, self.env, self.chain, schema.KIND_CHUNK, schema.chunk_key(inode.ino, first),
                schema.chunk_key(inode.ino, last + 1)).items()}
            buffered = inode.buffered if inode.dirty or inode.flushing else None
            for idx in range(first, last + 1):
                buf = None if buffered is None else buffered(idx)
                if buf is not None:
                    plan.memory[idx] = bytes(buf)
                    continue
                chunk_id = stored.get(idx)
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
            inode.unlogged.add(idx)
            pos += n
        inode.attrs_unlogged = True
        attrs = inode.attrs
        attrs["size"] = max(attrs["size"], offset + len(data))
        attrs["mtime_ns"] = attrs["ctime_ns"] = time.time_ns()
        self._mark_dirty(inode)
        if self.dirty_bytes > DIRTY_LIMIT_BYTES and self.background_flush is not None:
            self.background_flush()      # the loop keeps taking writes meanwhile
        return len(data)

    # --- whole filesystem ----------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.store.path)
