"""`cowfs pg cutover --offline` and `cowfs pg rollback-cutover` (offline).

The stop-the-world cutover, for clusters that cannot meet the online
cutover's preconditions. Only what must happen while no server runs is
inside the downtime (between stop-live and start-new-live):

    inspect-live      MNT is VOL of STORE; port, socket directory and listen
                      addresses of the live server; its initdb settings
    initdb-ahead      the new cluster PGDATA.pg<NEW>-new, created on the live
                      volume beside the data directory while live serves (the
                      snapshot then carries it into the clone); the live
                      cluster itself is not touched
    stop-live         fast shutdown: every COMMIT that returned is on disk
    snapshot-live     VOL@pre-upgrade-<time> through VOL's daemon (rule 5)
    clone, mount-clone
    pg-upgrade-link   no separate --check: --link runs every check first and
                      stops before changing anything; the rehearsal ran them too
    install-new
    start-new, check-sql, stop-new    only with --check-sql, the go/no-go
                      gate, on a side socket before any client can write
    unmount-clone, unmount-live
    rename-volumes    VOL -> VOL-pre-upgrade (or --keep-old-as), clone -> VOL
    mount-upgraded    VOL at MNT; the cutover record MNT/.cowfs-cutover.json
    start-new-live    the new server with the live port/socket/addresses
    analyze, amcheck  on the serving new server (amcheck: --verify full)

A live server that was not running (stopped by its owner) gets the old way:
recover-old and initdb-new on the clone, inside the downtime.

Nothing is written to the live cluster: the upgrade runs on the clone. So a
failure before unmount-live ends with the old server started again on the
untouched live volume; a failure after it renames back and does the same.
Rollback reverses the renames and starts the old server on the pre-upgrade
volume, which nothing has written to since the cutover stopped its server.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from .. import admin
from ..errors import CowfsError, ExistsError, NotFoundError, UsageError
from ..store import Store
from . import cluster
from .live import (CutoverInput, Endpoint, check_mounted_volume, live_endpoint, on_store, start_at,
                   volume_exists)
from .rehearse import stamp
from .report import Report
from .server import PgServer
from .upgrade import (UpgradePlan, Upgrader, analyze_in_stages, check_data_dir, check_pgdata,
                      check_versions, initdb_like, read_check_sql)
from .window import RECORD_NAME
from .workspace import Workspace, mount, stop_quietly, unmount


@dataclass
class CutoverOptions(CutoverInput):
    port: Optional[int] = None
    socket_dir: Optional[str] = None
    keep_old_as: Optional[str] = None
    verify: str = "full"


class _Cutover:
    def __init__(self, opts: CutoverOptions, store: Store):
        self.opts, self.store = opts, store
        self.pgdata = check_pgdata(opts.pgdata)
        self.old_major, self.new_major = check_versions(opts.old_bin, opts.new_bin)
        self.check_sql = read_check_sql(opts.check_sql_path)
        self.mnt = check_mounted_volume(store, opts.volume, opts.mountpoint)
        self.old_name = opts.keep_old_as or f"{opts.volume}-pre-upgrade"
        if volume_exists(store, self.old_name):
            raise ExistsError(f"volume {self.old_name} exists already (an earlier cutover?); give "
                              "--keep-old-as NAME or destroy/rename it first")
        when = stamp()
        self.clone = f"{opts.volume}-upgrade-{when}"
        self.snapshot = f"{opts.volume}@pre-upgrade-{when}"
        self.report = Report("cutover")
        self.report.facts.update(mode="offline", volume=opts.volume, old_major=self.old_major,
                                 new_major=self.new_major)
        self.ws = Workspace()
        self.live = PgServer(opts.old_bin, os.path.join(self.mnt, self.pgdata))
        self.ahead_dir = f"{self.live.data_dir}.pg{self.new_major}-new"
        self.endpoint: Optional[Endpoint] = None
        self.settings: dict = {}
        self.state = set()            # initdb-ahead, stopped-live, unmounted-live, renamed-live...

    def run(self) -> Report:
        try:
            self._inspect()         # bad input raises here, before anything is changed
        except CowfsError:
            self.ws.close()
            raise
        try:
            self._initdb_ahead()
            self._switch()
        except (CowfsError, KeyboardInterrupt) as exc:
            # Also Ctrl-C and SIGTERM (`terminate_cleanly`): the live cluster
            # must be served again, and the report must say so.
            if self.report.failed_step is None:
                self.report.error = str(exc) or "interrupted"
            self._recover()
            return self.report
        self._after_start()
        return self.report

    def _inspect(self) -> None:
        with self.report.step("inspect-live") as step:
            check_data_dir(self.live.data_dir, self.pgdata, self.old_major)
            if os.path.exists(self.ahead_dir):
                raise ExistsError(f"{self.ahead_dir} exists on the live volume (left by an "
                                  "interrupted cutover?); move it away first")
            self.endpoint = live_endpoint(self.live, self.opts.port, self.opts.socket_dir)
            if self.live.port is not None:
                self.settings = cluster.initdb_settings(self.live)
            step.detail = (f"port {self.endpoint.port}, socket directory {self.endpoint.socket_dir}, "
                           f"listen_addresses '{self.endpoint.listen_addresses}'")

    def _initdb_ahead(self) -> None:
        if not self.settings:
            self.report.skip("initdb-ahead", "the live server is not running: its settings are "
                                             "read on the clone, inside the downtime")
            return
        with self.report.step("initdb-ahead") as step:
            self.state.add("initdb-ahead")
            step.detail = initdb_like(self.opts.new_bin, self.ahead_dir, self.new_major,
                                      self.settings, owner_of=self.live.data_dir)
            step.detail += "; on the live volume, while live serves"

    def _switch(self) -> None:
        report, store = self.report, self.store
        started = time.monotonic()
        with report.step("stop-live") as step:
            if self.live.port is not None:          # it was running: restart it on failure
                self.state.add("stopped-live")
            self.live.stop("fast")
            step.detail = "fast shutdown: every committed transaction is on disk"
        with report.step("snapshot-live") as step:
            admin.snapshot(store, self.snapshot)
            report.snapshots.append(self.snapshot)
            step.snapshot = self.snapshot
        with report.step("clone") as step:
            admin.clone(store, self.snapshot, self.clone)
            step.detail = f"volume {self.clone}"
        with report.step("mount-clone"):
            self.ws.mount(store.path, self.clone)
        self._upgrade_clone()
        with report.step("unmount-clone"):
            self.ws.unmount(self.ws.mountpoint(self.clone))
        with report.step("unmount-live"):
            unmount(self.mnt)
            self.state.add("unmounted-live")
        with report.step("rename-volumes") as step:
            admin.rename(store, self.opts.volume, self.old_name)
            self.state.add("renamed-live")
            admin.rename(store, self.clone, self.opts.volume)
            self.state.add("renamed-clone")
            step.detail = f"{self.opts.volume} -> {self.old_name}; {self.clone} -> {self.opts.volume}"
        with report.step("mount-upgraded"):
            mount(store.path, self.opts.volume, self.mnt)
            self.state.add("mounted-upgraded")
            self._write_record()
        with report.step("start-new-live") as step:
            self.new = PgServer(self.opts.new_bin, os.path.join(self.mnt, self.pgdata))
            start_at(self.new, self.endpoint)
            step.detail = f"PostgreSQL {self.new.server_version()} on port {self.endpoint.port}"
        report.facts["downtime_s"] = round(time.monotonic() - started, 3)
        report.facts["pre_upgrade_volume"] = self.old_name
        report.remains.append(f"volume {self.old_name}: the cluster as it was before the cutover "
                              f"(PostgreSQL {self.old_major}); 'cowfs pg rollback-cutover' serves it again")
        report.remains.append(f"snapshots of the upgrade steps on volume {self.opts.volume} "
                              f"(formerly {self.clone})")
        self.ws.close()

    def _upgrade_clone(self) -> None:
        plan = UpgradePlan(store=self.store, clone=self.clone,
                           mountpoint=self.ws.mountpoint(self.clone), pgdata=self.pgdata,
                           old_bin=self.opts.old_bin, new_bin=self.opts.new_bin,
                           old_major=self.old_major, new_major=self.new_major,
                           check_sql=self.check_sql, check_sql_name=self.opts.check_sql_path or "",
                           database=self.opts.database, settings=dict(self.settings),
                           drop_copied_slots=False)
        upgrader = Upgrader(plan, self.report, self.ws)
        if "initdb-ahead" in self.state:
            self.report.skip("recover-old", "stop-live shut the cluster down cleanly")
        else:
            upgrader.recover_old(count_rows=False)
            upgrader.initdb_new()
        upgrader.pg_upgrade("link")
        upgrader.install_new()
        if self.check_sql is not None:
            server = upgrader.start_new()
            upgrader.check_sql(server)
            upgrader.stop_new(server)
        else:
            self.report.skip("check-sql", "no --check-sql given: the new server starts at the "
                                          "live endpoint directly")

    def _after_start(self) -> None:
        """Verification and statistics while the new server already serves."""
        try:
            with self.report.step("analyze") as step:
                step.detail = analyze_in_stages(self.new, self.new_major)
            if self.opts.verify == "full":
                with self.report.step("amcheck") as step:
                    self.new.amcheck()
                    step.detail = "pg_amcheck --all --heapallindexed: no corruption"
            else:
                self.report.skip("amcheck", "--verify light")
        except CowfsError as exc:
            self.report.remains.append(f"the new server serves, but {exc}; 'cowfs pg "
                                       "rollback-cutover' returns to the old one (writes made "
                                       "since stay on the upgraded volume)")

    def _write_record(self) -> None:
        """What rollback-cutover needs, stored with the upgraded volume itself."""
        record = dict(mode="offline", volume=self.opts.volume, pre_upgrade_volume=self.old_name,
                      pgdata=self.pgdata, old_major=self.old_major, new_major=self.new_major,
                      new_bin=self.opts.new_bin, old_bin=self.opts.old_bin,
                      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      **vars(self.endpoint))
        path = os.path.join(self.mnt, RECORD_NAME)
        # A new file renamed into place: the volume may hold the record of an
        # earlier cutover, and a crash must leave one whole record or the other.
        with open(f"{path}.tmp", "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)

    def _recover(self) -> None:
        """Serve the live volume with the old server again, as it was before we started."""
        problems = self.ws.close(keep_logs=True)
        self.report.facts["logs"] = self.ws.run_dir
        try:
            with self.report.step("restore-live") as step:
                self._undo_switch()
                step.detail = f"volume {self.opts.volume} is mounted at {self.mnt} again, unchanged"
                if "stopped-live" in self.state:
                    start_at(self.live, self.endpoint)
                    step.detail += f"; PostgreSQL {self.old_major} serves it"
                if "initdb-ahead" in self.state:
                    shutil.rmtree(self.ahead_dir, ignore_errors=True)
        except CowfsError:
            self.report.remains.append("the live cluster is NOT served; see the restore-live step")
        self.report.remains.extend(problems)
        if volume_exists(self.store, self.clone):
            self.report.remains.append(f"volume {self.clone} (the failed upgrade, with step "
                                       f"snapshots) and snapshot {self.snapshot}")

    def _undo_switch(self) -> None:
        store, vol = self.store, self.opts.volume
        if "mounted-upgraded" in self.state:
            stop_quietly(PgServer(self.opts.new_bin, os.path.join(self.mnt, self.pgdata)))
            unmount(self.mnt)
        if "renamed-clone" in self.state:
            admin.rename(store, vol, self.clone)
        if "renamed-live" in self.state:
            admin.rename(store, self.old_name, vol)
        if "unmounted-live" in self.state:
            mount(store.path, vol, self.mnt)


def cutover(opts: CutoverOptions) -> Report:
    return on_store(opts.store, lambda store: _Cutover(opts, store).run())


# --- rollback --------------------------------------------------------------------------------------

def rollback_cutover(store_path: str, volume: str, mountpoint: str, old_bin: Optional[str],
                     port: Optional[int] = None) -> Report:
    return on_store(store_path, lambda store: _rollback_checked(store, volume, mountpoint,
                                                                old_bin, port))


def _rollback_checked(store: Store, volume: str, mountpoint: str, old_bin: Optional[str],
                      port: Optional[int]) -> Report:
    mnt = check_mounted_volume(store, volume, mountpoint)
    record = _read_record(mnt)
    if old_bin is None:
        raise UsageError("give --old-bin, the bin directory of PostgreSQL "
                         f"{record['old_major']}, to roll back an offline cutover")
    old_major = cluster.bin_major(old_bin)
    if old_major != record["old_major"]:
        raise UsageError(f"--old-bin is PostgreSQL {old_major}, the cluster before the cutover "
                         f"was {record['old_major']}; give the bin directory of "
                         f"{record['old_major']}")
    if not volume_exists(store, record["pre_upgrade_volume"]):
        raise NotFoundError(f"the pre-upgrade volume {record['pre_upgrade_volume']} no longer "
                            "exists; nothing to roll back to")
    endpoint = Endpoint(port=port or record["port"], socket_dir=record["socket_dir"],
                        listen_addresses=record["listen_addresses"])
    return _rollback(store, volume, mnt, old_bin, record, endpoint)


def _read_record(mnt: str) -> dict:
    try:
        with open(os.path.join(mnt, RECORD_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        raise NotFoundError(f"{mnt} holds no cutover record ({RECORD_NAME}); only a volume made "
                            "live by 'cowfs pg cutover' can be rolled back") from None
    if record.get("mode") == "online":
        raise UsageError(f"the cutover recorded at {mnt} was online; roll it back with --online "
                         "(and --pgbouncer CONNINFO)")
    return record


def _rollback(store: Store, volume: str, mnt: str, old_bin: str, record: dict,
              endpoint: Endpoint) -> Report:
    report = Report("rollback-cutover")
    report.facts["mode"] = "offline"
    upgraded_name = f"{volume}-upgraded-{stamp()}"
    data_dir = os.path.join(mnt, record["pgdata"])
    started = time.monotonic()
    try:
        with report.step("stop-new") as step:
            new_bin = record["new_bin"] if os.path.isdir(record["new_bin"]) else old_bin
            PgServer(new_bin, data_dir).stop("fast")
            step.detail = f"PostgreSQL {record['new_major']} stopped"
        with report.step("unmount-upgraded"):
            unmount(mnt)
        with report.step("rename-volumes") as step:
            admin.rename(store, volume, upgraded_name)
            admin.rename(store, record["pre_upgrade_volume"], volume)
            step.detail = f"{volume} -> {upgraded_name}; {record['pre_upgrade_volume']} -> {volume}"
        with report.step("mount-pre-upgrade"):
            mount(store.path, volume, mnt)
        with report.step("start-old") as step:
            old = PgServer(old_bin, data_dir)
            start_at(old, endpoint)
            step.detail = f"PostgreSQL {old.server_version()} on port {endpoint.port}"
        report.facts["downtime_s"] = round(time.monotonic() - started, 3)
        # The cluster initdb-ahead left beside the data directory (outside the downtime).
        shutil.rmtree(f"{data_dir}.pg{record['new_major']}-new", ignore_errors=True)
        report.remains.append(f"volume {upgraded_name}: the upgraded cluster with every write made "
                              "after the cutover")
    except CowfsError as exc:
        if report.failed_step is None:
            report.error = str(exc)
        report.remains.append(f"rollback stopped at {report.failed_step.name if report.failed_step else '?'}"
                              f"; 'cowfs list {store.path}' shows the volumes as they are now")
    return report
