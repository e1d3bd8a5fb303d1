"""`cowfs pg rehearse-upgrade`: the whole upgrade on a clone, while the live cluster serves.

    snapshot-live   VOL@rehearsal-<time>; through VOL's daemon when mounted
                    (rule 5: every write acknowledged before is in it)
    clone           VOL-rehearsal-<time> from that snapshot
    mount-clone     in a workspace under /tmp
    ...             the upgrade steps of `upgrade.Upgrader`, each followed by
                    a snapshot of the clone

The live volume is only ever read through that one snapshot; the live server
is never contacted. What stays afterwards, by design, is named in the report:
the snapshot VOL@rehearsal-<time> and the clone volume with its step
snapshots (both are what a person wants to inspect after a failure; `cowfs
destroy STORE CLONE` then `cowfs destroy STORE VOL@rehearsal-...` remove
them). With ``keep`` the clone also stays mounted and, if the rehearsal
passed, the new server stays running on it.
"""

import time
from dataclasses import dataclass
from typing import Optional

from .. import admin
from ..errors import CowfsError, NotFoundError
from ..store import Store
from .report import Report
from .upgrade import (Upgrader, UpgradePlan, check_data_dir, check_pgdata, check_versions,
                      read_check_sql)
from .workspace import Workspace, terminate_cleanly


@dataclass
class RehearsalOptions:
    store: str
    volume: str
    pgdata: str
    old_bin: str
    new_bin: str
    check_sql_path: Optional[str] = None
    database: str = "postgres"
    port: Optional[int] = None
    keep: bool = False
    clone_name: Optional[str] = None


def stamp() -> str:
    """A UTC time for names: sortable, unique enough for one person's commands."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() // 1_000_000 % 1000:03d}"


def rehearse(opts: RehearsalOptions) -> Report:
    """Run the rehearsal; the report says what passed, what failed and what remains."""
    pgdata = check_pgdata(opts.pgdata)
    old_major, new_major = check_versions(opts.old_bin, opts.new_bin)
    check_sql = read_check_sql(opts.check_sql_path)
    store = Store.open(opts.store)
    try:
        _check_volume(store, opts.volume)
        when = stamp()
        clone = opts.clone_name or f"{opts.volume}-rehearsal-{when}"
        report = Report("rehearse-upgrade")
        report.facts.update(volume=opts.volume, clone=clone, old_major=old_major,
                            new_major=new_major)
        ws = Workspace()
        plan = UpgradePlan(store=store, clone=clone, mountpoint=ws.mountpoint(clone), pgdata=pgdata,
                           old_bin=opts.old_bin, new_bin=opts.new_bin, old_major=old_major,
                           new_major=new_major, check_sql=check_sql,
                           check_sql_name=opts.check_sql_path or "", database=opts.database,
                           port=opts.port)
        with terminate_cleanly():
            _run(store, opts, plan, report, ws, f"{opts.volume}@rehearsal-{when}")
        return report
    finally:
        store.close()


def _check_volume(store: Store, volume: str) -> None:
    names = {row["name"] for row in _volumes(store)}
    if volume not in names:
        raise NotFoundError(f"no volume named {volume!r} in {store.path}; 'cowfs list "
                            f"{store.path}' shows the volumes")


def _volumes(store: Store) -> list:
    from .. import volumes
    with store.env.begin() as txn:
        return [dict(name=name, vol_id=vol_id) for name, vol_id in volumes.list_volumes(txn, store.env)]


def _run(store, opts: RehearsalOptions, plan: UpgradePlan, report: Report, ws: Workspace,
         live_snapshot: str) -> None:
    server = None
    try:
        with report.step("snapshot-live") as step:
            admin.snapshot(store, live_snapshot)
            report.snapshots.append(live_snapshot)
            step.snapshot = live_snapshot
            step.detail = "the live volume is read only through this snapshot"
        with report.step("clone") as step:
            admin.clone(store, live_snapshot, plan.clone)
            step.detail = f"volume {plan.clone}"
        with report.step("mount-clone") as step:
            ws.mount(store.path, plan.clone)
            step.detail = f"at {plan.mountpoint}"
        _check_input_or_undo(store, plan, ws, live_snapshot)
        server = Upgrader(plan, report, ws).run(stop_at_end=not opts.keep)
        report.facts["cutover_estimate_s"] = _cutover_estimate(report)
    except BadInput:
        raise
    except CowfsError as exc:
        if report.failed_step is None:
            report.error = str(exc)
    finally:
        keep_running = opts.keep and report.ok
        if not keep_running:
            for problem in ws.stop_servers():
                report.remains.append(problem)
        problems = ws.close(keep_mounted=opts.keep, keep_logs=not report.ok)
        report.remains.extend(problems)
        _name_remains(store, opts, plan, report, ws, live_snapshot, server if keep_running else None)


# Steps an offline cutover repeats while the live server is down (it adds a fast
# shutdown, unmounts, renames, a mount and a start, each well under a second here;
# recover-old and initdb-new happen outside the downtime when live runs).
_DOWNTIME_STEPS = ("snapshot-live", "clone", "mount-clone", "pg-upgrade-link", "install-new",
                   "start-new", "check-sql", "stop-new")


def _cutover_estimate(report: Report) -> float:
    """About how long an offline cutover's downtime will be, from the rehearsal's step times.

    A busier machine during the cutover makes it an underestimate. The
    online cutover's pause is another matter: see `cowfs pg cutover --online`.
    """
    return round(sum(s.duration_s for s in report.steps if s.name in _DOWNTIME_STEPS), 1)


class BadInput(CowfsError):
    """Wraps a user error found on the clone, after everything made for it was removed."""

    def __init__(self, cause: CowfsError):
        super().__init__(str(cause))
        self.exit_code = cause.exit_code


def _check_input_or_undo(store, plan: UpgradePlan, ws: Workspace, live_snapshot: str) -> None:
    """A wrong --pgdata or --old-bin shows only on the clone: then undo it all and say so.

    Bad input must change nothing, so the clone and the snapshot made for
    it are destroyed again before the one-line error goes out.
    """
    try:
        check_data_dir(plan.data_dir, plan.pgdata, plan.old_major)
    except CowfsError as exc:
        ws.close()
        admin.destroy(store, plan.clone)
        admin.destroy(store, live_snapshot)
        raise BadInput(exc) from None


def _name_remains(store, opts, plan, report, ws, live_snapshot, server) -> None:
    names = {row["name"] for row in _volumes(store)}
    if plan.clone in names:
        where = f"mounted at {plan.mountpoint}" if opts.keep and plan.mountpoint in ws.mounts \
            else "not mounted"
        report.remains.append(f"volume {plan.clone} ({where}) with its step snapshots; remove with "
                              f"'cowfs destroy {store.path} {plan.clone}'")
        report.remains.append(f"snapshot {live_snapshot} (the clone's origin); remove after the clone "
                              f"with 'cowfs destroy {store.path} {live_snapshot}'")
    if server is not None and server.port is not None:
        report.remains.append(f"PostgreSQL {plan.new_major} running on the clone: port {server.port}, "
                              f"socket directory {server.socket_dir} (stop: pg_ctl stop -D "
                              f"{server.data_dir})")
    if opts.keep:
        report.facts["workspace"] = ws.path
    if not report.ok and not opts.keep:
        report.facts["logs"] = ws.run_dir
        report.remains.append(f"server logs of the rehearsal in {ws.run_dir}")
