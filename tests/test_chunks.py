"""The chunk store's write path: batched dedup lookups, coalesced pack
appends, per-pack statistics, and what a failed pack write leaves behind.

Library level on a real store (real LMDB files, real pack files); the only
fakes are pack writers that count or fail the operating-system calls, as in
`cowfs.faults`. Chunks are referenced straight through `ChunkBatch.ref` and
released again before the end, so that every test finishes with a store
whose records and reference counts agree, and a clean fsck.
"""

import errno
import os
import random
import stat

import pytest

from cowfs import faults, packs, schema, volumes
from cowfs.filesystem import Filesystem
from cowfs.packs import PackWriter
from cowfs.store import Store
from helpers import cowfs, fsck_clean

CHUNK = 8192


class CountingPackWriter(PackWriter):
    """Counts the two operating-system calls and checks each sync hits a live file."""

    pwritev_calls = 0
    synced_packs: list = []

    def _pwritev(self, buffers: list, offset: int) -> int:
        CountingPackWriter.pwritev_calls += 1
        return super()._pwritev(buffers, offset)

    def _fdatasync(self) -> None:
        # A writer must still own its descriptor when its batch syncs it:
        # the file behind the descriptor is this writer's pack.
        target = os.readlink(f"/proc/self/fd/{self._fd}")
        assert target.endswith(f"/{self.pack_id:08x}.pack"), \
            f"sync of pack {self.pack_id:08x} went to {target}"
        super()._fdatasync()
        CountingPackWriter.synced_packs.append(self.pack_id)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(CountingPackWriter, "pwritev_calls", 0)
    monkeypatch.setattr(CountingPackWriter, "synced_packs", [])
    return CountingPackWriter


def open_store(path: str, counting_writers: bool = False) -> Store:
    store = Store.open(path)
    if counting_writers:
        store.packs.writer_class = CountingPackWriter
    return store


def commit(store: Store, batch, refs=(), unrefs=()) -> None:
    batch.sync()                                        # rule 1
    with store.env.begin(write=True) as txn:
        for chunk_id in refs:
            batch.ref(chunk_id)
        for chunk_id in unrefs:
            batch.unref(chunk_id)
        batch.apply(txn)


def release(store: Store, chunk_ids) -> None:
    """Drop the references a test took, so fsck finds records and counts agree."""
    commit(store, store.chunks.batch(), unrefs=list(chunk_ids))


def pack_bytes(store: Store) -> int:
    return sum(store.packs.size(pack_id) for pack_id in store.packs.pack_ids())


def index(store: Store) -> dict:
    with store.env.begin() as txn:
        return {bytes(key): schema.unpack_chunk(bytes(raw))
                for key, raw in txn.cursor(db=store.env.chunks)}


def read_back(store: Store, chunk_ids) -> list:
    with store.env.begin() as txn:
        return store.chunks.read_many(txn, list(chunk_ids))


def test_add_many_dedups_within_the_batch_and_against_the_store(store):
    rng = random.Random(1)
    a, b, c, d = (rng.randbytes(CHUNK) for _ in range(4))
    entry = schema.ENTRY_HEADER.size + CHUNK
    st = open_store(store)
    try:
        assert st.packs.pack_ids() == []
        before = schema.PACK_HEADER.size                       # the pack this process creates
        batch = st.chunks.batch()
        ids = batch.add_many([a, b, a, bytearray(c)])
        assert ids[0] == ids[2] and len(set(ids)) == 3
        commit(st, batch, refs=ids)
        assert pack_bytes(st) == before + 3 * entry, "a repeated chunk is stored once"
        assert index(st)[ids[0]][3] == 2, "both uses are counted"

        batch = st.chunks.batch()
        buffer = bytearray(b)
        again = batch.add_many([a, memoryview(buffer), d])
        buffer[:] = bytes(CHUNK)          # the caller may reuse its buffer at once
        commit(st, batch, refs=again)
        assert again[:2] == [ids[0], ids[1]]
        assert pack_bytes(st) == before + 4 * entry, "only the chunk the store lacked is appended"
        assert read_back(st, ids + again) == [a, b, a, c, a, b, d]
        release(st, ids + again)
        assert index(st) == {}, "rule 4: a count reaching zero deletes the entry"
    finally:
        st.close()
    fsck_clean(store)


def test_coalesced_appends_span_packs_read_back_exactly_and_are_all_synced(store, counting, monkeypatch):
    # A small pack target makes one commit rotate through several packs.
    monkeypatch.setattr(packs, "PACK_TARGET_BYTES", 1 << 20)
    rng = random.Random(2)
    datas = [rng.randbytes(CHUNK) for _ in range(1200)]
    datas[700] = datas[3]                                       # a duplicate inside the batch
    datas[1199] = datas[1199][:1000]                            # a short last chunk
    st = open_store(store, counting_writers=True)
    try:
        batch = st.chunks.batch()
        ids = batch.add_many(datas)
        commit(st, batch, refs=ids)
        located = index(st)
        used_packs = {pack_id for pack_id, _, _, _ in located.values()}
        assert len(used_packs) >= 8
        # 1199 distinct chunks: one pwritev per ~4 MiB or per pack, not one per chunk.
        assert counting.pwritev_calls <= 2 * len(used_packs) + 3, counting.pwritev_calls
        assert used_packs <= set(counting.synced_packs), "rule 1: every pack written is synced"
        assert read_back(st, ids) == datas
        release(st, ids)
    finally:
        st.close()
    fsck_clean(store)


def test_pack_statistics_are_the_live_chunks_after_a_large_commit(store, monkeypatch):
    monkeypatch.setattr(packs, "PACK_TARGET_BYTES", 4 << 20)
    rng = random.Random(3)
    payload = bytearray(rng.randbytes(3000 * CHUNK))
    payload[100 * CHUNK:101 * CHUNK] = payload[:CHUNK]          # deduplicated
    st = open_store(store)
    try:
        with st.env.begin() as txn:
            vol_id = volumes.volume_id(txn, st.env, "main")
        fs = Filesystem(st, vol_id)
        inode = fs.make(schema.ROOT_INO, b"big", stat.S_IFREG | 0o644, 0, 0)
        fs.write(inode.ino, 0, bytes(payload))
        fs.flush_all()
        overwrite = rng.randbytes(500 * CHUNK)                  # frees 500 chunks
        fs.write(inode.ino, 1000 * CHUNK, overwrite)
        fs.flush_all()
        payload[1000 * CHUNK:1500 * CHUNK] = overwrite
        assert fs.read(inode.ino, 0, len(payload)) == bytes(payload)
        with st.env.begin() as txn:
            stats = {bytes(key): schema.unpack_pack_stats(bytes(raw))
                     for key, raw in txn.cursor(db=st.env.packs)}
        live: dict = {}
        for pack_id, _, length, _ in index(st).values():
            key = schema.pack_key(pack_id)
            live_bytes, live_chunks = live.get(key, (0, 0))
            live[key] = (live_bytes + length, live_chunks + 1)
        assert len(live) >= 5, "the commits spread over several packs"
        assert {key: tuple(value) for key, value in stats.items() if tuple(value) != (0, 0)} == live
    finally:
        st.close()
    fsck_clean(store)
    assert cowfs("fsck", "--verify-data", store).returncode == 0


def test_failed_coalesced_write_leaves_the_pack_clean_and_commits_nothing(store, monkeypatch):
    """A failed pack write must not leave a phantom index entry or a torn
    pack: the batch cannot be committed, the next batch appends cleanly."""
    monkeypatch.setenv(faults.ENV_VAR, "pack_write=EIO@1")
    rng = random.Random(4)
    datas = [rng.randbytes(CHUNK) for _ in range(100)]         # one coalesced write
    st = open_store(store)
    try:
        batch = st.chunks.batch()
        ids = batch.add_many(datas)
        writer = st.chunks._writer
        with pytest.raises(OSError) as exc:
            batch.sync()
        assert exc.value.errno == errno.EIO
        assert not isinstance(exc.value, packs.PackSyncError), "a write error, not a sync error"
        assert not writer.broken, "the pack was cut back, so it stays usable"
        assert st.packs.size(writer.pack_id) == schema.PACK_HEADER.size
        with pytest.raises(RuntimeError):
            commit(st, batch, refs=ids)                        # a failed batch is never committed
        assert index(st) == {}

        retry = st.chunks.batch()
        assert retry.add_many(datas) == ids
        commit(st, retry, refs=ids)
        assert index(st)[ids[0]][:2] == (writer.pack_id, schema.PACK_HEADER.size + schema.ENTRY_HEADER.size)
        assert read_back(st, ids) == datas
        release(st, ids)
    finally:
        st.close()
        monkeypatch.delenv(faults.ENV_VAR)
        faults.install_from_env()
    fsck_clean(store)


def test_chunk_freed_between_add_and_commit_is_appended_again_and_synced(store, counting):
    data = random.Random(5).randbytes(CHUNK)
    st = open_store(store, counting_writers=True)
    try:
        first = st.chunks.batch()
        (chunk_id,) = first.add_many([data])
        commit(st, first, refs=[chunk_id])

        late = st.chunks.batch()
        assert late.add(data) == chunk_id                      # known: nothing appended
        late.sync()
        release(st, [chunk_id])                                # freed meanwhile (rule 4)
        assert index(st) == {}
        synced_before = len(counting.synced_packs)
        with st.env.begin(write=True) as txn:
            late.ref(chunk_id)
            late.apply(txn)                                    # appends again, syncs (rule 1)
        assert len(counting.synced_packs) > synced_before
        assert read_back(st, [chunk_id]) == [data]
        release(st, [chunk_id])
    finally:
        st.close()
    fsck_clean(store)
