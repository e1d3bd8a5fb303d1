"""`cowfs pg cutover` and `cowfs pg rollback-cutover`.

Cutover, with the downtime window between the first and the last step:

    inspect-live      MNT is VOL of STORE; port, socket directory and listen
                      addresses of the live server (postmaster.pid, SHOW)
    stop-live         fast shutdown: every COMMIT that returned is on disk
    snapshot-live     VOL@pre-upgrade-<time> through VOL's daemon (rule 5)
    clone             VOL-upgrade-<time>
    mount-clone       in a workspace; then the upgrade steps of `upgrade.Upgrader`
    unmount-clone, unmount-live
    rename-volumes    VOL -> VOL-pre-upgrade (or --keep-old-as), clone -> VOL
    mount-upgraded    VOL at MNT; the cutover record MNT/.cowfs-cutover.json
    start-new-live    the new server with the live port/socket/addresses

Nothing is written to the live volume: the upgrade runs on the clone. So a
failure before unmount-live ends with the old server started again on the
untouched live volume; a failure after it renames back and does the same.
Rollback reverses the renames and starts the old server on the pre-upgrade
volume, which nothing has written to since the cutover stopped its server.
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from .. import admin
from ..errors import CowfsError, ExistsError, NotFoundError, UsageError
from ..store import Store
from . import cluster
from .rehearse import stamp
from .report import Report
from .server import PgServer
from .upgrade import (Upgrader, UpgradePlan, check_data_dir, check_pgdata, check_versions,
                      read_check_sql)
from .workspace import (Workspace, mount, mounted_volume, stop_quietly, terminate_cleanly,
                        unmount)

RECORD_NAME = ".cowfs-cutover.json"


@dataclass
class CutoverOptions:
    store: str
    volume: str
    pgdata: str
    mountpoint: str
    old_bin: str
    new_bin: str
    port: Optional[int] = None
    socket_dir: Optional[str] = None
    keep_old_as: Optional[str] = None
    check_sql_path: Optional[str] = None
    database: str = "postgres"
    verify: str = "full"


@dataclass
class Endpoint:
    """Where clients reach the server: kept identical across cutover and rollback."""

    port: int
    socket_dir: str
    listen_addresses: str


def check_mounted_volume(store: Store, volume: str, mountpoint: str) -> str:
    mnt = os.path.abspath(mountpoint)
    info = mounted_volume(mnt)
    if info is None or info.get("volume") != volume or info.get("store") != store.path:
        raise UsageError(f"{mnt} is not where volume {volume} of {store.path} is mounted; give "
                         f"--mountpoint of that volume ('cowfs mount {store.path} MNT --volume "
                         f"{volume}' mounts it)")
    return mnt


def _volume_exists(store: Store, name: str) -> bool:
    from .. import volumes
    with store.env.begin() as txn:
        return any(n == name for n, _ in volumes.list_volumes(txn, store.env))


# --- cutover ------------------------------------------------------------------------------------

class _Cutover:
    def __init__(self, opts: CutoverOptions, store: Store):
        self.opts, self.store = opts, store
        self.pgdata = check_pgdata(opts.pgdata)
        self.old_major, self.new_major = check_versions(opts.old_bin, opts.new_bin)
        self.check_sql = read_check_sql(opts.check_sql_path)
        self.mnt = check_mounted_volume(store, opts.volume, opts.mountpoint)
        self.old_name = opts.keep_old_as or f"{opts.volume}-pre-upgrade"
        if _volume_exists(store, self.old_name):
            raise ExistsError(f"volume {self.old_name} exists already (an earlier cutover?); give "
                              "--keep-old-as NAME or destroy/rename it first")
        when = stamp()
        self.clone = f"{opts.volume}-upgrade-{when}"
        self.snapshot = f"{opts.volume}@pre-upgrade-{when}"
        self.report = Report("cutover")
        self.report.facts.update(volume=opts.volume, old_major=self.old_major,
                                 new_major=self.new_major)
        self.ws = Workspace()
        self.live = PgServer(opts.old_bin, os.path.join(self.mnt, self.pgdata))
        self.endpoint: Optional[Endpoint] = None
        self.settings: dict = {}
        self.state = set()            # stopped-live, unmounted-live, renamed-live, renamed-clone...

    def run(self) -> Report:
        try:
            self._inspect()         # bad input raises here, before anything is changed
        except CowfsError:
            self.ws.close()
            raise
        try:
            self._switch()
        except (CowfsError, KeyboardInterrupt) as exc:
            # Also Ctrl-C and SIGTERM (`terminate_cleanly`): the live cluster
            # must be served again, and the report must say so.
            if self.report.failed_step is None:
                self.report.error = str(exc) or "interrupted"
            self._recover()
        return self.report

    def _inspect(self) -> None:
        with self.report.step("inspect-live") as step:
            check_data_dir(self.live.data_dir, self.pgdata, self.old_major)
            self.endpoint = _live_endpoint(self.live, self.opts)
            if self.live.port is not None:
                # Read now, while the server runs, so --verify light needs no
                # server start on the clone during the downtime.
                self.settings = cluster.initdb_settings(self.live)
            step.detail = (f"port {self.endpoint.port}, socket directory {self.endpoint.socket_dir}, "
                           f"listen_addresses '{self.endpoint.listen_addresses}'")

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
        plan = UpgradePlan(store=store, clone=self.clone, mountpoint=self.ws.mountpoint(self.clone),
                           pgdata=self.pgdata, old_bin=self.opts.old_bin, new_bin=self.opts.new_bin,
                           old_major=self.old_major, new_major=self.new_major,
                           check_sql=self.check_sql, check_sql_name=self.opts.check_sql_path or "",
                           database=self.opts.database, verify=self.opts.verify,
                           settings=dict(self.settings))
        Upgrader(plan, report, self.ws).run(stop_at_end=True)
        with report.step("unmount-clone"):
            self.ws.unmount(plan.mountpoint)
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
            new = PgServer(self.opts.new_bin, os.path.join(self.mnt, self.pgdata))
            _start_at(new, self.endpoint)
            step.detail = f"PostgreSQL {new.server_version()} on port {self.endpoint.port}"
        report.facts["downtime_s"] = round(time.monotonic() - started, 3)
        report.facts["pre_upgrade_volume"] = self.old_name
        report.remains.append(f"volume {self.old_name}: the cluster as it was before the cutover "
                              f"(PostgreSQL {self.old_major}); 'cowfs pg rollback-cutover' serves it again")
        report.remains.append(f"snapshots of the upgrade steps on volume {self.opts.volume} "
                              f"(formerly {self.clone})")
        self.ws.close()

    def _write_record(self) -> None:
        """What rollback-cutover needs, stored with the upgraded volume itself."""
        record = dict(volume=self.opts.volume, pre_upgrade_volume=self.old_name, pgdata=self.pgdata,
                      old_major=self.old_major, new_major=self.new_major, new_bin=self.opts.new_bin,
                      old_bin=self.opts.old_bin, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
                    _start_at(self.live, self.endpoint)
                    step.detail += f"; PostgreSQL {self.old_major} serves it"
        except CowfsError:
            self.report.remains.append("the live cluster is NOT served; see the restore-live step")
        self.report.remains.extend(problems)
        if _volume_exists(self.store, self.clone):
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


def _live_endpoint(live: PgServer, opts: CutoverOptions) -> Endpoint:
    pid = cluster.read_pid_file(live.data_dir)
    running = pid is not None and live.is_running()
    port = opts.port or (pid.port if running else None)
    socket_dir = opts.socket_dir or (pid.socket_dir if running else None)
    if port is None or not socket_dir:
        raise UsageError(f"no server runs on {live.data_dir}, so its port and socket directory are "
                         "unknown; give --port and --socket-dir (they are kept for the new server)")
    listen = pid.listen_address if running else ""
    if running:
        live.port, live.socket_dir = port, socket_dir
        listen = live.psql("SHOW listen_addresses")
    return Endpoint(port=port, socket_dir=socket_dir, listen_addresses=listen)


def _start_at(server: PgServer, endpoint: Endpoint) -> None:
    server.start(endpoint.port, endpoint.socket_dir, listen_addresses=endpoint.listen_addresses)


def cutover(opts: CutoverOptions) -> Report:
    store = Store.open(opts.store)
    try:
        with terminate_cleanly():
            return _Cutover(opts, store).run()
    finally:
        store.close()


# --- rollback --------------------------------------------------------------------------------------

def rollback_cutover(store_path: str, volume: str, mountpoint: str, old_bin: str,
                     port: Optional[int] = None) -> Report:
    store = Store.open(store_path)
    try:
        mnt = check_mounted_volume(store, volume, mountpoint)
        record = _read_record(mnt)
        old_major = cluster.bin_major(old_bin)
        if old_major != record["old_major"]:
            raise UsageError(f"--old-bin is PostgreSQL {old_major}, the cluster before the cutover "
                             f"was {record['old_major']}; give the bin directory of "
                             f"{record['old_major']}")
        if not _volume_exists(store, record["pre_upgrade_volume"]):
            raise NotFoundError(f"the pre-upgrade volume {record['pre_upgrade_volume']} no longer "
                                "exists; nothing to roll back to")
        endpoint = Endpoint(port=port or record["port"], socket_dir=record["socket_dir"],
                            listen_addresses=record["listen_addresses"])
        return _rollback(store, volume, mnt, old_bin, record, endpoint)
    finally:
        store.close()


def _read_record(mnt: str) -> dict:
    try:
        with open(os.path.join(mnt, RECORD_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise NotFoundError(f"{mnt} holds no cutover record ({RECORD_NAME}); only a volume made "
                            "live by 'cowfs pg cutover' can be rolled back") from None


def _rollback(store: Store, volume: str, mnt: str, old_bin: str, record: dict,
              endpoint: Endpoint) -> Report:
    report = Report("rollback-cutover")
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
            _start_at(old, endpoint)
            step.detail = f"PostgreSQL {old.server_version()} on port {endpoint.port}"
        report.facts["downtime_s"] = round(time.monotonic() - started, 3)
        report.remains.append(f"volume {upgraded_name}: the upgraded cluster with every write made "
                              "after the cutover")
    except CowfsError as exc:
        if report.failed_step is None:
            report.error = str(exc)
        report.remains.append(f"rollback stopped at {report.failed_step.name if report.failed_step else '?'}"
                              f"; 'cowfs list {store.path}' shows the volumes as they are now")
    return report
