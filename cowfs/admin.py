"""Store administration: what the snapshot commands do, mounted or not.

A volume that is mounted read-write is reached through its daemon (the
daemon flushes and snapshots in one transaction, rule 5); an unmounted one
is changed in LMDB directly while holding its volume lock, so no daemon can
mount it halfway through.
"""

from typing import Optional

from . import control, logs, policy, schema, scheduling, snapshots, volumes
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


def snapshot(store: Store, target: str) -> dict:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the snapshot as VOLUME@NAME, e.g. {vol}@before-upgrade")
    _take(store, vol, snap)
    return dict(target=f"{vol}@{snap}")


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


def clone(store: Store, source: str, new_name: str) -> dict:
    """{"volume", "origin", "snapshot_taken"}: snapshot_taken when SOURCE was a volume."""
    vol, snap = snapshots.parse_target(source)
    volumes.check_name(new_name)
    vol_id = _vol_id(store, vol)
    with store.env.begin() as txn:
        if txn.get(new_name.encode(), db=store.env.volnames) is not None:
            raise snapshots.ExistsError(f"volume {new_name!r} already exists")
    taken = snap is None
    if snap is None:
        with store.env.begin() as txn:
            snap = snapshots.unique_name(txn, store.env, vol_id, f"clone-{new_name}")
        _take(store, vol, snap)
    with store.env.begin(write=True) as txn:
        gen = snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap)
        snapshots.clone(txn, store.env, vol_id, gen, new_name)
    return dict(volume=new_name, origin=f"{vol}@{snap}", snapshot_taken=taken)


def destroy(store: Store, target: str) -> dict:
    """{"target", "kept_for"} (see `snapshots.destroy_snapshot`); for a set of
    snapshots (VOL@A%B, VOL@A,B,...) see `destroy_set`."""
    vol, _, spec = target.partition("@")
    if "%" in spec or "," in spec:
        return destroy_set(store, vol, spec)
    vol, snap = snapshots.parse_target(target)
    vol_id = _vol_id(store, vol)
    batch = store.chunks.batch()
    if snap is not None:
        with store.env.begin() as txn:
            gen = snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap)
        with store.lock_snapshot(vol_id, gen, target, exclusive=True, holder="cowfs destroy"):
            with store.env.begin(write=True) as txn:
                result = snapshots.destroy_snapshot(txn, store.env, vol_id, vol, snap, batch)
                batch.apply(txn)
            scheduling.drop_lock_file(store, vol_id, gen)
        logs.remove(store.run_dir, target)               # of its read-only mounts
        store.chunks.reclaim(batch.freed_locations)      # the space comes back now, not at gc
        return result
    with _require_unmounted(store, vol_id, vol, "destroying it"):
        locks = _lock_all_snapshots(store, vol_id, vol)
        try:
            with store.env.begin(write=True) as txn:
                result = snapshots.destroy_volume(txn, store.env, vol_id, vol, batch)
                batch.apply(txn)
            for gen in locks:
                scheduling.drop_lock_file(store, vol_id, gen)
            _drop_log_file(store, vol_id)
            logs.remove(store.run_dir, vol)              # its daemon logs, its snapshot mounts' too
        finally:
            for lock in locks.values():
                lock.release()
    store.chunks.reclaim(batch.freed_locations)
    return result


def destroy_set(store: Store, vol: str, spec: str) -> dict:
    """Destroy the snapshots `spec` names (see `snapshots.select_snapshots`) in
    one transaction, after taking every one's exclusive lock: all or none.
    Returns {"volume", "destroyed", "kept_for" {name: clones}, "frees_bytes"}."""
    volumes.check_name(vol)
    vol_id = _vol_id(store, vol)
    with store.env.begin() as txn:
        points = [(gen, rec["name"]) for gen, rec in snapshots.snapshots_of(txn, store.env, vol_id)
                  if rec["name"]]
    chosen = snapshots.select_snapshots(points, spec, vol)
    locks = []
    try:
        for gen, name in chosen:
            locks.append(store.lock_snapshot(vol_id, gen, f"{vol}@{name}", exclusive=True,
                                             holder="cowfs destroy"))
        batch = store.chunks.batch()
        kept = {}
        with store.env.begin(write=True) as txn:
            frees = snapshots.would_free_snapshots(txn, store.env, vol_id, [gen for gen, _n in chosen])
            for _gen, name in chosen:
                result = snapshots.destroy_snapshot(txn, store.env, vol_id, vol, name, batch)
                if result["kept_for"]:
                    kept[name] = result["kept_for"]
            batch.apply(txn)
        for gen, name in chosen:
            scheduling.drop_lock_file(store, vol_id, gen)
            logs.remove(store.run_dir, f"{vol}@{name}")
    finally:
        for lock in locks:
            lock.release()
    store.chunks.reclaim(batch.freed_locations)
    return dict(volume=vol, destroyed=[name for _gen, name in chosen], kept_for=kept, frees_bytes=frees)


def _drop_log_file(store: Store, vol_id: int) -> None:
    """The destroyed volume's intent log: its state went with the commit, and
    volume ids are never reused, so a crash before this only leaves a file."""
    import os
    from . import intent_log
    try:
        os.unlink(intent_log.log_path(store.logs_dir, vol_id))
    except FileNotFoundError:
        pass


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


def rollback(store: Store, target: str) -> dict:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the snapshot to roll back to as VOLUME@NAME, e.g. {vol}@hourly-1")
    vol_id = _vol_id(store, vol)
    batch = store.chunks.batch()
    with _require_unmounted(store, vol_id, vol, "rolling it back"):
        with store.env.begin(write=True) as txn:
            result = snapshots.rollback(txn, store.env, vol_id, vol, snap, batch)
            batch.apply(txn)
    store.chunks.reclaim(batch.freed_locations)
    return result


def rename(store: Store, old: str, new: str) -> dict:
    """{"kind": "volume"|"snapshot", "old", "new"} with full names."""
    old_vol, old_snap = snapshots.parse_target(old)
    if old_snap is None:
        if "@" in new:
            raise UsageError("a volume is renamed to a volume name (no '@')")
        with store.env.begin(write=True) as txn:
            snapshots.rename_volume(txn, store.env, old_vol, new)
        return dict(kind="volume", old=old_vol, new=new)
    new_vol, new_snap = snapshots.parse_target(new if "@" in new else f"{old_vol}@{new}")
    if new_vol != old_vol:
        raise UsageError("a snapshot keeps its volume; rename it to VOLUME@NEWNAME of the same volume")
    vol_id = _vol_id(store, old_vol)
    with store.env.begin(write=True) as txn:
        snapshots.rename_snapshot(txn, store.env, vol_id, old_vol, old_snap, new_snap)
    return dict(kind="snapshot", old=old, new=f"{old_vol}@{new_snap}")


# --- holds and policies ---------------------------------------------------------------------

def _snapshot_target(target: str, verb: str) -> tuple[str, str]:
    vol, snap = snapshots.parse_target(target)
    if snap is None:
        raise UsageError(f"give the snapshot to {verb} as VOLUME@NAME, e.g. {vol}@before-upgrade")
    return vol, snap


def hold(store: Store, target: str, reason: str = "") -> dict:
    vol, snap = _snapshot_target(target, "hold")
    if "\n" in reason or len(reason) > 1000:
        raise UsageError("a hold reason is one line of at most 1000 characters")
    with store.env.begin(write=True) as txn:
        return snapshots.hold(txn, store.env, volumes.volume_id(txn, store.env, vol), vol, snap, reason)


def release(store: Store, target: str) -> dict:
    vol, snap = _snapshot_target(target, "release")
    with store.env.begin(write=True) as txn:
        return snapshots.release(txn, store.env, volumes.volume_id(txn, store.env, vol), vol, snap)


def set_policy(store: Store, vol: str, new: Optional[policy.Policy]) -> dict:
    """Store (or with None remove) the schedule of a volume; its daemon picks it up within a second."""
    with store.env.begin(write=True) as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        if new is None:
            if not policy.delete(txn, store.env, vol_id):
                raise UsageError(f"volume {vol} has no schedule; nothing to turn off")
            return dict(volume=vol, schedule=None)
        policy.put(txn, store.env, vol_id, new)
    return dict(volume=vol, schedule=new.describe())


# --- pruning -----------------------------------------------------------------------------------

def prune(store: Store, vol: str, dry_run: bool = False) -> dict:
    """Apply (or with dry_run only show) the retention of a volume's schedule.

    Safe while the volume is mounted: destroying a snapshot never touches
    versions the head sees, and the head's daemon writes at its own
    generation, which pruning does not change.
    """
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        doomed = scheduling.plan(txn, store.env, vol_id, vol)
        if dry_run:
            frees = snapshots.would_free_snapshots(txn, store.env, vol_id, [s.gen for s in doomed])
            return dict(volume=vol, dry_run=True, destroy=[scheduling.plan_row(vol, s) for s in doomed],
                        frees_bytes=frees, skipped=[])
    return scheduling.prune_volume(store, vol_id, vol)


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

def collect_garbage(store: Store, min_dead_fraction: float, progress=None) -> dict:
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
    return gc.collect(store, min_dead_fraction, progress)


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


# --- content digests -------------------------------------------------------------------------------

def content_digest(store: Store, target: str) -> dict:
    """The content digest of a snapshot (cached) or of a volume head now (a mounted one flushed
    first; an unmounted one's intent log was replayed when the store was opened by the CLI)."""
    from . import digest
    vol, snap = snapshots.parse_target(target)
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
        gen = None if snap is None else snapshots.snapshot_gen(txn, store.env, vol_id, vol, snap)
    if gen is None:
        flush_if_mounted(store, vol_id)
        value = digest.head_digest(store.env, vol_id)
    else:
        value = digest.snapshot_digests(store.env, [(vol_id, gen)])[(vol_id, gen)]
    return dict(name=target, digest=digest.to_hex(value))
