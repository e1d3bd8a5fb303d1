"""Versioned metadata: read-as-of, write-at-generation, clone chains.

Every catalog record (inode, directory entry, chunk map entry, xattr) is
stored per version: ``(vol_id, kind, record_key, gen)`` (layout in
`schema`). A volume's *chain* says where its reads look::

    [(vol_id, max_gen), (parent_vol_id, parent_gen), (grandparent, gen), ...]

A read takes, level by level, the newest version with ``gen <= max_gen``;
the first level that has a version decides (a tombstone there means
"deleted", it does not fall through). For a volume head max_gen is its head
generation; for a snapshot it is the snapshot's generation. A clone's first
level is the clone itself, then the snapshot it was made from.

Writes go to chain[0] at its max_gen (the head generation): a version already
at that generation is overwritten in place, otherwise a new version is added
and logged in ``born``. Callers receive the payload a write displaced so that
they can drop the chunk reference it held; a version at an older generation
is never displaced (a snapshot still sees it), which is why snapshots never
touch reference counts.

All functions are synchronous and take an open LMDB transaction: whatever a
caller does between two awaits in one transaction is atomic.
"""

import heapq
from typing import Iterator, Optional

from . import schema
from .errors import StoreError
from .schema import TAG_LIVE, TAG_TOMBSTONE

Chain = list[tuple[int, int]]


def volume_chain(txn, env: "schema.Env", vol_id: int, as_of_gen: Optional[int] = None) -> Chain:
    """The read chain of a volume head (or of the volume as of a generation)."""
    chain: Chain = []
    gen = as_of_gen
    while vol_id:
        raw = txn.get(schema.u64(vol_id), db=env.volumes)
        if raw is None:
            raise StoreError(f"volume id {vol_id} is missing from the catalog; run 'cowfs fsck'")
        record = schema.unpack_volume(raw)
        chain.append((vol_id, record["head_gen"] if gen is None else gen))
        vol_id, gen = record["parent_vol_id"], record["parent_gen"]
    return chain


def _newest_version(cursor, vol_id: int, kind: bytes, record_key: bytes, max_gen: int):
    """(gen, raw value) of the newest version <= max_gen at one level, or None."""
    prefix = schema.record_prefix(vol_id, kind, record_key)
    if not cursor.set_range(prefix + schema.inv_gen(max_gen)):
        return None
    key = cursor.key()
    if len(key) != len(prefix) + 8 or not key.startswith(prefix):
        return None
    return schema.gen_from_inv(key[-8:]), cursor.value()


def get(txn, env, chain: Chain, kind: bytes, record_key: bytes) -> Optional[bytes]:
    """The visible payload of a record, or None if absent or deleted."""
    cursor = txn.cursor(db=env.records)
    for vol_id, max_gen in chain:
        found = _newest_version(cursor, vol_id, kind, record_key, max_gen)
        if found is not None:
            raw = found[1]
            return None if raw[:1] == TAG_TOMBSTONE else bytes(raw[1:])
    return None


def _visible_below(txn, env, chain: Chain, kind: bytes, record_key: bytes) -> bool:
    """Would a read of chain see a live version once chain[0]'s newest is gone?"""
    return get(txn, env, chain, kind, record_key) is not None


def _scan_level(cursor, vol_id: int, max_gen: int, kind: bytes, prefix: bytes,
                start_key: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(record_key, raw value) of the newest version <= max_gen, per record key."""
    level_prefix = schema.record_prefix(vol_id, kind, prefix)
    head_len = 9  # vol_id u64 + kind byte
    if not cursor.set_range(schema.record_prefix(vol_id, kind, start_key or prefix)):
        return
    last_key = None
    for key, value in cursor:
        if not key.startswith(level_prefix):
            return
        record_key = key[head_len:-8]
        if record_key == last_key:
            continue
        if schema.gen_from_inv(key[-8:]) > max_gen:
            continue
        last_key = record_key
        yield bytes(record_key), value


def scan(txn, env, chain: Chain, kind: bytes, prefix: bytes,
         start_key: bytes = b"") -> list[tuple[bytes, bytes]]:
    """Visible (record_key, payload) under a key prefix, sorted by record key.

    Upper chain levels shadow lower ones, tombstones included. Cost is
    O(versions under the prefix x chain depth).
    """
    cursor = txn.cursor(db=env.records)
    merged: dict[bytes, bytes] = {}
    for vol_id, max_gen in chain:
        for record_key, raw in _scan_level(cursor, vol_id, max_gen, kind, prefix, start_key):
            if record_key not in merged:
                merged[record_key] = bytes(raw)
    return sorted((k, v[1:]) for k, v in merged.items() if v[:1] == TAG_LIVE)


def iter_visible(txn, env, chain: Chain, kind: bytes,
                 after_key: Optional[bytes] = None) -> Iterator[tuple[bytes, bytes]]:
    """Visible (record_key, payload) of one kind in record-key order, streamed.

    `scan` without its memory: the levels of the chain are merged as they
    are read (upper levels shadow lower ones, tombstones included), so a
    whole volume can be walked in O(chain depth) memory. Only keys greater
    than `after_key` are returned, so a long walk can go on in a new
    transaction from where the last one stopped.
    """
    cursor_per_level = [txn.cursor(db=env.records) for _ in chain]
    levels = [((record_key, depth, raw) for record_key, raw
               in _scan_level(cursor, vol_id, max_gen, kind, b"", after_key or b""))
              for depth, (cursor, (vol_id, max_gen)) in enumerate(zip(cursor_per_level, chain))]
    last_key = after_key
    for record_key, _depth, raw in heapq.merge(*levels):
        if record_key == last_key:
            continue                     # shadowed by an upper level, or the resume point
        last_key = record_key
        if raw[:1] == TAG_LIVE:
            yield record_key, bytes(raw[1:])


def get_range(txn, env, chain: Chain, kind: bytes, start_key: bytes, end_key: bytes) -> dict[bytes, bytes]:
    """The visible payloads of every record key in [start_key, end_key), with
    one cursor walk per chain level instead of one lookup per key (a read of
    a file range: its chunk maps). Upper levels shadow lower ones, tombstones
    included; absent keys are absent from the result."""
    if end_key == _next_key(start_key):              # one key: a point lookup is cheaper
        payload = get(txn, env, chain, kind, start_key)
        return {} if payload is None else {start_key: payload}
    cursor = txn.cursor(db=env.records)
    found: dict[bytes, bytes] = {}                   # record key -> raw value (tag + payload)
    head_len = 9                                     # vol_id u64 + kind byte
    for vol_id, max_gen in chain:
        start = schema.record_prefix(vol_id, kind, start_key)
        end = schema.record_prefix(vol_id, kind, end_key)
        if not cursor.set_range(start):
            continue
        level: dict[bytes, bytes] = {}
        for key, value in cursor:
            if key >= end:
                break
            record_key = bytes(key[head_len:-8])
            if record_key in level or schema.gen_from_inv(key[-8:]) > max_gen:
                continue                             # an older version, or one too new
            level[record_key] = value
        for record_key, value in level.items():
            found.setdefault(record_key, bytes(value))
    return {k: v[1:] for k, v in found.items() if v[:1] == TAG_LIVE}


def _next_key(key: bytes) -> bytes:
    """The key right after `key` for keys of one fixed length (chunk map keys)."""
    return (int.from_bytes(key, "big") + 1).to_bytes(len(key), "big")


def put(txn, env, chain: Chain, kind: bytes, record_key: bytes, payload: bytes) -> Optional[bytes]:
    """Write a record at chain[0]'s head generation; return the payload displaced.

    Only a live version at the *same* generation is displaced (overwritten);
    older versions stay for the snapshots that see them.
    """
    vol_id, gen = chain[0]
    key = schema.versioned_key(vol_id, kind, record_key, gen)
    old = txn.get(key, db=env.records)
    if old is None:
        txn.put(schema.born_key(vol_id, gen, kind, record_key), b"", db=env.born)
    txn.put(key, TAG_LIVE + payload, db=env.records)
    if old is not None and old[:1] == TAG_LIVE:
        return bytes(old[1:])
    return None


def delete(txn, env, chain: Chain, kind: bytes, record_key: bytes) -> Optional[bytes]:
    """Delete a record as seen from chain[0]'s head; return the payload displaced.

    A version at the head generation is removed outright; a tombstone is
    written only if an older version (of this volume or an ancestor) would
    otherwise become visible again.
    """
    vol_id, gen = chain[0]
    key = schema.versioned_key(vol_id, kind, record_key, gen)
    old = txn.get(key, db=env.records)
    displaced = None
    if old is not None:
        txn.delete(key, db=env.records)
        txn.delete(schema.born_key(vol_id, gen, kind, record_key), db=env.born)
        if old[:1] == TAG_LIVE:
            displaced = bytes(old[1:])
    if _visible_below(txn, env, chain, kind, record_key):
        txn.put(key, TAG_TOMBSTONE, db=env.records)
        txn.put(schema.born_key(vol_id, gen, kind, record_key), b"", db=env.born)
    return displaced


def iter_all_versions(txn, env) -> Iterator[tuple[int, bytes, bytes, int, bytes]]:
    """Every record version in the store: (vol_id, kind, record_key, gen, raw value)."""
    cursor = txn.cursor(db=env.records)
    for key, value in cursor:
        vol_id, kind, record_key, gen = schema.split_versioned_key(bytes(key))
        yield vol_id, kind, record_key, gen, bytes(value)
