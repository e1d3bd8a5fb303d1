"""cowfs scrub: a flipped byte in a pack is found and named; the mount gives EIO for it only."""

import errno
import json
import os
import pty
import subprocess
import sys

import pytest

from cowfs import errors, schema
from cowfs.chunks import chunk_id_of
from cowfs.store import Store
from helpers import REPO, cowfs

CHUNK = schema.DEFAULT_CHUNK_SIZE


def flip_byte_of_chunk(store_path: str, data: bytes) -> str:
    """Flip one byte inside the pack entry holding `data`; returns its chunk id (hex)."""
    chunk_id = chunk_id_of(data)
    store = Store.open(store_path)
    try:
        with store.env.begin() as txn:
            pack_id, offset, length, _refs = schema.unpack_chunk(txn.get(chunk_id, db=store.env.chunks))
        path = store.packs.path(pack_id)
    finally:
        store.close()
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0x40]))
        os.fsync(f.fileno())
    return chunk_id.hex()


def test_flipped_byte_is_named_by_scrub_and_reads_fail_with_eio(store, mounted):
    victim = os.urandom(3 * CHUNK)
    other = os.urandom(3 * CHUNK)
    os.makedirs(f"{mounted.path}/pg/base")
    for name, data in (("pg/base/victim", victim), ("other", other)):
        with open(f"{mounted.path}/{name}", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    cowfs("snapshot", store, "main@s1")
    cowfs("clone", store, "main@s1", "c1")
    mounted.umount()
    damaged_id = flip_byte_of_chunk(store, victim[CHUNK:2 * CHUNK])

    result = cowfs("scrub", store, "--json", check=False)
    assert result.returncode == errors.EXIT_FAILURE
    report = json.loads(result.stdout)
    assert [d["chunk_id"] for d in report["damaged"]] == [damaged_id]
    refs = {(r["point"], r["path"], r["offset"]) for r in report["damaged"][0]["refs"]}
    assert refs == {(point, "/pg/base/victim", CHUNK) for point in ("main", "main@s1", "c1")}
    text = cowfs("scrub", store, check=False)
    assert "DAMAGED chunk " + damaged_id in text.stdout and "main@s1: /pg/base/victim" in text.stdout
    assert "1 damaged" in text.stderr

    mounted.mount()
    with open(f"{mounted.path}/pg/base/victim", "rb") as f:
        assert f.read(CHUNK) == victim[:CHUNK], "undamaged chunks of the file still read"
        with pytest.raises(OSError) as exc:
            f.seek(CHUNK)
            f.read(CHUNK)
        assert exc.value.errno == errno.EIO
    with open(f"{mounted.path}/other", "rb") as f:
        assert f.read() == other


def test_scrub_of_an_intact_store_exits_zero_with_progress(store, mounted):
    for n in range(5):
        with open(f"{mounted.path}/f{n}", "wb") as f:
            f.write(os.urandom(5 * CHUNK))
    cowfs("snapshot", store, "main@s1")
    plain = cowfs("scrub", store)
    assert "scrub: 100% (" in plain.stderr and "done in" in plain.stderr and "store intact" in plain.stderr
    assert "\r" not in plain.stderr, "no bar when stderr is not a terminal"
    assert plain.stdout == ""
    # On a terminal: a bar redrawn in place.
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "cowfs", "scrub", store], stderr=secondary,
                              stdout=subprocess.PIPE, cwd=REPO, timeout=120)
        os.close(secondary)
        shown = _read_all(primary)
    finally:
        os.close(primary)
    assert proc.returncode == 0
    assert "\rscrub:" in shown and "100%" in shown and "B/s" in shown, shown   # tqdm's live line


def _read_all(fd: int) -> str:
    out = b""
    while True:
        try:
            part = os.read(fd, 65536)
        except OSError:          # EIO once the other side is closed
            break
        if not part:
            break
        out += part
    return out.decode(errors="replace")
