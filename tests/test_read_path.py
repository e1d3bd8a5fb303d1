"""Reads that span many chunks: stored runs read with one pread, holes,
dirty buffers not yet committed, deduplicated chunks and a short last chunk.

Real mounts only; the `mounted` fixture ends with a clean fsck.
"""

import errno
import os
import random
import threading

from cowfs import chunks, schema

CHUNK = 8192


def _pread_all(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        # Drop the kernel's pages so the read reaches the daemon.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _write(path: str, offset: int, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _check_reads(path: str, expected: bytearray, rng: random.Random) -> None:
    assert _pread_all(path, 0, len(expected) + CHUNK) == bytes(expected)
    for _ in range(40):
        offset = rng.randrange(0, len(expected) + CHUNK)
        size = rng.choice([1, 100, CHUNK, 3 * CHUNK + 17, 32 * CHUNK, 128 * 1024])
        assert _pread_all(path, offset, size) == bytes(expected[offset:offset + size]), (offset, size)


def test_reads_across_many_chunks(mounted, store):
    rng = random.Random(7)
    path = os.path.join(mounted.path, "f")
    expected = bytearray()

    def put(offset: int, data: bytes, fsync: bool = False) -> None:
        if len(expected) < offset + len(data):
            expected.extend(bytes(offset + len(data) - len(expected)))
        expected[offset:offset + len(data)] = data
        _write(path, offset, data, fsync)

    put(0, rng.randbytes(40 * CHUNK), fsync=True)                 # one run in one pack
    put(50 * CHUNK, rng.randbytes(10 * CHUNK + 1234), fsync=True)  # hole, short last chunk
    repeated = rng.randbytes(CHUNK)
    for idx in (3, 9, 10, 55):                                     # deduplicated chunks
        put(idx * CHUNK, repeated)
    put(20 * CHUNK, bytes(2 * CHUNK), fsync=True)                  # zero chunks become holes
    _check_reads(path, expected, rng)

    put(5 * CHUNK + 100, rng.randbytes(3 * CHUNK))                 # dirty, not fsynced
    put(56 * CHUNK + 7, rng.randbytes(500))
    _check_reads(path, expected, rng)

    mounted.umount()
    mounted.mount()
    _check_reads(path, expected, rng)


def test_contiguous_runs_split_on_gaps_packs_and_span():
    step = CHUNK + schema.ENTRY_HEADER.size
    ids = [bytes([i]) * 16 for i in range(6)]
    locations = [(1, 100, CHUNK), (1, 100 + step, CHUNK), (1, 100 + 3 * step, CHUNK),
                 (2, 100 + 4 * step, CHUNK), (2, 100 + 5 * step, CHUNK), (2, 100 + 6 * step, 10)]
    runs = chunks._contiguous_runs(ids, locations)
    assert [[entry[0] for entry in run] for run in runs] == [ids[0:2], ids[2:3], ids[3:6]]

    many = [(1, 100 + i * step, CHUNK) for i in range(1000)]
    runs = chunks._contiguous_runs([b"x" * 16] * 1000, many)
    assert sum(len(run) for run in runs) == 1000
    assert all(run[-1][2] + run[-1][3] - run[0][2] <= chunks.MAX_SPAN_BYTES for run in runs)


def test_large_reads_in_parallel_threads_and_damage_still_gives_eio(mounted, store):
    """Reads of many stored chunks are served in worker threads, several at
    once; each returns its own bytes, and a damaged chunk still gives EIO for
    the read that covers it (never wrong bytes), others unaffected."""
    path = os.path.join(mounted.path, "big")
    mib = 1 << 20
    data = random.Random(11).randbytes(32 * mib)
    _write(path, 0, data, fsync=True)
    mounted.umount()
    mounted.mount()
    results, errors = {}, []

    def reader(start_mib: int) -> None:
        try:
            for m in range(start_mib, 32, 4):
                results[m] = _pread_all(path, m * mib, mib)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert b"".join(results[m] for m in range(32)) == data

    # Flip one byte of the chunk at 20 MiB + 3 chunks, in its pack.
    target = data[20 * mib + 3 * CHUNK: 20 * mib + 4 * CHUNK]
    needle = target[:64]
    mounted.umount()
    packs = os.path.join(store, "packs")
    flipped = None
    for name in sorted(os.listdir(packs)):
        with open(os.path.join(packs, name), "r+b") as f:
            blob = f.read()
            at = blob.find(needle)
            if at >= 0:
                f.seek(at + 10)
                f.write(bytes([blob[at + 10] ^ 0xFF]))
                flipped = (name, at + 10, blob[at + 10])
                break
    assert flipped is not None
    mounted.mount()
    try:
        # A read over the damage stops short of it (the kernel returns what
        # it read before the failed page) or fails; it never returns the chunk.
        damaged_at = 20 * mib + 3 * CHUNK
        try:
            got = _pread_all(path, 20 * mib, mib)
            assert len(got) <= damaged_at - 20 * mib and got == data[20 * mib:20 * mib + len(got)]
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        try:
            _pread_all(path, damaged_at, mib)
            raise AssertionError("a read starting at a damaged chunk returned data")
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        assert _pread_all(path, 21 * mib, mib) == data[21 * mib:22 * mib]
    finally:
        mounted.umount()
        name, at, original = flipped
        with open(os.path.join(packs, name), "r+b") as f:    # undo: the fixture's fsck stays clean
            f.seek(at)
            f.write(bytes([original]))
        mounted.mount()
