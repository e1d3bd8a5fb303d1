"""Online cutover 14 -> 18 behind a real PgBouncer, through PostgreSQL's logical replication.

One live PostgreSQL 14 cluster (two databases: postgres with pgbench tables
and a ledger, app with its own table and sequence) on a cowfs mount, with a
PgBouncer of our own (transaction pooling) in front, serves the whole
module; the tests run in file order:

1. every refusal of an online cutover, one line each, live untouched;
2. a long transaction through PgBouncer holds the switch past --pause-limit:
   the cutover gives up, live serves on, nothing changed;
3. the proof (module fixture `story`): an open-loop ledger through
   PgBouncer during `cutover --online`, then `rollback-cutover --online`,
   with DDL tried on live all the while, then `finish-cutover`. The tests
   after it each check one promise on what was recorded;
4. switching or finishing the closed window is a one-line error;
5. the same cutover without PgBouncer: clients see errors, lose no commit.

The longest commit wait a ledger client saw is printed as a figure
(COWFS_FIGURE lines), never asserted: the machine is shared.
"""

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from cowfs.pg import PgServer, ledger
from cowfs.pg.cluster import table_digests
from helpers import cowfs, make_workdir, remove_workdir
from pg_helpers import (LOGICAL_SETTINGS, PGDATA, Bouncer, LiveCluster, assert_one_line_error,
                        read_json, step, volume_names, wait_for)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DATABASES = ["app", "postgres"]
RATE_PER_S = 40
WRITERS = 4
ACKS_BETWEEN_STEPS = 60
DDL = "ALTER TABLE pgbench_branches ADD COLUMN note text"
BLOCKED = "is blocked while an online cutover is open"
DRAIN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def live(pg14_bin, pg18_bin):
    workdir = make_workdir()
    cluster = LiveCluster(workdir, pg14_bin, pg18_bin, settings=LOGICAL_SETTINGS)
    bouncer = None
    try:
        cluster.create()
        # pgbench_history has no primary key: the first refusal a pgbench user meets.
        cluster.server.psql("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        cluster.server.psql("CREATE DATABASE app")
        cluster.server.psql("CREATE TABLE orders (id bigserial PRIMARY KEY, total numeric NOT NULL);"
                            "INSERT INTO orders (total) SELECT g FROM generate_series(1, 500) g",
                            database="app")
        bouncer = Bouncer(workdir, cluster)
        cluster.bouncer = bouncer
        yield cluster
    finally:
        if bouncer is not None:
            bouncer.stop()
        cluster.close()
        remove_workdir(workdir)


def online(live, command: str, *extra, pgbouncer=True, name="report"):
    """`cowfs pg COMMAND ... --online`; (result, JSON report)."""
    report_path = os.path.join(live.workdir, f"{name}.json")
    args = {"cutover": ["--pgdata", PGDATA, "--mountpoint", live.mnt, "--old-bin", live.old_bin,
                        "--new-bin", live.new_bin],
            "rollback-cutover": ["--mountpoint", live.mnt, "--online"],
            "finish-cutover": []}[command]
    if pgbouncer and command != "finish-cutover":
        args += ["--pgbouncer", live.bouncer.console]
    result = live.pg(command, live.store, "live", *args, "--json", report_path, *extra)
    report = read_json(report_path) if os.path.exists(report_path) else None
    return result, report


def through_bouncer(live) -> PgServer:
    return live.bouncer.client(live.new_bin)


def window_objects(server: PgServer) -> dict:
    """What an online cutover adds to a server; all empty when nothing is left over."""
    found = {}
    for db in DATABASES:
        found[db] = server.psql(
            "SELECT (SELECT string_agg(pubname, ',') FROM pg_publication), "
            "(SELECT string_agg(slot_name, ',') FROM pg_replication_slots), "
            "(SELECT string_agg(subname, ',') FROM pg_subscription), "
            "(SELECT string_agg(evtname, ',') FROM pg_event_trigger), "
            "(SELECT string_agg(nspname, ',') FROM pg_namespace WHERE nspname LIKE 'cowfs%')",
            database=db)
    return found


NOTHING = {db: "||||" for db in DATABASES}


# --- 1. refusals -------------------------------------------------------------------------------

REFUSALS = [
    ("CREATE TABLE no_key (x int); INSERT INTO no_key VALUES (1)", "DROP TABLE no_key",
     "without a primary key or replica identity"),
    ("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)", "DROP TABLE scratch", "unlogged tables"),
    ("SELECT lo_create(4242)", "SELECT lo_unlink(4242)", "large object"),
    ("BEGIN; CREATE TABLE prepared_t (id int PRIMARY KEY); PREPARE TRANSACTION 'cowfs_test'",
     "ROLLBACK PREPARED 'cowfs_test'", "prepared transaction"),
    ("SELECT pg_create_logical_replication_slot('other_slot', 'pgoutput')",
     "SELECT pg_drop_replication_slot('other_slot')", "logical replication slots (other_slot)"),
    ("CREATE SUBSCRIPTION other_sub CONNECTION 'host=/nonexistent dbname=x' PUBLICATION p "
     "WITH (connect = false)",
     "ALTER SUBSCRIPTION other_sub SET (slot_name = NONE); DROP SUBSCRIPTION other_sub",
     "subscriptions (other_sub)"),
    ("SELECT pg_create_physical_replication_slot('held_' || g) FROM generate_series(1, 9) g",
     "SELECT pg_drop_replication_slot('held_' || g) FROM generate_series(1, 9) g",
     "max_replication_slots is 10 with 9 in use"),
]


@pytest.mark.parametrize("setup, cleanup, needle", REFUSALS, ids=[r[2].split()[0] + "-" + str(i)
                                                                 for i, r in enumerate(REFUSALS)])
def test_refusal_is_one_line_before_anything_changes(live, setup, cleanup, needle):
    volumes = volume_names(live.store)
    live.server.psql(setup, database="app" if "no_key" in setup or "scratch" in setup else "postgres")
    try:
        result, report = online(live, "cutover")
        assert_one_line_error(result, 2, needle, "--offline")
    finally:
        live.server.psql(cleanup, database="app" if "no_key" in setup or "scratch" in setup
                         else "postgres")
    assert report is None
    assert volume_names(live.store) == volumes
    assert window_objects(live.server) == NOTHING


@pytest.mark.parametrize("settings, needle", [
    ({"wal_level": "replica"}, "wal_level is replica"),
    ({"max_wal_senders": 1}, "max_wal_senders is 1"),
], ids=["wal_level", "max_wal_senders"])
def test_refusal_of_server_settings_names_the_setting(live, settings, needle):
    live.restart(settings)
    try:
        assert_one_line_error(online(live, "cutover")[0], 2, needle, "restart")
    finally:
        live.restart(LOGICAL_SETTINGS)
    assert window_objects(live.server) == NOTHING


def test_unreachable_pgbouncer_console_is_one_line_and_changes_nothing(live):
    result = live.pg("cutover", live.store, "live", "--pgdata", PGDATA, "--mountpoint", live.mnt,
                     "--old-bin", live.old_bin, "--new-bin", live.new_bin,
                     "--pgbouncer", f"host={live.workdir} port=1 user=postgres")
    assert_one_line_error(result, 1, "PgBouncer's console", "refused SHOW CONFIG")
    assert window_objects(live.server) == NOTHING


# --- 2. a long transaction holds the switch --------------------------------------------------

def test_long_transaction_through_pgbouncer_makes_the_cutover_give_up_and_change_nothing(live):
    before = table_digests(live.server, DATABASES)
    volumes = volume_names(live.store)
    holder = through_bouncer(live).popen("psql", *through_bouncer(live).connection_args(), "-XAtq",
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    try:
        holder.stdin.write("BEGIN;\nSELECT count(*) FROM pgbench_branches;\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "1"      # the transaction holds its server
        result, report = online(live, "cutover", "--pause-limit", "2", name="held")
    finally:
        holder.stdin.write("ROLLBACK;\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert report["failed_step"] == "pause"
    assert "did not pause within 2 s" in step(report, "pause")["detail"]
    assert step(report, "restore-live")["outcome"] == "ok"
    assert [s["name"] for s in report["steps"]][-1] == "restore-live"
    # Live serves through PgBouncer, as 14, with the same data and nothing of the cutover left.
    assert through_bouncer(live).server_version().startswith("14.")
    assert table_digests(live.server, DATABASES) == before
    assert window_objects(live.server) == NOTHING
    assert load_record(live) is None
    # The upgraded clone stays for inspection (named in the report), unmounted; remove it.
    assert volume_names(live.store) - volumes >= {"live-pg18"}
    assert any("live-pg18" in line for line in report["remains"])
    live.remove_later(os.path.dirname(report["logs"]))
    cowfs("destroy", live.store, "live-pg18")
    for name in volume_names(live.store) - volumes:
        cowfs("destroy", live.store, name)


def load_record(live):
    path = os.path.join(live.mnt, ".cowfs-cutover.json")
    return read_json(path) if os.path.exists(path) else None


# --- 3. the story: cutover, rollback, finish under load ---------------------------------------

@dataclass
class DdlProbe:
    """Tries DDL through PgBouncer every half second once the cutover prepared live."""

    client: PgServer
    live: PgServer
    refused: list = field(default_factory=list)
    succeeded: list = field(default_factory=list)
    temp_tables: int = 0
    temp_table_errors: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while self.live.psql("SELECT count(*) FROM pg_publication") == "0":
            if self.stop.wait(0.05):
                return
        for attempt in range(1_000_000):
            if self.stop.wait(0.5):
                return
            try:
                self.client.psql(f"CREATE TABLE ddl_probe_{attempt} (id int PRIMARY KEY)")
                self.succeeded.append(time.monotonic())
            except Exception as exc:            # the refusal is what we record
                self.refused.append(str(exc))
            # Temporary tables are not replicated: applications may keep creating them
            # (in one transaction: PgBouncer pools transactions, not sessions).
            try:
                self.client.psql("BEGIN; CREATE TEMP TABLE scratch (x int) ON COMMIT DROP; "
                                 "INSERT INTO scratch VALUES (1); COMMIT;")
                self.temp_tables += 1
            except Exception as exc:
                self.temp_table_errors.append(str(exc))


@dataclass
class Story:
    cutover: dict
    rollback: dict
    finish: dict
    version_after_cutover: str
    version_after_rollback: str
    missing_after_cutover: list
    figures: ledger.Figures
    ddl: DdlProbe
    ddl_on_new_while_open: str
    digests_serving: dict
    digests_following: dict
    ledger_problems: dict
    objects_after_finish: dict
    ddl_after_finish: str
    volumes_after_finish: set


@pytest.fixture(scope="module")
def story(live):
    load = ledger.Ledger(live.new_bin, live.bouncer.directory, live.bouncer.port,
                         rate_per_s=RATE_PER_S, writers=WRITERS).start()
    ddl = DdlProbe(through_bouncer(live), live.server)
    prober = threading.Thread(target=ddl.run, daemon=True)
    try:
        wait_for(lambda: len(load.acked) >= ACKS_BETWEEN_STEPS)
        prober.start()
        cut = online(live, "cutover", name="cutover")
        ddl.stop.set()
        prober.join()
        assert cut[0].returncode == 0, cut[0].stdout + cut[0].stderr
        version_after_cutover = through_bouncer(live).server_version()
        acked = len(load.acked)
        wait_for(lambda: len(load.acked) >= acked + ACKS_BETWEEN_STEPS)
        missing_after_cutover = ledger.missing_rows(live.new_bin, live.socket_dir, live.port,
                                                    list(load.acked))
        try:
            through_bouncer(live).psql(DDL)
            ddl_on_new = "succeeded"
        except Exception as exc:
            ddl_on_new = str(exc)
        back = online(live, "rollback-cutover", name="rollback")
        assert back[0].returncode == 0, back[0].stdout + back[0].stderr
        version_after_rollback = through_bouncer(live).server_version()
        acked = len(load.acked)
        wait_for(lambda: len(load.acked) >= acked + ACKS_BETWEEN_STEPS)
    finally:
        ddl.stop.set()
        figures = load.stop()
    report = back[1]
    following = PgServer(live.new_bin, os.path.join(report["new_mountpoint"], PGDATA))
    following.port, following.socket_dir = report["new_side_port"], report["logs"]
    serving = live.client(live.old_bin)
    digests = lambda server: table_digests(server, DATABASES)
    wait_for(lambda: digests(serving) == digests(following), timeout_s=DRAIN_TIMEOUT_S)
    # Sequences are the serving server's; the follower gets them at the next switch.
    problems = {where: ledger.problems(live.new_bin, server.socket_dir, server.port, figures.acked,
                                       sequence=where == "serving")
                for where, server in (("serving", serving), ("following", following))}
    serving_digests, following_digests = digests(serving), digests(following)
    finish = online(live, "finish-cutover", name="finish")
    assert finish[0].returncode == 0, finish[0].stdout + finish[0].stderr
    try:
        serving.psql(DDL)
        ddl_after = "succeeded"
    except Exception as exc:
        ddl_after = str(exc)
    yield Story(cutover=cut[1], rollback=report, finish=finish[1],
                version_after_cutover=version_after_cutover,
                version_after_rollback=version_after_rollback,
                missing_after_cutover=missing_after_cutover, figures=figures, ddl=ddl,
                ddl_on_new_while_open=ddl_on_new, digests_serving=serving_digests,
                digests_following=following_digests, ledger_problems=problems,
                objects_after_finish=window_objects(serving), ddl_after_finish=ddl_after,
                volumes_after_finish=volume_names(live.store))


def test_figures_of_the_switches(story):
    """Not an assertion: the pauses clients saw, for the record (target: about a second)."""
    for name, report in (("cutover", story.cutover), ("rollback", story.rollback)):
        print(f"COWFS_FIGURE online {name}: write_pause_s={report['write_pause_s']} "
              f"replication_lag_at_switch={report['replication_lag_at_switch']} "
              f"steps={[(s['name'], s['duration_s']) for s in report['steps']]}")
    print(f"COWFS_FIGURE online ledger: {len(story.figures.acked)} commits at {RATE_PER_S}/s by "
          f"{WRITERS} writers, longest commit wait {story.figures.max_wait_s:.3f} s, "
          f"{story.figures.reads} reads")
    assert story.cutover["write_pause_s"] > 0 and story.rollback["write_pause_s"] > 0


def test_clients_saw_no_error(story):
    assert story.figures.errors == []
    assert story.figures.read_errors == []
    assert story.figures.reads > 0


def test_no_acknowledged_commit_is_lost_on_either_server(story):
    assert story.missing_after_cutover == []
    assert story.ledger_problems["serving"] == []
    assert story.ledger_problems["following"] == []


def test_a_reader_never_sees_the_count_go_down(story):
    assert story.figures.count_went_down == 0


def test_every_table_has_equal_count_and_md5_on_both_servers_after_the_drain(story):
    assert set(story.digests_serving) == set(DATABASES)
    assert "public.cowfs_ledger" in story.digests_serving["postgres"]
    assert "public.orders" in story.digests_serving["app"]
    assert story.digests_serving == story.digests_following


def test_server_version_after_each_switch(story):
    assert story.version_after_cutover.startswith("18.")
    assert story.version_after_rollback.startswith("14.")


def test_report_names_steps_slots_subscriptions_and_side_port(story):
    cut = story.cutover
    assert cut["ok"] and cut["mode"] == "online"
    names = [s["name"] for s in cut["steps"]]
    for expected in ("prepare-live", "recover-old", "pg-upgrade-link", "subscribe", "catch-up",
                     "pause", "fence", "drain", "sequences", "hand-over", "stop-old", "new-takes-live-endpoint",
                     "resume", "old-follows"):
        assert expected in names, names
    assert "pg-upgrade-check" not in names
    assert all(s["duration_s"] >= 0 for s in cut["steps"])
    assert cut["slots"] == cut["subscriptions"] == ["cowfs_to14_0", "cowfs_to14_1"]
    assert cut["old_side_port"] > 0 and cut["replication_lag_at_switch"]["bytes"] >= 0
    assert "end-of-recovery checkpoint" in step(cut, "recover-old")["detail"]
    assert "checksums off" in step(cut, "initdb-new")["detail"]
    assert "carried the planner statistics" in step(cut, "analyze")["detail"]
    assert story.rollback["slots"] == ["cowfs_to18_0", "cowfs_to18_1"]
    assert story.rollback["serving"].startswith("old")


def test_ddl_is_refused_during_catch_up_and_temporary_tables_are_not(story):
    assert story.ddl.refused, "no DDL was tried while the cutover ran"
    assert story.ddl.succeeded == []
    assert all(BLOCKED in message for message in story.ddl.refused), story.ddl.refused[:3]
    assert story.ddl.temp_table_errors == []
    assert story.ddl.temp_tables >= len(story.ddl.refused)
    assert BLOCKED in story.ddl_on_new_while_open


def test_finish_closes_the_window_and_keeps_the_serving_version(story):
    assert story.finish["ok"]
    assert story.objects_after_finish == NOTHING
    assert story.ddl_after_finish == "succeeded"
    assert {"live", "live-pg18"} <= story.volumes_after_finish
    assert any("live-pg18" in line for line in story.finish["remains"])



def test_switching_or_finishing_a_closed_window_is_a_one_line_error(live, story):
    result, _ = online(live, "rollback-cutover", name="closed-rollback")
    assert_one_line_error(result, 2, "finished", "nothing to switch")
    result, _ = online(live, "finish-cutover", name="closed-finish")
    assert_one_line_error(result, 2, "finished")
    result = live.pg("rollback-cutover", live.store, "live", "--mountpoint", live.mnt,
                     "--old-bin", live.old_bin)
    assert_one_line_error(result, 2, "was online", "--online")
    assert through_bouncer(live).server_version().startswith("14.")

# --- 4. without PgBouncer ------------------------------------------------------------------------

def test_without_pgbouncer_clients_see_errors_for_the_swap_but_lose_no_commit(live, story):
    """After the story (old serves, window closed): the same path, clients connected directly."""
    load = ledger.Ledger(live.new_bin, live.socket_dir, live.port, rate_per_s=RATE_PER_S,
                         writers=WRITERS, reader=False).start()
    try:
        wait_for(lambda: len(load.acked) >= ACKS_BETWEEN_STEPS)
        result, report = online(live, "cutover", "--new-volume", "live-pg18-direct",
                                "--new-mountpoint", os.path.join(live.workdir, "mnt-direct"),
                                pgbouncer=False, name="direct")
        acked = len(load.acked)
        wait_for(lambda: len(load.acked) >= acked + ACKS_BETWEEN_STEPS)   # back, on 18
    finally:
        figures = load.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"COWFS_FIGURE online without PgBouncer: write_pause_s={report['write_pause_s']} "
          f"client errors={len(figures.errors)} longest commit wait={figures.max_wait_s:.3f} s")
    assert "no --pgbouncer" in report["clients_saw"]
    assert step(report, "pause")["detail"].startswith("no --pgbouncer")
    assert live.client(live.new_bin).server_version().startswith("18.")
    assert ledger.problems(live.new_bin, live.socket_dir, live.port, figures.acked) == []
    result, report = online(live, "finish-cutover", name="direct-finish")
    assert result.returncode == 0, result.stdout + result.stderr
    assert window_objects(live.client(live.new_bin)) == NOTHING
