"""`cowfs receive`: a stream of `cowfs send` becomes a snapshot of this store.

All or nothing. Everything that can be refused from the header alone is
refused before a byte is stored (wrong chunk size, missing or different
base, target volume in use or changed, snapshot already there). Then:

1. Chunk frames: each chunk is re-hashed against its id and, unless the
   store holds it already (dedup: no duplicate bytes), appended to a pack
   of this process. Record frames are checked and spooled to an unlinked
   temporary file in ``STORE/run`` (so memory does not grow with the
   volume, and a crash leaves no file).
2. The end frame's counts must match; then every appended chunk is made
   durable (rule 1) before anything refers to it.
3. One LMDB write transaction creates the volume (full stream) or writes
   at the head of the existing one (incremental), indexes the new chunks,
   adjusts reference counts, records the snapshot with the sender's time,
   computes its content digest (O(changes) from the base's, see `digest`)
   and commits only if it equals the sender's. That commit is the moment
   the snapshot becomes visible.

A failure before the commit (damaged stream, full disk, crash) leaves
nothing a reader can see: appended chunks are named by no committed
record; after an error they are punched out and the packs this receive
opened are removed at once, after a crash gc reclaims them. The same
receive can simply be run again.

An incremental stream goes into the volume that holds its base snapshot
(same name and same digest), while that volume is not mounted (its lock is
held throughout) and only if its head still reads as the base (rolled back
to it is fine): then the head becomes the new snapshot, as `zfs receive`
does.
"""

import contextlib
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

import lmdb

from . import catalog, digest, faults, log_replay, schema, snapshots, volumes
from .chunks import chunk_id_of
from .errors import BusyError, CowfsError, ExistsError, NotFoundError, StoreIOError, StreamError, UsageError
from .gc import _drop_if_empty
from .store import Store
from .stream import (AGAIN, CHUNKS, END, OP_DELETE, OP_PUT, RECORDS, STREAM_VERSION, StreamReader,
                     parse_chunks, parse_json, parse_records)

_SPOOL_LENGTH = struct.Struct("<I")


@dataclass
class Target:
    """Where the stream goes: a new volume, a new clone of the base snapshot, or the head of
    an existing volume holding the base (vol_id set)."""
    name: str
    vol_id: Optional[int] = None
    base: Optional[tuple[int, int]] = None      # (vol_id, gen) of the base snapshot here
    locks: list = field(default_factory=list)

    @property
    def is_new_clone(self) -> bool:
        return self.vol_id is None and self.base is not None

    def release(self) -> None:
        while self.locks:
            self.locks.pop().release()


# --- the header --------------------------------------------------------------------------------

_HEADER_FIELDS = dict(stream_id=str, type=str, volume=str, snapshot=str, created_ns=int,
                      digest=str, chunk_size=int, next_ino=int, estimated_bytes=int)


def check_header(store: Store, header: dict) -> dict:
    for name, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(name), kind):
            raise StreamError(f"the stream's header lacks a valid {name!r}; {AGAIN}")
    if header.get("format") != STREAM_VERSION or header["type"] not in ("full", "incremental"):
        raise StreamError(f"the stream's header is not of format {STREAM_VERSION}; {AGAIN}")
    base = header.get("base")
    if (header["type"] == "incremental") != isinstance(base, dict):
        raise StreamError(f"the stream's header names its base wrongly; {AGAIN}")
    volumes.check_name(header["volume"])
    volumes.check_name(header["snapshot"], "snapshot")
    if base is not None:
        volumes.check_name(str(base.get("snapshot")), "snapshot")
        volumes.check_name(str(base.get("volume")))
        if not isinstance(base.get("digest"), str):
            raise StreamError(f"the stream's header lacks its base's digest; {AGAIN}")
    if header["chunk_size"] != store.chunk_size:
        raise UsageError(f"the stream has chunk size {header['chunk_size']}, store {store.path} has "
                         f"{store.chunk_size}; receive it into a store made with "
                         f"'cowfs init --chunk-size {header['chunk_size']}'")
    return header


def prepare_target(store: Store, header: dict, vol_name: Optional[str]) -> Target:
    """Refuse what the header alone shows will not fit; lock what the receive relies on."""
    target = Target(volumes.check_name(vol_name or header["volume"]))
    with store.env.begin() as txn:
        exists = txn.get(target.name.encode(), db=store.env.volnames) is not None
    if header["type"] == "full":
        if exists:
            raise ExistsError(f"volume {target.name} already exists; a full stream makes a new volume: "
                              f"give another name ('cowfs receive STORE NEWNAME'), or send incrementally "
                              f"from a snapshot {target.name} has (--from)")
        return target
    try:
        if exists:
            _into_existing(store, target, header)
        else:
            _into_new_clone(store, target, header)
        vol_id, gen = target.base
        target.locks.append(store.lock_snapshot(vol_id, gen, "the base", exclusive=False,
                                                holder="cowfs receive"))
    except BaseException:
        target.release()
        raise
    return target


def _into_existing(store: Store, target: Target, header: dict) -> None:
    """The volume holds the base, is not mounted, still reads as the base: its head takes the stream."""
    env, name, snap = store.env, target.name, header["snapshot"]
    with env.begin() as txn:
        target.vol_id = volumes.volume_id(txn, env, name)
    try:
        target.locks.append(store.lock_volume(target.vol_id, name, "cowfs receive"))
    except BusyError:
        raise BusyError(f"volume {name} is mounted; unmount it before receiving into it") from None
    # The head is read and written: what its intent log still holds goes in first
    # (the CLI replayed every unmounted volume already; this closes the gap since).
    if log_replay.needs_replay(store, target.vol_id):
        log_replay.replay(store, target.vol_id)
    with env.begin() as txn:
        if txn.get(schema.snapname_key(target.vol_id, snap), db=env.snapnames) is not None:
            raise ExistsError(f"volume {name} already has a snapshot {snap!r}: this stream was "
                              "received already (destroy the snapshot to receive it again)")
        head_gen = volumes.volume_record(txn, env, target.vol_id)["head_gen"]
    target.base = _base_here(store, target.vol_id, name, header)
    base = header["base"]["snapshot"]
    with env.begin() as txn:
        changed = digest.step_delta(txn, env, target.vol_id, target.base, head_gen)
    if changed:
        raise CowfsError(f"volume {name} changed since @{base}; return it there with 'cowfs rollback "
                         f"STORE {name}@{base}' (undoable), or receive into a new volume "
                         f"('cowfs receive STORE NEWNAME': a clone of {name}@{base} plus the stream)")


def _into_new_clone(store: Store, target: Target, header: dict) -> None:
    """A new volume: a clone of the base snapshot here (O(1)), whose head takes the stream."""
    base_volume = header["base"]["volume"]
    with store.env.begin() as txn:
        found = txn.get(base_volume.encode(), db=store.env.volnames)
    if found is None:
        raise NotFoundError(f"this incremental stream needs {base_volume}@{header['base']['snapshot']}, "
                            f"and there is no volume {base_volume} here: receive the full stream of "
                            f"{base_volume}@{header['base']['snapshot']} first")
    target.base = _base_here(store, schema.read_u64(found), base_volume, header)


def _base_here(store: Store, vol_id: int, vol_name: str, header: dict) -> tuple[int, int]:
    """(vol_id, gen) of the stream's base in volume vol_name, checked against its digest."""
    base, expected = header["base"]["snapshot"], header["base"]["digest"]
    with store.env.begin() as txn:
        raw = txn.get(schema.snapname_key(vol_id, base), db=store.env.snapnames)
    if raw is None:
        raise NotFoundError(f"volume {vol_name} has no snapshot {base!r}, the base of this incremental "
                            f"stream; receive a full stream of {header['base']['volume']}@{base} first")
    point = (vol_id, schema.read_u64(raw))
    here = digest.to_hex(digest.snapshot_digests(store.env, [point])[point])
    if here != expected:
        raise CowfsError(f"{vol_name}@{base} here is not the sender's {header['base']['volume']}@{base} "
                         f"(digest {here}, the stream expects {expected}); receive a full stream into "
                         "a new volume instead")
    return point


# --- staging ---------------------------------------------------------------------------------------

@dataclass
class StagedChunks:
    """Chunks of the stream: appended to this process's packs as they arrive, indexed at commit."""
    store: Store
    first_new_pack_id: int                           # packs from this id on were opened after we started
    located: dict = field(default_factory=dict)      # chunk_id -> (pack, offset, length): appended by us
    present: set = field(default_factory=set)        # chunk ids the store held already (dedup)
    writers: list = field(default_factory=list)

    @classmethod
    def start(cls, store: Store) -> "StagedChunks":
        with store.env.begin() as txn:
            return cls(store, schema.unpack_le_u64(txn.get(b"next_pack_id", db=store.env.meta)))

    def add_frame(self, entries: list) -> None:
        """Verified (chunk_id, data) of one frame; appends what the store lacks."""
        with self.store.env.begin() as txn:
            for chunk_id, _data in entries:
                if chunk_id not in self.located and txn.get(chunk_id, db=self.store.env.chunks) is not None:
                    self.present.add(chunk_id)
        try:
            for chunk_id, data in entries:
                if chunk_id in self.located or chunk_id in self.present:
                    continue
                # The process's own pack writer, as gc uses it; no other process appends to it.
                writer = self.store.chunks._active_writer()
                if writer not in self.writers:
                    self.writers.append(writer)
                data = bytes(data)
                self.located[chunk_id] = (writer.pack_id, writer.append_deferred(chunk_id, data), len(data))
        except OSError as exc:
            raise StoreIOError(f"cannot store the stream's chunks: {exc.strerror or exc}; nothing was "
                               "received (free space, then receive again)") from exc

    def known(self, chunk_id: bytes) -> bool:
        return chunk_id in self.located or chunk_id in self.present

    def sync(self) -> None:
        """Rule 1: every appended byte is durable before the commit that names it."""
        try:
            for writer in self.writers:
                writer.sync()
        except OSError as exc:
            raise StoreIOError(f"cannot make the received chunks durable: {exc}; nothing was "
                               "received") from exc

    def discard(self) -> None:
        """After a failure: give back what was appended (no committed record names it)."""
        for writer in self.writers:
            writer.discard_queued()
        self.store.packs.punch_entries(list(self.located.values()))
        self.store.chunks.close_writer()
        for pack_id in sorted({w.pack_id for w in self.writers if w.pack_id >= self.first_new_pack_id}):
            with contextlib.suppress(OSError):
                _drop_if_empty(self.store, pack_id)     # its stats first (committed), then the file


class RecordSpool:
    """Record frames, checked, in an unlinked temporary file of the store's run directory."""

    def __init__(self, run_dir: str):
        self._file = tempfile.TemporaryFile(dir=run_dir, prefix="receive-")
        self.records = 0
        self.referenced: set[bytes] = set()

    def add_frame(self, payload: bytes, staged: StagedChunks, full: bool) -> None:
        for op, kind, key, value in parse_records(payload):
            _check_record(op, kind, key, value, full)
            if kind == schema.KIND_CHUNK and op == OP_PUT:
                if not staged.known(value):
                    raise StreamError(f"a record names chunk {value.hex()}, which the stream did not "
                                      f"carry before it; {AGAIN}")
                self.referenced.add(value)
            self.records += 1
        self._file.write(_SPOOL_LENGTH.pack(len(payload)))
        self._file.write(payload)

    def __iter__(self):
        self._file.flush()
        self._file.seek(0)
        while True:
            raw = self._file.read(_SPOOL_LENGTH.size)
            if not raw:
                return
            yield from parse_records(self._file.read(_SPOOL_LENGTH.unpack(raw)[0]))

    def close(self) -> None:
        self._file.close()


_KEY_BYTES = {schema.KIND_INODE: 8, schema.KIND_CHUNK: 16}


def _check_record(op: int, kind: bytes, key: bytes, value: bytes, full: bool) -> None:
    """What the catalog must never get, whatever the sender: checked before anything is written."""
    if kind not in digest.KINDS or op not in (OP_PUT, OP_DELETE) or (full and op == OP_DELETE):
        raise StreamError(f"the stream holds a record it cannot hold (kind {kind!r}, op {op}); {AGAIN}")
    size = _KEY_BYTES.get(kind)
    named = kind in (schema.KIND_DENTRY, schema.KIND_XATTR)
    if (size is not None and len(key) != size) or (named and (len(key) < 10 or key[-1] != 0
                                                                or 0 in key[8:-1])):
        raise StreamError(f"the stream holds a malformed {kind.decode()} record key; {AGAIN}")
    if op == OP_PUT and ((kind == schema.KIND_CHUNK and len(value) != 16)
                         or (kind == schema.KIND_DENTRY and len(value) != 8)
                         or (kind == schema.KIND_INODE and not _is_inode(value))):
        raise StreamError(f"the stream holds a malformed {kind.decode()} record; {AGAIN}")


def _is_inode(value: bytes) -> bool:
    try:
        schema.unpack_inode(value)
    except struct.error:
        return False
    return True


# --- receiving ---------------------------------------------------------------------------------------

def receive(store: Store, inp: BinaryIO, vol_name: Optional[str] = None,
            on_bytes=None, on_start=None) -> dict:
    """Read one stream from `inp` into the store; returns a summary. All or nothing."""
    started = time.monotonic()
    if vol_name is not None:
        volumes.check_name(vol_name)          # before a byte of the stream is read
    reader = StreamReader(inp, on_bytes)
    frames = reader.frames_in_order()
    header = check_header(store, parse_json(next(frames)[1], "header"))
    if on_start is not None:
        on_start(header["estimated_bytes"])
    target = prepare_target(store, header, vol_name)
    staged = StagedChunks.start(store)
    spool = None
    try:
        spool = RecordSpool(store.run_dir)
        counts = _read_body(frames, reader, staged, spool, header["type"] == "full")
        staged.sync()
        faults.point("receive.synced")
        batch = _commit(store, target, header, staged, spool)
    except BaseException as exc:
        staged.discard()
        if isinstance(exc, (OSError, lmdb.Error)):     # the spool in run/, the input, a full disk
            raise StoreIOError(f"receive failed: {exc}; nothing was received") from exc
        raise
    finally:
        if spool is not None:
            spool.close()
        target.release()
    faults.point("receive.committed")
    store.chunks.close_writer()
    store.chunks.reclaim(batch.freed_locations)     # versions an incremental displaced at the head
    stored = list(staged.located.values())
    return dict(volume=target.name, snapshot=f"{target.name}@{header['snapshot']}",
                base=f"{header['base']['volume']}@{header['base']['snapshot']}" if header["base"] else None,
                type=header["type"],
                digest=header["digest"], stream_bytes=reader.bytes_read, records=counts["records"],
                chunks=counts["chunks"], chunks_stored=len(stored),
                stored_bytes=sum(length for _p, _o, length in stored),
                duration_s=round(time.monotonic() - started, 3))


def _read_body(frames, reader: StreamReader, staged: StagedChunks, spool: RecordSpool, full: bool) -> dict:
    chunks = chunk_bytes = 0
    for kind, payload in frames:
        if kind == CHUNKS:
            entries = list(parse_chunks(payload))
            for chunk_id, data in entries:
                if chunk_id_of(data) != chunk_id:
                    raise StreamError(f"chunk {chunk_id.hex()} in frame {reader.frames - 1} does not "
                                      f"match its checksum; {AGAIN}")
                chunk_bytes += len(data)
            staged.add_frame(entries)
            chunks += len(entries)
            faults.point("receive.staged")
        elif kind == RECORDS:
            spool.add_frame(payload, staged, full)
        elif kind == END:
            counts = dict(frames=reader.frames - 1, records=spool.records, chunks=chunks,
                          chunk_bytes=chunk_bytes)
            end = parse_json(payload, "end frame")
            if any(end.get(name) != value for name, value in counts.items()):
                raise StreamError(f"the stream's end frame counts {end}, but it held {counts}; {AGAIN}")
            return counts
    raise StreamError(f"the stream has no end frame; {AGAIN}")


def _commit(store: Store, target: Target, header: dict, staged: StagedChunks, spool: RecordSpool):
    """One transaction: records, chunk index and counts, the snapshot; kept only if the digest matches."""
    env = store.env
    batch = store.chunks.batch()
    with env.begin(write=True) as txn:
        vol_id = _volume(txn, env, target)
        chain = catalog.volume_chain(txn, env, vol_id)
        for op, kind, key, value in spool:
            _apply_record(txn, env, chain, vol_id, batch, op, kind, key, value)
        if target.is_new_clone:
            _record_orphans(txn, env, chain, vol_id)
        _index_new_chunks(txn, env, staged, spool.referenced)
        batch.apply(txn)
        _raise_next_ino(txn, env, vol_id, header["next_ino"])
        gen = snapshots.take(txn, env, vol_id, header["snapshot"], created_ns=header["created_ns"])
        base_digest = 0 if target.base is None else digest.point_digest(txn, env, *target.base)
        got = (base_digest + digest.step_delta(txn, env, vol_id, target.base, gen)) % digest.MODULUS
        if digest.to_hex(got) != header["digest"]:
            raise CowfsError(f"the received tree has digest {digest.to_hex(got)}, the sender's has "
                             f"{header['digest']}; nothing was kept (damaged metadata on either side? "
                             "run 'cowfs fsck' on both stores)")
        digest.store_cached(txn, env, vol_id, gen, got)
        faults.point("receive.committing")
    return batch


def _volume(txn, env, target: Target) -> int:
    """The volume that takes the records: existing, or made now (invisible until the commit)."""
    if target.vol_id is not None:
        return target.vol_id
    if target.is_new_clone:
        return snapshots.clone(txn, env, *target.base, target.name)
    return _new_volume(txn, env, target.name)


def _record_orphans(txn, env, chain, vol_id: int) -> None:
    """A new clone sees the base's inodes without a name (unlinked while open at the sender)
    that the stream did not touch: orphans of the clone too, freed by its first mount."""
    for key, payload in catalog.iter_visible(txn, env, chain, schema.KIND_INODE):
        ino = schema.read_u64(key)
        if ino != schema.ROOT_INO and schema.unpack_inode(payload)[0]["nlink"] == 0:
            txn.put(schema.orphan_key(vol_id, ino), b"", db=env.orphans)


def _new_volume(txn, env, name: str) -> int:
    """An empty volume record (no root: the stream carries it), invisible until the commit."""
    if txn.get(name.encode(), db=env.volnames) is not None:
        raise ExistsError(f"volume {name} was created while the stream was read; receive into another name")
    vol_id = volumes.allocate_vol_id(txn, env)
    volumes.put_volume_record(txn, env, vol_id, dict(
        head_gen=volumes.FIRST_GEN, parent_vol_id=0, parent_gen=0, next_ino=schema.FIRST_FREE_INO,
        created_ns=time.time_ns(), name=name, flags=0))
    txn.put(name.encode(), schema.u64(vol_id), db=env.volnames)
    return vol_id


def _apply_record(txn, env, chain, vol_id: int, batch, op: int, kind: bytes, key: bytes, value: bytes) -> None:
    if op == OP_PUT:
        displaced = catalog.put(txn, env, chain, kind, key, value)
        if kind == schema.KIND_CHUNK:
            batch.ref(value)
    else:
        displaced = catalog.delete(txn, env, chain, kind, key)
    if displaced is not None and kind == schema.KIND_CHUNK:
        batch.unref(displaced)
    if kind == schema.KIND_INODE and schema.read_u64(key) != schema.ROOT_INO:
        # An inode unlinked while open at the sender is in the snapshot with no name:
        # an orphan here too, freed by the first mount (see `Filesystem.recover_orphans`).
        orphan = op == OP_PUT and schema.unpack_inode(value)[0]["nlink"] == 0
        orphan_key = schema.orphan_key(vol_id, schema.read_u64(key))
        if orphan:
            txn.put(orphan_key, b"", db=env.orphans)
        else:
            txn.delete(orphan_key, db=env.orphans)


def _index_new_chunks(txn, env, staged: StagedChunks, referenced: set) -> None:
    """Chunk entries for the chunks this receive appended (count 0: `ChunkBatch.apply` adds the refs)."""
    packs_delta: dict[int, list[int]] = {}
    for chunk_id in referenced:
        if txn.get(chunk_id, db=env.chunks) is not None:
            continue
        location = staged.located.get(chunk_id)
        if location is None:
            raise BusyError(f"chunk {chunk_id.hex()}, which the store held when the stream arrived, "
                            "was freed meanwhile; run the same receive again")
        pack_id, offset, length = location
        txn.put(chunk_id, schema.pack_chunk(pack_id, offset, length, 0), db=env.chunks)
        delta = packs_delta.setdefault(pack_id, [0, 0])
        delta[0] += length
        delta[1] += 1
    for pack_id, (live_bytes, live_chunks) in packs_delta.items():
        key = schema.pack_key(pack_id)
        raw = txn.get(key, db=env.packs)
        old_bytes, old_chunks = schema.unpack_pack_stats(raw) if raw else (0, 0)
        txn.put(key, schema.pack_pack_stats(old_bytes + live_bytes, old_chunks + live_chunks), db=env.packs)


def _raise_next_ino(txn, env, vol_id: int, next_ino: int) -> None:
    record = volumes.volume_record(txn, env, vol_id)
    if record["next_ino"] < next_ino:
        record["next_ino"] = next_ino
        volumes.put_volume_record(txn, env, vol_id, record)
