"""Store administration: what the snapshot commands do, mounted or not.

A volume that is mounted read-write is reached through its daemon (the
daemon flushes and snapshots in one transaction, rule 5); an unmounted one
is changed in LMDB directly while holding its volume lock, so no daemon can
mount it halfway through.
"""

import time
from typing import Optional

from . import control, policy, schema, snapshots, volumes
from .errors import BusyError, CowfsError, UsageError
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
            _drop_lock_file(store, vol_id, gen)
        store.chunks.reclaim(batch.freed_locations)      # the space comes back now, not at gc
        return message
    with _require_unmounted(store, vol_id, vol, "destroying it"):
        locks = _lock_all_snapshots(store, vol_id, vol)
        try:
            with store.env.begin(write=True) as txn:
                message = snapshots.destroy_volume(txn, store.env, vol_id, vol, batch)
                batch.apply(txn)
            for gen in locks:
                _drop_lock_file(store, vol_id, gen)
        finally:
            for lock in locks.values():
                lock.release()
    store.chunks.reclaim(batch.freed_locations)
    return message


def _lock_all_snapshots(store: Store, vol_id: int, vol: str) -> dict:
    """Exclusive locks of every snapshot of a volume: {gen: lock}."""
    locks = {}
    with store.env.begin() as txn:
        gens = [(gen, rec["name"]) for gen, rec in snapshots.snapshots_of(txn, store.env, vol_id)]
    try:
        for gen, name in gens:
            locks[gen] = store.lock_snapshot(vol_id, gen, f"{vol}@{name}", exclusive=True,
                                             holder="cowfs destroy")
    except BusyError:
        for lock in locks.values():
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
    store.chunks.reclaim(batch.freed_locations)
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


# --- holds and policies ---------------------------------------------------------------------

def _snapshot_target(target: str, verb: str) -> tuple[str, str]:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the snapshot to {verb} as VOLUME@NAME, e.g. {vol}@before-upgrade")
    return vol, snap


def hold(store: Store, target: str, reason: str = "") -> str:
    vol, snap = _snapshot_target(target, "hold")
    if "\n" in reason or len(reason) > 1000:
        raise UsageError("a hold reason is one line of at most 1000 characters")
    with store.env.begin(write=True) as txn:
        return snapshots.hold(txn, store.env, volumes.volume_id(txn, store.env, vol), vol, snap, reason)


def release(store: Store, target: str) -> str:
    vol, snap = _snapshot_target(target, "release")
    with store.env.begin(write=True) as txn:
        return snapshots.release(txn, store.env, volumes.volume_id(txn, store.env, vol), vol, snap)


def set_policy(store: Store, vol: str, new: Optional[policy.Policy]) -> str:
    """Store (or with None remove) the schedule of a volume; its daemon picks it up within a second."""
    with store.env.begin(write=True) as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        if new is None:
            if not policy.delete(txn, store.env, vol_id):
                raise UsageError(f"volume {vol} has no schedule; nothing to turn off")
            return f"schedule of {vol} turned off; its automatic snapshots stay until destroyed"
        policy.put(txn, store.env, vol_id, new)
    return f"schedule of {vol}: {new.describe()}"


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
    last_ns = last_auto_ns(txn, env, vol_id)
    return None if last_ns is None else _fmt_time(last_ns)


def last_auto_ns(txn, env, vol_id: int) -> Optional[int]:
    """Creation time of the most recently taken automatic snapshot (highest generation,
    so a clock that went back does not make an old timestamp look new)."""
    newest = None
    for _gen, rec in snapshots.snapshots_of(txn, env, vol_id):     # oldest first
        if rec["name"] and rec["flags"] & schema.SNAP_FLAG_AUTO:
            newest = rec["created_ns"]
    return newest


# --- pruning -----------------------------------------------------------------------------------

def snapshot_infos(txn, env, vol_id: int) -> list[policy.SnapInfo]:
    return [policy.SnapInfo(gen=gen, name=rec["name"], created_ns=rec["created_ns"],
                            auto=bool(rec["flags"] & schema.SNAP_FLAG_AUTO),
                            held=snapshots.hold_of(txn, env, vol_id, gen) is not None,
                            has_clones=bool(snapshots.dependents(txn, env, vol_id, gen)))
            for gen, rec in snapshots.snapshots_of(txn, env, vol_id) if rec["name"]]


def _plan(txn, env, vol_id: int, vol: str) -> tuple[policy.Policy, list[policy.SnapInfo]]:
    pol = policy.get(txn, env, vol_id)
    if pol is None:
        raise UsageError(f"volume {vol} has no schedule, so nothing is pruned; set one with "
                         f"'cowfs policy STORE {vol} --every 1h --keep 24'")
    return pol, policy.plan_prune(snapshot_infos(txn, env, vol_id), pol)


def prune(store: Store, vol: str, dry_run: bool = False) -> dict:
    """Apply (or with dry_run only show) the retention of a volume's schedule.

    Safe while the volume is mounted: destroying a snapshot never touches
    versions the head sees, and the head's daemon writes at its own
    generation, which pruning does not change.
    """
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        _pol, doomed = _plan(txn, store.env, vol_id, vol)
        if dry_run:
            frees = snapshots.would_free_snapshots(txn, store.env, vol_id, [s.gen for s in doomed])
            return dict(volume=vol, dry_run=True, destroy=[_plan_row(vol, s) for s in doomed],
                        frees_bytes=frees, skipped=[])
    return prune_volume(store, vol_id, vol)


def _plan_row(vol: str, info: policy.SnapInfo) -> dict:
    return dict(name=f"{vol}@{info.name}", created=_fmt_time(info.created_ns), gen=info.gen)


def prune_volume(store: Store, vol_id: int, vol: str) -> dict:
    """Destroy what the schedule no longer keeps, in one committed transaction (rule 4).

    Used by `cowfs prune` and by the daemon after each automatic snapshot.
    A snapshot mounted read-only (its lock is share-held) is skipped this
    time and pruned by a later run.
    """
    with store.env.begin() as txn:
        _pol, doomed = _plan(txn, store.env, vol_id, vol)
    locks, skipped = [], []
    for info in doomed:
        try:
            locks.append((info, store.lock_snapshot(vol_id, info.gen, f"{vol}@{info.name}",
                                                    exclusive=True, holder="cowfs prune")))
        except BusyError as exc:
            skipped.append(dict(name=f"{vol}@{info.name}", why=str(exc)))
    try:
        result = _destroy_locked(store, vol_id, vol, [info for info, _ in locks], skipped)
        for row in result["destroy"]:
            _drop_lock_file(store, vol_id, row["gen"])
        return result
    finally:
        for _info, lock in locks:
            lock.release()


def _drop_lock_file(store: Store, vol_id: int, gen: int) -> None:
    """Unlink a destroyed snapshot's lock file, while we hold its exclusive lock.

    Otherwise one file per automatic snapshot would stay in run/ forever.
    Generations are never reused, so no later snapshot needs this path; a
    mount racing us fails to find the snapshot by name.
    """
    import os
    try:
        os.unlink(store.snapshot_lock_path(vol_id, gen))
    except FileNotFoundError:
        pass


def _destroy_locked(store: Store, vol_id: int, vol: str, locked: list, skipped: list) -> dict:
    batch = store.chunks.batch()
    destroyed = []
    with store.env.begin(write=True) as txn:
        # Re-plan inside the write transaction: a hold, clone or prune that
        # landed since the plan above wins.
        _pol, doomed = _plan(txn, store.env, vol_id, vol)
        still = {info.gen for info in doomed}
        todo = [info for info in locked if info.gen in still]
        frees = snapshots.would_free_snapshots(txn, store.env, vol_id, [i.gen for i in todo])
        for info in todo:
            snapshots.destroy_snapshot(txn, store.env, vol_id, vol, info.name, batch)
            destroyed.append(_plan_row(vol, info))
        batch.apply(txn)
    store.chunks.reclaim(batch.freed_locations)
    return dict(volume=vol, dry_run=False, destroy=destroyed, frees_bytes=frees, skipped=skipped)


def run_schedule(store: Store, vol: str, now_ns: int) -> Optional[str]:
    """One scheduler step for an *unmounted* volume with an injected clock.

    Takes the automatic snapshot if due (named and dated by `now_ns`), then
    prunes. The daemon of a mounted volume does the same with the real clock
    (`daemon._scheduler`). Returns the new snapshot's name, or None.
    """
    vol_id = _vol_id(store, vol)
    with _require_unmounted(store, vol_id, vol, "running its schedule here"):
        with store.env.begin(write=True) as txn:
            pol = policy.get(txn, store.env, vol_id)
            if pol is None or not policy.is_due(pol, last_auto_ns(txn, store.env, vol_id), now_ns):
                return None
            name = free_snapshot_name(txn, store.env, vol_id, policy.auto_name(now_ns))
            snapshots.take(txn, store.env, vol_id, name, created_ns=now_ns, flags=schema.SNAP_FLAG_AUTO)
        prune_volume(store, vol_id, vol)
    return name


def free_snapshot_name(txn, env, vol_id: int, base: str) -> str:
    """`base`, or `base-2`, `base-3`... if taken (two ticks in one millisecond)."""
    name, n = base, 1
    while txn.get(schema.snapname_key(vol_id, name), db=env.snapnames) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def flush_if_mounted(store: Store, vol_id: int) -> bool:
    """Ask the daemon of a mounted volume to commit every acknowledged write.

    Used before reading a volume head from another process (diff), so the
    head read includes what applications were told is written. Without a
    control socket the volume is not mounted read-write and LMDB is current.
    """
    import os
    if not os.path.exists(os.path.join(store.run_dir, control.socket_name(vol_id))):
        return False
    try:
        control.request(store.run_dir, vol_id, dict(op="flush"))
    except BusyError:
        # A socket left by a crashed daemon: nothing is buffered anywhere.
        lock = _try_lock(store, vol_id, f"volume id {vol_id}", "cowfs diff")
        if lock is None:
            raise
        lock.release()
        return False
    return True


# --- gc ----------------------------------------------------------------------------------------

def collect_garbage(store: Store, min_dead_fraction: float) -> dict:
    """gc, after asking every mounted volume's daemon to close the pack it
    appends to: gc cannot touch that pack, and after a big delete it may
    hold most of the dead bytes."""
    import os
    from . import gc
    with store.env.begin() as txn:
        vol_ids = [vol_id for _name, vol_id in volumes.list_volumes(txn, store.env)]
    for vol_id in vol_ids:
        if os.path.exists(os.path.join(store.run_dir, control.socket_name(vol_id))):
            try:
                control.request(store.run_dir, vol_id, dict(op="release-pack"), timeout_s=60.0)
            except CowfsError:
                pass        # a crashed daemon's socket, or one too busy: its pack waits
    return gc.collect(store, min_dead_fraction)


# --- diff ---------------------------------------------------------------------------------------

def diff(store: Store, text_a: str, text_b: str) -> dict:
    """Changes between two points of one volume; a head is read after its daemon flushed."""
    from . import diff as diff_mod
    with store.env.begin() as txn:
        a = diff_mod.resolve_point(txn, store.env, text_a)
        b = diff_mod.resolve_point(txn, store.env, text_b)
    diff_mod.check_same_volume(a, b)
    if a.is_head or b.is_head:
        flush_if_mounted(store, a.vol_id)
    index_stats = dict(index_built=0, index_replayed=0)
    with store.env.begin() as txn:
        stale = diff_mod.index_is_stale(txn, store.env, a.vol_id)
    if stale:       # write transactions only when there is something to index
        index_stats = diff_mod.refresh_index(store.env, a.vol_id)
    with store.env.begin() as txn:
        # Re-resolve: a head read now includes what the flush committed.
        a = diff_mod.resolve_point(txn, store.env, text_a)
        b = diff_mod.resolve_point(txn, store.env, text_b)
        report = diff_mod.compare(txn, store.env, a, b, store.chunk_size)
    report["stats"].update(index_stats)
    return {"from": a.label, "to": b.label, **report}


# --- reporting ---------------------------------------------------------------------------------

def _fmt_time(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def listing(store: Store) -> list[dict]:
    """Volumes and their snapshots with origin, time and space figures."""
    from . import digest
    env = store.env
    rows = []
    with env.begin() as txn:
        named = [(vol_id, gen) for _name, vol_id in volumes.list_volumes(txn, env)
                 for gen, snap in snapshots.snapshots_of(txn, env, vol_id) if snap["name"]]
    digests = digest.snapshot_digests(env, named)      # cached after the first time
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
    from . import catalog, digest
    record = volumes.volume_record(txn, env, vol_id)
    rows = []
    prev_gen = 0
    for gen, snap in snapshots.snapshots_of(txn, env, vol_id):
        if snap["name"]:
            held = snapshots.hold_of(txn, env, vol_id, gen)
            rows.append(dict(
                name=f"{name}@{snap['name']}", type="snapshot", origin=None,
                created=_fmt_time(snap["created_ns"]), created_ns=snap["created_ns"], gen=gen,
                logical_bytes=snapshots.logical_bytes(txn, env, catalog.volume_chain(txn, env, vol_id, gen)),
                written_bytes=snapshots.written_bytes(txn, env, vol_id, prev_gen, gen),
                unique_bytes=snapshots.would_free_snapshot(txn, env, vol_id, gen),
                clones=snapshots.dependents(txn, env, vol_id, gen),
                auto=bool(snap["flags"] & schema.SNAP_FLAG_AUTO), held=held is not None,
                hold_reason=None if held is None else held["reason"],
                held_since=None if held is None else _fmt_time(held["created_ns"]),
                digest=digest.to_hex(digests[(vol_id, gen)]) if (vol_id, gen) in digests else None))
        prev_gen = gen
    head = record["head_gen"]
    rows.insert(0, dict(
        name=name, type="volume", origin=_origin(txn, env, record), created=_fmt_time(record["created_ns"]),
        created_ns=record["created_ns"], gen=head, logical_bytes=snapshots.logical_bytes(txn, env, catalog.volume_chain(txn, env, vol_id)),
        written_bytes=snapshots.written_bytes(txn, env, vol_id, prev_gen, head),
        unique_bytes=snapshots.bytes_freed(txn, env, list(snapshots._dead_for_point(txn, env, vol_id, head))),
        clones=[], auto=False, held=False, hold_reason=None, held_since=None,
        policy=_policy_text(txn, env, vol_id), digest=None))
    return rows


def _policy_text(txn, env, vol_id: int) -> Optional[str]:
    pol = policy.get(txn, env, vol_id)
    return None if pol is None else pol.describe()


def df(store: Store) -> dict:
    """Store totals, what holds space, and per volume and snapshot the exact
    bytes destroying it frees.

    `snapshot_held_bytes`: chunk bytes that only snapshots still reference
    (deleted or overwritten in every volume head since): destroying every
    snapshot without clones frees exactly this much."""
    env = store.env
    with env.begin() as txn:
        chunk_bytes = referenced = chunks = 0
        for _key, raw in txn.cursor(db=env.chunks):
            _pack, _off, length, refcount = schema.unpack_chunk(bytes(raw))
            chunk_bytes += length
            referenced += length * refcount
            chunks += 1
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
    pack_bytes = sum(store.packs.disk_bytes(p) for p in store.packs.pack_ids())
    return dict(chunk_bytes=chunk_bytes, chunks=chunks, referenced_bytes=referenced,
                pack_bytes=pack_bytes, garbage_bytes=max(pack_bytes - chunk_bytes, 0),
                snapshot_held_bytes=snapshot_held,
                filesystem=store.packs.space.figures(),
                dedup_ratio=round(referenced / chunk_bytes, 3) if chunk_bytes else 1.0, items=items)


# --- content digests -------------------------------------------------------------------------------

def content_digest(store: Store, target: str) -> dict:
    """The content digest of a snapshot (cached) or of a volume head now (a mounted one flushed first)."""
    from . import digest
    vol, snap = snapshots.parse_target(target)
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        gen = None if snap is None else snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap)
    if gen is None:
        flush_if_mounted(store, vol_id)      # (unmounted: the intent log's replay goes here, issue 14)
        value = digest.head_digest(store.env, vol_id)
    else:
        value = digest.snapshot_digests(store.env, [(vol_id, gen)])[(vol_id, gen)]
    return dict(name=target, digest=digest.to_hex(value))
