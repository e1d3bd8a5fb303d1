"""Every fsck check has a test that breaks exactly what it checks.

A small store is built through a real mount (files, a hard link, a
subdirectory, a snapshot and a clone); each test then damages one thing
with raw LMDB or file writes and expects fsck to name it.
"""

import os

import lmdb
import pytest

from cowfs import schema
from helpers import Mount, cowfs, fsck_clean


@pytest.fixture
def built(store, workdir):
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        os.mkdir(f"{mount.path}/dir")
        with open(f"{mount.path}/dir/file", "wb") as f:
            f.write(os.urandom(30_000))
        os.link(f"{mount.path}/dir/file", f"{mount.path}/hardlink")
        with open(f"{mount.path}/small", "wb") as f:
            f.write(b"hello")
    finally:
        mount.close()
    cowfs("snapshot", store, "main@s1")
    cowfs("clone", store, "main@s1", "c1")
    fsck_clean(store)
    return store


class Raw:
    """Direct access to the store's LMDB, for breaking things on purpose."""

    def __init__(self, store):
        self.env = schema.Env(os.path.join(store, "meta"))

    def __enter__(self):
        self.txn = self.env.begin(write=True)
        return self

    def __exit__(self, *exc):
        self.txn.commit()
        self.env.close()

    def items(self, db_name):
        return [(bytes(k), bytes(v)) for k, v in self.txn.cursor(db=self.env.dbs[db_name])]

    def put(self, db_name, key, value):
        self.txn.put(key, value, db=self.env.dbs[db_name])

    def delete(self, db_name, key):
        self.txn.delete(key, db=self.env.dbs[db_name])

    def records(self, kind):
        out = []
        for key, value in self.items("records"):
            vol_id, k, record_key, gen = schema.split_versioned_key(key)
            if k == kind:
                out.append((key, vol_id, record_key, gen, value))
        return out


def fsck_problems(store, *extra):
    result = cowfs("fsck", store, *extra, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "problems found" in result.stderr
    return result.stdout


def vol_id(raw, name):
    return schema.read_u64(dict(raw.items("volnames"))[name.encode()])


def test_name_pointing_at_missing_volume(built):
    with Raw(built) as raw:
        raw.put("volnames", b"ghost", schema.u64(99))
    assert "volume name 'ghost' points at missing volume id 99" in fsck_problems(built)


def test_clone_chain_with_missing_parent(built):
    with Raw(built) as raw:
        record = schema.unpack_volume(dict(raw.items("volumes"))[schema.u64(vol_id(raw, "c1"))])
        record["parent_vol_id"] = 77
        raw.put("volumes", schema.u64(vol_id(raw, "c1")), schema.pack_volume(**{
            k: record[k] for k in ("head_gen", "parent_vol_id", "parent_gen", "next_ino", "created_ns", "name", "flags")}))
    assert "volume c1: clone chain names missing volume id 77" in fsck_problems(built)


def test_clone_of_a_generation_the_parent_never_had(built):
    with Raw(built) as raw:
        cid = vol_id(raw, "c1")
        record = schema.unpack_volume(dict(raw.items("volumes"))[schema.u64(cid)])
        record["parent_gen"] = 1000
        raw.put("volumes", schema.u64(cid), schema.pack_volume(**{
            k: record[k] for k in ("head_gen", "parent_vol_id", "parent_gen", "next_ino", "created_ns", "name", "flags")}))
    assert "parent generation 1000 is newer than the head" in fsck_problems(built)


def test_record_of_a_missing_volume(built):
    with Raw(built) as raw:
        key, _vol, record_key, gen, value = raw.records(schema.KIND_INODE)[0]
        raw.put("records", schema.versioned_key(55, schema.KIND_INODE, record_key, gen), value)
        raw.put("born", schema.born_key(55, gen, schema.KIND_INODE, record_key), b"")
    assert "belongs to missing volume id 55" in fsck_problems(built)


def test_inode_allocator_that_would_reuse_an_inode(built):
    with Raw(built) as raw:
        mid = vol_id(raw, "main")
        record = schema.unpack_volume(dict(raw.items("volumes"))[schema.u64(mid)])
        record["next_ino"] = 2
        raw.put("volumes", schema.u64(mid), schema.pack_volume(**{
            k: record[k] for k in ("head_gen", "parent_vol_id", "parent_gen", "next_ino", "created_ns", "name", "flags")}))
    assert "volume main: inode allocator 2 would reuse inode" in fsck_problems(built)


def test_change_log_missing_a_version(built):
    with Raw(built) as raw:
        born = raw.items("born")
        raw.delete("born", born[0][0])
    assert "change log misses record" in fsck_problems(built)


def test_reference_count_off_by_one(built):
    with Raw(built) as raw:
        chunk_id, value = raw.items("chunks")[0]
        pack_id, offset, length, refcount = schema.unpack_chunk(value)
        raw.put("chunks", chunk_id, schema.pack_chunk(pack_id, offset, length, refcount + 1))
    assert f"chunk {chunk_id.hex()}: reference count" in fsck_problems(built)


def test_record_pointing_at_missing_chunk(built):
    with Raw(built) as raw:
        chunk_id, value = raw.items("chunks")[0]
        raw.delete("chunks", chunk_id)
    out = fsck_problems(built)
    assert f"chunk {chunk_id.hex()}:" in out and "not in the chunk index" in out


def test_missing_pack_file(built):
    packs = os.path.join(built, "packs")
    for name in os.listdir(packs):
        os.unlink(os.path.join(packs, name))
    assert "is missing" in fsck_problems(built)


def test_truncated_pack(built):
    packs = os.path.join(built, "packs")
    for name in os.listdir(packs):
        os.truncate(os.path.join(packs, name), 100)
    assert "lie outside pack" in fsck_problems(built)


def test_pack_entry_header_overwritten(built):
    with Raw(built) as raw:
        chunk_id, value = raw.items("chunks")[0]
    pack_id, offset, length, _ = schema.unpack_chunk(value)
    with open(os.path.join(built, "packs", f"{pack_id:08x}.pack"), "r+b") as f:
        f.seek(offset - schema.ENTRY_HEADER.size)
        f.write(b"JUNK")
    assert "holds a different entry" in fsck_problems(built)


def test_flipped_data_byte_found_by_verify_data(built):
    with Raw(built) as raw:
        chunk_id, value = raw.items("chunks")[0]
    pack_id, offset, length, _ = schema.unpack_chunk(value)
    with open(os.path.join(built, "packs", f"{pack_id:08x}.pack"), "r+b") as f:
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    fsck_clean(built)      # structure is intact; only the data check reads the bytes
    assert "do not match the checksum" in fsck_problems(built, "--verify-data")


def test_pack_statistics_wrong(built):
    with Raw(built) as raw:
        key, value = raw.items("packs")[0]
        live_bytes, live_chunks = schema.unpack_pack_stats(value)
        raw.put("packs", key, schema.pack_pack_stats(live_bytes + 1, live_chunks))
    assert "statistics say" in fsck_problems(built)


def _put_record(raw, vol, kind, record_key, gen, payload):
    raw.put("records", schema.versioned_key(vol, kind, record_key, gen), schema.TAG_LIVE + payload)
    raw.put("born", schema.born_key(vol, gen, kind, record_key), b"")


def _head(raw, name):
    vid = vol_id(raw, name)
    return vid, schema.unpack_volume(dict(raw.items("volumes"))[schema.u64(vid)])["head_gen"]


def test_directory_entry_pointing_at_missing_inode(built):
    with Raw(built) as raw:
        vid, head = _head(raw, "c1")
        _put_record(raw, vid, schema.KIND_DENTRY, schema.dentry_key(schema.ROOT_INO, b"dangling"), head,
                    schema.u64(12345))
    assert "entry 'dangling' in directory 1 points at missing inode 12345" in fsck_problems(built)


def test_wrong_link_count(built):
    with Raw(built) as raw:
        vid, head = _head(raw, "main")
        for key, vol, record_key, gen, value in raw.records(schema.KIND_INODE):
            attrs, target = schema.unpack_inode(value[1:])
            if vol == vid and attrs["nlink"] == 2 and attrs["mode"] & 0o100000:
                attrs["nlink"] = 3
                _put_record(raw, vid, schema.KIND_INODE, record_key, head, schema.pack_inode(attrs, target))
                break
    assert "has link count 3, expected 2" in fsck_problems(built)


def test_unreachable_inode(built):
    with Raw(built) as raw:
        vid, head = _head(raw, "main")
        for key, vol, record_key, gen, value in raw.records(schema.KIND_DENTRY):
            if vol == vid and record_key.endswith(b"small\x00"):
                raw.put("records", schema.versioned_key(vid, schema.KIND_DENTRY, record_key, head),
                        schema.TAG_TOMBSTONE)
                raw.put("born", schema.born_key(vid, head, schema.KIND_DENTRY, record_key), b"")
    assert "is not reachable from the root (leaked)" in fsck_problems(built)


def test_chunks_beyond_the_file_size(built):
    with Raw(built) as raw:
        vid, head = _head(raw, "main")
        for key, vol, record_key, gen, value in raw.records(schema.KIND_INODE):
            attrs, target = schema.unpack_inode(value[1:])
            if vol == vid and attrs["size"] == 30_000:
                attrs["size"] = 100
                _put_record(raw, vid, schema.KIND_INODE, record_key, head, schema.pack_inode(attrs, target))
    assert "chunks beyond its size" in fsck_problems(built)


def test_damaged_metadata_file_is_refused(built):
    with open(os.path.join(built, "meta", "data.mdb"), "r+b") as f:
        f.write(b"\0" * 8192)
    result = cowfs("fsck", built, check=False)
    assert result.returncode == 6 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert isinstance(lmdb.Error, type)


def test_snapshot_name_without_snapshot(built):
    with Raw(built) as raw:
        mid = vol_id(raw, "main")
        raw.put("snapnames", schema.snapname_key(mid, "phantom"), schema.u64(999))
    assert "snapshot name 'phantom'" in fsck_problems(built)


def test_hold_on_a_missing_snapshot(built):
    with Raw(built) as raw:
        raw.put("holds", schema.hold_key(vol_id(raw, "main"), 999), schema.pack_hold(0, "lost"))
    assert "hold on generation 999" in fsck_problems(built)


def test_intent_log_state_of_a_missing_volume(built):
    with Raw(built) as raw:
        raw.put("logs", schema.log_state_key(77), schema.pack_log_state(1, 5, 4096, 5))
    assert "intent-log state of missing volume id 77" in fsck_problems(built)


def test_intent_log_state_that_replay_cannot_start_from(built):
    with Raw(built) as raw:
        raw.put("logs", schema.log_state_key(vol_id(raw, "main")), schema.pack_log_state(1, 5, 100, 5))
    assert "intent-log state is impossible" in fsck_problems(built)


def test_policy_of_a_missing_volume(built):
    cowfs("policy", built, "c1", "--every", "1h", "--keep", "3")
    fsck_clean(built)
    with Raw(built) as raw:
        c1 = vol_id(raw, "c1")
        raw.put("policies", schema.policy_key(77), dict(raw.items("policies"))[schema.policy_key(c1)])
    assert "snapshot policy of missing volume id 77" in fsck_problems(built)


def test_cached_digest_of_a_missing_snapshot(built):
    cowfs("digest", built, "main@s1")       # computes and caches the digest of main@s1
    with Raw(built) as raw:
        assert len(raw.items("digests")) == 1
        raw.put("digests", schema.digest_key(vol_id(raw, "main"), 999), raw.items("digests")[0][1])
    assert "cached content digest of generation 999" in fsck_problems(built)


def test_wrong_cached_digest_found_by_verify_data(built):
    cowfs("digest", built, "main@s1")
    with Raw(built) as raw:
        key, value = raw.items("digests")[0]
        raw.put("digests", key, value[:1] + bytes(16))
    fsck_clean(built)      # the cache is well formed; only recomputing it shows the damage
    assert "is wrong" in fsck_problems(built, "--verify-data")
