"""Content digest of a snapshot: one value over its whole tree, kept in O(changes).

The digest of a point (a snapshot, or a volume head) is

    D = sum over its visible records r of xxh3_128(kind | len(key) | key | payload)  mod 2**128

over every record a read of the point sees: inodes (all attributes), directory
entries (names), chunk maps (chunk ids) and xattrs. A sum over a *set* is
order-free and can be updated: when a record changes from `old` to `new`,
D' = D - h(old) + h(new). So the digest of a point follows from the digest
of an older point of the same volume plus the keys born in between (the
``born`` log, as `diff` walks it): O(changes), never O(volume), once one
older point is known. Consequences:

* a clone nobody has written to has the digest of the snapshot it came
  from (its reads see the same records), and so has a snapshot of it;
* a snapshot received from another store has the digest of the one sent
  (the receiver checks that before it becomes visible, see `receive`);
* the first digest of a volume without a cached point costs one streamed
  pass over its records (`catalog.iter_visible`, constant memory): `cowfs
  digest` and `send` make it, `list` does not (it shows no digest for such
  a snapshot rather than read a whole volume: a 10 GiB volume took 3 s).

Digests of snapshots are cached in the ``digests`` sub-database (snapshots
are immutable); a head's digest is computed on demand from the newest
snapshot before it. The hash is xxh3-128, as for chunk ids: it detects
damage and mistakes, not an adversary who can choose colliding content.
"""

import logging
import struct
from typing import Iterator, Optional

import lmdb
import xxhash

from . import catalog, schema, snapshots, volumes

log = logging.getLogger(__name__)

MODULUS = 1 << 128
KINDS = (schema.KIND_INODE, schema.KIND_DENTRY, schema.KIND_CHUNK, schema.KIND_XATTR)
_KEY_LEN = struct.Struct("<H")


def record_hash(kind: bytes, record_key: bytes, payload: bytes) -> int:
    """The element hash of one visible record (its key length makes the encoding unambiguous)."""
    return xxhash.xxh3_128_intdigest(kind + _KEY_LEN.pack(len(record_key)) + record_key + payload)


def to_hex(digest: int) -> str:
    return digest.to_bytes(16, "big").hex()


# --- cache --------------------------------------------------------------------------------------

def cached(txn, env, vol_id: int, gen: int) -> Optional[int]:
    raw = txn.get(schema.digest_key(vol_id, gen), db=env.digests)
    if raw is None or raw[:1] != bytes([schema.DIGEST_ALGORITHM]):
        return None              # absent, or written by another digest algorithm
    return int.from_bytes(raw[1:17], "big")


def store_cached(txn, env, vol_id: int, gen: int, digest: int) -> None:
    """Cache the digest of a snapshot that still exists (never of a head)."""
    if txn.get(schema.snapshot_key(vol_id, gen), db=env.snapshots) is not None:
        txn.put(schema.digest_key(vol_id, gen),
                bytes([schema.DIGEST_ALGORITHM]) + digest.to_bytes(16, "big"), db=env.digests)


# --- computing -------------------------------------------------------------------------------------

def _older_snapshot(txn, env, vol_id: int, gen: int) -> Optional[int]:
    """The newest snapshot of the volume older than gen (named or kept for a clone).

    One cursor seek, not a list of the volume's snapshots: walking back
    through thousands of uncached snapshots must stay O(snapshots)."""
    cursor = txn.cursor(db=env.snapshots)
    found = cursor.prev() if cursor.set_range(schema.snapshot_key(vol_id, gen)) else cursor.last()
    if not found:
        return None
    key = bytes(cursor.key())
    return schema.read_u64(key, 8) if schema.read_u64(key) == vol_id else None


def _plan(txn, env, vol_id: int, gen: int, fresh: dict, use_cache: bool = True) -> tuple[int, list]:
    """(starting digest, steps): walk back to a point whose digest is known.

    A step (vol_id, from_point, gen) moves from a known point to (vol_id,
    gen): from_point is an older snapshot of the same volume, the clone's
    origin (another volume), or None for the empty tree.
    """
    steps = []
    while True:
        known = fresh.get((vol_id, gen))
        if known is None and use_cache:
            known = cached(txn, env, vol_id, gen)
        if known is not None:
            return known, steps
        older = _older_snapshot(txn, env, vol_id, gen)
        if older is not None:
            steps.append((vol_id, (vol_id, older), gen))
            gen = older
            continue
        record = volumes.volume_record(txn, env, vol_id)
        if record["parent_vol_id"]:
            steps.append((vol_id, (record["parent_vol_id"], record["parent_gen"]), gen))
            vol_id, gen = record["parent_vol_id"], record["parent_gen"]
            continue
        steps.append((vol_id, None, gen))
        return 0, steps


def point_digest(txn, env, vol_id: int, gen: int, fresh: Optional[dict] = None,
                 use_cache: bool = True, first_pass: bool = True) -> Optional[int]:
    """Digest of (vol_id as of gen). Digests of snapshots computed on the
    way are added to `fresh` ({(vol_id, gen): digest}) for the caller to cache.
    Without `use_cache` nothing cached is trusted (fsck checks the cache so).
    Without `first_pass`, None instead of a walk from the empty tree (the
    first digest of a chain: one pass over every record it ever wrote)."""
    fresh = {} if fresh is None else fresh
    digest, steps = _plan(txn, env, vol_id, gen, fresh, use_cache)
    if not first_pass and any(from_point is None for _vol, from_point, _gen in steps):
        return None
    for step_vol, from_point, step_gen in reversed(steps):
        digest = (digest + step_delta(txn, env, step_vol, from_point, step_gen)) % MODULUS
        fresh[(step_vol, step_gen)] = digest
    return digest


def step_delta(txn, env, vol_id: int, from_point: Optional[tuple[int, int]], gen: int) -> int:
    """Digest change from `from_point` to (vol_id, gen), in O(records born in between).

    `from_point` is None (the empty tree) or a point on the chain of (vol_id,
    gen): an older point of the volume, or of an ancestor it was cloned from.
    """
    new_chain = catalog.volume_chain(txn, env, vol_id, gen)
    if from_point is None:
        return sum(record_hash(kind, key, payload) for kind, key, payload
                   in iter_tree(txn, env, new_chain)) % MODULUS
    old_chain = catalog.volume_chain(txn, env, *from_point)
    delta = 0
    for kind, keys in changed_since(txn, env, new_chain, *from_point).items():
        for key in keys:
            delta += change_hash(kind, key, catalog.get(txn, env, old_chain, kind, key),
                                 catalog.get(txn, env, new_chain, kind, key))
    return delta % MODULUS


def on_chain(chain, base_vol_id: int, base_gen: int) -> bool:
    """Is (base_vol_id, base_gen) an older point on this chain (same volume or an ancestor)?"""
    for depth, (vol_id, max_gen) in enumerate(chain):
        if vol_id == base_vol_id:
            return base_gen < max_gen or (depth > 0 and base_gen == max_gen)
    return False


def changed_since(txn, env, chain, base_vol_id: int, base_gen: int) -> dict:
    """Keys per kind that may differ between the point of `chain` and the
    older point (base_vol_id, base_gen) on it: O(records born in between).

    Every key whose value differs has a version the newer point still sees,
    born either in a chain level above the base's volume (any generation up
    to that level's) or in the base's volume after base_gen (see `diff`).
    The levels below the base's volume are the same for both points.
    """
    keys: dict = {}
    for vol_id, max_gen in chain:
        lo_gen = base_gen if vol_id == base_vol_id else 0
        for kind, found in snapshots.changed_keys(txn, env, vol_id, lo_gen, max_gen).items():
            keys.setdefault(kind, set()).update(found)
        if vol_id == base_vol_id:
            return keys
    raise ValueError(f"point ({base_vol_id}, {base_gen}) is not on the chain {chain}")


def change_hash(kind: bytes, key: bytes, old: Optional[bytes], new: Optional[bytes]) -> int:
    """What one record's change adds to a digest (mod MODULUS by the caller)."""
    if old == new:
        return 0
    return ((record_hash(kind, key, new) if new is not None else 0)
            - (record_hash(kind, key, old) if old is not None else 0))


def iter_tree(txn, env, chain) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(kind, record_key, payload) of every visible record of a point, kind by kind."""
    for kind in KINDS:
        for key, payload in catalog.iter_visible(txn, env, chain, kind):
            yield kind, key, payload


# --- what commands use ----------------------------------------------------------------------------

def snapshot_digests(env, points: list[tuple[int, int]], first_pass: bool = True) -> dict:
    """{(vol_id, gen): digest} of snapshots; computes what is not cached and caches it.

    Computed in a read transaction, cached in one short write transaction
    (a snapshot destroyed meanwhile is simply not cached). Caching is best
    effort: on a full disk `list` must still work, it just computes again.
    Without `first_pass` (what `list` asks), a snapshot whose digest would
    need the first pass over its chain is left out: O(changes) only.
    """
    fresh: dict = {}
    out = {}
    with env.begin() as txn:
        for vol_id, gen in points:
            value = point_digest(txn, env, vol_id, gen, fresh, first_pass=first_pass)
            if value is not None:
                out[(vol_id, gen)] = value
    if fresh:
        try:
            with env.begin(write=True) as txn:
                for (vol_id, gen), value in fresh.items():
                    if cached(txn, env, vol_id, gen) is None:
                        store_cached(txn, env, vol_id, gen, value)
        except lmdb.Error as exc:
            log.info("content digests not cached (%s); computed again next time", exc)
    return out


def head_digest(env, vol_id: int) -> int:
    """Digest of a volume head now (not cached: the head changes)."""
    with env.begin() as txn:
        head_gen = volumes.volume_record(txn, env, vol_id)["head_gen"]
        return point_digest(txn, env, vol_id, head_gen)
