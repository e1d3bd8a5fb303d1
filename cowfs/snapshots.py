"""Snapshots, clones, rollback, destroy and exact space accounting.

All of it is metadata over the versioned catalog (see `catalog`):

* snapshot  = record (vol, head_gen) under a name, bump the head: O(1).
* clone     = a new volume whose chain continues at (vol, snapshot gen): O(1).
* rollback  = snapshot the current head, then re-write at the new head the
              version each key had at the target: O(changes since it).
* destroy   = free the record versions no remaining *kept point* can see.
  Kept points of a volume are its snapshots (named, or unnamed because a
  clone depends on them) and its head. A version born at gen g is visible at
  point T iff it is the newest version of its key with gen <= T. When the
  point S (previous kept point P) goes away, the only candidates are versions
  born in (P, S], and such a version survives iff it is still the newest at
  the next kept point N. Cost O(versions born in (P, S]) = O(changes).

Freed chunk-map versions drop their chunk reference in the same transaction
(rule 4: the count reaches zero in a committed transaction before gc may
reclaim the bytes). `would_free` runs the same walk without writing, so the
figure `df` shows for a snapshot is exactly what destroying it frees.
"""

import bisect
import collections
import time
from typing import Optional

from . import catalog, schema, volumes
from .errors import BusyError, ExistsError, NotFoundError, UsageError

FLAG_HIDDEN = 1          # volume destroyed by name, kept for the clones that depend on it


def parse_target(text: str) -> tuple[str, Optional[str]]:
    """'vol' -> (vol, None); 'vol@snap' -> (vol, snap); names validated."""
    vol, at, snap = text.partition("@")
    volumes.check_name(vol)
    if at:
        volumes.check_name(snap, "snapshot")
        return vol, snap
    return vol, None


def select_snapshots(points: list[tuple[int, str]], spec: str, vol_name: str) -> list[tuple[int, str]]:
    """The snapshots a set spec names, in creation order, from `points` (gen,
    name) of one volume: names and ranges separated by commas; a range
    "A%B" is every snapshot from A to B inclusive, by creation, and a side
    left empty means the first or the last (as `zfs destroy vol@a%b`)."""
    order = {name: index for index, (_gen, name) in enumerate(points)}
    chosen: set[int] = set()
    for item in spec.split(","):
        if "%" in item:
            first, _, last = item.partition("%")
            lo = _position(order, first, vol_name) if first else 0
            hi = _position(order, last, vol_name) if last else len(points) - 1
            if lo > hi:
                raise UsageError(f"range {vol_name}@{item} is empty: {first} was taken after {last}; "
                                 "give the older snapshot first")
            chosen.update(range(lo, hi + 1))
        else:
            chosen.add(_position(order, item, vol_name))
    return [points[index] for index in sorted(chosen)]


def _position(order: dict, name: str, vol_name: str) -> int:
    volumes.check_name(name, "snapshot")
    if name not in order:
        raise NotFoundError(f"volume {vol_name} has no snapshot {name!r}; 'cowfs list STORE' shows them")
    return order[name]


# --- reading snapshot records ------------------------------------------------------------

def snapshot_gen(txn, env, vol_id: int, vol_name: str, snap: str) -> int:
    raw = txn.get(schema.snapname_key(vol_id, snap), db=env.snapnames)
    if raw is None:
        raise NotFoundError(f"volume {vol_name} has no snapshot {snap!r}; "
                            "'cowfs list STORE' shows the snapshots")
    return schema.read_u64(raw)


def snapshots_of(txn, env, vol_id: int) -> list[tuple[int, dict]]:
    """(gen, record) of every snapshot of a volume, oldest first, hidden ones included."""
    prefix = schema.vol_prefix(vol_id)
    out = []
    cursor = txn.cursor(db=env.snapshots)
    if cursor.set_range(prefix):
        for key, raw in cursor:
            if not bytes(key).startswith(prefix):
                break
            out.append((schema.split_vol_gen_key(bytes(key))[1], schema.unpack_snapshot(bytes(raw))))
    return out


def dependents(txn, env, vol_id: int, gen: int) -> list[str]:
    """Names of the clones whose chain continues at (vol_id, gen)."""
    out = []
    for _key, raw in txn.cursor(db=env.volumes):
        record = schema.unpack_volume(bytes(raw))
        if record["parent_vol_id"] == vol_id and record["parent_gen"] == gen:
            out.append(record["name"])
    return out


def kept_points(txn, env, vol_id: int) -> list[int]:
    record = volumes.volume_record(txn, env, vol_id)
    points = [gen for gen, _ in snapshots_of(txn, env, vol_id)]
    if not record["flags"] & FLAG_HIDDEN:
        points.append(record["head_gen"])
    return sorted(points)


# --- creating -----------------------------------------------------------------------------

def unique_name(txn, env, vol_id: int, base: str) -> str:
    """`base`, or `base-2`, `base-3`... if taken: the one way cowfs names a
    snapshot it makes by itself (scheduled, before a clone, before a rollback)."""
    name, n = base, 1
    while txn.get(schema.snapname_key(vol_id, name), db=env.snapnames) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def take(txn, env, vol_id: int, name: str, created_ns: Optional[int] = None, flags: int = 0) -> int:
    """Record the head as snapshot `name` and move the head on; returns the snapshot gen.

    The caller must have made every acknowledged write of the volume part of
    this transaction or an earlier one (rule 5): the daemon of a mounted
    volume does that, see `Filesystem.snapshot`. created_ns defaults to now
    (an injected clock passes its own); flags: schema.SNAP_FLAG_AUTO.
    """
    volumes.check_name(name, "snapshot")
    record = volumes.volume_record(txn, env, vol_id)
    if txn.get(schema.snapname_key(vol_id, name), db=env.snapnames) is not None:
        raise ExistsError(f"volume {record['name']} already has a snapshot {name!r}")
    gen = record["head_gen"]
    created_ns = time.time_ns() if created_ns is None else created_ns
    # The volume's orphans (unlinked, still open) go with the snapshot: its
    # tree holds them with no name, and a clone or a rollback of it must free them.
    txn.put(schema.snapshot_key(vol_id, gen),
            schema.pack_snapshot(created_ns, name, flags, orphans_of(txn, env, vol_id)), db=env.snapshots)
    txn.put(schema.snapname_key(vol_id, name), schema.u64(gen), db=env.snapnames)
    record["head_gen"] = gen + 1
    volumes.put_volume_record(txn, env, vol_id, record)
    return gen


def clone(txn, env, vol_id: int, gen: int, new_name: str) -> int:
    """A writable volume that starts as (vol_id as of gen); O(1)."""
    volumes.check_name(new_name)
    if txn.get(new_name.encode(), db=env.volnames) is not None:
        raise ExistsError(f"volume {new_name!r} already exists")
    source = volumes.volume_record(txn, env, vol_id)
    new_id = volumes.allocate_vol_id(txn, env)
    volumes.put_volume_record(txn, env, new_id, dict(
        head_gen=volumes.FIRST_GEN, parent_vol_id=vol_id, parent_gen=gen,
        next_ino=source["next_ino"], created_ns=time.time_ns(), name=new_name, flags=0))
    txn.put(new_name.encode(), schema.u64(new_id), db=env.volnames)
    _set_orphans(txn, env, new_id, _snapshot_record(txn, env, vol_id, gen)["orphans"])
    return new_id


def orphans_of(txn, env, vol_id: int) -> list[int]:
    """Inodes of the volume's head unlinked while open, freed at its next mount."""
    prefix = schema.vol_prefix(vol_id)
    cursor = txn.cursor(db=env.orphans)
    out = []
    if cursor.set_range(prefix):
        for key, _ in cursor:
            if not bytes(key).startswith(prefix):
                break
            out.append(schema.split_vol_gen_key(bytes(key))[1])
    return out


def _set_orphans(txn, env, vol_id: int, inos) -> None:
    """The head's orphans become `inos`: those of the snapshot the head now reads as."""
    _delete_prefix(txn, env.orphans, schema.vol_prefix(vol_id))
    for ino in inos:
        txn.put(schema.orphan_key(vol_id, ino), b"", db=env.orphans)


def _snapshot_record(txn, env, vol_id: int, gen: int) -> dict:
    return schema.unpack_snapshot(bytes(txn.get(schema.snapshot_key(vol_id, gen), db=env.snapshots)))


# --- holds ------------------------------------------------------------------------------------
# A hold is keyed by (volume, generation), so renaming a held snapshot keeps it held.

def hold_of(txn, env, vol_id: int, gen: int) -> Optional[dict]:
    raw = txn.get(schema.hold_key(vol_id, gen), db=env.holds)
    return None if raw is None else schema.unpack_hold(bytes(raw))


def hold(txn, env, vol_id: int, vol_name: str, snap: str, reason: str) -> dict:
    """Hold a snapshot; {"target", "reason", "was_held"}."""
    gen = snapshot_gen(txn, env, vol_id, vol_name, snap)
    previous = hold_of(txn, env, vol_id, gen)
    txn.put(schema.hold_key(vol_id, gen), schema.pack_hold(time.time_ns(), reason), db=env.holds)
    return dict(target=f"{vol_name}@{snap}", reason=reason, was_held=previous is not None)


def release(txn, env, vol_id: int, vol_name: str, snap: str) -> dict:
    gen = snapshot_gen(txn, env, vol_id, vol_name, snap)
    if not txn.delete(schema.hold_key(vol_id, gen), db=env.holds):
        raise NotFoundError(f"snapshot {vol_name}@{snap} is not held; nothing to release")
    return dict(target=f"{vol_name}@{snap}")


def _refuse_if_held(txn, env, vol_id: int, gen: int, target: str) -> None:
    held = hold_of(txn, env, vol_id, gen)
    if held is not None:
        because = f" ({held['reason']})" if held["reason"] else ""
        raise BusyError(f"snapshot {target} is held{because}; release it first with "
                        f"'cowfs release STORE {target}'")


# --- freeing ---------------------------------------------------------------------------------

def _dead_versions(txn, env, vol_id: int, lo: int, hi: int, next_point: Optional[int]):
    """Versions born in (lo, hi] that no point >= next_point can see."""
    cursor = txn.cursor(db=env.records)
    born = txn.cursor(db=env.born)
    start, end = schema.born_range(vol_id, lo, hi)
    if not born.set_range(start):
        return
    for key, _ in born:
        key = bytes(key)
        if key >= end:
            return
        _vol, gen, kind, record_key = schema.split_born_key(key)
        if next_point is not None:
            newest = catalog._newest_version(cursor, vol_id, kind, record_key, next_point)
            if newest is not None and newest[0] == gen:
                continue
        raw = txn.get(schema.versioned_key(vol_id, kind, record_key, gen), db=env.records)
        yield gen, kind, record_key, bytes(raw)


def _free(txn, env, vol_id: int, dead, batch) -> int:
    dead = list(dead)
    for gen, kind, record_key, raw in dead:
        txn.delete(schema.versioned_key(vol_id, kind, record_key, gen), db=env.records)
        txn.delete(schema.born_key(vol_id, gen, kind, record_key), db=env.born)
        if kind == schema.KIND_CHUNK and raw[:1] == schema.TAG_LIVE:
            batch.unref(raw[1:])
    return len(dead)


def _neighbours(txn, env, vol_id: int, gen: int) -> tuple[int, Optional[int]]:
    """The kept points either side of `gen` (0 and None at the ends), by two
    cursor seeks: `list` and `df` ask this for every snapshot, so it must
    not read them all each time (a year of hourly snapshots is 8760)."""
    prefix = schema.vol_prefix(vol_id)
    cursor = txn.cursor(db=env.snapshots)
    lo = 0
    # The entry before gen's key: step back from the first key >= it, or the
    # very last key when every key is smaller.
    found = cursor.prev() if cursor.set_range(schema.snapshot_key(vol_id, gen)) else cursor.last()
    if found and bytes(cursor.key()).startswith(prefix):
        lo = schema.split_vol_gen_key(bytes(cursor.key()))[1]
    if cursor.set_range(schema.snapshot_key(vol_id, gen + 1)) and bytes(cursor.key()).startswith(prefix):
        return lo, schema.split_vol_gen_key(bytes(cursor.key()))[1]
    record = volumes.volume_record(txn, env, vol_id)
    head_is_next = not record["flags"] & FLAG_HIDDEN and record["head_gen"] > gen
    return lo, record["head_gen"] if head_is_next else None


def _dead_for_point(txn, env, vol_id: int, gen: int):
    lo, nxt = _neighbours(txn, env, vol_id, gen)
    return _dead_versions(txn, env, vol_id, lo, gen, nxt)


def _all_versions(txn, env, vol_id: int):
    prefix = schema.vol_prefix(vol_id)
    cursor = txn.cursor(db=env.records)
    if not cursor.set_range(prefix):
        return
    for key, raw in cursor:
        key = bytes(key)
        if not key.startswith(prefix):
            return
        _vol, kind, record_key, gen = schema.split_versioned_key(key)
        yield gen, kind, record_key, bytes(raw)


def bytes_freed(txn, env, dead) -> int:
    """Chunk bytes whose last reference is among `dead` versions."""
    refs = collections.Counter(raw[1:] for _g, kind, _k, raw in dead
                               if kind == schema.KIND_CHUNK and raw[:1] == schema.TAG_LIVE)
    total = 0
    for chunk_id, count in refs.items():
        _pack, _off, length, refcount = schema.unpack_chunk(txn.get(chunk_id, db=env.chunks))
        if refcount == count:
            total += length
    return total


def would_free_snapshot(txn, env, vol_id: int, gen: int) -> int:
    if dependents(txn, env, vol_id, gen):
        return 0
    return bytes_freed(txn, env, list(_dead_for_point(txn, env, vol_id, gen)))


def would_free_snapshots(txn, env, vol_id: int, gens) -> int:
    """Exact chunk bytes destroying all snapshots `gens` together frees.

    Not the sum of `would_free_snapshot`: a version two of them share is
    freed only when both go. Removing a run of adjacent points S1 < ... < Sk
    between remaining points P and N frees the versions born in (P, Sk] that
    N cannot see, which is what destroying them one by one does.
    """
    remove = {gen for gen in gens if not dependents(txn, env, vol_id, gen)}
    remaining = sorted(p for p in kept_points(txn, env, vol_id) if p not in remove)
    runs: dict[tuple[int, Optional[int]], int] = {}
    for gen in remove:
        at = bisect.bisect_left(remaining, gen)     # sorted: a year of hourly points stays fast
        lo = remaining[at - 1] if at else 0
        nxt = remaining[at] if at < len(remaining) else None
        runs[(lo, nxt)] = max(gen, runs.get((lo, nxt), 0))
    dead = []
    for (lo, nxt), hi in runs.items():
        dead.extend(_dead_versions(txn, env, vol_id, lo, hi, nxt))
    return bytes_freed(txn, env, dead)


def would_free_volume(txn, env, vol_id: int) -> int:
    """Bytes destroying the volume frees (its clones keep what they need)."""
    if _has_dependents(txn, env, vol_id):
        record = volumes.volume_record(txn, env, vol_id)
        dead = list(_dead_for_point(txn, env, vol_id, record["head_gen"]))
        return bytes_freed(txn, env, dead)   # snapshots are destroyed separately
    return bytes_freed(txn, env, list(_all_versions(txn, env, vol_id)))


def _has_dependents(txn, env, vol_id: int) -> bool:
    return any(dependents(txn, env, vol_id, gen) for gen, _ in snapshots_of(txn, env, vol_id))


def destroy_snapshot(txn, env, vol_id: int, vol_name: str, snap: str, batch) -> dict:
    """Remove a snapshot; a snapshot clones depend on only loses its name.

    Returns {"target", "kept_for"}: the clones whose data stays (empty: all freed)."""
    gen = snapshot_gen(txn, env, vol_id, vol_name, snap)
    _refuse_if_held(txn, env, vol_id, gen, f"{vol_name}@{snap}")
    holders = dependents(txn, env, vol_id, gen)
    txn.delete(schema.snapname_key(vol_id, snap), db=env.snapnames)
    if holders:
        record = _snapshot_record(txn, env, vol_id, gen)
        txn.put(schema.snapshot_key(vol_id, gen), schema.pack_snapshot(record["created_ns"], "",
                                                                       orphans=record["orphans"]),
                db=env.snapshots)
        return dict(target=f"{vol_name}@{snap}", kept_for=holders)
    _free(txn, env, vol_id, list(_dead_for_point(txn, env, vol_id, gen)), batch)
    _delete_snapshot_record(txn, env, vol_id, gen)
    _collect_hidden(txn, env, vol_id, batch)
    return dict(target=f"{vol_name}@{snap}", kept_for=[])


def destroy_volume(txn, env, vol_id: int, name: str, batch) -> dict:
    """Remove a volume and its snapshots; what its clones need stays, unnamed.

    Returns {"target", "kept_for"}: the clones whose data stays."""
    record = volumes.volume_record(txn, env, vol_id)
    for gen, snap in snapshots_of(txn, env, vol_id):
        _refuse_if_held(txn, env, vol_id, gen, f"{name}@{snap['name']}")
    txn.delete(name.encode(), db=env.volnames)
    _forget_lifecycle(txn, env, vol_id)
    if not _has_dependents(txn, env, vol_id):
        _remove_volume(txn, env, vol_id, batch)
        return dict(target=name, kept_for=[])
    _free(txn, env, vol_id, list(_dead_for_point(txn, env, vol_id, record["head_gen"])), batch)
    record["flags"] |= FLAG_HIDDEN
    record["name"] = f"{name}~destroyed-{vol_id}"
    volumes.put_volume_record(txn, env, vol_id, record)
    kept = []
    for gen, snap in snapshots_of(txn, env, vol_id):
        if snap["name"]:
            txn.delete(schema.snapname_key(vol_id, snap["name"]), db=env.snapnames)
        if dependents(txn, env, vol_id, gen):
            txn.put(schema.snapshot_key(vol_id, gen), schema.pack_snapshot(snap["created_ns"], "",
                                                                           orphans=snap["orphans"]),
                    db=env.snapshots)
            kept.extend(dependents(txn, env, vol_id, gen))
        else:
            _free(txn, env, vol_id, list(_dead_for_point(txn, env, vol_id, gen)), batch)
            _delete_snapshot_record(txn, env, vol_id, gen)
    return dict(target=name, kept_for=sorted(set(kept)))


def _delete_snapshot_record(txn, env, vol_id: int, gen: int) -> None:
    """The snapshot (vol_id, gen) is gone: its record and its cached content digest."""
    txn.delete(schema.snapshot_key(vol_id, gen), db=env.snapshots)
    txn.delete(schema.digest_key(vol_id, gen), db=env.digests)


def _forget_lifecycle(txn, env, vol_id: int) -> None:
    """A destroyed volume takes no more scheduled snapshots and needs no path index."""
    txn.delete(schema.policy_key(vol_id), db=env.policies)
    _delete_prefix(txn, env.paths, schema.vol_prefix(vol_id))
    _delete_prefix(txn, env.logs, schema.log_prefix(vol_id))


def _remove_volume(txn, env, vol_id: int, batch) -> None:
    """Delete every record, snapshot and name of a volume nobody depends on."""
    record = volumes.volume_record(txn, env, vol_id)
    _free(txn, env, vol_id, list(_all_versions(txn, env, vol_id)), batch)
    for gen, snap in snapshots_of(txn, env, vol_id):
        _delete_snapshot_record(txn, env, vol_id, gen)
        if snap["name"]:
            txn.delete(schema.snapname_key(vol_id, snap["name"]), db=env.snapnames)
    _delete_prefix(txn, env.orphans, schema.vol_prefix(vol_id))
    _delete_prefix(txn, env.holds, schema.vol_prefix(vol_id))
    _forget_lifecycle(txn, env, vol_id)
    txn.delete(schema.u64(vol_id), db=env.volumes)
    parent_id, parent_gen = record["parent_vol_id"], record["parent_gen"]
    if parent_id:
        _release_parent_snapshot(txn, env, parent_id, parent_gen, batch)


def _release_parent_snapshot(txn, env, vol_id: int, gen: int, batch) -> None:
    """The last clone of an unnamed snapshot is gone: free the snapshot too."""
    raw = txn.get(schema.snapshot_key(vol_id, gen), db=env.snapshots)
    if raw is None or schema.unpack_snapshot(bytes(raw))["name"] or dependents(txn, env, vol_id, gen):
        _collect_hidden(txn, env, vol_id, batch)
        return
    _free(txn, env, vol_id, list(_dead_for_point(txn, env, vol_id, gen)), batch)
    _delete_snapshot_record(txn, env, vol_id, gen)
    _collect_hidden(txn, env, vol_id, batch)


def _collect_hidden(txn, env, vol_id: int, batch) -> None:
    raw = txn.get(schema.u64(vol_id), db=env.volumes)
    if raw is None:
        return
    record = schema.unpack_volume(bytes(raw))
    if record["flags"] & FLAG_HIDDEN and not snapshots_of(txn, env, vol_id):
        _remove_volume(txn, env, vol_id, batch)


def _delete_prefix(txn, db, prefix: bytes) -> None:
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        while cursor.key().startswith(prefix):
            if not cursor.delete():
                break


# --- rollback and rename ----------------------------------------------------------------------

def rollback(txn, env, vol_id: int, vol_name: str, snap: str, batch) -> dict:
    """Make the head read as snapshot `snap`; the state before is kept as a snapshot.

    Returns {"volume", "snapshot", "undo"}: undo is the snapshot of the state before."""
    target_gen = snapshot_gen(txn, env, vol_id, vol_name, snap)
    undo_name = unique_name(txn, env, vol_id, time.strftime("pre-rollback-%Y%m%dT%H%M%SZ", time.gmtime()))
    old_head = take(txn, env, vol_id, undo_name)
    head_chain = catalog.volume_chain(txn, env, vol_id)
    target_chain = catalog.volume_chain(txn, env, vol_id, target_gen)
    changed = {(kind, record_key) for _g, kind, record_key, _raw
               in _dead_versions(txn, env, vol_id, target_gen, old_head, None)}
    for kind, record_key in sorted(changed):
        payload = catalog.get(txn, env, target_chain, kind, record_key)
        if payload is None:
            old = catalog.delete(txn, env, head_chain, kind, record_key)
        else:
            old = catalog.put(txn, env, head_chain, kind, record_key, payload)
            if kind == schema.KIND_CHUNK:
                batch.ref(payload)
        if old is not None and kind == schema.KIND_CHUNK:
            batch.unref(old)
    _set_orphans(txn, env, vol_id, _snapshot_record(txn, env, vol_id, target_gen)["orphans"])
    return dict(volume=vol_name, snapshot=snap, undo=undo_name)


def rename_volume(txn, env, old: str, new: str) -> None:
    volumes.check_name(new)
    vol_id = volumes.volume_id(txn, env, old)
    if txn.get(new.encode(), db=env.volnames) is not None:
        raise ExistsError(f"volume {new!r} already exists")
    record = volumes.volume_record(txn, env, vol_id)
    record["name"] = new
    volumes.put_volume_record(txn, env, vol_id, record)
    txn.delete(old.encode(), db=env.volnames)
    txn.put(new.encode(), schema.u64(vol_id), db=env.volnames)


def rename_snapshot(txn, env, vol_id: int, vol_name: str, old: str, new: str) -> None:
    volumes.check_name(new, "snapshot")
    gen = snapshot_gen(txn, env, vol_id, vol_name, old)
    if txn.get(schema.snapname_key(vol_id, new), db=env.snapnames) is not None:
        raise ExistsError(f"volume {vol_name} already has a snapshot {new!r}")
    record = _snapshot_record(txn, env, vol_id, gen)
    # A renamed snapshot is one somebody chose to keep: it stops being automatic,
    # so its schedule never prunes it.
    txn.put(schema.snapshot_key(vol_id, gen), schema.pack_snapshot(record["created_ns"], new,
                                                                   orphans=record["orphans"]),
            db=env.snapshots)
    txn.delete(schema.snapname_key(vol_id, old), db=env.snapnames)
    txn.put(schema.snapname_key(vol_id, new), schema.u64(gen), db=env.snapnames)


# --- accounting ----------------------------------------------------------------------------------

def logical_bytes(txn, env, chain) -> int:
    """Sum of file sizes visible through a chain: O(inodes), independent of data size."""
    total = 0
    for _key, raw in catalog.scan(txn, env, chain, schema.KIND_INODE, b""):
        attrs, _ = schema.unpack_inode(raw)
        if attrs["mode"] & 0o170000 == 0o100000:
            total += attrs["size"]
    return total


def logical_bytes_at(txn, env, vol_id: int, gens) -> dict[int, int]:
    """Logical bytes of a volume as of each of `gens`: one scan of the tree at
    the first, then, from one to the next, the size changes of the inode
    records born in between. O(inodes + changes), not O(gens x inodes): a
    volume with a year of hourly snapshots lists in O(snapshots)."""
    parents = catalog.volume_chain(txn, env, vol_id)[1:]
    out: dict[int, int] = {}
    prev, total = None, 0
    for gen in sorted(set(gens)):
        if prev is None:
            total = logical_bytes(txn, env, [(vol_id, gen)] + parents)
        else:
            total += _size_change(txn, env, vol_id, parents, prev, gen)
        out[gen], prev = total, gen
    return out


def _size_change(txn, env, vol_id: int, parents: list, lo: int, hi: int) -> int:
    """Sum of file size changes between generations lo and hi of a volume."""
    start, end = schema.born_range(vol_id, lo, hi)
    keys = set()
    born = txn.cursor(db=env.born)
    if born.set_range(start):
        for key, _ in born:
            key = bytes(key)
            if key >= end:
                break
            _vol, _gen, kind, record_key = schema.split_born_key(key)
            if kind == schema.KIND_INODE:
                keys.add(record_key)
    change = 0
    for record_key in keys:
        before = catalog.get(txn, env, [(vol_id, lo)] + parents, schema.KIND_INODE, record_key)
        after = catalog.get(txn, env, [(vol_id, hi)] + parents, schema.KIND_INODE, record_key)
        change += _file_size(after) - _file_size(before)
    return change


def _file_size(raw) -> int:
    if raw is None:
        return 0
    attrs, _ = schema.unpack_inode(raw)
    return attrs["size"] if attrs["mode"] & 0o170000 == 0o100000 else 0


def written_bytes(txn, env, vol_id: int, lo: int, hi: int) -> int:
    """Chunk bytes of chunk-map versions born in (lo, hi]: what was written in between."""
    total = 0
    born = txn.cursor(db=env.born)
    start, end = schema.born_range(vol_id, lo, hi)
    if not born.set_range(start):
        return 0
    for key, _ in born:
        key = bytes(key)
        if key >= end:
            break
        _vol, gen, kind, record_key = schema.split_born_key(key)
        if kind != schema.KIND_CHUNK:
            continue
        raw = txn.get(schema.versioned_key(vol_id, kind, record_key, gen), db=env.records)
        if raw[:1] == schema.TAG_LIVE:
            entry = txn.get(bytes(raw[1:]), db=env.chunks)
            total += schema.unpack_chunk(entry)[2]
    return total


def changed_keys(txn, env, vol_id: int, lo_gen: int, hi_gen: int) -> dict[bytes, set]:
    """Record keys of a volume with a version born in (lo_gen, hi_gen], per kind."""
    out = {kind: set() for kind in (schema.KIND_INODE, schema.KIND_DENTRY, schema.KIND_CHUNK,
                                    schema.KIND_XATTR)}
    start, end = schema.born_range(vol_id, lo_gen, hi_gen)
    cursor = txn.cursor(db=env.born)
    if not cursor.set_range(start):
        return out
    for key, _ in cursor:
        key = bytes(key)
        if key >= end:
            break
        _vol, _gen, kind, record_key = schema.split_born_key(key)
        out.setdefault(kind, set()).add(record_key)
    return out
