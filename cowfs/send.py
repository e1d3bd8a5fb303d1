"""`cowfs send`: a snapshot, or what changed since an older one, as a stream.

A full stream carries every record a read of the snapshot sees (inodes,
directory entries, chunk maps, xattrs: the whole tree through its clone
chain) and each chunk they name, once. An incremental stream (`--from`
an older snapshot of the same volume, or of the volume it was cloned from)
carries only the records whose value differs between the two points, found
like `diff` does through the ``born`` log, O(changes), and the chunks those
records name: its size follows the
change, not the volume. The stream format is `stream`'s; the header says
what the receiver needs to check (`receive`).

The snapshots sent are share-locked for the duration (destroying one is
refused as busy meanwhile), and records are read in bounded read transactions, so a long
send neither holds old LMDB pages nor blocks anybody's commits.
"""

import itertools
import os
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

from . import catalog, digest, schema, snapshots, volumes
from .errors import ChunkDamagedError, StoreIOError, UsageError
from .store import Store
from .stream import (CHUNK_FRAME_BYTES, CHUNKS, END, HEADER, OP_DELETE, OP_PUT, RECORD_FRAME_BYTES,
                     RECORDS, STREAM_VERSION, FrameBuffer, StreamWriter, chunk_entry, record_entry)

RECORDS_PER_TXN = 10_000       # records read per read transaction of a full send
CHUNK_BATCH = 512              # chunk-map records whose chunks are read together (4 MiB at 8 KiB)


@dataclass(frozen=True)
class Snapshot:
    vol_id: int
    vol_name: str
    name: str
    gen: int

    @property
    def label(self) -> str:
        return f"{self.vol_name}@{self.name}"


def resolve(store: Store, target: str, what: str = "snapshot to send") -> Snapshot:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the {what} as VOLUME@SNAPSHOT, e.g. {vol}@nightly "
                         f"(take one with 'cowfs snapshot STORE {vol}@nightly')")
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        return Snapshot(vol_id, vol, snap, snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap))


def resolve_base(store: Store, snap: Snapshot, base_text: str) -> Snapshot:
    """An older snapshot of the same volume, or of a volume it was cloned from (at or before
    the clone's origin): then the receiver makes the clone from its copy of that snapshot."""
    base = resolve(store, base_text, "base (--from)")
    with store.env.begin() as txn:
        chain = catalog.volume_chain(txn, store.env, snap.vol_id, snap.gen)
    if not digest.on_chain(chain, base.vol_id, base.gen):
        raise UsageError(f"--from {base.label} is not an older point of {snap.label} (give an older "
                         f"snapshot of {snap.vol_name} or of the volume it was cloned from), or "
                         f"send {snap.label} in full")
    return base


def send(store: Store, target: str, out: BinaryIO, base_text: Optional[str] = None,
         on_bytes=None, on_start=None) -> dict:
    """Write the stream of `target` (incremental from `base_text`) to `out`; returns a summary.

    `on_start(estimated_bytes)` is called once the size estimate is known,
    `on_bytes(n)` for every n bytes written (progress)."""
    started = time.monotonic()
    snap = resolve(store, target)
    base = resolve_base(store, snap, base_text) if base_text else None
    locks = [store.lock_snapshot(s.vol_id, s.gen, s.label, exclusive=False, holder="cowfs send")
             for s in (snap, base) if s is not None]
    try:
        header = make_header(store, snap, base)
        if on_start is not None:
            on_start(header["estimated_bytes"])
        writer = StreamWriter(out, on_bytes)
        writer.json_frame(HEADER, header)
        records = _changed_records(store, snap, base) if base else _all_records(store, snap)
        counts = _write_body(store, writer, records)
        writer.json_frame(END, dict(frames=writer.frames, **counts))
        out.flush()
    finally:
        for lock in locks:
            lock.release()
    return dict(snapshot=snap.label, base=base.label if base else None,
                type="incremental" if base else "full", digest=header["digest"],
                stream_bytes=writer.bytes_written, frames=writer.frames,
                duration_s=round(time.monotonic() - started, 3), **counts)


def make_header(store: Store, snap: Snapshot, base: Optional[Snapshot]) -> dict:
    """What the receiver checks before anything becomes visible (see `receive`)."""
    env = store.env
    points = [(snap.vol_id, snap.gen)] + ([(base.vol_id, base.gen)] if base else [])
    digests = digest.snapshot_digests(env, points)
    with env.begin() as txn:
        record = volumes.volume_record(txn, env, snap.vol_id)
        snap_record = schema.unpack_snapshot(txn.get(schema.snapshot_key(snap.vol_id, snap.gen),
                                                     db=env.snapshots))
        if base and base.vol_id == snap.vol_id:
            estimated = snapshots.written_bytes(txn, env, snap.vol_id, base.gen, snap.gen)
        elif base:          # a clone against its origin: what the clone wrote
            estimated = snapshots.written_bytes(txn, env, snap.vol_id, 0, snap.gen)
        else:
            estimated = snapshots.logical_bytes(txn, env, catalog.volume_chain(txn, env, snap.vol_id, snap.gen))
        store_uuid = bytes(txn.get(b"store_uuid", db=env.meta) or b"").hex()
    return dict(
        format=STREAM_VERSION, stream_id=uuid.uuid4().hex, type="incremental" if base else "full",
        volume=snap.vol_name, snapshot=snap.name, created_ns=snap_record["created_ns"],
        digest=digest.to_hex(digests[(snap.vol_id, snap.gen)]),
        base=None if base is None else dict(
            volume=base.vol_name, snapshot=base.name, digest=digest.to_hex(digests[(base.vol_id, base.gen)])),
        chunk_size=store.chunk_size, next_ino=record["next_ino"], source_store=store_uuid,
        estimated_bytes=estimated)


# --- which records ---------------------------------------------------------------------------------

def _all_records(store: Store, snap: Snapshot) -> Iterator[tuple[int, bytes, bytes, bytes]]:
    """(OP_PUT, kind, key, payload) of every visible record, in bounded read transactions."""
    env = store.env
    with env.begin() as txn:
        chain = catalog.volume_chain(txn, env, snap.vol_id, snap.gen)
    for kind in digest.KINDS:
        after = None
        while True:
            with env.begin() as txn:
                batch = list(itertools.islice(catalog.iter_visible(txn, env, chain, kind, after),
                                              RECORDS_PER_TXN))
            for key, payload in batch:
                yield OP_PUT, kind, key, payload
            if len(batch) < RECORDS_PER_TXN:
                break
            after = batch[-1][0]


def _changed_records(store: Store, snap: Snapshot, base: Snapshot) -> Iterator[tuple[int, bytes, bytes, bytes]]:
    """Records whose value differs between base and snap: puts, and deletes of what snap lacks."""
    env = store.env
    changes = []
    with env.begin() as txn:
        new_chain = catalog.volume_chain(txn, env, snap.vol_id, snap.gen)
        old_chain = catalog.volume_chain(txn, env, base.vol_id, base.gen)
        keys = digest.changed_since(txn, env, new_chain, base.vol_id, base.gen)
        for kind in digest.KINDS:
            for key in sorted(keys.get(kind, ())):
                new = catalog.get(txn, env, new_chain, kind, key)
                if new != catalog.get(txn, env, old_chain, kind, key):
                    changes.append((OP_DELETE, kind, key, b"") if new is None else (OP_PUT, kind, key, new))
    return iter(changes)


# --- writing them -------------------------------------------------------------------------------

def _write_body(store: Store, writer: StreamWriter, records) -> dict:
    """Chunk frames before the record frames that name their chunks; each chunk once."""
    chunk_frames = FrameBuffer(writer, CHUNKS, CHUNK_FRAME_BYTES)
    record_frames = FrameBuffer(writer, RECORDS, RECORD_FRAME_BYTES)
    sent: set[bytes] = set()
    chunk_bytes = 0
    while True:
        batch = list(itertools.islice(records, CHUNK_BATCH))
        if not batch:
            break
        wanted = list(dict.fromkeys(payload for op, kind, _key, payload in batch
                                    if kind == schema.KIND_CHUNK and op == OP_PUT and payload not in sent))
        for chunk_id, data in zip(wanted, _read_chunks(store, wanted)):
            chunk_frames.add(*chunk_entry(chunk_id, data))
            chunk_bytes += len(data)
        sent.update(wanted)
        chunk_frames.flush()              # the chunks precede every record naming them
        for op, kind, key, payload in batch:
            record_frames.add(*record_entry(op, kind, key, payload))
    record_frames.flush()
    return dict(records=record_frames.entries, chunks=chunk_frames.entries, chunk_bytes=chunk_bytes)


def _read_chunks(store: Store, chunk_ids: list[bytes]) -> list[bytes]:
    if not chunk_ids:
        return []
    try:
        with store.env.begin() as txn:
            locations = store.chunks.locate_many(txn, chunk_ids)
        return store.chunks.read_located(chunk_ids, locations)
    except ChunkDamagedError as exc:
        raise StoreIOError(f"cannot send: {exc.args[1]}; 'cowfs scrub STORE' names the files "
                           "that read damaged chunks") from exc


def open_output(path: str) -> BinaryIO:
    """A new file for --output (an existing one is kept: refuse rather than overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")
