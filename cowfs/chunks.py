"""Content-addressed chunks over packs and the ``chunks`` sub-database.

A chunk is named by the xxh3-128 digest of its bytes (never a 64-bit hash:
at 100 TB of 8 KiB chunks a 64-bit collision becomes likely). Identical
chunks are stored once; all-zero chunks are not stored at all (holes; the
caller decides that with `is_zero`). Reference counts count chunk-map
*record versions* (see `catalog`), so snapshots and clones never touch them.

Writing is done in batches, one per commit:

    batch = chunk_store.batch()
    chunk_ids = batch.add_many(datas)  # queues for the pack what the store lacks
    batch.sync()                       # rule 1: bytes written and durable before the commit
    with env.begin(write=True) as txn:
        ... batch.ref(chunk_id) / batch.unref(old_chunk_id) ...
        batch.apply(txn)               # refcounts, new entries, pack stats

Threads: `sync` and `apply` may run on a worker thread while the event loop
reads chunks (`read`, `read_many`). They touch only the batch, the pack
writers and the commit's transaction, never what reads use (the LMDB read
transactions of the reader, `PackStore._read_fds`). The adds, syncs and
applies of all batches of one `ChunkStore` must not overlap in time (one
thread at a time; the caller orders them): they share the pack writer.
"""

import collections

import xxhash

from . import schema
from .errors import ChunkDamagedError, ChunkGoneError
from .packs import PackStore, PackWriter

_ZEROS = bytes(schema.MAX_CHUNK_SIZE)
_digest = xxhash.xxh3_128_digest          # accepts any buffer: bytes, bytearray, memoryview


def chunk_id_of(data) -> bytes:
    return _digest(data)


def is_zero(data) -> bool:
    n = len(data)
    if n and (data[0] or data[n - 1]):
        return False             # most data chunks: no copy, no compare
    if type(data) is not bytes:
        # bytes == bytes is one memcmp; a memoryview compares item by item,
        # ~20 us for an all-zero 8 KiB chunk against 0.5 us for copy + memcmp.
        data = bytes(data)
    return data == _ZEROS[:len(data)]


class ChunkStore:
    """Chunk bytes of one store, as seen by one process."""

    def __init__(self, env: schema.Env, packs: PackStore):
        self.env = env
        self.packs = packs
        self._writer: PackWriter | None = None
        self._retired: list[PackWriter] = []     # full, but a batch has not synced them yet

    # --- reading ---------------------------------------------------------------

    def read(self, txn, chunk_id: bytes) -> bytes:
        """The bytes of a chunk, verified against its id (never wrong bytes)."""
        pack_id, offset, length = self._locate(txn, chunk_id)
        try:
            data = self.packs.read(pack_id, offset, length)
        except FileNotFoundError:
            return self._read_again(chunk_id, pack_id, offset)   # gc removed the pack
        except OSError as exc:
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} in pack {pack_id:08x}: {exc}") from exc
        return self._checked(chunk_id, data, pack_id, offset)

    def _checked(self, chunk_id: bytes, data: bytes, pack_id: int, offset: int) -> bytes:
        """`data` if it hashes to `chunk_id`, else what a fresh lookup finds."""
        if chunk_id_of(data) == chunk_id:
            return data
        return self._read_again(chunk_id, pack_id, offset)

    def _read_again(self, chunk_id: bytes, pack_id: int, offset: int) -> bytes:
        """The chunk was not found where it was located. gc may have moved it
        (the pack is gone, or the old range punched out), or the chunk was
        freed since it was located and gc reclaimed its bytes (the reader's
        file changed meanwhile: `ChunkGoneError`, the read is planned again).
        Still indexed at the same place: real damage (never wrong bytes)."""
        with self.env.begin() as txn:
            raw = txn.get(chunk_id, db=self.env.chunks)
        if raw is None:
            raise ChunkGoneError(f"chunk {chunk_id.hex()} was freed while being read")
        new_pack, new_offset, length, _refcount = schema.unpack_chunk(raw)
        if (new_pack, new_offset) == (pack_id, offset):
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} in pack {pack_id:08x} at offset "
                                    f"{offset} does not match its checksum")
        try:
            data = self.packs.read(new_pack, new_offset, length)
        except OSError as exc:
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} in pack {new_pack:08x}: {exc}") from exc
        _verify(chunk_id, data, new_pack, new_offset)
        return data

    def read_many(self, txn, chunk_ids: list[bytes]) -> list[bytes]:
        """The bytes of several chunks (in order), each verified against its id."""
        return self.read_located(chunk_ids, self.locate_many(txn, chunk_ids))

    def locate_many(self, txn, chunk_ids: list[bytes]) -> list[tuple[int, int, int]]:
        """(pack, offset, length) of each chunk, as of `txn` (the lookups in
        one call into LMDB: a 1 MiB read locates 128 chunks)."""
        if not chunk_ids:
            return []
        found = dict(txn.cursor(db=self.env.chunks).getmulti(chunk_ids))
        locations = []
        unpack = schema.unpack_chunk
        for chunk_id in chunk_ids:
            raw = found.get(chunk_id)
            if raw is None:
                raise ChunkDamagedError(f"chunk {chunk_id.hex()} is referenced but not in the chunk index")
            pack_id, offset, length, _refcount = unpack(raw)
            locations.append((pack_id, offset, length))
        return locations

    def read_located(self, chunk_ids: list[bytes], locations: list) -> list:
        """The bytes of chunks already located (bytes, or memoryviews of one
        read of a run), each verified against its id.

        Chunks that lie back to back in one pack (data, next entry header,
        data...) are read with one pread of the whole span and sliced: a
        sequential read costs one system call per run, not one per chunk.
        Safe in any thread: it reads pack files, and LMDB only in a read
        transaction of its own when gc moved a chunk after it was located."""
        out: list[bytes] = []
        with self.packs.reading():
            for run in _contiguous_runs(chunk_ids, locations):
                out.extend(self._read_run(run))
        return out

    def _locate(self, txn, chunk_id: bytes) -> tuple[int, int, int]:
        raw = txn.get(chunk_id, db=self.env.chunks)
        if raw is None:
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} is referenced but not in the chunk index")
        pack_id, offset, length, _refcount = schema.unpack_chunk(raw)
        return pack_id, offset, length

    def _read_run(self, run: list[tuple[bytes, int, int, int]]) -> list[bytes]:
        """One pread for a run of adjacent chunks of one pack; falls back to
        `read` chunk by chunk (with a fresh lookup) if the pack is gone."""
        _, pack_id, first_offset, _ = run[0]
        _, _, last_offset, last_length = run[-1]
        try:
            span = self.packs.read(pack_id, first_offset, last_offset + last_length - first_offset)
        except FileNotFoundError:
            # gc moved the chunks and removed the pack after they were located.
            return [self._read_again(chunk_id, pack_id, offset) for chunk_id, _, offset, _ in run]
        except OSError as exc:
            raise ChunkDamagedError(f"chunks at {first_offset}.. in pack {pack_id:08x}: {exc}") from exc
        if len(run) == 1:
            return [self._checked(run[0][0], span, pack_id, first_offset)]
        view = memoryview(span)          # slices without copies; verified like bytes
        return [self._checked(chunk_id, view[offset - first_offset: offset - first_offset + length],
                              pack_id, offset)
                for chunk_id, _, offset, length in run]

    # --- writing ---------------------------------------------------------------

    def batch(self, use_reserve: bool = False) -> "ChunkBatch":
        """use_reserve: this batch may write into the space reserve (for
        changes that free more than they write: a truncate, gc)."""
        return ChunkBatch(self, use_reserve)

    def _active_writer(self) -> PackWriter:
        writer = self._writer
        if writer is not None and (writer.broken or writer.full):
            self._writer = None
            if writer.dirty and not writer.broken:
                # The batch in progress still has to sync what it appended
                # here (rule 1): keep the file open until it has. Closing it
                # now would let that sync hit a closed descriptor -- or the
                # next pack, which reuses the number -- and leave these bytes
                # unsynced under a commit.
                self._retired.append(writer)
            else:
                writer.close()
        if self._writer is None:
            self._writer = self.packs.create(self._allocate_pack_id())
        return self._writer

    def _close_retired(self) -> None:
        """Close the full packs whose appends are all durable now."""
        if self._retired:
            still_dirty = []
            for writer in self._retired:
                if writer.dirty and not writer.broken:
                    still_dirty.append(writer)
                else:
                    writer.close()
            self._retired = still_dirty

    def reclaim(self, locations: list[tuple[int, int, int]], synced: bool = False) -> int:
        """Give the disk blocks of freed chunk entries back to the filesystem
        now, instead of at the next gc; returns the bytes given back.

        Rule 4: the commit that freed them must be durable first: unless the
        caller just synced the environment (`synced`), this syncs it (a
        mount daemon commits without flushing the meta page). A freed entry
        is never used again (the same bytes written later are appended
        anew), and a reader that located it before finds it gone and plans
        again (`ChunkGoneError`)."""
        if not locations:
            return 0
        if not synced:
            self.env.lmdb.sync(True)
        return self.packs.punch_entries(locations)

    def _allocate_pack_id(self) -> int:
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"next_pack_id", db=self.env.meta)
            pack_id = schema.unpack_le_u64(raw)
            txn.put(b"next_pack_id", schema.pack_le_u64(pack_id + 1), db=self.env.meta)
            txn.put(schema.pack_key(pack_id), schema.pack_pack_stats(0, 0), db=self.env.packs)
        # The pack file is made durable next (`PackStore.create`): the
        # allocation must be durable first, or after a power cut a mount
        # daemon's commit (no meta-page flush) is undone, the file stays, and
        # the next allocation of the same id fails with EEXIST. One sync per
        # new pack (every 64 MiB).
        self.env.lmdb.sync(True)
        return pack_id

    def close_writer(self) -> None:
        """Close every pack writer (appends not synced by then are dropped:
        nothing committed refers to them)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for writer in self._retired:
            writer.close()
        self._retired = []

    def close(self) -> None:
        self.close_writer()
        self.packs.close()


class ChunkBatch:
    """The chunk side of one commit: new bytes, then reference changes.

    New chunks are queued in the pack writer and written with few large
    pwritev calls (see `PackWriter.append_deferred`); `sync` writes what is
    still queued and makes it durable (rule 1). A batch whose add, sync or
    apply raised cannot be committed any more (queued appends were dropped):
    abandon it and start a new one, as the callers do.
    """

    def __init__(self, store: ChunkStore, use_reserve: bool = False):
        self._store = store
        self._env = store.env
        self._use_reserve = use_reserve
        self.freed_bytes = 0       # chunk bytes whose last reference `apply` dropped
        self.freed_locations: list[tuple[int, int, int]] = []    # their (pack, offset, length)
        self._data: dict[bytes, bytes] = {}                      # chunk_id -> bytes added
        self._located: dict[bytes, tuple[int, int, int]] = {}    # chunk_id -> pack, offset, length
        self._writers: set[PackWriter] = set()                   # appended to, not yet synced
        self._delta: collections.Counter = collections.Counter()
        self._failed: BaseException | None = None

    def add(self, data) -> bytes:
        """Make `data` storable in this batch; returns its chunk id.

        `add_many` of one item (same rules for `data`).
        """
        return self.add_many((data,))[0]

    def add_many(self, datas, stable: bool = False) -> list[bytes]:
        """Make each of `datas` storable in this batch; returns their chunk
        ids in order (duplicates included, each stored once).

        One LMDB read transaction serves every dedup lookup of the call;
        chunks the store does not hold yet are queued for the pack. Items
        may be bytes, bytearray or memoryview; bytes are kept as they are
        (no copy), other buffers are copied once, so the caller may reuse
        or change its buffers as soon as this returns. ENOSPC (the space
        reserve, see `PackWriter._take_space`) is raised here, before
        anything is committed; a pack write error may be raised here or by
        `sync`. After either the batch is spent (see the class docstring).

        `stable`: the caller promises its buffers do not change until this
        batch was synced and applied (a flush's frozen buffers), so they
        are kept as they are, without a copy: a flush of 32 MiB then holds
        32 MiB, not 64.
        """
        self._check_usable()
        keep = (lambda data: data) if stable else (lambda data: data if type(data) is bytes else bytes(data))
        digest = _digest
        in_batch = self._data
        chunk_ids = []
        fresh: dict[bytes, bytes] = {}               # new to this batch, in order
        for data in datas:
            chunk_id = digest(data)
            chunk_ids.append(chunk_id)
            if chunk_id not in in_batch and chunk_id not in fresh:
                fresh[chunk_id] = keep(data)
        if fresh:
            in_batch.update(fresh)
            chunks_db = self._env.chunks
            with self._env.begin() as txn:
                get = txn.get
                unknown = [chunk_id for chunk_id in fresh if get(chunk_id, db=chunks_db) is None]
            if unknown:
                self._append_all(unknown)
        return chunk_ids

    def _append_all(self, chunk_ids: list[bytes]) -> None:
        store, data, located, writers = self._store, self._data, self._located, self._writers
        try:
            writer = store._active_writer()
            writers.add(writer)
            for chunk_id in chunk_ids:
                if writer.full:
                    writer = store._active_writer()     # retires the full one until we sync it
                    writers.add(writer)
                chunk = data[chunk_id]
                located[chunk_id] = (writer.pack_id,
                                     writer.append_deferred(chunk_id, chunk, self._use_reserve),
                                     len(chunk))
        except BaseException as exc:
            self._fail(exc)
            raise

    def _reappend(self, chunk_id: bytes) -> tuple[int, int, int]:
        """Append a chunk that was in the store at `add` but is gone now."""
        # Inside the commit's write transaction: prefer the current writer,
        # even past its target size, because starting a new pack opens a
        # write transaction of its own (`_allocate_pack_id`), which LMDB
        # refuses while ours is open on the same thread (the commit would
        # fail). `prepare_commit` made sure a writer exists; only one that
        # broke since still gets there.
        writer = self._store._writer
        if writer is None or writer.broken:
            writer = self._store._active_writer()
        self._writers.add(writer)
        chunk = self._data[chunk_id]
        location = (writer.pack_id, writer.append_deferred(chunk_id, chunk, self._use_reserve),
                    len(chunk))
        self._located[chunk_id] = location
        return location

    def sync(self) -> None:
        """Rule 1: every byte this batch appended is durable before the commit."""
        self._check_usable()
        try:
            for writer in self._writers:
                writer.sync()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._writers.clear()
        self._store._close_retired()

    def prepare_commit(self) -> None:
        """Call before the commit's write transaction opens. A chunk this
        batch found in the store (a dedup hit) may be freed by another
        process before `apply`, which then appends it again; a pack writer
        must exist by then, as starting a pack inside the transaction would
        take a second write transaction."""
        if len(self._data) > len(self._located):
            self._store._active_writer()

    def ref(self, chunk_id: bytes) -> None:
        self._delta[chunk_id] += 1

    def unref(self, chunk_id: bytes) -> None:
        self._delta[chunk_id] -= 1

    def apply(self, txn) -> None:
        """Apply reference changes inside the commit's write transaction:
        one get+put per chunk, one get+put per pack for its statistics."""
        self._check_usable()
        chunks_db = self._env.chunks
        get, put, delete = txn.get, txn.put, txn.delete
        unpack_chunk, pack_chunk = schema.unpack_chunk, schema.pack_chunk
        located = self._located
        packs_delta: dict[int, list[int]] = {}       # pack_id -> [live bytes, live chunks] change
        freed = []
        try:
            for chunk_id, delta in self._delta.items():
                if not delta:
                    continue
                raw = get(chunk_id, db=chunks_db)
                if raw is None:
                    if delta < 0:
                        raise AssertionError(f"dropping a reference to unknown chunk {chunk_id.hex()}")
                    # Not in `located`: another process freed the chunk between
                    # `add` and this commit; append it again (synced below, rule 1).
                    pack_id, offset, length = located.get(chunk_id) or self._reappend(chunk_id)
                    refcount = 0
                    _count(packs_delta, pack_id, length, 1)
                else:
                    pack_id, offset, length, refcount = unpack_chunk(raw)
                refcount += delta
                if refcount < 0:
                    raise AssertionError(f"reference count of chunk {chunk_id.hex()} would go negative")
                if refcount == 0:
                    # Rule 4: the count reaches zero in this committed transaction;
                    # only afterwards may gc reclaim the bytes.
                    delete(chunk_id, db=chunks_db)
                    _count(packs_delta, pack_id, length, -1)
                    freed.append((pack_id, offset, length))
                else:
                    put(chunk_id, pack_chunk(pack_id, offset, length, refcount), db=chunks_db)
            _apply_pack_stats(txn, self._env, packs_delta)
            self.freed_locations = freed
            self.freed_bytes = sum(length for _pack, _offset, length in freed)
        except BaseException as exc:
            self._fail(exc)
            raise
        # A chunk appended just now (above) must be durable before the
        # caller commits (rule 1).
        self.sync()

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"this chunk batch failed earlier ({self._failed!r}) and may have "
                               "lost appended chunks; start a new batch")

    def _fail(self, exc: BaseException) -> None:
        """Poison the batch; queued, unwritten appends are dropped (nothing
        refers to them) so they neither cost space nor reach the pack."""
        self._failed = exc
        for writer in self._writers:
            writer.discard_queued()


def _verify(chunk_id: bytes, data: bytes, pack_id: int, offset: int) -> None:
    """Never wrong bytes: a chunk that does not hash to its id is damage."""
    if chunk_id_of(data) != chunk_id:
        raise ChunkDamagedError(f"chunk {chunk_id.hex()} in pack {pack_id:08x} at offset "
                                f"{offset} does not match its checksum")


# Longest span one coalesced pread may cover (a FUSE read is at most 1 MiB).
MAX_SPAN_BYTES = 4 << 20


def _contiguous_runs(chunk_ids, locations):
    """Group (chunk_id, pack_id, offset, length) into runs adjacent on disk:
    the next chunk's data starts one entry header after this one's end."""
    runs: list[list[tuple[bytes, int, int, int]]] = []
    for chunk_id, (pack_id, offset, length) in zip(chunk_ids, locations):
        if runs:
            _, last_pack, last_offset, last_length = runs[-1][-1]
            first_offset = runs[-1][0][2]
            if (last_pack == pack_id
                    and offset == last_offset + last_length + schema.ENTRY_HEADER.size
                    and offset + length - first_offset <= MAX_SPAN_BYTES):
                runs[-1].append((chunk_id, pack_id, offset, length))
                continue
        runs.append([(chunk_id, pack_id, offset, length)])
    return runs


def _count(packs_delta: dict, pack_id: int, length: int, sign: int) -> None:
    change = packs_delta.get(pack_id)
    if change is None:
        packs_delta[pack_id] = [sign * length, sign]
    else:
        change[0] += sign * length
        change[1] += sign


def _apply_pack_stats(txn, env, packs_delta: dict) -> None:
    """One get+put per pack for the commit's net change of its live bytes/chunks."""
    packs_db = env.packs
    for pack_id, (bytes_delta, chunks_delta) in packs_delta.items():
        if not bytes_delta and not chunks_delta:
            continue
        key = schema.pack_key(pack_id)
        raw = txn.get(key, db=packs_db)
        live_bytes, live_chunks = schema.unpack_pack_stats(raw) if raw else (0, 0)
        txn.put(key, schema.pack_pack_stats(live_bytes + bytes_delta, live_chunks + chunks_delta),
                db=packs_db)
