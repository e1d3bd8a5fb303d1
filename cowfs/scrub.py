"""Scrub: read every stored chunk back, verify it, and name what a damaged one hurts.

A chunk is verified by reading its pack entry (header and bytes) and
re-hashing the bytes: the xxh3-128 digest must equal the chunk id, and the
header must name the same chunk and length. Reads through a mount verify the
same digest (`ChunkStore.read`), so a damaged chunk gives EIO there, never
wrong bytes; scrub finds the damage before anybody reads it.

Safe while volumes are mounted and gc runs: chunk locations are listed in
short read transactions, a batch at a time (a long-lived LMDB reader would
stop the map from reusing pages); a chunk that fails is looked up again, and
only counts as damaged if it is still stored at the place that failed.

Naming the damage: every record version naming a damaged chunk is found by
one pass over the ``records`` sub-database (only when something is damaged),
then each volume head and named snapshot whose view contains such a version
is reported with the file path, resolved as `diff` does.
"""

import collections
import json
import os
import time
from typing import Callable, Optional

from . import catalog, schema, volumes
from .chunks import chunk_id_of
from .diff import PathResolver
from .store import Store

BATCH_CHUNKS = 65536

Progress = Callable[[int, int, int, int], None]   # done_bytes, total_bytes, done_chunks, total_chunks


def scrub(store: Store, progress: Optional[Progress] = None) -> dict:
    progress = progress or (lambda *_: None)
    total_chunks, total_bytes = _totals(store)
    done_chunks = done_bytes = 0
    damaged = []
    for batch in _location_batches(store):
        for chunk_id, pack_id, offset, length in batch:
            problem = _verify_current(store, chunk_id, pack_id, offset, length)
            if problem is not None:
                damaged.append(dict(chunk_id=chunk_id.hex(), pack=f"{pack_id:08x}", offset=offset,
                                    length=length, problem=problem))
            done_chunks += 1
            done_bytes += length
            progress(done_bytes, max(total_bytes, done_bytes), done_chunks, max(total_chunks, done_chunks))
    if damaged:
        _attach_references(store, damaged)
    report = dict(chunks=done_chunks, bytes=done_bytes, damaged=damaged)
    save_last(store, report)
    return report


def _totals(store: Store) -> tuple[int, int]:
    env = store.env
    with env.begin() as txn:
        chunks = txn.stat(env.chunks)["entries"]
        live_bytes = sum(schema.unpack_pack_stats(bytes(raw))[0] for _k, raw in txn.cursor(db=env.packs))
    return chunks, live_bytes


def _location_batches(store: Store):
    """Chunk locations in batches, each sorted by pack and offset for sequential reads."""
    env = store.env
    after = b""
    while True:
        batch = []
        with env.begin() as txn:
            cursor = txn.cursor(db=env.chunks)
            found = cursor.set_range(after) if after else cursor.first()
            while found and len(batch) < BATCH_CHUNKS:
                key = bytes(cursor.key())
                if key != after:
                    pack_id, offset, length, _refs = schema.unpack_chunk(bytes(cursor.value()))
                    batch.append((key, pack_id, offset, length))
                found = cursor.next()
        if not batch:
            return
        after = batch[-1][0]
        yield sorted(batch, key=lambda entry: (entry[1], entry[2]))


def _verify(store: Store, chunk_id: bytes, pack_id: int, offset: int, length: int) -> Optional[str]:
    """None if the entry is intact, else what is wrong with it."""
    header_size = schema.ENTRY_HEADER.size
    try:
        raw = store.packs.read(pack_id, offset - header_size, header_size + length)
    except OSError as exc:
        return f"cannot be read: {exc}"
    if chunk_id_of(raw[header_size:]) != chunk_id:
        return "bytes do not match the checksum"
    magic, stored_length, stored_id = schema.ENTRY_HEADER.unpack(raw[:header_size])
    if magic != schema.ENTRY_MAGIC or stored_length != length or stored_id != chunk_id:
        return "entry header is damaged (the bytes themselves are intact)"
    return None


def _verify_current(store: Store, chunk_id: bytes, pack_id: int, offset: int, length: int) -> Optional[str]:
    problem = _verify(store, chunk_id, pack_id, offset, length)
    if problem is None:
        return None
    # gc may have moved or freed the chunk since its location was listed.
    with store.env.begin() as txn:
        raw = txn.get(chunk_id, db=store.env.chunks)
    if raw is None:
        return None
    now = schema.unpack_chunk(bytes(raw))[:3]
    if now != (pack_id, offset, length):
        return _verify(store, chunk_id, *now)
    return problem


# --- the last result, for `cowfs metrics` and `cowfs status` -----------------------------------

def _last_path(store: Store) -> str:
    return os.path.join(store.run_dir, "scrub-last.json")


def save_last(store: Store, report: dict) -> None:
    """Keep the outcome of a finished scrub (counts, not the damage list)."""
    summary = dict(finished_ns=time.time_ns(), chunks=report["chunks"], bytes=report["bytes"],
                   damaged=len(report["damaged"]))
    tmp = _last_path(store) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, _last_path(store))


def last(store: Store) -> Optional[dict]:
    """The last finished scrub of the store, or None if it was never scrubbed."""
    try:
        with open(_last_path(store)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- who refers to the damage ------------------------------------------------------------------

def _attach_references(store: Store, damaged: list[dict]) -> None:
    env = store.env
    wanted = {bytes.fromhex(d["chunk_id"]): d for d in damaged}
    for d in damaged:
        d["refs"] = []
    with env.begin() as txn:
        versions = _versions_naming(txn, env, set(wanted))
        for name, vol_id in volumes.list_volumes(txn, env):
            for label, gen in _points(txn, env, vol_id, name):
                chain = catalog.volume_chain(txn, env, vol_id, gen)
                for chunk_id, ref in _refs_at(txn, env, vol_id, label, chain, versions, store.chunk_size):
                    wanted[chunk_id]["refs"].append(ref)


def _versions_naming(txn, env, chunk_ids: set) -> dict[tuple[int, bytes], set]:
    """(vol_id, chunk record key) -> damaged chunk ids some version of it names."""
    found = collections.defaultdict(set)
    for vol_id, kind, record_key, _gen, raw in catalog.iter_all_versions(txn, env):
        if kind == schema.KIND_CHUNK and raw[:1] == schema.TAG_LIVE and raw[1:] in chunk_ids:
            found[(vol_id, record_key)].add(raw[1:])
    return found


def _points(txn, env, vol_id: int, name: str) -> list[tuple[str, int]]:
    from .snapshots import snapshots_of
    points = [(f"{name}@{rec['name']}", gen) for gen, rec in snapshots_of(txn, env, vol_id) if rec["name"]]
    points.append((name, volumes.volume_record(txn, env, vol_id)["head_gen"]))
    return points


def _refs_at(txn, env, vol_id: int, label: str, chain, versions: dict, chunk_size: int):
    """(chunk_id, reference) for each damaged chunk the point `chain` reads."""
    levels = {level_vol for level_vol, _gen in chain}
    paths = PathResolver(txn, env, vol_id, chain)
    for (ref_vol, record_key), chunk_ids in versions.items():
        if ref_vol not in levels:
            continue
        visible = catalog.get(txn, env, chain, schema.KIND_CHUNK, record_key)
        if visible not in chunk_ids:
            continue
        ino, idx = schema.read_u64(record_key), schema.chunk_index_of(record_key)
        yield visible, dict(point=label, path=paths.path(ino) or f"<inode {ino}, no name>",
                            ino=ino, offset=idx * chunk_size, end=(idx + 1) * chunk_size - 1)
