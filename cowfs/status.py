"""What runs: every mounted cowfs volume, its daemon's figures, what is wrong.

Sources, none of which can hang on a stuck FUSE daemon:

* the mount table and the registry (`mounting.cowfs_mounts`): mount point,
  daemon pid, start time;
* the daemon's ``stats`` answer over its control socket, with a timeout:
  its ``figures`` dict is passed through untouched (a figure the daemon adds
  shows up in `cowfs status` and `cowfs metrics` without changes here), the
  fsync latency histogram, why the volume stopped, its last error;
* the store (LMDB, read only): last snapshot, next scheduled snapshot.

A volume that is not mounted (with STORE given) says why, from its log or
its service, and what to do. Returns data; the CLI words it.
"""

import os
import time
from typing import Optional

from . import control, logs, mounting, policy, scheduling, service, snapshots, volumes
from .errors import CowfsError
from .store import Store

STATS_TIMEOUT_S = 10.0
CLEAN_EXIT = "every buffered write is committed"      # the daemon's last line after a clean unmount


def gather(store_path: Optional[str] = None, now_ns: Optional[int] = None) -> dict:
    """{"mounts": [...], "unmounted": [...]}: every cowfs mount (of STORE, if given),
    and with STORE its volumes that are not mounted."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    store_path = None if store_path is None else os.path.abspath(store_path)
    mounts = [_mount_row(m, now_ns) for m in mounting.cowfs_mounts()]
    if store_path is not None:
        mounts = [m for m in mounts if m["store"] == store_path]
    by_store: dict = {}
    for row in mounts:
        by_store.setdefault(row["store"], []).append(row)
    if store_path is not None:
        by_store.setdefault(store_path, [])
    unmounted = []
    for path, rows in by_store.items():
        unmounted += _add_store_facts(path, rows, now_ns, list_unmounted=path == store_path)
    return dict(mounts=mounts, unmounted=unmounted)


def healthy(report: dict) -> bool:
    return all(m["state"] in ("mounted", "read-only") for m in report["mounts"])


# --- mounted volumes -----------------------------------------------------------------------

def _mount_row(entry: dict, now_ns: int) -> dict:
    info = entry["registry"] or {}
    row = dict(mountpoint=entry["mountpoint"], store=info.get("store"), volume=info.get("volume"),
               pid=info.get("pid"), read_only=bool(info.get("read_only")), state="mounted",
               started=None, uptime_s=None, figures={}, fsync_latency=None, problem=None,
               action=None, last_error=None)
    if info.get("started_ns"):
        row["started"] = policy.fmt_utc(info["started_ns"])
        row["uptime_s"] = round((now_ns - info["started_ns"]) / 1e9, 1)
    if not info or not mounting.pid_alive(info["pid"]):
        return _dead(row)
    if row["read_only"]:
        row["state"] = "read-only"
        return row
    return _ask_daemon(row)


def _dead(row: dict) -> dict:
    who = f"its daemon (pid {row['pid']})" if row["pid"] else "no daemon"
    row.update(state="dead", problem=f"{who} is gone; the mount answers nothing "
                                     "('Transport endpoint is not connected')",
               action=f"fusermount3 -u -z {row['mountpoint']}, then mount again "
                      "(a service restarts by itself); the daemon's log says why it ended")
    return row


def _ask_daemon(row: dict) -> dict:
    try:
        store = Store.open(row["store"])
        try:
            vol_id = _vol_id(store, row["volume"])
        finally:
            store.close()
        stats = control.request(os.path.join(row["store"], "run"), vol_id, dict(op="stats"),
                                timeout_s=STATS_TIMEOUT_S)
    except CowfsError as exc:
        row.update(state="not answering", problem=str(exc),
                   action=f"look at its log ({logs.log_path(os.path.join(row['store'], 'run'), row['volume'])})")
        return row
    # A daemon of an older cowfs answers without `figures`: its numbers then.
    figures = stats.get("figures") or {k: v for k, v in stats.items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "pid"}
    row.update(figures=figures, fsync_latency=stats.get("fsync_latency"),
               last_error=stats.get("last_error"))
    if stats.get("stopped"):
        row.update(state="stopped writes", problem=stats["stopped"],
                   action="unmount it, fix the disk, mount again (writes after the last successful "
                          "fsync are lost)")
    return row


def _vol_id(store: Store, name: str) -> int:
    with store.env.begin() as txn:
        return volumes.volume_id(txn, store.env, name)


# --- facts from the store ------------------------------------------------------------------

def _add_store_facts(store_path: str, rows: list, now_ns: int, list_unmounted: bool) -> list:
    """Snapshot facts into the rows of one store; its unmounted volumes if asked."""
    try:
        store = Store.open(store_path)
    except CowfsError:
        return []                    # the store moved or is damaged; the mounts say enough
    try:
        with store.env.begin() as txn:
            names = dict(volumes.list_volumes(txn, store.env))
            for row in rows:
                vol = (row["volume"] or "").partition("@")[0]
                if vol in names:
                    row.update(_snapshot_facts(txn, store.env, names[vol], now_ns))
            mounted = {row["volume"] for row in rows}
            return [_unmounted_row(store_path, name, txn, store.env, names[name], now_ns)
                    for name in names if list_unmounted and name not in mounted]
    finally:
        store.close()


def _snapshot_facts(txn, env, vol_id: int, now_ns: int) -> dict:
    named = [(gen, rec) for gen, rec in snapshots.snapshots_of(txn, env, vol_id) if rec["name"]]
    last = named[-1][1] if named else None
    pol = policy.get(txn, env, vol_id)
    next_ns = scheduling.next_due_ns(txn, env, vol_id, now_ns)
    return dict(snapshots=len(named),
                last_snapshot=None if last is None else dict(name=last["name"],
                                                             created=policy.fmt_utc(last["created_ns"])),
                schedule=None if pol is None else pol.describe(),
                next_snapshot=None if next_ns is None else policy.fmt_utc(next_ns))


def _unmounted_row(store_path: str, name: str, txn, env, vol_id: int, now_ns: int) -> dict:
    row = dict(store=store_path, volume=name, state="not mounted", **_snapshot_facts(txn, env, vol_id, now_ns))
    units = [u for u in service.installed() if u.get("store") == store_path and u.get("volume") == name]
    last = _last_log_event(os.path.join(store_path, "run"), name)
    if units:
        unit = units[0]["unit"]
        row.update(why=f"its service {unit} is installed but not running"
                       + (f"; last log line: {last}" if last else ""),
                   action=f"systemctl status {unit}; journalctl -u {unit}; systemctl start {unit}")
    elif last is None:
        row.update(why="never mounted here (no log)", action=f"cowfs mount {store_path} MOUNTPOINT --volume {name}")
    else:
        clean = CLEAN_EXIT in last
        row.update(why=("unmounted cleanly" if clean else "its daemon did not end cleanly (killed?)")
                       + f"; last log line: {last}",
                   action=f"cowfs mount {store_path} MOUNTPOINT --volume {name}")
    return row


def _last_log_event(run_dir: str, volume: str) -> Optional[str]:
    """The last line of a volume's daemon log (how its last mount ended)."""
    try:
        with open(logs.log_path(run_dir, volume), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1] if lines else None
