"""`cowfs pg follow`, `cowfs pg status` and `cowfs pg clone`: adopt a cluster without moving it.

`follow` makes a cowfs volume a streaming standby of a primary that lives
anywhere (another disk, another machine):

    mount           the volume at MNT (if it is not mounted there already)
    inspect-primary IDENTIFY_SYSTEM over a replication connection; version,
                    wal_level and slots checked (upstream.py); the volume must
                    be empty. Bad input stops here, one line, nothing changed
    create-slot     a physical slot on the primary, reserving WAL from now on
    base-backup     pg_basebackup -X stream -S SLOT into MNT/PGDATA, with a
                    progress display; the record says "copying" meanwhile
    snapshot-base   VOL@base-backup-<time>: makes the copy durable in one
                    commit (pg_basebackup ran with --no-sync), and is the first
                    snapshot a clone can start from
    start-standby   standby.signal; PostgreSQL started with the primary's
                    conninfo and the slot on its command line (standby.py says
                    why not in the data directory); the record says "following"
    streaming       returns once the WAL receiver streams

A failure up to the base backup undoes everything it made (the slot on the
primary, the partial data directory, the record, the mount) and is one line
that says what to fix; running the same command again starts over. An
interruption the process could not handle (a power cut) leaves the record
"copying": the next run removes what it left (dropping the slot it names)
and starts over. A failure after the copy keeps it: the next run starts the
standby. A volume that follows already is not copied again: the command
starts its standby if it is down and reports its state.

`status` reports a following volume: replay lag in bytes and seconds, the
slot as the primary sees it, the last snapshot. `clone` clones a snapshot
and starts its cluster as a primary of its own (standby.start_clone).
"""

import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from .. import admin, snapshots, volumes
from ..errors import BusyError, CowfsError, ExistsError, NotFoundError, UsageError
from ..store import Store
from . import cluster, standby
from .basebackup import BaseBackup, progress_display, stop_stray_copies
from .live import on_store, volume_exists
from .rehearse import stamp
from .report import Report, StepError
from .server import PgServer, free_port
from .upgrade import CLONE_SERVER_SETTINGS, check_pgdata
from .upstream import Upstream
from .workspace import mount, mounted_volume, stop_quietly, unmount, volume_mountpoint

DEFAULT_SOCKET_DIR = "/tmp"            # PostgreSQL's own default
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


@dataclass
class FollowOptions:
    store: str
    volume: str
    primary: str                      # libpq conninfo of the primary
    pgdata: str
    bin_dir: str
    mountpoint: str
    port: int
    socket_dir: str = DEFAULT_SOCKET_DIR
    slot: Optional[str] = None
    fast_checkpoint: bool = True
    progress: bool = False


def default_slot(volume: str) -> str:
    return "cowfs_" + re.sub(r"[^a-z0-9_]", "_", volume.lower())[:57]


def check_slot_name(name: str) -> str:
    if not _SLOT_NAME.match(name):
        raise UsageError(f"--slot {name!r}: a slot name has 1-63 characters a-z, 0-9 and _")
    return name


def follow(opts: FollowOptions) -> Report:
    pgdata = check_pgdata(opts.pgdata)
    major = cluster.bin_major(opts.bin_dir)
    slot = check_slot_name(opts.slot or default_slot(opts.volume))

    def workflow(store: Store) -> Report:
        _require_volume(store, opts.volume)
        mnt, mounted_here = _mount(store, opts)
        run = _Follow(store, opts, pgdata, major, slot, mnt)
        try:
            return run.run()
        except BaseException:
            if mounted_here and standby.load_record(mnt) is None:
                unmount(mnt)          # nothing of ours is on it: leave it as we found it
            raise
    return on_store(opts.store, workflow)


def _require_volume(store: Store, volume: str) -> None:
    if not volume_exists(store, volume):
        raise NotFoundError(f"no volume named {volume!r} in {store.path}; 'cowfs list "
                            f"{store.path}' shows the volumes")


def _mount(store: Store, opts: FollowOptions) -> tuple:
    """MNT with VOL mounted on it; whether we mounted it now."""
    mnt = os.path.abspath(opts.mountpoint)
    info = mounted_volume(mnt)
    if info is not None:
        if info.get("store") != store.path or info.get("volume") != opts.volume:
            raise BusyError(f"{mnt} is where volume {info.get('volume')} of {info.get('store')} is "
                            f"mounted; give another --mountpoint")
        return mnt, False
    elsewhere = volume_mountpoint(store.path, opts.volume)
    if elsewhere is not None:
        raise BusyError(f"volume {opts.volume} is mounted at {elsewhere}; give --mountpoint "
                        f"{elsewhere}")
    if os.path.ismount(mnt) or (os.path.isdir(mnt) and os.listdir(mnt)):
        raise UsageError(f"--mountpoint {mnt} is not an empty directory")
    mount(store.path, opts.volume, mnt)
    return mnt, True


class _Follow:
    def __init__(self, store: Store, opts: FollowOptions, pgdata: str, major: str, slot: str,
                 mnt: str):
        self.store, self.opts, self.pgdata, self.major, self.slot, self.mnt = (
            store, opts, pgdata, major, slot, mnt)
        self.data_dir = os.path.join(mnt, pgdata)
        self.server = PgServer(opts.bin_dir, self.data_dir)
        self.upstream = Upstream(opts.primary, self.server)
        self.report = Report("follow")
        self.report.facts.update(volume=opts.volume, mountpoint=mnt, primary=self.upstream.shown)

    def run(self) -> Report:
        record = standby.load_record(self.mnt)
        if record is not None and record.state == "following":
            return self._resume(record)
        system = self._inspect(record)
        self._copy(system)
        self._start(standby.load_record(self.mnt))
        return self.report

    # --- bad input: refused before anything changes ------------------------------------------

    def _inspect(self, leftover: Optional[standby.FollowRecord]):
        system = self.upstream.identify()
        if system.major != self.major:
            raise UsageError(f"the primary runs PostgreSQL {system.major} but --bin is "
                             f"PostgreSQL {self.major}; give the bin directory of {system.major}")
        settings = self.upstream.check_settings()
        tablespaces = self.upstream.tablespaces()
        if tablespaces:
            raise UsageError(f"the primary has tablespaces ({', '.join(tablespaces)}); their files "
                             "live outside its data directory and would be copied outside the "
                             "volume: cowfs follows only clusters without tablespaces")
        if leftover is not None:
            self._remove_leftover(leftover)
        _check_empty(self.mnt, self.opts.volume)
        self.report.facts.update(system_id=system.system_id, server_major=system.major)
        with self.report.step("inspect-primary") as step:
            step.detail = (f"PostgreSQL {system.major}, system {system.system_id}, timeline "
                           f"{system.timeline}, at {system.wal_lsn}; wal_level "
                           f"{settings['wal_level']}, max_wal_senders {settings['max_wal_senders']}")
        return system

    def _remove_leftover(self, leftover: standby.FollowRecord) -> None:
        """What a run interrupted during the copy left: its slot, its partial copy, its record."""
        with self.report.step("remove-interrupted-copy") as step:
            data_dir = os.path.join(self.mnt, leftover.pgdata)
            stop_stray_copies(data_dir)
            dropped = self.upstream.drop_slot(leftover.slot, wait=True)
            shutil.rmtree(data_dir, ignore_errors=True)
            standby.forget_record(self.mnt)
            step.detail = (f"an earlier follow was interrupted during its base backup (started "
                           f"{leftover.started}); removed its copy"
                           + (f" and slot {leftover.slot} on the primary" if dropped else ""))

    # --- the copy: undone completely if it fails -----------------------------------------------

    def _copy(self, system) -> None:
        record = standby.FollowRecord(
            volume=self.opts.volume, pgdata=self.pgdata, bin_dir=os.path.abspath(self.opts.bin_dir),
            primary=self.upstream.shown, slot=self.slot, port=self.opts.port,
            socket_dir=os.path.abspath(self.opts.socket_dir), system_id=system.system_id,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self.report.step("create-slot") as step:
            self.upstream.create_slot(self.slot)
            step.detail = f"physical slot {self.slot} on the primary keeps the WAL the standby needs"
        try:
            record.save(self.mnt)
            with self.report.step("base-backup") as step:
                result = self._base_backup()
                record.base_backup = dict(bytes=result.copied_bytes, seconds=round(result.seconds, 3),
                                          mib_per_s=round(result.mib_per_s, 1))
                step.detail = (f"{result.copied_bytes / (1 << 20):,.1f} MiB in {result.seconds:.1f} s "
                               f"({result.mib_per_s:,.1f} MiB/s), WAL streamed through the slot")
            self.report.facts["base_backup"] = record.base_backup
            with self.report.step("snapshot-base") as step:
                snapshot = f"{self.opts.volume}@base-backup-{stamp()}"
                standby.make_standby(self.server)
                admin.snapshot(self.store, snapshot)
                self.report.snapshots.append(snapshot)
                step.snapshot = snapshot
                step.detail = "the copy is durable; clones can start from here"
        except BaseException as exc:
            self._undo_copy()
            if isinstance(exc, CowfsError):
                raise CowfsError(f"the base backup from {self.upstream.shown} failed: {exc}; "
                                 f"slot {self.slot} dropped and the copy removed: fix that and run "
                                 "the same command again") from None
            raise
        record.state = "following"
        record.save(self.mnt)

    def _base_backup(self):
        owner = self.server.owner_ids()
        os.mkdir(self.data_dir, 0o700)
        if owner is not None:
            os.chown(self.data_dir, *owner)
        show = progress_display(f"base backup of {self.upstream.shown}") if self.opts.progress else None
        result = BaseBackup(self.server, self.opts.primary, self.slot,
                            fast_checkpoint=self.opts.fast_checkpoint, show=show).run()
        if not result.ok:
            raise StepError(f"pg_basebackup: {result.error.removeprefix('pg_basebackup: ')}",
                            log=result.output)
        return result

    def _undo_copy(self) -> None:
        stop_stray_copies(self.data_dir)
        self.upstream.drop_slot(self.slot, wait=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        standby.forget_record(self.mnt)

    # --- the standby ---------------------------------------------------------------------------

    def _start(self, record: standby.FollowRecord) -> None:
        try:
            with self.report.step("start-standby") as step:
                standby.start_standby(self.server, record, self.opts.primary)
                step.detail = (f"PostgreSQL {self.server.server_version()} on port {record.port}, "
                               f"socket directory {record.socket_dir}")
            with self.report.step("streaming") as step:
                lsn = standby.wait_streaming(self.server)
                step.detail = f"the WAL receiver streams through slot {record.slot}; received {lsn}"
        except CowfsError as exc:
            if self.report.failed_step is None:
                self.report.error = str(exc)
            self.report.remains.append(
                f"the copy in {self.data_dir} is complete; fix the cause and run the same "
                "'cowfs pg follow' again: it starts the standby")
            return
        self.report.facts.update(slot=record.slot, port=record.port, socket_dir=record.socket_dir)
        self.report.remains.append(
            f"the standby runs on {self.data_dir} (volume {self.opts.volume} at {self.mnt}); "
            f"'cowfs pg status {self.store.path} {self.opts.volume}' shows its lag")

    def _resume(self, record: standby.FollowRecord) -> Report:
        if record.pgdata != self.pgdata:
            raise UsageError(f"volume {self.opts.volume} follows with its data directory in "
                             f"{record.pgdata}, not {self.pgdata}; give --pgdata {record.pgdata}")
        self.report.facts["already_following"] = True
        running = standby.running_standby(self.opts.bin_dir, self.data_dir)
        if running is not None:
            self.server = running
            with self.report.step("streaming") as step:
                lsn = standby.wait_streaming(self.server)
                step.detail = (f"already following {record.primary} through slot {record.slot} "
                               f"on port {running.port}; nothing copied again; received {lsn}")
            self.report.facts.update(slot=record.slot, port=running.port,
                                     socket_dir=running.socket_dir)
            return self.report
        record.port, record.socket_dir = self.opts.port, os.path.abspath(self.opts.socket_dir)
        record.save(self.mnt)
        self._start(record)
        return self.report


def _check_empty(mnt: str, volume: str) -> None:
    entries = sorted(os.listdir(mnt))
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ExistsError(f"volume {volume} is not empty (it holds {shown}); a standby needs an "
                          "empty volume: 'cowfs init NEWSTORE' makes one (main), or remove its files")


# --- status -----------------------------------------------------------------------------------------

def status(store_path: str, volume: str) -> dict:
    """What a following volume's standby is doing; see docs/postgres.md for the fields."""
    def workflow(store: Store) -> dict:
        _require_volume(store, volume)
        mnt = volume_mountpoint(store.path, volume)
        record = standby.load_record(mnt) if mnt else None
        if record is None:
            where = f"mounted at {mnt}" if mnt else "not mounted"
            raise UsageError(f"volume {volume} ({where}) does not follow a primary; 'cowfs pg "
                             f"follow {store.path} {volume} ...' makes it a standby")
        facts = dict(volume=volume, mountpoint=mnt, state=record.state, primary=record.primary,
                     slot=record.slot, pgdata=record.pgdata, last_snapshot=last_snapshot(store, volume))
        facts.update(_standby_facts(record, os.path.join(mnt, record.pgdata)))
        return facts
    return on_store(store_path, workflow)


def _standby_facts(record: standby.FollowRecord, data_dir: str) -> dict:
    server = standby.running_standby(record.bin_dir, data_dir)
    if server is None:
        return dict(standby="stopped", streaming=False, lag=None,
                    slot_on_primary=_slot_on_primary(record, PgServer(record.bin_dir, data_dir)))
    local = standby.local_state(server)
    slot = _slot_on_primary(record, server)
    primary_lsn = slot.get("current_lsn") if slot.get("reachable") else None
    return dict(standby=f"running on port {server.port}, socket directory {server.socket_dir}",
                port=server.port, streaming=local["receiver"] == "streaming", receiver=local,
                lag=standby.lag(server, local, primary_lsn, slot.get("replay_lag_s")),
                slot_on_primary=slot)


def _slot_on_primary(record: standby.FollowRecord, client: PgServer) -> dict:
    """The slot as the primary sees it; ``reachable`` False (and why) when it cannot be asked."""
    try:
        state = Upstream(record.primary, client).slot_state(record.slot)
    except CowfsError as exc:
        return dict(reachable=False, error=str(exc))
    if state is None:
        return dict(reachable=True, exists=False)
    return dict(reachable=True, exists=True, **state)


def last_snapshot(store: Store, volume: str) -> Optional[dict]:
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, volume)
        named = [rec for _gen, rec in snapshots.snapshots_of(txn, store.env, vol_id) if rec["name"]]
    if not named:
        return None
    newest = max(named, key=lambda rec: rec["created_ns"])
    created_s = newest["created_ns"] / 1e9
    return dict(name=f"{volume}@{newest['name']}",
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_s)),
                age_s=round(time.time() - created_s, 1))


# --- clone: a snapshot started as a primary of its own ---------------------------------------------

@dataclass
class CloneOptions:
    store: str
    source: str                      # VOL@SNAP, or VOL (snapshot now)
    new_volume: str
    pgdata: str
    bin_dir: str
    mountpoint: str
    port: Optional[int] = None
    socket_dir: str = DEFAULT_SOCKET_DIR


def clone_primary(opts: CloneOptions) -> Report:
    pgdata = check_pgdata(opts.pgdata)
    major = cluster.bin_major(opts.bin_dir)
    mnt = os.path.abspath(opts.mountpoint)
    if os.path.ismount(mnt) or (os.path.isdir(mnt) and os.listdir(mnt)):
        raise UsageError(f"--mountpoint {mnt} is not an empty directory")

    def workflow(store: Store) -> Report:
        report = Report("clone")
        admin.clone(store, opts.source, opts.new_volume)      # bad names fail here, one line
        server = PgServer(opts.bin_dir, os.path.join(mnt, pgdata))
        try:
            _start_clone(store, opts, report, server, mnt, major)
        except CowfsError as exc:
            if report.failed_step is None:
                report.error = str(exc)
            stop_quietly(server)
            if mounted_volume(mnt) is not None:
                unmount(mnt)
            admin.destroy(store, opts.new_volume)
            report.remains.append(f"nothing: volume {opts.new_volume} was destroyed again")
        return report
    return on_store(opts.store, workflow)


def _start_clone(store: Store, opts: CloneOptions, report: Report, server: PgServer, mnt: str,
                 major: str) -> None:
    with report.step("mount-clone") as step:
        mount(store.path, opts.new_volume, mnt)
        step.detail = f"volume {opts.new_volume} (from {opts.source}) at {mnt}"
    with report.step("start") as step:
        cluster.forget_stale_pid_file(server.data_dir)     # the origin's server's, not ours
        found = cluster.data_dir_major(server.data_dir)
        if found != major:
            raise UsageError(f"{opts.pgdata} is a PostgreSQL {found} data directory but --bin is "
                             f"PostgreSQL {major}")
        port = opts.port or free_port()
        how = standby.start_clone(server, port, opts.socket_dir, CLONE_SERVER_SETTINGS, mnt)
        step.detail = (how or "crash recovery of the snapshot") + f"; port {port}"
    report.facts.update(volume=opts.new_volume, mountpoint=mnt, data_dir=server.data_dir,
                        port=server.port, socket_dir=server.socket_dir,
                        promoted_from_standby=bool(how))
    report.remains.append(f"PostgreSQL {major} runs on volume {opts.new_volume} at {mnt}, port "
                          f"{server.port}, socket directory {server.socket_dir}; stop it with "
                          f"pg_ctl stop -D {server.data_dir}, then 'cowfs umount {mnt}'")

