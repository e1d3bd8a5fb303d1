"""Store administration: what the snapshot commands do, mounted or not.

A volume that is mounted read-write is reached through its daemon (the
daemon flushes and snapshots in one transaction, rule 5); an unmounted one
is changed in LMDB directly while holding its volume lock, so no daemon can
mount it halfway through.
"""

import time
from typing import Optional

from . import control, schema, snapshots, volumes
from .errors import BusyError, UsageError
from .store import Store


def _vol_id(store: Store, name: str) -> int:
    with store.env.begin() as txn:
        return volumes.volume_id(txn, store.env, name)


def _try_lock(store: Store, vol_id: int, name: str, holder: str):
    """The volume lock, or None when a daemon has the volume mounted."""
    try:
        return store.lock_volume(vol_id, name, holder)
    except BusyError:
        return None


def _require_unmounted(store: Store, vol_id: int, name: str, action: str):
    try:
        return store.lock_volume(vol_id, name, f"cowfs {action}")
    except BusyError:
        raise BusyError(f"volume {name} is mounted; unmount it before {action}") from None


def snapshot(store: Store, target: str) -> str:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the snapshot as VOLUME@NAME, e.g. {vol}@before-upgrade")
    _take(store, vol, snap)
    return f"created snapshot {vol}@{snap}"


def _take(store: Store, vol: str, snap: str) -> int:
    vol_id = _vol_id(store, vol)
    with store.env.begin() as txn:
        if txn.get(schema.snapname_key(vol_id, snap), db=store.env.snapnames) is not None:
            raise snapshots.ExistsError(f"volume {vol} already has a snapshot {snap!r}")
    lock = _try_lock(store, vol_id, vol, "cowfs snapshot")
    if lock is None:
        return control.request(store.run_dir, vol_id, dict(op="snapshot", name=snap))["gen"]
    with lock, store.env.begin(write=True) as txn:
        return snapshots.take(txn, store.env, vol_id, snap)


def clone(store: Store, source: str, new_name: str) -> str:
    vol, snap = snapshots.parse_target(source)
    volumes.check_name(new_name)
    vol_id = _vol_id(store, vol)
    with store.env.begin() as txn:
        if txn.get(new_name.encode(), db=store.env.volnames) is not None:
            raise snapshots.ExistsError(f"volume {new_name!r} already exists")
    note = ""
    if snap is None:
        snap = _free_snapshot_name(store, vol_id, f"clone-{new_name}")
        _take(store, vol, snap)
        note = f" (snapshot {vol}@{snap} taken now)"
    with store.env.begin(write=True) as txn:
        gen = snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap)
        snapshots.clone(txn, store.env, vol_id, gen, new_name)
    return f"created volume {new_name} from {vol}@{snap}{note}"


def _free_snapshot_name(store: Store, vol_id: int, base: str) -> str:
    name = base
    with store.env.begin() as txn:
        while txn.get(schema.snapname_key(vol_id, name), db=store.env.snapnames) is not None:
            name = f"{base}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.time_ns() % 1000}"
    return name


def destroy(store: Store, target: str) -> str:
    vol, snap = snapshots.parse_target(target)
    vol_id = _vol_id(store, vol)
    batch = store.chunks.batch()
    if snap is not None:
        with store.env.begin() as txn:
            gen = snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap)
        with store.lock_snapshot(vol_id, gen, target, exclusive=True, holder="cowfs destroy"):
            with store.env.begin(write=True) as txn:
                message = snapshots.destroy_snapshot(txn, store.env, vol_id, vol, snap, batch)
                batch.apply(txn)
        return message
    with _require_unmounted(store, vol_id, vol, "destroying it"):
        locks = _lock_all_snapshots(store, vol_id, vol)
        try:
            with store.env.begin(write=True) as txn:
                message = snapshots.destroy_volume(txn, store.env, vol_id, vol, batch)
                batch.apply(txn)
        finally:
            for lock in locks:
                lock.release()
    return message


def _lock_all_snapshots(store: Store, vol_id: int, vol: str) -> list:
    locks = []
    with store.env.begin() as txn:
        gens = [(gen, rec["name"]) for gen, rec in snapshots.snapshots_of(txn, store.env, vol_id)]
    try:
        for gen, name in gens:
            locks.append(store.lock_snapshot(vol_id, gen, f"{vol}@{name}", exclusive=True,
                                             holder="cowfs destroy"))
    except BusyError:
        for lock in locks:
            lock.release()
        raise
    return locks


def rollback(store: Store, target: str) -> str:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the snapshot to roll back to as VOLUME@NAME, e.g. {vol}@hourly-1")
    vol_id = _vol_id(store, vol)
    batch = store.chunks.batch()
    with _require_unmounted(store, vol_id, vol, "rolling it back"):
        with store.env.begin(write=True) as txn:
            message = snapshots.rollback(txn, store.env, vol_id, vol, snap, batch)
            batch.apply(txn)
    return message


def rename(store: Store, old: str, new: str) -> str:
    old_vol, old_snap = snapshots.parse_target(old)
    if old_snap is None:
        if "@" in new:
            raise UsageError("a volume is renamed to a volume name (no '@')")
        with store.env.begin(write=True) as txn:
            snapshots.rename_volume(txn, store.env, old_vol, new)
        return f"renamed volume {old_vol} to {new}"
    new_vol, new_snap = snapshots.parse_target(new if "@" in new else f"{old_vol}@{new}")
    if new_vol != old_vol:
        raise UsageError("a snapshot keeps its volume; rename it to VOLUME@NEWNAME of the same volume")
    vol_id = _vol_id(store, old_vol)
    with store.env.begin(write=True) as txn:
        snapshots.rename_snapshot(txn, store.env, vol_id, old_vol, old_snap, new_snap)
    return f"renamed snapshot {old} to {old_vol}@{new_snap}"


# --- reporting ---------------------------------------------------------------------------------

def _fmt_time(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def listing(store: Store) -> list[dict]:
    """Volumes and their snapshots with origin, time and space figures."""
    env = store.env
    rows = []
    with env.begin() as txn:
        for name, vol_id in volumes.list_volumes(txn, env):
            rows.extend(_volume_rows(txn, env, vol_id, name))
    return rows


def _origin(txn, env, record: dict) -> Optional[str]:
    if not record["parent_vol_id"]:
        return None
    parent = volumes.volume_record(txn, env, record["parent_vol_id"])
    snap_raw = txn.get(schema.snapshot_key(record["parent_vol_id"], record["parent_gen"]), db=env.snapshots)
    snap_name = schema.unpack_snapshot(bytes(snap_raw))["name"] if snap_raw else ""
    return f"{parent['name']}@{snap_name or '(destroyed)'}"


def _volume_rows(txn, env, vol_id: int, name: str) -> list[dict]:
    from . import catalog
    record = volumes.volume_record(txn, env, vol_id)
    rows = []
    prev_gen = 0
    for gen, snap in snapshots.snapshots_of(txn, env, vol_id):
        if snap["name"]:
            rows.append(dict(
                name=f"{name}@{snap['name']}", type="snapshot", origin=None,
                created=_fmt_time(snap["created_ns"]), gen=gen,
                logical_bytes=snapshots.logical_bytes(txn, env, catalog.volume_chain(txn, env, vol_id, gen)),
                written_bytes=snapshots.written_bytes(txn, env, vol_id, prev_gen, gen),
                unique_bytes=snapshots.would_free_snapshot(txn, env, vol_id, gen),
                clones=snapshots.dependents(txn, env, vol_id, gen)))
        prev_gen = gen
    head = record["head_gen"]
    rows.insert(0, dict(
        name=name, type="volume", origin=_origin(txn, env, record), created=_fmt_time(record["created_ns"]),
        gen=head, logical_bytes=snapshots.logical_bytes(txn, env, catalog.volume_chain(txn, env, vol_id)),
        written_bytes=snapshots.written_bytes(txn, env, vol_id, prev_gen, head),
        unique_bytes=snapshots.bytes_freed(txn, env, list(snapshots._dead_for_point(txn, env, vol_id, head))),
        clones=[]))
    return rows


def df(store: Store) -> dict:
    """Store totals and, per volume and snapshot, the exact bytes destroying it frees."""
    import os
    env = store.env
    with env.begin() as txn:
        chunk_bytes = referenced = chunks = 0
        for _key, raw in txn.cursor(db=env.chunks):
            _pack, _off, length, refcount = schema.unpack_chunk(bytes(raw))
            chunk_bytes += length
            referenced += length * refcount
            chunks += 1
        items = []
        for name, vol_id in volumes.list_volumes(txn, env):
            items.append(dict(name=name, frees_bytes=snapshots.would_free_volume(txn, env, vol_id)))
            for gen, snap in snapshots.snapshots_of(txn, env, vol_id):
                if snap["name"]:
                    items.append(dict(name=f"{name}@{snap['name']}",
                                      frees_bytes=snapshots.would_free_snapshot(txn, env, vol_id, gen)))
    pack_bytes = sum(os.path.getsize(store.packs.path(p)) for p in store.packs.pack_ids())
    return dict(chunk_bytes=chunk_bytes, chunks=chunks, referenced_bytes=referenced,
                pack_bytes=pack_bytes, garbage_bytes=max(pack_bytes - chunk_bytes, 0),
                dedup_ratio=round(referenced / chunk_bytes, 3) if chunk_bytes else 1.0, items=items)
