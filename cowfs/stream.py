"""The send stream format: versioned, every frame checksummed and chained.

A stream is what `cowfs send` writes and `cowfs receive` reads; it can go
through a pipe, ssh, a compressor or a file. It knows nothing of LMDB: the
sender and the receiver (`send`, `receive`) decide what goes into it.

Layout (integers little-endian)::

    MAGIC b"COWSTRM" | version u8 (STREAM_VERSION)
    frame*  : kind u8 | length u32 | payload (length bytes) | check (16 bytes)

    check(n) = xxh3_128(check(n-1) | n u64 | kind | length | payload),
    check(-1) = 16 zero bytes

The check of each frame covers the one before it, so a frame that is
damaged, dropped, repeated, moved, or taken from another stream (the header
holds a random stream id) fails its check; a stream cut short lacks its end
frame. Frames, in this order:

``H`` header, first and only once: JSON (see `send.header`).
``C`` chunks: entries chunk_id (16) | length u32 | bytes. The receiver
      re-hashes each chunk against its id.
``R`` records: entries op u8 (1 put, 0 delete) | kind u8 | key length u16 |
      payload length u32 | record key | payload. A chunk-map record names
      a chunk sent in an earlier ``C`` frame of the same stream.
``E`` end, last: JSON counts (frames, records, chunks, chunk_bytes) that
      must match what was read; nothing may follow it.
"""

import json
import struct
from typing import BinaryIO, Iterator

import xxhash

from .errors import StreamError

MAGIC = b"COWSTRM"
STREAM_VERSION = 1
MAX_FRAME_BYTES = 16 << 20          # a damaged length field must not make us allocate gigabytes
CHUNK_FRAME_BYTES = 4 << 20         # a sender closes a chunk frame past this size
RECORD_FRAME_BYTES = 1 << 20        # ... and a record frame past this one

FRAME_HEADER = struct.Struct("<BI")
CHECK_PREFIX = struct.Struct("<Q")
CHUNK_ENTRY = struct.Struct("<16sI")
RECORD_ENTRY = struct.Struct("<BBHI")
CHECK_BYTES = 16
OP_DELETE, OP_PUT = 0, 1

HEADER, CHUNKS, RECORDS, END = b"H", b"C", b"R", b"E"
AGAIN = "send it again"


def _check(previous: bytes, seq: int, frame_header: bytes, payload) -> bytes:
    hasher = xxhash.xxh3_128(previous)
    hasher.update(CHECK_PREFIX.pack(seq))
    hasher.update(frame_header)
    hasher.update(payload)
    return hasher.digest()


# --- writing ----------------------------------------------------------------------------------

class StreamWriter:
    """Writes frames to a binary file object; counts what it wrote."""

    def __init__(self, out: BinaryIO, on_bytes=None):
        self._out = out
        self._on_bytes = on_bytes or (lambda n: None)
        self._previous = bytes(CHECK_BYTES)
        self.frames = 0
        self.bytes_written = 0
        self._write(MAGIC + bytes([STREAM_VERSION]))

    def _write(self, data) -> None:
        self._out.write(data)
        self.bytes_written += len(data)
        self._on_bytes(len(data))

    def frame(self, kind: bytes, payload) -> None:
        frame_header = FRAME_HEADER.pack(kind[0], len(payload))
        self._previous = _check(self._previous, self.frames, frame_header, payload)
        self._write(frame_header)
        self._write(payload)
        self._write(self._previous)
        self.frames += 1

    def json_frame(self, kind: bytes, value: dict) -> None:
        self.frame(kind, json.dumps(value, sort_keys=True).encode())


class FrameBuffer:
    """Entries of one frame kind, written as a frame once past `limit_bytes`."""

    def __init__(self, writer: StreamWriter, kind: bytes, limit_bytes: int):
        self._writer, self._kind, self._limit = writer, kind, limit_bytes
        self._parts: list = []
        self._size = 0
        self.entries = 0

    def add(self, *parts) -> None:
        self._parts += parts
        self._size += sum(map(len, parts))
        self.entries += 1
        if self._size >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._writer.frame(self._kind, b"".join(self._parts))
            self._parts, self._size = [], 0


def chunk_entry(chunk_id: bytes, data: bytes) -> tuple[bytes, bytes]:
    return CHUNK_ENTRY.pack(chunk_id, len(data)), data


def record_entry(op: int, kind: bytes, record_key: bytes, payload: bytes) -> tuple[bytes, bytes, bytes]:
    return RECORD_ENTRY.pack(op, kind[0], len(record_key), len(payload)), record_key, payload


# --- reading ----------------------------------------------------------------------------------

class StreamReader:
    """Reads and verifies frames; every failure is a one-line `StreamError`."""

    def __init__(self, inp: BinaryIO, on_bytes=None):
        self._in = inp
        self._on_bytes = on_bytes or (lambda n: None)
        self._previous = bytes(CHECK_BYTES)
        self.frames = 0
        self.bytes_read = 0
        start = self._read(len(MAGIC) + 1, "its start")
        if start[:len(MAGIC)] != MAGIC:
            raise StreamError("the input is not a cowfs send stream (no COWSTRM signature); "
                              "give the output of 'cowfs send'")
        if start[-1] != STREAM_VERSION:
            raise StreamError(f"the stream has format version {start[-1]}, this cowfs reads version "
                              f"{STREAM_VERSION}; receive it with the cowfs release that sent it")

    def _read(self, size: int, what: str) -> bytes:
        data = self._in.read(size) or b""
        while 0 < len(data) < size:           # a raw pipe or socket may return less before its end
            more = self._in.read(size - len(data))
            if not more:
                break
            data += more
        got = len(data)
        self.bytes_read += got
        self._on_bytes(got)
        if got != size:
            raise StreamError(f"the stream ends inside {what} after {self.bytes_read} bytes "
                              f"(truncated); nothing was received, {AGAIN}")
        return data

    def frames_in_order(self) -> Iterator[tuple[bytes, bytes]]:
        """(kind, payload) of each verified frame: a header first, an end frame last, then EOF."""
        kind, payload = self._next_frame()
        if kind != HEADER:
            raise StreamError(f"the stream does not start with its header; {AGAIN}")
        yield kind, payload
        while True:
            kind, payload = self._next_frame()
            if kind == HEADER:
                raise StreamError(f"frame {self.frames - 1} is a second header; {AGAIN}")
            if kind == END and self._in.read(1):        # checked before the end is acted on
                raise StreamError(f"data follows the end of the stream; give exactly one stream, {AGAIN}")
            yield kind, payload
            if kind == END:
                return

    def _next_frame(self) -> tuple[bytes, bytes]:
        seq = self.frames
        frame_header = self._read(FRAME_HEADER.size, f"frame {seq}")
        kind_byte, length = FRAME_HEADER.unpack(frame_header)
        kind = bytes([kind_byte])
        if kind not in (HEADER, CHUNKS, RECORDS, END) or length > MAX_FRAME_BYTES:
            raise StreamError(f"frame {seq} is damaged (kind {kind_byte}, length {length}); {AGAIN}")
        payload = self._read(length, f"frame {seq}")
        check = self._read(CHECK_BYTES, f"frame {seq}")
        expected = _check(self._previous, seq, frame_header, payload)
        if check != expected:
            raise StreamError(f"frame {seq} fails its checksum: the stream is corrupted, reordered or "
                              f"mixed with another one; nothing was received, {AGAIN}")
        self._previous = check
        self.frames += 1
        return kind, payload


def parse_json(payload: bytes, what: str) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise StreamError(f"the stream's {what} is not a JSON object; {AGAIN}")
    return value


def parse_chunks(payload: bytes) -> Iterator[tuple[bytes, memoryview]]:
    view, pos = memoryview(payload), 0
    while pos < len(view):
        if pos + CHUNK_ENTRY.size > len(view):
            raise StreamError(f"a chunk frame ends inside an entry; {AGAIN}")
        chunk_id, length = CHUNK_ENTRY.unpack_from(view, pos)
        pos += CHUNK_ENTRY.size
        if pos + length > len(view):
            raise StreamError(f"a chunk frame ends inside chunk {chunk_id.hex()}; {AGAIN}")
        yield chunk_id, view[pos:pos + length]
        pos += length


def parse_records(payload: bytes) -> Iterator[tuple[int, bytes, bytes, bytes]]:
    """(op, kind, record_key, payload) of each entry of a record frame."""
    pos = 0
    while pos < len(payload):
        if pos + RECORD_ENTRY.size > len(payload):
            raise StreamError(f"a record frame ends inside an entry; {AGAIN}")
        op, kind, key_len, value_len = RECORD_ENTRY.unpack_from(payload, pos)
        pos += RECORD_ENTRY.size
        end = pos + key_len + value_len
        if end > len(payload):
            raise StreamError(f"a record frame ends inside a record; {AGAIN}")
        yield op, bytes([kind]), payload[pos:pos + key_len], payload[pos + key_len:end]
        pos = end
