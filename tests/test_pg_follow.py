"""A cowfs standby following a primary on a plain directory; its snapshots start as primaries.

One PostgreSQL 14 primary on a plain directory (not cowfs) serves the whole
module, with pgbench and an open-loop ledger (cowfs/pg/ledger.py) writing
to it while the standby is snapshotted; the tests run in file order:

1. `cowfs pg follow` copies it into an empty volume (progress shown) and
   returns once the standby streams; again, it only reports; `cowfs pg
   status` shows lag, slot and last snapshot;
2. under load, a marker row is written on the primary every few seconds,
   waited for on the standby, and the standby snapshotted (manual
   snapshots), while a schedule takes its own; each clone started with
   `cowfs pg clone` is a primary of its own (new timeline, no slot, no
   WAL receiver) holding every ledger row the standby had replayed before
   its snapshot, passes pg_amcheck and accepts writes; the standby streams
   on, and the primary's log shows no connection from any clone;
3. rehearse-upgrade (14 -> 18) and bisect accept the following volume;
4. bad input, one line each, nothing left: unreachable primary, wrong
   password, a primary without replication settings, a volume that is not
   empty, a slot that exists; a failing base backup drops its slot again;
   a follow killed during the copy is cleaned up by the next run;
5. last, `cowfs pg cutover --online` 14 -> 18 of the followed primary: the
   clone comes from the standby's snapshot, logical replication catches up
   from the primary, the ledger loses no commit; the old primary follows
   from its own directory until finish-cutover, which also ends the standby.

Figures (base backup throughput, lag) are printed as COWFS_FIGURE lines,
never asserted: the machine is shared.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from cowfs.pg import PgServer, free_port, ledger
from cowfs.pg.workspace import stop_quietly
from helpers import REPO, Mount, cowfs, fsck_clean, make_workdir, remove_workdir
from pg_helpers import (PGDATA, PgbenchLoop, PlainPrimary, assert_one_line_error, read_json,
                        step, stop_store_servers, volume_names, wait_for)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TICKS = 4
TICK_S = 2.0
BREAKS_AT = 2               # marker rows from this tick on are 'bad' (for bisect)
RATE_PER_S = 40
REPLICATOR = ("replicator", "s3cret")


@dataclass
class Adopted:
    workdir: str
    primary: PlainPrimary
    store: str
    mnt: str
    standby: PgServer
    report: dict
    stderr: str
    log_offset: int = 0           # the primary's log from where clones start

    def follow(self, *extra, store=None, mnt=None, primary=None, port=None, check=False):
        return cowfs("pg", "follow", store or self.store, "main", "--primary",
                     primary or self.primary.conninfo(), "--pgdata", PGDATA, "--bin",
                     self.primary.bin_dir, "--mountpoint", mnt or self.mnt, "--port",
                     port or self.standby.port, "--socket-dir", self.primary.socket_dir, *extra,
                     check=check, timeout=600)


@pytest.fixture(scope="module")
def adopted(pg14_bin, pg18_bin):
    workdir = make_workdir()
    # wal_level logical: the online cutover at the end replicates from this primary.
    primary = PlainPrimary(workdir, pg14_bin, settings={"wal_level": "logical"}, hba=(
        f"local replication {REPLICATOR[0]} scram-sha-256",
        f"local all {REPLICATOR[0]} scram-sha-256"))
    store = os.path.join(workdir, "store")
    try:
        primary.create(scale=2)
        primary.server.psql(f"CREATE ROLE {REPLICATOR[0]} LOGIN REPLICATION PASSWORD "
                            f"'{REPLICATOR[1]}'; CREATE TABLE markers (tick int PRIMARY KEY, "
                            "bad boolean NOT NULL)")
        cowfs("init", store)
        mnt = os.path.join(workdir, "standby")
        report_path = os.path.join(workdir, "follow.json")
        standby = PgServer(pg14_bin, os.path.join(mnt, PGDATA))
        standby.port = free_port(exclude=(primary.server.port,))
        standby.socket_dir = primary.socket_dir
        result = Adopted(workdir, primary, store, mnt, standby, {}, "").follow(
            "--json", report_path)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Adopted(workdir, primary, store, mnt, standby, read_json(report_path), result.stderr)
    finally:
        stop_store_servers(store, pg18_bin)          # its pg_ctl stops 14 and 18 alike
        primary.stop()
        if os.path.exists(store):
            fsck_clean(store)
        remove_workdir(workdir)


# --- 1. follow, again, status ------------------------------------------------------------------

def test_follow_copies_with_progress_and_returns_once_streaming(adopted):
    report = adopted.report
    assert report["ok"]
    assert [s["name"] for s in report["steps"]] == ["inspect-primary", "create-slot", "base-backup",
                                                    "snapshot-base", "start-standby", "streaming"]
    assert report["slot"] == "cowfs_main" and report["base_backup"]["bytes"] > 20 << 20
    # The progress display (cowfs.progress: plain lines, not a terminal): rate, then time left or done.
    assert "base backup of" in adopted.stderr and "MiB/s" in adopted.stderr
    assert "s left" in adopted.stderr or "done in" in adopted.stderr
    assert adopted.primary.slots() == {"cowfs_main": True}
    assert adopted.standby.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"
    assert adopted.standby.psql("SELECT count(*) FROM pgbench_accounts") == "200000"
    # The primary's conninfo is on the standby's command line, not in its data directory:
    # no snapshot (and no clone) of the volume can reach the primary.
    with open(os.path.join(adopted.standby.data_dir, "postgresql.auto.conf")) as f:
        assert "primary_conninfo" not in f.read()
    print(f"COWFS_FIGURE follow base backup into cowfs: {report['base_backup']}")


def test_following_again_reports_its_state_without_copying(adopted):
    snapshots = volume_names(adopted.store)
    result = adopted.follow(check=True)
    assert "already following" in result.stdout and "nothing copied again" in result.stdout
    assert volume_names(adopted.store) == snapshots
    assert adopted.primary.slots() == {"cowfs_main": True}


def test_status_shows_lag_slot_and_last_snapshot(adopted):
    facts = json.loads(cowfs("pg", "status", adopted.store, "main", "--json").stdout)
    assert facts["streaming"] and facts["state"] == "following"
    assert facts["lag"]["bytes"] >= 0 and facts["lag"]["seconds"] is not None
    assert facts["slot_on_primary"]["exists"] and facts["slot_on_primary"]["active"]
    assert facts["last_snapshot"]["name"].startswith("main@base-backup-")
    text = cowfs("pg", "status", adopted.store, "main").stdout
    assert "streaming" in text and "replay lag:" in text and "slot cowfs_main on the primary: active" in text


# --- 2. snapshots under load, clones as primaries of their own -------------------------------------

@dataclass
class Tick:
    snapshot: str
    replayed: set            # ledger numbers the standby showed before the snapshot was requested


@pytest.fixture(scope="module")
def ticks(adopted):
    primary, standby = adopted.primary, adopted.standby
    cowfs("policy", adopted.store, "main", "--every", "2s", "--keep", "10")
    load = ledger.Ledger(primary.bin_dir, primary.socket_dir, primary.server.port,
                         rate_per_s=RATE_PER_S, writers=2, reader=False).start()
    bench = PgbenchLoop(primary.server).start()
    taken, lags = [], []
    try:
        for i in range(TICKS):
            time.sleep(TICK_S)
            primary.server.psql(f"INSERT INTO markers VALUES ({i}, {str(i >= BREAKS_AT).lower()})")
            wait_for(lambda: standby.psql(f"SELECT count(*) FROM markers WHERE tick = {i}") == "1")
            replayed = set(map(int, standby.psql(f"SELECT n FROM {ledger.TABLE}").split()))
            cowfs("snapshot", adopted.store, f"main@tick-{i}")
            taken.append(Tick(f"main@tick-{i}", replayed))
            lags.append(json.loads(cowfs("pg", "status", adopted.store, "main", "--json").stdout)["lag"])
    finally:
        bench.stop()
        figures = load.stop()
        cowfs("policy", adopted.store, "main", "--off")
    assert bench.failures == [] and figures.errors == [], (bench.failures, figures.errors[:3])
    assert all(tick.replayed for tick in taken)
    print(f"COWFS_FIGURE follow replay lag under pgbench ({bench.transactions} transactions) and "
          f"{RATE_PER_S} ledger commits/s on the primary: {lags}")
    return taken


def start_clone(adopted, source: str, name: str) -> tuple:
    """`cowfs pg clone`; (report, a handle on the running clone server)."""
    report_path = os.path.join(adopted.workdir, f"{name}.json")
    mnt = os.path.join(adopted.workdir, name)
    result = cowfs("pg", "clone", adopted.store, source, name, "--pgdata", PGDATA, "--bin",
                   adopted.primary.bin_dir, "--mountpoint", mnt, "--socket-dir",
                   adopted.primary.socket_dir, "--json", report_path, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_json(report_path)
    server = PgServer(adopted.primary.bin_dir, report["data_dir"])
    server.port, server.socket_dir = report["port"], report["socket_dir"]
    return report, server


def drop_clone(adopted, server: PgServer, name: str) -> None:
    server.stop("fast")
    cowfs("umount", os.path.join(adopted.workdir, name))
    cowfs("destroy", adopted.store, name)


def assert_primary_of_its_own(server: PgServer) -> None:
    assert server.psql("SELECT pg_is_in_recovery()") == "f"
    assert int(server.psql("SELECT timeline_id FROM pg_control_checkpoint()")) > 1
    assert server.psql("SELECT count(*) FROM pg_stat_wal_receiver") == "0"
    assert server.psql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert server.psql("SHOW primary_conninfo") == ""
    assert not os.path.exists(os.path.join(os.path.dirname(server.data_dir), ".cowfs-follow.json"))


def test_clones_of_standby_snapshots_are_primaries_with_every_replayed_row(adopted, ticks):
    adopted.log_offset = adopted.primary.log_size()
    for tick in (ticks[0], ticks[-1]):
        name = f"clone-{tick.snapshot.split('@')[1]}"
        report, server = start_clone(adopted, tick.snapshot, name)
        try:
            assert report["promoted_from_standby"]
            assert "promoted to a primary of its own" in step(report, "start")["detail"]
            assert_primary_of_its_own(server)
            in_clone = set(map(int, server.psql(f"SELECT n FROM {ledger.TABLE}").split()))
            missing = sorted(tick.replayed - in_clone)
            assert not missing, f"{len(missing)} rows the standby had replayed are missing: {missing[:10]}"
            on_primary = set(map(int, adopted.primary.server.psql(
                f"SELECT n FROM {ledger.TABLE}").split()))
            assert in_clone <= on_primary
            state = ledger.state(adopted.primary.bin_dir, server.socket_dir, server.port)
            assert state["applied"] == state["rows"]
            server.amcheck()
            server.psql(f"INSERT INTO {ledger.TABLE} (n, seq) VALUES (-1, -1)")
            assert adopted.primary.server.psql(
                f"SELECT count(*) FROM {ledger.TABLE} WHERE n = -1") == "0"
        finally:
            drop_clone(adopted, server, name)


def test_a_scheduled_snapshot_clones_into_a_primary_too(adopted, ticks):
    autos = sorted(name for name in volume_names(adopted.store) if name.startswith("main@auto-"))
    assert autos, "the schedule took no snapshot"
    report, server = start_clone(adopted, autos[-1], "clone-auto")
    try:
        assert_primary_of_its_own(server)
        server.psql("CREATE TABLE written_on_clone (x int); INSERT INTO written_on_clone VALUES (1)")
    finally:
        drop_clone(adopted, server, "clone-auto")


def test_standby_streams_on_and_the_primary_never_saw_a_clone(adopted, ticks):
    before = int(adopted.standby.psql("SELECT count(*) FROM markers"))
    adopted.primary.server.psql(f"INSERT INTO markers VALUES ({TICKS}, true)")
    wait_for(lambda: int(adopted.standby.psql("SELECT count(*) FROM markers")) == before + 1)
    facts = json.loads(cowfs("pg", "status", adopted.store, "main", "--json").stdout)
    assert facts["streaming"] and facts["slot_on_primary"]["active"]
    log = adopted.primary.log_since(adopted.log_offset)
    assert "replication connection authorized" not in log, log[-2000:]
    assert adopted.primary.server.psql("SELECT count(*) FROM pg_stat_replication") == "1"


# --- 3. rehearse-upgrade and bisect on the following volume ------------------------------------------

def test_rehearse_upgrade_accepts_a_following_volume(adopted, pg18_bin):
    report_path = os.path.join(adopted.workdir, "rehearsal.json")
    result = cowfs("pg", "rehearse-upgrade", adopted.store, "main", "--pgdata", PGDATA,
                   "--old-bin", adopted.primary.bin_dir, "--new-bin", pg18_bin, "--json",
                   report_path, check=False, timeout=900)
    report = read_json(report_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "promoted to a primary of its own" in step(report, "recover-old")["detail"]
    assert "equal" in step(report, "row-counts")["detail"]
    cowfs("destroy", adopted.store, report["clone"])
    assert adopted.standby.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"


def test_bisect_accepts_a_following_volume(adopted, ticks):
    report_path = os.path.join(adopted.workdir, "bisect.json")
    cowfs("pg", "bisect", adopted.store, "main", "--pgdata", PGDATA, "--bin",
          adopted.primary.bin_dir, "--check", "SELECT count(*) = 0 FROM markers WHERE bad",
          "--from", "tick-0", "--to", f"tick-{TICKS - 1}", "--json", report_path, timeout=600)
    report = read_json(report_path)
    # Scheduled snapshots lie between the ticks: the change is between tick-1 and tick-2,
    # and the pair bisect names lies within that interval.
    created = {row["name"]: row["created_ns"]
               for row in json.loads(cowfs("list", adopted.store, "--json").stdout)}
    good, bad = report["last_good"]["snapshot"], report["first_bad"]["snapshot"]
    assert created[f"main@tick-{BREAKS_AT - 1}"] <= created[good] < created[bad]
    assert created[bad] <= created[f"main@tick-{BREAKS_AT}"]
    assert report["servers_started"] <= report["max_servers"]


# --- 4. bad input: one line, nothing left half-done ---------------------------------------------------

@pytest.fixture(scope="module")
def spare(adopted):
    """A second store with an empty volume, for attempts that must leave nothing behind."""
    store = os.path.join(adopted.workdir, "spare-store")
    cowfs("init", store)
    yield store
    stop_store_servers(store, adopted.primary.bin_dir)
    fsck_clean(store)


SPARE_SLOT = "cowfs_spare"


def spare_follow(adopted, spare, *extra, primary=None):
    return adopted.follow("--slot", SPARE_SLOT, *extra, store=spare, primary=primary,
                          mnt=os.path.join(adopted.workdir, "spare"), port=adopted.standby.port + 1)


def refused(adopted, spare, primary: str, *extra):
    mnt = os.path.join(adopted.workdir, "spare")
    result = spare_follow(adopted, spare, *extra, primary=primary)
    assert adopted.primary.slots() == {"cowfs_main": True}       # no slot added or left
    assert not os.path.ismount(mnt), "a refused follow left the volume mounted"
    return result


def test_unreachable_primary(adopted, spare):
    result = refused(adopted, spare, f"host={adopted.primary.socket_dir} port=1 user=postgres")
    assert_one_line_error(result, 1, "did not answer", "check host and port")


def test_wrong_password(adopted, spare):
    user, _ = REPLICATOR
    result = refused(adopted, spare, adopted.primary.conninfo(user=user, password="wrong"))
    assert_one_line_error(result, 1, "password authentication failed", ".pgpass")
    assert "wrong" not in result.stderr                      # never echo a password


def test_primary_without_replication_settings(adopted, spare):
    bare = PlainPrimary(adopted.workdir, adopted.primary.bin_dir, "bare",
                        settings={"wal_level": "minimal", "max_wal_senders": 0})
    try:
        bare.create(scale=0)
        result = refused(adopted, spare, bare.conninfo())
        assert_one_line_error(result, 2, "not set up for replication", "wal_level = replica")
        assert bare.slots() == {}
    finally:
        bare.stop()


def test_volume_that_is_not_empty(adopted, spare):
    mount = Mount(spare, os.path.join(adopted.workdir, "spare")).mount()
    with open(os.path.join(mount.path, "notes.txt"), "w") as f:
        f.write("mine\n")
    mount.umount()
    try:
        assert_one_line_error(refused(adopted, spare, adopted.primary.conninfo()), 4,
                              "is not empty", "notes.txt")
    finally:
        mount.mount()
        os.unlink(os.path.join(mount.path, "notes.txt"))
        mount.umount()


def test_slot_that_exists_already(adopted, spare):
    result = refused(adopted, spare, adopted.primary.conninfo(), "--slot", "cowfs_main")
    assert_one_line_error(result, 4, "cowfs_main exists", "--slot")


def test_failed_base_backup_drops_its_slot_and_a_killed_one_is_cleaned_up_next_time(adopted, spare):
    # A file the primary cannot read makes pg_basebackup fail part-way through.
    blocker = os.path.join(adopted.primary.server.data_dir, "unreadable")
    with open(blocker, "w") as f:
        f.write("root only\n")
    os.chmod(blocker, 0o600)
    try:
        result = refused(adopted, spare, adopted.primary.conninfo())
    finally:
        os.unlink(blocker)
    assert_one_line_error(result, 1, "base backup", "failed", "unreadable", "dropped")

    # Killed (SIGKILL) during the copy: the record says so, the next run removes the leftovers.
    mnt = os.path.join(adopted.workdir, "spare")
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", "pg", "follow", spare, "main",
                             "--primary", adopted.primary.conninfo(), "--pgdata", PGDATA, "--bin",
                             adopted.primary.bin_dir, "--mountpoint", mnt, "--port",
                             str(adopted.standby.port + 1), "--socket-dir",
                             adopted.primary.socket_dir, "--slot", SPARE_SLOT],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert "MiB" in proc.stderr.readline()                     # the copy has started
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert adopted.primary.slots().get(SPARE_SLOT) is not None     # left behind, for now
    result = spare_follow(adopted, spare)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted during its base backup" in result.stdout
    assert adopted.primary.slots() == {"cowfs_main": True, SPARE_SLOT: True}
    # Stop following: stop the standby, drop its slot.
    PgServer(adopted.primary.bin_dir, os.path.join(mnt, PGDATA)).stop("fast")
    adopted.primary.server.psql(f"SELECT pg_drop_replication_slot('{SPARE_SLOT}')")


def test_status_of_a_volume_that_does_not_follow(adopted):
    store = os.path.join(adopted.workdir, "plain-store")
    cowfs("init", store)
    assert_one_line_error(cowfs("pg", "status", store, "main", check=False), 2, "does not follow",
                          "cowfs pg follow")


def test_a_clone_that_does_not_start_is_removed_again(adopted, ticks, pg18_bin):
    volumes = volume_names(adopted.store)
    result = cowfs("pg", "clone", adopted.store, "main@tick-0", "wrong-bin", "--pgdata", PGDATA,
                   "--bin", pg18_bin, "--mountpoint", os.path.join(adopted.workdir, "wrong-bin"),
                   check=False, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PostgreSQL 14 data directory but --bin is PostgreSQL 18" in result.stdout
    assert volume_names(adopted.store) == volumes
    assert not os.path.ismount(os.path.join(adopted.workdir, "wrong-bin"))
    # The clone held the standby's postmaster.pid: cleaning up must not have stopped the standby.
    assert adopted.standby.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"


def test_cleaning_up_a_clone_never_stops_the_server_it_was_cloned_from(adopted, ticks):
    cowfs("clone", adopted.store, "main@tick-0", "never-started")
    mount = Mount(adopted.store, os.path.join(adopted.workdir, "never-started"),
                  "never-started").mount()
    try:
        # The clone holds the standby's postmaster.pid, naming the standby's running postmaster.
        clone = PgServer(adopted.primary.bin_dir, os.path.join(mount.path, PGDATA))
        assert clone.postmaster_pid() == adopted.standby.postmaster_pid()
        assert stop_quietly(clone) == []
    finally:
        mount.close()
    cowfs("destroy", adopted.store, "never-started")
    assert adopted.standby.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"


# --- 5. the online cutover of the followed primary (last: it moves the primary) -----------------

def test_online_cutover_of_a_primary_that_is_not_on_cowfs(adopted, pg18_bin):
    primary, old_data_dir = adopted.primary, adopted.primary.server.data_dir
    primary.server.psql("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
    report_path = os.path.join(adopted.workdir, "cutover.json")
    load = ledger.Ledger(pg18_bin, primary.socket_dir, primary.server.port, rate_per_s=RATE_PER_S,
                         writers=2, reader=False).start()
    try:
        wait_for(lambda: len(load.acked) >= 40)
        result = cowfs("pg", "cutover", adopted.store, "main", "--pgdata", PGDATA, "--mountpoint",
                       adopted.mnt, "--old-bin", primary.bin_dir, "--new-bin", pg18_bin, "--json",
                       report_path, check=False, timeout=900)
        acked = len(load.acked)
        wait_for(lambda: len(load.acked) >= acked + 40)          # writes go on, on 18
    finally:
        figures = load.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_json(report_path)
    assert step(report, "standby-catches-up")["outcome"] == "ok"
    assert "promoted to a primary of its own" in step(report, "recover-old")["detail"]
    print(f"COWFS_FIGURE follow online cutover of a plain-directory primary: write_pause_s="
          f"{report['write_pause_s']}, client errors {len(figures.errors)}")
    serving = PgServer(pg18_bin, os.path.join(report["new_mountpoint"], PGDATA))
    serving.port, serving.socket_dir = primary.server.port, primary.socket_dir
    assert serving.server_version().startswith("18.")
    assert ledger.problems(pg18_bin, primary.socket_dir, primary.server.port, figures.acked) == []
    # The old primary serves no more but follows, from its own directory on its own disk.
    old = PgServer(primary.bin_dir, old_data_dir)
    old.port, old.socket_dir = report["old_side_port"], report["logs"]
    assert old.server_version().startswith("14.")
    wait_for(lambda: ledger.missing_rows(pg18_bin, old.socket_dir, old.port, figures.acked) == [])

    finish = cowfs("pg", "finish-cutover", adopted.store, "main", check=False, timeout=600)
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert "stop-standby" in finish.stdout
    assert not os.path.exists(os.path.join(old_data_dir, "postmaster.pid"))    # stopped, kept
    with open(os.path.join(old_data_dir, "PG_VERSION")) as f:
        assert f.read().strip() == "14"
    assert not os.path.ismount(adopted.mnt)
    assert serving.server_version().startswith("18.")
