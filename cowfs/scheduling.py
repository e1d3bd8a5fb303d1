"""Scheduled snapshots and retention: one step, used by the daemon and by tests.

`step` takes the automatic snapshot of a volume if its policy says one is
due, then prunes what the policy no longer keeps. The daemon of a mounted
volume runs it on every tick with the real clock and a `take` that goes
through its filesystem (flush and snapshot in one transaction, rule 5);
`run_schedule` runs it for an unmounted volume with an injected clock.
`prune_volume` is also what `cowfs prune` runs. The retention math itself is
pure (`policy.plan_prune`).
"""

import logging
import os
from typing import Callable, Optional

from . import policy, schema, snapshots, volumes
from .errors import BusyError, UsageError
from .store import Store

log = logging.getLogger(__name__)

# Figures of this process's scheduler (one daemon per process), for `stats`.
_figures = dict(scheduled_snapshots_total=0, pruned_snapshots_total=0, pruned_bytes_total=0)


def figures() -> dict:
    return dict(_figures)


# --- when ----------------------------------------------------------------------------------

def last_auto_ns(txn, env, vol_id: int) -> Optional[int]:
    """Creation time of the most recently taken automatic snapshot (highest generation,
    so a clock that went back does not make an old timestamp look new)."""
    newest = None
    for _gen, rec in snapshots.snapshots_of(txn, env, vol_id):     # oldest first
        if rec["name"] and rec["flags"] & schema.SNAP_FLAG_AUTO:
            newest = rec["created_ns"]
    return newest


def due(store: Store, vol_id: int, now_ns: int) -> tuple[Optional[policy.Policy], bool]:
    """(the volume's policy or None, whether an automatic snapshot is due now)."""
    with store.env.begin() as txn:
        pol = policy.get(txn, store.env, vol_id)
        if pol is None:
            return None, False
        return pol, policy.is_due(pol, last_auto_ns(txn, store.env, vol_id), now_ns)


def next_due_ns(txn, env, vol_id: int, now_ns: int) -> Optional[int]:
    """When the next automatic snapshot is due (now if overdue), or None without a schedule."""
    pol = policy.get(txn, env, vol_id)
    if pol is None:
        return None
    last_ns = last_auto_ns(txn, env, vol_id)
    if last_ns is None or now_ns < last_ns:
        return now_ns
    return max(now_ns, last_ns + pol.every_s * 1_000_000_000)


# --- one step ----------------------------------------------------------------------------------

def step(store: Store, vol_id: int, now_ns: int, take: Callable[[str], None]) -> Optional[dict]:
    """Take the due automatic snapshot with `take(name)`, then prune; None if none was due.

    `take` must record the snapshot with the auto flag in the same
    transaction as the snapshot itself, so a crash never leaves a scheduled
    snapshot that looks manual.
    """
    _pol, is_due = due(store, vol_id, now_ns)
    if not is_due:
        return None
    with store.env.begin() as txn:
        name = snapshots.unique_name(txn, store.env, vol_id, policy.auto_name(now_ns))
        vol_name = volumes.volume_record(txn, store.env, vol_id)["name"]
    take(name)
    _figures["scheduled_snapshots_total"] += 1
    pruned = prune_volume(store, vol_id, vol_name)
    _figures["pruned_snapshots_total"] += len(pruned["destroy"])
    _figures["pruned_bytes_total"] += pruned["frees_bytes"]
    log.info("scheduled snapshot %s@%s; pruned %d (%d bytes freed)%s", vol_name, name,
             len(pruned["destroy"]), pruned["frees_bytes"],
             f", {len(pruned['skipped'])} in use" if pruned["skipped"] else "")
    return dict(name=name, volume=vol_name, pruned=pruned)


def run_schedule(store: Store, vol: str, now_ns: int) -> Optional[str]:
    """One step for an *unmounted* volume with an injected clock (named and dated
    by `now_ns`); returns the new snapshot's name, or None."""
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, vol)
    try:
        lock = store.lock_volume(vol_id, vol, "cowfs schedule")
    except BusyError:
        raise BusyError(f"volume {vol} is mounted; its daemon runs its schedule") from None

    def take(name: str) -> None:
        with store.env.begin(write=True) as txn:
            snapshots.take(txn, store.env, vol_id, name, created_ns=now_ns, flags=schema.SNAP_FLAG_AUTO)
    with lock:
        done = step(store, vol_id, now_ns, take)
    return None if done is None else done["name"]


# --- pruning -------------------------------------------------------------------------------------

def snapshot_infos(txn, env, vol_id: int) -> list[policy.SnapInfo]:
    return [policy.SnapInfo(gen=gen, name=rec["name"], created_ns=rec["created_ns"],
                            auto=bool(rec["flags"] & schema.SNAP_FLAG_AUTO),
                            held=snapshots.hold_of(txn, env, vol_id, gen) is not None,
                            has_clones=bool(snapshots.dependents(txn, env, vol_id, gen)))
            for gen, rec in snapshots.snapshots_of(txn, env, vol_id) if rec["name"]]


def plan(txn, env, vol_id: int, vol: str) -> list[policy.SnapInfo]:
    """The automatic snapshots the volume's policy no longer keeps."""
    pol = policy.get(txn, env, vol_id)
    if pol is None:
        raise UsageError(f"volume {vol} has no schedule, so nothing is pruned; set one with "
                         f"'cowfs policy STORE {vol} --every 1h --keep 24'")
    return policy.plan_prune(snapshot_infos(txn, env, vol_id), pol)


def plan_row(vol: str, info: policy.SnapInfo) -> dict:
    return dict(name=f"{vol}@{info.name}", created=policy.fmt_utc(info.created_ns), gen=info.gen)


def prune_volume(store: Store, vol_id: int, vol: str) -> dict:
    """Destroy what the schedule no longer keeps, in one committed transaction (rule 4).

    Used by `cowfs prune` and after each automatic snapshot. A snapshot
    mounted read-only (its lock is share-held) is skipped this time and
    pruned by a later run.
    """
    with store.env.begin() as txn:
        doomed = plan(txn, store.env, vol_id, vol)
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
            drop_lock_file(store, vol_id, row["gen"])
        return result
    finally:
        for _info, lock in locks:
            lock.release()


def drop_lock_file(store: Store, vol_id: int, gen: int) -> None:
    """Unlink a destroyed snapshot's lock file, while we hold its exclusive lock.

    Otherwise one file per automatic snapshot would stay in run/ forever.
    Generations are never reused, so no later snapshot needs this path; a
    mount racing us fails to find the snapshot by name.
    """
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
        still = {info.gen for info in plan(txn, store.env, vol_id, vol)}
        todo = [info for info in locked if info.gen in still]
        frees = snapshots.would_free_snapshots(txn, store.env, vol_id, [i.gen for i in todo])
        for info in todo:
            snapshots.destroy_snapshot(txn, store.env, vol_id, vol, info.name, batch)
            destroyed.append(plan_row(vol, info))
        batch.apply(txn)
    store.chunks.reclaim(batch.freed_locations)
    return dict(volume=vol, dry_run=False, destroy=destroyed, frees_bytes=frees, skipped=skipped)
