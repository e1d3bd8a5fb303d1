"""The intent log of a volume: one device flush per fsync.

Without it an fsync costs a pack append and fdatasync, an LMDB commit and an
environment sync: three device flushes in a row, and PostgreSQL serialises
its WAL flushes behind one lock, so no grouping hides them. With it, an
fsync appends one *record* -- the file's changed chunks, bytes included, and
its attributes -- to a preallocated file and fdatasyncs that file once (the
commit point of the fsync, rule 2). A *fold* later moves logged changes into
packs and LMDB in batches, like ZFS's ZIL and its txg sync.

File ``STORE/logs/vol-<vol_id>.log``, `LOG_BYTES` long, written full of zeros
when created (an overwrite of allocated, written blocks changes no file
metadata, so fdatasync flushes data only: one device flush, no journal
commit). Block 0 is a header (`FILE_HEADER`); records start on block
boundaries from `DATA_START` and take whole blocks (no read-modify-write of
a partial block), and the log wraps around: a `KIND_WRAP` record (or the
end of the file) sends the reader back to `DATA_START`.

Record: `RECORD_HEADER` (magic, kind, epoch, seq, payload length,
xxh3-128 checksum of header and payload), then the payload; `KIND_INODE`:
`INODE_UPDATE` (ino and the file's data attributes), then per chunk
`CHUNK_HEADER` (chunk index, length: 0 means all zeros) and its bytes.
Records carry their bytes, never a chunk id: a chunk another volume frees
and gc reclaims before the fold would otherwise take acknowledged data
with it. Dedup happens at the fold.

What makes replay safe (the state is the ``logs`` sub-database, see schema):
* A record is valid only with the log's current *epoch* (random, new at
  every replay: a record left from an earlier incarnation never matches),
  the next consecutive *seq*, and a matching checksum. The first invalid
  record -- torn, stale, never written -- ends the log.
* seq numbers never repeat within a volume (`next_seq` survives epochs),
  so a per-inode *fence* (`fence[ino]` = newest seq already in LMDB for
  that inode, written by a commit that wrote the inode's data past the log,
  e.g. a truncate) stays meaningful: replay skips records at or below it.
* The fold that covers records up to seq S commits `start_seq = S + 1` and
  the offset of record S + 1 in the same LMDB transaction as their data, so
  replay never applies a record twice (refcounts would drift). The log's
  space before that offset is reused only once that commit is durable.
* Before a record is written, every earlier namespace commit of the volume
  is made durable (environment sync), so the inode a record names exists
  in whatever state a power cut leaves. A record whose inode no longer
  exists (deleted later, durably) is skipped.
"""

import os
import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional

import xxhash

from . import schema
from .packs import fsync_dir

LOG_BYTES = 32 << 20
BLOCK = 4096
DATA_START = BLOCK
FILE_MAGIC = b"COWLOG01"
RECORD_MAGIC = b"CWLR"
KIND_INODE = 1
KIND_WRAP = 2

FILE_HEADER = struct.Struct("<8sQ16s")                 # magic, vol_id, store uuid
RECORD_HEADER = struct.Struct("<4sB3xQQI4x16s")        # magic kind epoch seq payload_len checksum
INODE_UPDATE = struct.Struct("<QQIIIIqqqI4x")          # ino size mode uid gid pad atime mtime ctime nchunks
CHUNK_HEADER = struct.Struct("<QI4x")                  # chunk index, length (0 = zeros)
_CHECKSUM_AT = RECORD_HEADER.size - 16
_ZERO_CHECKSUM = bytes(16)

DATA_FIELDS = ("size", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns")


def padded(length: int) -> int:
    """Bytes a record of `length` takes in the log: whole blocks."""
    return -(-length // BLOCK) * BLOCK


def log_path(logs_dir: str, vol_id: int) -> str:
    return os.path.join(logs_dir, f"vol-{vol_id}.log")


# --- records ----------------------------------------------------------------------------

@dataclass
class InodeUpdate:
    """What one record says of one file: its data attributes and the chunks
    (index -> bytes; b"" for an all-zero chunk) changed since its last record."""

    ino: int
    attrs: dict
    chunks: dict = field(default_factory=dict)

    def payload_parts(self) -> list:
        a = self.attrs
        parts = [INODE_UPDATE.pack(self.ino, a["size"], a["mode"], a["uid"], a["gid"], 0,
                                   a["atime_ns"], a["mtime_ns"], a["ctime_ns"], len(self.chunks))]
        for idx, data in self.chunks.items():
            parts.append(CHUNK_HEADER.pack(idx, len(data)))
            parts.append(data)
        return parts


def encode(kind: int, epoch: int, seq: int, payload_parts: list) -> list:
    """The buffers of one record, padded to whole blocks."""
    payload_len = sum(len(p) for p in payload_parts)
    header = RECORD_HEADER.pack(RECORD_MAGIC, kind, epoch, seq, payload_len, _ZERO_CHECKSUM)
    digest = xxhash.xxh3_128()
    digest.update(header)
    for part in payload_parts:
        digest.update(part)
    parts = [header[:_CHECKSUM_AT] + digest.digest(), *payload_parts]
    total = RECORD_HEADER.size + payload_len
    pad = padded(total) - total
    if pad:
        parts.append(bytes(pad))
    return parts


def decode_inode_update(payload: bytes) -> InodeUpdate:
    (ino, size, mode, uid, gid, _pad, atime_ns, mtime_ns, ctime_ns,
     nchunks) = INODE_UPDATE.unpack_from(payload)
    attrs = dict(size=size, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns,
                 ctime_ns=ctime_ns)
    chunks, at = {}, INODE_UPDATE.size
    for _ in range(nchunks):
        idx, length = CHUNK_HEADER.unpack_from(payload, at)
        at += CHUNK_HEADER.size
        chunks[idx] = bytes(payload[at:at + length])
        at += length
    if at != len(payload):
        raise ValueError("record payload has trailing bytes")
    return InodeUpdate(ino, attrs, chunks)


# --- the state in LMDB ----------------------------------------------------------------------

@dataclass
class LogState:
    """The ``logs`` record of a volume: where replay starts and what it expects."""

    epoch: int
    next_seq: int           # the seq the next record written gets
    start_offset: int       # where the oldest record not yet folded is (or will be)
    start_seq: int          # the seq expected there

    def pack(self) -> bytes:
        return schema.pack_log_state(self.epoch, self.next_seq, self.start_offset, self.start_seq)

    @classmethod
    def unpack(cls, raw: bytes) -> "LogState":
        return cls(*schema.unpack_log_state(raw))


def read_state(txn, env, vol_id: int) -> Optional[LogState]:
    raw = txn.get(schema.log_state_key(vol_id), db=env.logs)
    return None if raw is None else LogState.unpack(bytes(raw))


def fence_of(txn, env, vol_id: int, ino: int) -> int:
    raw = txn.get(schema.log_fence_key(vol_id, ino), db=env.logs)
    return 0 if raw is None else schema.unpack_le_u64(raw)


# --- reading the file ----------------------------------------------------------------------

def scan(path: str, state: LogState) -> Iterator[tuple[int, int, int, bytes]]:
    """(seq, kind, next offset, payload) of every valid record from the state's
    start, in order, until the first invalid one. Wrap records are followed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        offset, expected = state.start_offset, state.start_seq
        for _ in range(size // BLOCK + 1):        # at most one lap
            if offset + RECORD_HEADER.size > size:
                offset = DATA_START                 # the end of the file wraps
            record = _read_record(fd, offset, size, state.epoch, expected)
            if record is None:
                return
            kind, payload_len, payload = record
            offset = offset + padded(RECORD_HEADER.size + payload_len)
            if kind == KIND_WRAP:
                offset = DATA_START
            yield expected, kind, offset, payload
            expected += 1
    finally:
        os.close(fd)


def _read_record(fd: int, offset: int, size: int, epoch: int, seq: int):
    """(kind, payload length, payload) of a valid record at `offset`, or None."""
    header = os.pread(fd, RECORD_HEADER.size, offset)
    if len(header) < RECORD_HEADER.size:
        return None
    magic, kind, rec_epoch, rec_seq, payload_len, checksum = RECORD_HEADER.unpack(header)
    if (magic != RECORD_MAGIC or rec_epoch != epoch or rec_seq != seq
            or kind not in (KIND_INODE, KIND_WRAP)
            or offset + RECORD_HEADER.size + payload_len > size):
        return None
    payload = os.pread(fd, payload_len, offset + RECORD_HEADER.size)
    digest = xxhash.xxh3_128()
    digest.update(header[:_CHECKSUM_AT] + _ZERO_CHECKSUM)
    digest.update(payload)
    if len(payload) != payload_len or digest.digest() != checksum:
        return None                                 # torn or damaged: the log ends here
    return kind, payload_len, payload


def coalesce(records) -> dict[int, tuple[int, InodeUpdate]]:
    """ino -> (newest seq, update) of a run of records, later ones winning:
    the chunks of all records of an inode merged, the attributes of its last."""
    merged: dict[int, tuple[int, InodeUpdate]] = {}
    for seq, kind, _offset, payload in records:
        if kind != KIND_INODE:
            continue
        update = decode_inode_update(payload)
        if update.ino in merged:
            chunks = merged[update.ino][1].chunks
            chunks.update(update.chunks)
            update.chunks = chunks
        merged[update.ino] = (seq, update)
    return merged


# --- creating the file -----------------------------------------------------------------------

def create_file(path: str, vol_id: int, store_uuid: bytes, size_bytes: int = LOG_BYTES) -> None:
    """Write a log file full of zeros and make it durable (file and directory).

    Zeros written, not a sparse file or fallocate: overwriting unwritten
    extents later would change file metadata at every fdatasync."""
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        zeros = bytes(1 << 20)
        header = FILE_HEADER.pack(FILE_MAGIC, vol_id, store_uuid)
        os.pwrite(fd, header + bytes(BLOCK - len(header)), 0)
        offset = BLOCK
        while offset < size_bytes:
            n = min(len(zeros), size_bytes - offset)
            if os.pwrite(fd, zeros[:n], offset) != n:
                raise OSError(28, "short write creating the intent log")
            offset += n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))
