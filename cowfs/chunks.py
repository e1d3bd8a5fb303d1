"""Content-addressed chunks over packs and the ``chunks`` sub-database.

A chunk is named by the xxh3-128 digest of its bytes (never a 64-bit hash:
at 100 TB of 8 KiB chunks a 64-bit collision becomes likely). Identical
chunks are stored once; all-zero chunks are not stored at all (holes; the
caller decides that with `is_zero`). Reference counts count chunk-map
*record versions* (see `catalog`), so snapshots and clones never touch them.

Writing is done in batches, one per commit:

    batch = chunk_store.batch()
    chunk_id = batch.add(data)         # appends to the pack unless known
    batch.sync()                       # rule 1: bytes durable before the commit
    with env.begin(write=True) as txn:
        ... batch.ref(chunk_id) / batch.unref(old_chunk_id) ...
        batch.apply(txn)               # refcounts, new entries, pack stats
"""

import collections

import xxhash

from . import schema
from .errors import ChunkDamagedError
from .packs import PackStore, PackWriter

_ZEROS = bytes(schema.MAX_CHUNK_SIZE)


def chunk_id_of(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def is_zero(data) -> bool:
    return data == _ZEROS[:len(data)]


class ChunkStore:
    """Chunk bytes of one store, as seen by one process."""

    def __init__(self, env: schema.Env, packs: PackStore):
        self.env = env
        self.packs = packs
        self._writer: PackWriter | None = None

    # --- reading ---------------------------------------------------------------

    def read(self, txn, chunk_id: bytes) -> bytes:
        """The bytes of a chunk, verified against its id (never wrong bytes)."""
        raw = txn.get(chunk_id, db=self.env.chunks)
        if raw is None:
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} is referenced but not in the chunk index")
        pack_id, offset, length, _refcount = schema.unpack_chunk(raw)
        try:
            try:
                data = self.packs.read(pack_id, offset, length)
            except FileNotFoundError:
                # gc moved the chunk and removed the pack after our lookup.
                with self.env.begin() as fresh:
                    pack_id, offset, length, _refcount = schema.unpack_chunk(
                        fresh.get(chunk_id, db=self.env.chunks) or raw)
                data = self.packs.read(pack_id, offset, length)
        except OSError as exc:
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} in pack {pack_id:08x}: {exc}") from exc
        _verify(chunk_id, data, pack_id, offset)
        return data

    def read_many(self, txn, chunk_ids: list[bytes]) -> list[bytes]:
        """The bytes of several chunks (in order), each verified against its id.

        Chunks that lie back to back in one pack (data, next entry header,
        data...) are read with one pread of the whole span and sliced: a
        sequential read costs one system call per run, not one per chunk."""
        locations = [self._locate(txn, chunk_id) for chunk_id in chunk_ids]
        out: list[bytes] = []
        for run in _contiguous_runs(chunk_ids, locations):
            out.extend(self._read_run(txn, run))
        return out

    def _locate(self, txn, chunk_id: bytes) -> tuple[int, int, int]:
        raw = txn.get(chunk_id, db=self.env.chunks)
        if raw is None:
            raise ChunkDamagedError(f"chunk {chunk_id.hex()} is referenced but not in the chunk index")
        pack_id, offset, length, _refcount = schema.unpack_chunk(raw)
        return pack_id, offset, length

    def _read_run(self, txn, run: list[tuple[bytes, int, int, int]]) -> list[bytes]:
        """One pread for a run of adjacent chunks of one pack; falls back to
        `read` chunk by chunk (with its gc retry) if the pack is gone."""
        if len(run) == 1:
            return [self.read(txn, run[0][0])]
        _, pack_id, first_offset, _ = run[0]
        _, _, last_offset, last_length = run[-1]
        try:
            span = self.packs.read(pack_id, first_offset, last_offset + last_length - first_offset)
        except FileNotFoundError:
            return [self.read(txn, chunk_id) for chunk_id, _, _, _ in run]
        except OSError as exc:
            raise ChunkDamagedError(f"chunks at {first_offset}.. in pack {pack_id:08x}: {exc}") from exc
        pieces = []
        for chunk_id, _, offset, length in run:
            data = span[offset - first_offset: offset - first_offset + length]
            _verify(chunk_id, data, pack_id, offset)
            pieces.append(data)
        return pieces

    # --- writing ---------------------------------------------------------------

    def batch(self) -> "ChunkBatch":
        return ChunkBatch(self)

    def _active_writer(self) -> PackWriter:
        if self._writer is not None and (self._writer.broken or self._writer.full):
            self._writer.close()
            self._writer = None
        if self._writer is None:
            self._writer = self.packs.create(self._allocate_pack_id())
        return self._writer

    def _allocate_pack_id(self) -> int:
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"next_pack_id", db=self.env.meta)
            pack_id = schema.unpack_le_u64(raw)
            txn.put(b"next_pack_id", schema.pack_le_u64(pack_id + 1), db=self.env.meta)
            txn.put(schema.pack_key(pack_id), schema.pack_pack_stats(0, 0), db=self.env.packs)
        return pack_id

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self.close_writer()
        self.packs.close()


class ChunkBatch:
    """The chunk side of one commit: new bytes, then reference changes."""

    def __init__(self, store: ChunkStore):
        self._store = store
        self._env = store.env
        self._data: dict[bytes, bytes] = {}                      # chunk_id -> bytes added
        self._located: dict[bytes, tuple[int, int, int]] = {}    # chunk_id -> pack, offset, length
        self._writers: set[PackWriter] = set()
        self._delta: collections.Counter = collections.Counter()

    def add(self, data: bytes) -> bytes:
        """Make `data` storable in this batch; returns its chunk id."""
        chunk_id = chunk_id_of(data)
        if chunk_id in self._data:
            return chunk_id
        self._data[chunk_id] = data
        with self._store.env.begin() as txn:
            known = txn.get(chunk_id, db=self._env.chunks) is not None
        if not known:
            self._append(chunk_id, data)
        return chunk_id

    def _append(self, chunk_id: bytes, data: bytes) -> None:
        writer = self._store._active_writer()
        offset = writer.append(chunk_id, data)
        self._located[chunk_id] = (writer.pack_id, offset, len(data))
        self._writers.add(writer)

    def sync(self) -> None:
        """Rule 1: every byte this batch appended is durable before the commit."""
        for writer in self._writers:
            writer.sync()
        self._writers.clear()

    def ref(self, chunk_id: bytes) -> None:
        self._delta[chunk_id] += 1

    def unref(self, chunk_id: bytes) -> None:
        self._delta[chunk_id] -= 1

    def apply(self, txn) -> None:
        """Apply reference changes inside the commit's write transaction."""
        for chunk_id, delta in self._delta.items():
            if delta:
                self._apply_one(txn, chunk_id, delta)
        # A chunk that another process freed between `add` and this commit
        # was appended here just now; make it durable before we commit (rule 1).
        self.sync()

    def _apply_one(self, txn, chunk_id: bytes, delta: int) -> None:
        raw = txn.get(chunk_id, db=self._env.chunks)
        if raw is None:
            if delta < 0:
                raise AssertionError(f"dropping a reference to unknown chunk {chunk_id.hex()}")
            if chunk_id not in self._located:
                self._append(chunk_id, self._data[chunk_id])
            pack_id, offset, length = self._located[chunk_id]
            refcount = 0
            _bump_pack(txn, self._env, pack_id, length, 1)
        else:
            pack_id, offset, length, refcount = schema.unpack_chunk(raw)
        refcount += delta
        if refcount < 0:
            raise AssertionError(f"reference count of chunk {chunk_id.hex()} would go negative")
        if refcount == 0:
            # Rule 4: the count reaches zero in this committed transaction;
            # only afterwards may gc reclaim the bytes.
            txn.delete(chunk_id, db=self._env.chunks)
            _bump_pack(txn, self._env, pack_id, length, -1)
        else:
            txn.put(chunk_id, schema.pack_chunk(pack_id, offset, length, refcount), db=self._env.chunks)


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


def _bump_pack(txn, env, pack_id: int, length: int, sign: int) -> None:
    key = schema.pack_key(pack_id)
    raw = txn.get(key, db=env.packs)
    live_bytes, live_chunks = schema.unpack_pack_stats(raw) if raw else (0, 0)
    txn.put(key, schema.pack_pack_stats(live_bytes + sign * length, live_chunks + sign), db=env.packs)
