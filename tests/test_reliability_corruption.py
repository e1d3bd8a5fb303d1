"""Corruption: damaged bytes are never returned; they are named; bad metadata is refused.

Each test damages a store on disk the way a failing disk or a careless
person would (a flipped byte, a truncated pack, a damaged or truncated
LMDB file, an unknown format version), then checks what cowfs does: EIO for
exactly the damaged file through a real mount, fsck naming the chunk and
the file that reads it, one line and exit code 6 for unusable metadata.
Tests that can undo the damage do so and end with a clean fsck.
"""

import errno
import os
import random
import shutil

import lmdb
import pytest

from cowfs import errors, schema
from cowfs.chunks import chunk_id_of
from helpers import Mount, cowfs, fsck_clean

CHUNK_BYTES = schema.DEFAULT_CHUNK_SIZE


@pytest.fixture
def two_files(store, workdir):
    """'healthy' then 'victim' (committed in that order), unmounted; their bytes."""
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    files = {"healthy": os.urandom(5 * CHUNK_BYTES), "victim": os.urandom(5 * CHUNK_BYTES)}
    try:
        for name, data in files.items():
            with open(f"{mount.path}/{name}", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
    finally:
        mount.close()
    return mount, files


def chunk_location(store: str, data: bytes) -> tuple[str, int, int]:
    """(pack path, offset, length) of the chunk holding `data`."""
    env = schema.Env(os.path.join(store, "meta"), readonly=True)
    try:
        with env.begin() as txn:
            pack_id, offset, length, _ = schema.unpack_chunk(txn.get(chunk_id_of(data), db=env.chunks))
    finally:
        env.close()
    return os.path.join(store, "packs", f"{pack_id:08x}.pack"), offset, length


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def read_errno(path: str):
    """None if the file reads fine, else the errno of the failed read."""
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as exc:
        return exc.errno
    return None


def fsck_output(store: str, *extra: str) -> str:
    result = cowfs("fsck", store, *extra, check=False)
    assert result.returncode == errors.EXIT_FAILURE, result.stdout + result.stderr
    return result.stdout


def test_flipped_byte_gives_eio_for_that_file_only_and_fsck_names_it(store, two_files):
    mount, files = two_files
    pack, offset, _ = chunk_location(store, files["victim"][2 * CHUNK_BYTES:3 * CHUNK_BYTES])
    flip_byte(pack, offset + 100)
    mount.mount()
    try:
        with open(f"{mount.path}/victim", "rb") as f:
            assert f.read(2 * CHUNK_BYTES) == files["victim"][:2 * CHUNK_BYTES]   # before the damage
            with pytest.raises(OSError) as exc:
                f.read(CHUNK_BYTES)
            assert exc.value.errno == errno.EIO
        with open(f"{mount.path}/healthy", "rb") as f:
            assert f.read() == files["healthy"]
    finally:
        mount.close()
    out = fsck_output(store, "--verify-data")
    assert "do not match the checksum" in out
    assert "reads damaged chunk" in out and f"at file offset {2 * CHUNK_BYTES}" in out
    flip_byte(pack, offset + 100)               # undo: the store is whole again
    fsck_clean(store)
    assert cowfs("fsck", store, "--verify-data", check=False).returncode == 0


def test_truncated_pack_gives_eio_for_the_cut_file_and_fsck_names_it(store, workdir, two_files):
    mount, files = two_files
    pack, victim_offset, _ = chunk_location(store, files["victim"][:CHUNK_BYTES])
    healthy_pack, _, _ = chunk_location(store, files["healthy"][:CHUNK_BYTES])
    assert pack == healthy_pack
    saved = os.path.join(workdir, "pack.copy")
    shutil.copyfile(pack, saved)
    os.truncate(pack, victim_offset + 10)
    mount.mount()
    try:
        assert read_errno(f"{mount.path}/victim") == errno.EIO
        assert read_errno(f"{mount.path}/healthy") is None
    finally:
        mount.close()
    out = fsck_output(store)
    assert "lie outside pack" in out and "reads damaged chunk" in out
    shutil.copyfile(saved, pack)
    fsck_clean(store)


def test_gc_never_moves_a_damaged_chunk(store, two_files):
    """Compaction re-reads what it copies: a damaged chunk stays where fsck finds it."""
    mount, files = two_files
    mount.mount()
    try:
        os.unlink(f"{mount.path}/healthy")                # the pack becomes half dead
    finally:
        mount.close()
    pack, offset, _ = chunk_location(store, files["victim"][:CHUNK_BYTES])
    flip_byte(pack, offset + 1)
    cowfs("gc", store)
    assert os.path.exists(pack), "gc removed the pack holding a damaged chunk"
    assert "do not match the checksum" in fsck_output(store, "--verify-data")
    flip_byte(pack, offset + 1)
    fsck_clean(store)
    cowfs("gc", store)
    fsck_clean(store)
    mount.mount()
    try:
        with open(f"{mount.path}/victim", "rb") as f:
            assert f.read() == files["victim"]
    finally:
        mount.close()
    fsck_clean(store)


def one_line_refusal(store: str, command: str, *args: str) -> str:
    result = cowfs(command, store, *args, check=False)
    assert result.returncode == errors.EXIT_STORE, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["zeroed meta pages", "truncated", "garbage pages", "empty"])
def test_damaged_metadata_file_is_refused_with_one_line(store, workdir, damage):
    data = os.path.join(store, "meta", "data.mdb")
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        if damage == "zeroed meta pages":
            f.write(bytes(8192))
        elif damage == "garbage pages":
            f.seek(8192)
            f.write(os.urandom(size - 8192))
        else:
            f.truncate(size // 2 if damage == "truncated" else 0)
    os.mkdir(os.path.join(workdir, "mnt"))
    line = one_line_refusal(store, "mount", os.path.join(workdir, "mnt"))
    assert "restore meta/ from a copy" in line or "no format version" in line
    for command in ("fsck", "list", "gc", "df"):
        one_line_refusal(store, command)


def test_unknown_format_version_is_refused_by_every_command(store, workdir):
    env = lmdb.open(os.path.join(store, "meta"), max_dbs=32)
    meta = env.open_db(b"meta")          # before the write transaction: it takes the writer lock
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"3", db=meta)
    env.close()
    os.mkdir(os.path.join(workdir, "mnt"))
    assert "format version 3" in one_line_refusal(store, "mount", os.path.join(workdir, "mnt"))
    for command, *args in (("fsck",), ("list",), ("gc",), ("df",), ("snapshot", "main@s")):
        assert "format version 3" in one_line_refusal(store, command, *args)


def test_a_big_delete_leaves_a_short_but_healthy_data_file_that_opens(store):
    """One transaction that frees thousands of chunk entries (a big unlink,
    destroy or gc) leaves data.mdb shorter than its meta page's last page:
    pages allocated and freed inside a transaction are never written. That is
    not damage: every command must still open the store, and the check
    extends the file once. Built with the chunk store directly, so that no
    other commit (a daemon's periodic one) reuses the pages in between."""
    from cowfs import lmdb_check
    from cowfs.store import Store
    opened = Store.open(store)
    try:
        batch = opened.chunks.batch()
        # Seeded: the B-tree's layout, and so whether the freed pages were
        # the file's last ones, follows the chunk ids; with random content
        # about one run in ten wrote the last page and the file was not short.
        rng = random.Random(1)
        chunk_ids = batch.add_many([rng.randbytes(64) for _ in range(3000)])
        batch.sync()                                    # rule 1
        with opened.env.begin(write=True) as txn:
            for chunk_id in chunk_ids:
                batch.ref(chunk_id)
            batch.apply(txn)
        batch = opened.chunks.batch()
        with opened.env.begin(write=True) as txn:       # frees all 3000 entries at once
            for chunk_id in chunk_ids:
                batch.unref(chunk_id)
            batch.apply(txn)
    finally:
        opened.close()
    data = os.path.join(store, "meta", "data.mdb")
    with open(data, "rb") as f:
        _version, _txnid, page_size, _free, _main, last_pg = lmdb_check._newest_meta(f.read(2 * 65536))
    assert os.path.getsize(data) < (last_pg + 1) * page_size, "precondition: a short file"
    for command in ("list", "df"):
        cowfs(command, store)
    assert os.path.getsize(data) >= (last_pg + 1) * page_size
    fsck_clean(store)
