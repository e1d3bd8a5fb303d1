"""The stored part of a read, planned on the event loop and fetched in any thread."""


class ReadPlan:
    """Holds copies of the buffered chunks a read needs and the pack locations
    of the stored ones (`Filesystem.plan_read`), so `fetch` touches no
    `Filesystem` state: a write that lands meanwhile is simply not part of
    this read (as if it came after). A chunk freed and reclaimed meanwhile
    raises `ChunkGoneError` from `fetch`; the caller plans again.
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
        """The bytes of the read: one copy of each chunk into the reply (holes
        and short chunks stay zeros)."""
        cs, offset, end = self.chunk_size, self.offset, self.end
        if offset >= end:
            return b""
        indices, ids, locations = self.stored
        chunks = dict(self.memory)
        chunks.update(zip(indices, self.chunks.read_located(ids, locations)))
        first = offset // cs
        if (end - 1) // cs == first and len(chunks.get(first, b"")) >= end - first * cs:
            # One chunk holds it all (a PostgreSQL page read): no assembly.
            data = chunks[first]
            return data if (offset, end) == (first * cs, first * cs + len(data)) else \
                data[offset - first * cs:end - first * cs]
        out = bytearray(end - offset)
        for idx, data in chunks.items():
            base = idx * cs
            lo, hi = max(offset, base) - base, min(end, base + cs, base + len(data)) - base
            if hi > lo:
                out[base + lo - offset: base + hi - offset] = data[lo:hi]
        return out
