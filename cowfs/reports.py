"""Reports of a store: volumes and snapshots with their space, schedules, df.

Read-only: each report is one LMDB read transaction and returns data (lists
and dicts); the CLI words it. (The listing fills the content-digest cache
for snapshots one step from a cached one, see `digest.snapshot_digests`.)
"""

from typing import Optional

from . import catalog, digest, policy, schema, scheduling, snapshots, volumes
from .policy import fmt_utc
from .store import Store


def listing(store: Store) -> list[dict]:
    """Volumes and their snapshots with origin, time and space figures."""
    env = store.env
    rows = []
    with env.begin() as txn:
        named = [(vol_id, gen) for _name, vol_id in volumes.list_volumes(txn, env)
                 for gen, snap in snapshots.snapshots_of(txn, env, vol_id) if snap["name"]]
    # Cached, or computed in O(changes) from a cached one; never a first pass
    # over a volume (`cowfs digest` and `send` make that one).
    digests = digest.snapshot_digests(env, named, first_pass=False)
    with env.begin() as txn:
        for name, vol_id in volumes.list_volumes(txn, env):
            rows.extend(_volume_rows(txn, env, vol_id, name, digests))
    return rows


def _origin(txn, env, record: dict) -> Optional[str]:
    if not record["parent_vol_id"]:
        return None
    parent = volumes.volume_record(txn, env, record["parent_vol_id"])
    snap_raw = txn.get(schema.snapshot_key(record["parent_vol_id"], record["parent_gen"]), db=env.snapshots)
    snap_name = schema.unpack_snapshot(bytes(snap_raw))["name"] if snap_raw else ""
    return f"{parent['name']}@{snap_name or '(destroyed)'}"


def _volume_rows(txn, env, vol_id: int, name: str, digests: dict) -> list[dict]:
    """digests: {(vol_id, gen): content digest} of the snapshots (a head's is not listed: it moves)."""
    record = volumes.volume_record(txn, env, vol_id)
    rows = []
    prev_gen = 0
    points = snapshots.snapshots_of(txn, env, vol_id)
    logical = snapshots.logical_bytes_at(txn, env, vol_id,
                                         [gen for gen, snap in points if snap["name"]] + [record["head_gen"]])
    for gen, snap in points:
        if snap["name"]:
            held = snapshots.hold_of(txn, env, vol_id, gen)
            rows.append(dict(
                name=f"{name}@{snap['name']}", type="snapshot", origin=None,
                created=fmt_utc(snap["created_ns"]), created_ns=snap["created_ns"], gen=gen,
                logical_bytes=logical[gen],
                written_bytes=snapshots.written_bytes(txn, env, vol_id, prev_gen, gen),
                unique_bytes=snapshots.would_free_snapshot(txn, env, vol_id, gen),
                clones=snapshots.dependents(txn, env, vol_id, gen),
                auto=bool(snap["flags"] & schema.SNAP_FLAG_AUTO), held=held is not None,
                hold_reason=None if held is None else held["reason"],
                held_since=None if held is None else fmt_utc(held["created_ns"]),
                digest=digest.to_hex(digests[(vol_id, gen)]) if (vol_id, gen) in digests else None))
        prev_gen = gen
    head = record["head_gen"]
    rows.insert(0, dict(
        name=name, type="volume", origin=_origin(txn, env, record), created=fmt_utc(record["created_ns"]),
        created_ns=record["created_ns"], gen=head, logical_bytes=logical[head],
        written_bytes=snapshots.written_bytes(txn, env, vol_id, prev_gen, head),
        unique_bytes=snapshots.bytes_freed(txn, env, list(snapshots._dead_for_point(txn, env, vol_id, head))),
        clones=[], auto=False, held=False, hold_reason=None, held_since=None,
        policy=_policy_text(txn, env, vol_id), digest=None))
    return rows


def _policy_text(txn, env, vol_id: int) -> Optional[str]:
    pol = policy.get(txn, env, vol_id)
    return None if pol is None else pol.describe()


def totals(store: Store) -> dict:
    """Stored chunk bytes, what refers to them (dedup), pack bytes on disk.

    One pass over the chunk index: O(chunks)."""
    env = store.env
    chunk_bytes = referenced = chunks = 0
    with env.begin() as txn:
        for _key, raw in txn.cursor(db=env.chunks):
            _pack, _off, length, refcount = schema.unpack_chunk(bytes(raw))
            chunk_bytes += length
            referenced += length * refcount
            chunks += 1
    pack_bytes = sum(store.packs.disk_bytes(p) for p in store.packs.pack_ids())
    return dict(chunk_bytes=chunk_bytes, chunks=chunks, referenced_bytes=referenced,
                pack_bytes=pack_bytes, garbage_bytes=max(pack_bytes - chunk_bytes, 0),
                dedup_ratio=round(referenced / chunk_bytes, 3) if chunk_bytes else 1.0)


def volume_space(store: Store) -> list[dict]:
    """Per volume: logical bytes of its head, bytes destroying it frees, snapshots."""
    env = store.env
    rows = []
    with env.begin() as txn:
        for name, vol_id in volumes.list_volumes(txn, env):
            rows.append(dict(volume=name,
                             logical_bytes=snapshots.logical_bytes(txn, env, catalog.volume_chain(txn, env, vol_id)),
                             unique_bytes=snapshots.would_free_volume(txn, env, vol_id),
                             snapshots=sum(1 for _g, rec in snapshots.snapshots_of(txn, env, vol_id)
                                           if rec["name"])))
    return rows


def df(store: Store) -> dict:
    """Store totals, what holds space, and per volume and snapshot the exact
    bytes destroying it frees.

    `snapshot_held_bytes`: chunk bytes that only snapshots still reference
    (deleted or overwritten in every volume head since): destroying every
    snapshot without clones frees exactly this much."""
    env = store.env
    with env.begin() as txn:
        items, snapshot_held = [], 0
        for name, vol_id in volumes.list_volumes(txn, env):
            items.append(dict(name=name, frees_bytes=snapshots.would_free_volume(txn, env, vol_id)))
            gens = []
            for gen, snap in snapshots.snapshots_of(txn, env, vol_id):
                if snap["name"]:
                    gens.append(gen)
                    items.append(dict(name=f"{name}@{snap['name']}",
                                      frees_bytes=snapshots.would_free_snapshot(txn, env, vol_id, gen)))
            snapshot_held += snapshots.would_free_snapshots(txn, env, vol_id, gens) if gens else 0
    return dict(totals(store), snapshot_held_bytes=snapshot_held, filesystem=store.packs.space.figures(),
                items=items)


def policies(store: Store) -> list[dict]:
    with store.env.begin() as txn:
        names = {vol_id: name for name, vol_id in volumes.list_volumes(txn, store.env)}
        rows = []
        for vol_id, pol in policy.all_policies(txn, store.env):
            if vol_id in names:
                rows.append(dict(volume=names[vol_id], **pol.__dict__, summary=pol.describe(),
                                 last_auto=_last_auto_text(txn, store.env, vol_id)))
    return rows


def _last_auto_text(txn, env, vol_id: int) -> Optional[str]:
    last_ns = scheduling.last_auto_ns(txn, env, vol_id)
    return None if last_ns is None else fmt_utc(last_ns)
