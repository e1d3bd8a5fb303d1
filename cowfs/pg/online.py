"""`cowfs pg cutover --online`, `rollback-cutover --online` and `finish-cutover`.

The live server keeps serving while a clone of it is upgraded; the upgraded
server then catches up through PostgreSQL's logical replication and takes
over the live endpoint behind a PgBouncer PAUSE (switch.py). Until
`finish-cutover`, the old server follows the new one the same way, so
`rollback-cutover --online` switches back without losing a write.

    inspect-live    the live endpoint, databases and every precondition
                    (preconditions.py); PgBouncer answers and routes to live
    prepare-live    per database: DDL block, publication FOR ALL TABLES, then
                    a logical slot; all before the snapshot, so the slot sees
                    every transaction the snapshot misses
    snapshot-live, clone, mount-clone
                    VOL@pre-upgrade-<time>, clone VOL-pg<NEW> at MNT-pg<NEW>
    recover-old     crash recovery of the snapshot with the old version; its
                    end-of-recovery checkpoint is S0, the first WAL position
                    the clone lacks; the copied slots are dropped
    initdb-new, pg-upgrade-link, install-new, start-new
                    the upgrade (no separate --check: --link checks first),
                    the new server on a side port
    subscribe       per database, a disabled subscription on live's slot,
                    copy_data = false, its origin advanced to S0, enabled
    analyze, check-sql
    ...             the switch (switch.py), which first waits for the new
                    server to catch up

Why S0 and not the "redo done at" position of the log: that line names the
start of the last record replayed, so starting there applies the last
transaction twice. The checkpoint that ends crash recovery is written right
after the last replayed record (its location equals its redo location).

Nothing is written to the live *cluster* but the publication, the slots and
the DDL block, and a failure before the switch removes them again; the
clone volume stays for inspection. The live server never stops unless the
switch does it, and a failed switch starts it again (switch.py).
"""

import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from .. import admin
from ..errors import CowfsError, ExistsError, UsageError
from ..store import Store
from . import preconditions, replication
from .live import CutoverInput, check_mounted_volume, live_endpoint, on_store, volume_exists
from .pgbouncer import PgBouncerConsole
from .rehearse import stamp
from .report import Report
from .server import PgError, PgServer, free_port
from .switch import Switch, ensure_following, follow
from .upgrade import Upgrader, UpgradePlan, check_data_dir, check_pgdata, check_versions, read_check_sql
from .window import FOLLOWER_SETTINGS, Side, Window, load, open_window
from .workspace import Workspace, mount, stop_quietly, unmount, volume_mountpoint

PAUSE_LIMIT_S = 5.0
CATCH_UP_TIMEOUT_S = 3600.0
SLOT_TIMEOUT_S = 300.0


@dataclass
class OnlineOptions(CutoverInput):
    pgbouncer: Optional[str] = None
    new_volume: Optional[str] = None
    new_mountpoint: Optional[str] = None
    pause_limit_s: float = PAUSE_LIMIT_S
    catch_up_timeout_s: float = CATCH_UP_TIMEOUT_S


def _console(conninfo: Optional[str], client: PgServer) -> Optional[PgBouncerConsole]:
    return PgBouncerConsole(conninfo, client) if conninfo else None


def _positive(value: float, option: str) -> float:
    if not value > 0:
        raise UsageError(f"{option} must be a positive number of seconds")
    return value


class _OnlineCutover:
    def __init__(self, opts: OnlineOptions, store: Store):
        self.opts, self.store = opts, store
        self.pgdata = check_pgdata(opts.pgdata)
        self.old_major, self.new_major = check_versions(opts.old_bin, opts.new_bin)
        self.check_sql = read_check_sql(opts.check_sql_path)
        _positive(opts.pause_limit_s, "--pause-limit")
        _positive(opts.catch_up_timeout_s, "--catch-up-timeout")
        self.mnt = check_mounted_volume(store, opts.volume, opts.mountpoint)
        record = load(self.mnt) or {}
        if record.get("mode") == "online" and record.get("state") == "open":
            raise ExistsError(f"an online cutover of {opts.volume} is open (record at {self.mnt}); "
                              f"'cowfs pg finish-cutover {store.path} {opts.volume}' closes it first")
        self.new_volume = opts.new_volume or f"{opts.volume}-pg{self.new_major}"
        if volume_exists(store, self.new_volume):
            raise ExistsError(f"volume {self.new_volume} exists already; give --new-volume NAME "
                              "or destroy it")
        self.new_mnt = os.path.abspath(opts.new_mountpoint or f"{self.mnt}-pg{self.new_major}")
        if os.path.exists(self.new_mnt) and (os.path.ismount(self.new_mnt) or os.listdir(self.new_mnt)):
            raise ExistsError(f"{self.new_mnt} is not an empty directory; give --new-mountpoint DIR")
        self.snapshot = f"{opts.volume}@pre-upgrade-{stamp()}"
        self.report = Report("cutover")
        self.report.facts.update(mode="online", volume=opts.volume, old_major=self.old_major,
                                 new_major=self.new_major)
        self.live = PgServer(opts.old_bin, os.path.join(self.mnt, self.pgdata))
        self.console: Optional[PgBouncerConsole] = None
        self.ws = Workspace()
        self.window: Optional[Window] = None
        self.databases: list = []
        self.done: set = set()           # prepared-live, cloned, mounted-clone

    # --- the workflow ----------------------------------------------------------------------

    def run(self) -> Report:
        try:
            self._inspect()             # bad input raises here, before anything is changed
        except CowfsError:
            self.ws.close()
            raise
        try:
            self._prepare_live()
            self._upgrade_clone()
            facts = Switch(self.window, self.report, self.console, self.opts.pause_limit_s,
                           self.opts.catch_up_timeout_s).run()
        except (CowfsError, KeyboardInterrupt) as exc:
            if self.report.failed_step is None:
                self.report.error = str(exc) or "interrupted"
            if switched(self.window):
                return self.report
            self._abort()
            return self.report
        self.report.facts.update(facts)
        self.report.facts.update(self.window.summary())
        self.report.facts["server_version"] = self.window.server("new").server_version()
        self.report.remains.append(
            f"the cutover window is open: PostgreSQL {self.old_major} follows on port "
            f"{self.window.old.side_port} ({self.window.run_dir}); 'cowfs pg rollback-cutover "
            f"{self.store.path} {self.opts.volume} --mountpoint {self.mnt} --online' switches "
            f"back, 'cowfs pg finish-cutover {self.store.path} {self.opts.volume}' closes it")
        return self.report

    def _inspect(self) -> None:
        with self.report.step("inspect-live") as step:
            check_data_dir(self.live.data_dir, self.pgdata, self.old_major)
            if not self.live.is_running():
                raise UsageError(f"no server runs on {self.live.data_dir}; an online cutover "
                                 "replicates from the running live server (start it, or use --offline)")
            endpoint = live_endpoint(self.live, port=None, socket_dir=None)
            self.databases = replication.databases(self.live)
            preconditions.check_live(self.live, self.databases)
            self.console = _console(self.opts.pgbouncer, self.live)
            if self.console is not None:
                preconditions.check_pgbouncer(self.console, endpoint.port)
            side_ports = [free_port(exclude=(endpoint.port,))]
            side_ports.append(free_port(exclude=(endpoint.port, *side_ports)))
            self.window = Window(
                store=self.store.path, volume=self.opts.volume, pgdata=self.pgdata,
                port=endpoint.port, socket_dir=endpoint.socket_dir,
                listen_addresses=endpoint.listen_addresses, run_dir=self.ws.run_dir,
                databases=self.databases,
                old=Side(self.old_major, self.opts.old_bin, self.opts.volume, self.mnt, side_ports[0]),
                new=Side(self.new_major, self.opts.new_bin, self.new_volume, self.new_mnt,
                         side_ports[1]))
            step.detail = (f"port {endpoint.port}, socket directory {endpoint.socket_dir}; "
                           f"databases {', '.join(self.databases)}; preconditions met"
                           + ("; PgBouncer routes to it" if self.console else "; no --pgbouncer"))

    def _prepare_live(self) -> None:
        with self.report.step("prepare-live") as step:
            self.done.add("prepared-live")
            for db in self.databases:
                replication.block_ddl(self.live, db)
                replication.create_publication(self.live, db)
            slots = self.window.links_to("new")
            for i, db in enumerate(self.databases):
                replication.create_slot(self.live, db, slots[i], SLOT_TIMEOUT_S)
            step.detail = (f"DDL blocked, publication {replication.PUBLICATION}, slots "
                           f"{', '.join(slots)}")

    def _upgrade_clone(self) -> None:
        report, store = self.report, self.store
        with report.step("snapshot-live") as step:
            admin.snapshot(store, self.snapshot)
            report.snapshots.append(self.snapshot)
            step.snapshot = self.snapshot
        with report.step("clone") as step:
            admin.clone(store, self.snapshot, self.new_volume)
            self.done.add("cloned")
            step.detail = f"volume {self.new_volume}"
        with report.step("mount-clone") as step:
            mount(store.path, self.new_volume, self.new_mnt)
            self.done.add("mounted-clone")
            step.detail = f"at {self.new_mnt}"
        plan = UpgradePlan(store=store, clone=self.new_volume, mountpoint=self.new_mnt,
                           pgdata=self.pgdata, old_bin=self.opts.old_bin, new_bin=self.opts.new_bin,
                           old_major=self.old_major, new_major=self.new_major,
                           check_sql=self.check_sql, check_sql_name=self.opts.check_sql_path or "",
                           database=self.opts.database, port=self.window.new.side_port,
                           server_settings=dict(FOLLOWER_SETTINGS))
        upgrader = Upgrader(plan, report, self.ws)
        upgrader.recover_old(count_rows=False, inspect=self._read_s0)
        upgrader.initdb_new()
        upgrader.pg_upgrade("link")
        upgrader.install_new()
        server = upgrader.start_new()
        self._subscribe(server)
        upgrader.analyze(server)
        upgrader.check_sql(server)

    def _read_s0(self, server: PgServer) -> str:
        self.s0 = replication.end_of_recovery_lsn(server)
        self.report.facts["replication_start_lsn"] = self.s0
        return f"end-of-recovery checkpoint at {self.s0}: replication starts there"

    def _subscribe(self, server: PgServer) -> None:
        with self.report.step("subscribe") as step:
            names = self.window.links_to("new")
            for i, db in enumerate(self.databases):
                replication.subscribe(server, db, names[i], self.window.endpoint_conninfo(db),
                                      start_lsn=self.s0)
            step.detail = f"subscriptions {', '.join(names)} from {self.s0}, no initial copy"

    # --- failure: live serves as before ------------------------------------------------------

    def _abort(self) -> None:
        problems = self.ws.stop_servers()
        problems += stop_quietly(self.window.server("new"))    # if a failed switch moved it
        try:
            with self.report.step("restore-live") as step:
                if "prepared-live" in self.done:
                    close_live_side(self.live, self.window, self.databases)
                if "mounted-clone" in self.done:
                    unmount(self.new_mnt)
                step.detail = ("publication, slots and DDL block removed; live serves as before"
                               if "prepared-live" in self.done else "live was not changed")
        except CowfsError:
            self.report.remains.append("cleaning up the live server failed: see the restore-live "
                                       "step; drop publication cowfs_cutover, slots cowfs_to* and "
                                       "schema cowfs_cutover by hand")
        if not self.live.is_running():
            self.report.remains.append("the live cluster is NOT served; see the steps above")
        self.report.remains.extend(problems)
        self.ws.close(keep_logs=True)
        self.report.facts["logs"] = self.ws.run_dir
        if "cloned" in self.done:
            self.report.remains.append(
                f"volume {self.new_volume} (the upgraded clone, with step snapshots) and snapshot "
                f"{self.snapshot}; remove with 'cowfs destroy {self.store.path} {self.new_volume}' "
                f"then 'cowfs destroy {self.store.path} {self.snapshot}'")


def switched(window: Optional[Window]) -> bool:
    """After a failure: did the new server take the live endpoint? Then the window stays open.

    The switch records that itself; this covers an interruption between the
    takeover and that record.
    """
    if window is None or window.serving != "new":
        return False
    window.save()
    return True


def close_live_side(server: PgServer, window: Window, databases: list) -> None:
    """Remove what the window added to a server: its slots, publication and DDL block."""
    for name in replication.existing_slots(server, window.links_to("new") + window.links_to("old")):
        replication.drop_slot(server, name)
    for db in databases:
        replication.drop_publication(server, db)
        replication.unblock_ddl(server, db)


def cutover_online(opts: OnlineOptions) -> Report:
    return on_store(opts.store, lambda store: _OnlineCutover(opts, store).run())


# --- rollback: the same switch, back ----------------------------------------------------------

def rollback_online(store_path: str, volume: str, mountpoint: str, pgbouncer: Optional[str],
                    pause_limit_s: float = PAUSE_LIMIT_S,
                    catch_up_timeout_s: float = CATCH_UP_TIMEOUT_S) -> Report:
    _positive(pause_limit_s, "--pause-limit")
    _positive(catch_up_timeout_s, "--catch-up-timeout")

    def workflow(store: Store) -> Report:
        window = open_window(check_mounted_volume(store, volume, mountpoint))
        if window.serving != "new":
            raise UsageError(f"PostgreSQL {window.old.major} serves already (rolled back); "
                             f"'cowfs pg finish-cutover {store_path} {volume}' closes the window")
        return _rollback(window, _console(pgbouncer, window.server("old")), pause_limit_s,
                         catch_up_timeout_s)
    return on_store(store_path, workflow)


def _rollback(window: Window, console: Optional[PgBouncerConsole], pause_limit_s: float,
              catch_up_timeout_s: float) -> Report:
    report = Report("rollback-cutover")
    report.facts.update(mode="online", volume=window.volume)
    try:
        with report.step("old-follows") as step:
            step.detail = follow(window)       # as the cutover left it, or repaired
        facts = Switch(window, report, console, pause_limit_s, catch_up_timeout_s).run()
    except (CowfsError, KeyboardInterrupt) as exc:
        if report.failed_step is None:
            report.error = str(exc) or "interrupted"
        window.save()                # who serves, should the switch have happened after all
        report.remains.append(f"PostgreSQL {window.side(window.serving).major} serves; the window "
                              "stays open")
        return report
    report.facts.update(facts)
    report.facts.update(window.summary())
    report.facts["server_version"] = window.server("old").server_version()
    report.remains.append(f"the window stays open: PostgreSQL {window.new.major} follows; "
                          f"'cowfs pg finish-cutover {window.store} {window.volume}' closes it")
    return report


# --- finish: close the window -------------------------------------------------------------------

def finish_cutover(store_path: str, volume: str, mountpoint: Optional[str] = None) -> Report:
    def workflow(store: Store) -> Report:
        mnt = mountpoint or volume_mountpoint(store.path, volume)
        if mnt is None:
            raise UsageError(f"volume {volume} of {store.path} is not mounted, so no cutover "
                             "window of it is open (give --mountpoint if it is mounted elsewhere)")
        return _finish(open_window(check_mounted_volume(store, volume, mnt)))
    return on_store(store_path, workflow)


def _finish(window: Window) -> Report:
    report = Report("finish-cutover")
    serving_key, following_key = window.serving, window.following
    serving = window.server(serving_key)
    report.facts.update(mode="online", volume=window.volume,
                        serving=f"{serving_key} (PostgreSQL {window.side(serving_key).major})")
    try:
        with report.step(f"stop-{following_key}") as step:
            following = ensure_following(window)
            names = window.links_to(following_key)
            for i, db in enumerate(window.databases):
                replication.unsubscribe(following, db, names[i])
            close_live_side(following, window, window.databases)
            following.stop("fast")
            step.detail = (f"subscriptions {', '.join(names)} dropped, publication and DDL block "
                           "removed, stopped")
        with report.step(f"close-{serving_key}") as step:
            close_live_side(serving, window, window.databases)
            step.detail = "slots, publication cowfs_cutover and the DDL block dropped: DDL works again"
        with report.step(f"unmount-{following_key}") as step:
            window.state = "finished"
            window.save()
            side = window.side(following_key)
            unmount(side.mountpoint)
            step.detail = f"volume {side.volume} unmounted from {side.mountpoint}"
    except CowfsError as exc:
        if report.failed_step is None:
            report.error = str(exc)
        report.remains.append("the window is not fully closed; run finish-cutover again")
        return report
    shutil.rmtree(os.path.dirname(window.run_dir), ignore_errors=True)
    kept = window.side(following_key)
    report.facts["server_version"] = serving.server_version()
    report.remains.append(f"volume {kept.volume}: the PostgreSQL {kept.major} cluster as of the "
                          f"last switch (unmounted); 'cowfs destroy {window.store} {kept.volume}' "
                          "frees it")
    if serving_key == "new":
        report.remains.append(f"PostgreSQL {window.new.major} serves from volume "
                              f"{window.new.volume} mounted at {window.new.mountpoint}")
    return report
