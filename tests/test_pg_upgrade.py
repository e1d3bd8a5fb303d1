"""Upgrade rehearsal, offline cutover and rollback: PostgreSQL 14.23 -> 18.6 on real cowfs mounts.

Each test starts from a live 14 cluster on volume ``live`` of a fresh store
(see `pg_helpers.LiveCluster`) and drives `cowfs pg ...` as a user does.
The online cutover has its own module (test_pg_online.py); the other
upgrade paths are rehearsed in test_pg_matrix.py.
"""

import os
import signal
import subprocess
import sys

import pytest

from cowfs.pg import PgServer, free_port
from cowfs.pg.ledger import Ledger, missing_rows
from helpers import Mount, cowfs
from pg_helpers import (PGDATA, LiveCluster, PgbenchLoop, assert_one_line_error,
                        assert_pgbench_consistent, fingerprint, read_json, step, store_mounts,
                        volume_names, wait_for)

pytestmark = pytest.mark.postgres

UPGRADE_STEPS = ["snapshot-live", "clone", "mount-clone", "recover-old", "initdb-new",
                 "pg-upgrade-check", "pg-upgrade-link", "install-new", "start-new", "analyze", "amcheck",
                 "row-counts", "check-sql", "stop-new"]


@pytest.fixture
def live(workdir, pg14_bin, pg18_bin):
    cluster = LiveCluster(workdir, pg14_bin, pg18_bin)
    try:
        yield cluster.create()
    finally:
        cluster.close()


def rehearse(live: LiveCluster, *extra):
    report_path = os.path.join(live.workdir, "rehearsal.json")
    result = live.pg("rehearse-upgrade", live.store, "live", "--pgdata", PGDATA,
                     "--old-bin", live.old_bin, "--new-bin", live.new_bin,
                     "--json", report_path, *extra)
    report = read_json(report_path) if os.path.exists(report_path) else None
    if report and report.get("logs"):
        live.remove_later(os.path.dirname(report["logs"]))      # kept for people, not tests
    return result, report


def test_rehearsal_passes_while_live_pgbench_runs_and_live_keeps_exactly_its_commits(live):
    live_pid = live.server.postmaster_pid()
    bench = PgbenchLoop(live.server).start()
    try:
        result, report = rehearse(live)
    finally:
        bench.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["ok"] and report["failed_step"] is None
    assert [s["name"] for s in report["steps"]] == UPGRADE_STEPS
    assert step(report, "check-sql")["outcome"] == "skipped"
    assert all(s["outcome"] == "ok" for s in report["steps"] if s["name"] != "check-sql")
    assert all(s["duration_s"] >= 0 for s in report["steps"])
    assert "PostgreSQL 18." in step(report, "start-new")["detail"]
    assert "equal" in step(report, "row-counts")["detail"]
    assert "PASSED" in result.stdout
    assert report["cutover_estimate_s"] > 0 and "cutover_estimate_s" in result.stdout

    # Every snapshot the report names exists; the clone is kept but unmounted.
    names = volume_names(live.store)
    assert set(report["snapshots"]) <= names, report["snapshots"]
    assert report["clone"] in names
    assert any(s.endswith("@step-7-pg-upgrade-link") for s in report["snapshots"])
    assert any(report["clone"] in line for line in report["remains"])
    assert not os.path.exists(os.path.join(live.mnt, f"{PGDATA}.pg18-new"))

    # The live side: pgbench never failed, same postmaster, still 14, data = what pgbench committed.
    assert bench.failures == [] and bench.rounds >= 1, bench.failures
    assert live.server.postmaster_pid() == live_pid
    assert live.server.server_version().startswith("14.")
    assert_pgbench_consistent(fingerprint(live.server), bench.transactions)


def test_regproc_blocker_fails_at_pg_upgrade_check_and_live_is_untouched(live):
    live.server.psql("CREATE TABLE blocker (id int PRIMARY KEY, fn regproc);"
                     "INSERT INTO blocker VALUES (1, 'now'::regproc)")
    before = fingerprint(live.server)
    live_pid = live.server.postmaster_pid()

    result, report = rehearse(live)

    assert result.returncode == 1, result.stdout + result.stderr
    assert not report["ok"] and report["failed_step"] == "pg-upgrade-check"
    failed = step(report, "pg-upgrade-check")
    assert failed["outcome"] == "failed"
    assert "reg* data types in user tables" in failed["detail"], failed["detail"]
    assert "public.blocker.fn" in failed["log"], failed["log"]        # tables_using_reg.txt
    assert failed["snapshot"].endswith("@step-6-pg-upgrade-check-failed")
    assert [s["name"] for s in report["steps"]][-1] == "pg-upgrade-check"
    assert "pg-upgrade-check" in result.stdout and "FAILED" in result.stdout
    assert "public.blocker.fn" in result.stdout

    assert live.server.postmaster_pid() == live_pid
    assert fingerprint(live.server) == before
    assert live.server.psql("SELECT fn FROM blocker") == "now"
    assert not os.path.exists(os.path.join(live.mnt, f"{PGDATA}.pg18-new"))


def test_failing_check_sql_is_reported_at_its_step_and_the_snapshot_before_it_starts(live, workdir):
    check = os.path.join(workdir, "check.sql")
    with open(check, "w") as f:
        f.write("SELECT count(*) > 1000000 FROM pgbench_accounts;\n")   # scale 1: 100,000 rows

    result, report = rehearse(live, "--check-sql", check, "--keep")
    live.remove_later(report["workspace"])

    assert result.returncode == 1, result.stdout + result.stderr
    assert report["failed_step"] == "check-sql"
    # --keep: the clone stays mounted (its server stopped, as the rehearsal failed).
    kept = os.path.join(report["workspace"], f"mnt-{report['clone']}")
    assert kept in store_mounts(live.store)
    assert not os.path.exists(os.path.join(kept, PGDATA, "postmaster.pid"))
    assert any(f"mounted at {kept}" in line for line in report["remains"])
    assert "did not return true" in step(report, "check-sql")["detail"]
    before = step(report, "row-counts")
    assert before["outcome"] == "ok" and before["snapshot"] in report["snapshots"]

    # The state before the failing step clones and starts (PostgreSQL 18, data intact).
    cowfs("clone", live.store, before["snapshot"], "inspect")
    mount = Mount(live.store, os.path.join(workdir, "inspect"), "inspect").mount()
    server = PgServer(live.new_bin, os.path.join(mount.path, PGDATA))
    try:
        os.unlink(os.path.join(server.data_dir, "postmaster.pid"))   # taken while it ran
        server.start(free_port(exclude=(live.port,)), live.socket_dir)
        assert server.server_version().startswith("18.")
        assert server.psql("SELECT count(*) FROM pgbench_accounts") == "100000"
    finally:
        server.stop("immediate")
        mount.close()


def test_cutover_keeps_every_committed_row_and_rollback_brings_back_14(live):
    ledger = Ledger(live.new_bin, live.socket_dir, live.port).start()
    report_path = os.path.join(live.workdir, "cutover.json")
    try:
        wait_for(lambda: len(ledger.acked) >= 50)         # load before the cutover starts
        acked_before = list(ledger.acked)
        result = live.pg("cutover", live.store, "live", "--pgdata", PGDATA, "--mountpoint", live.mnt,
                         "--old-bin", live.old_bin, "--new-bin", live.new_bin, "--offline",
                         "--json", report_path)
        assert result.returncode == 0, result.stdout + result.stderr
        acked_at_cutover_end = len(ledger.acked)
        wait_for(lambda: len(ledger.acked) >= acked_at_cutover_end + 20)   # it reconnects to 18
    finally:
        acked = ledger.stop().acked
    report = read_json(report_path)
    assert report["ok"] and report["downtime_s"] > 0 and report["mode"] == "offline"
    names = [s["name"] for s in report["steps"]]
    # Out of the downtime: initdb before stop-live, no separate --check, no crash recovery.
    assert names.index("initdb-ahead") < names.index("stop-live")
    assert "pg-upgrade-check" not in names and step(report, "recover-old")["outcome"] == "skipped"
    assert names.index("analyze") > names.index("start-new-live")
    assert step(report, "amcheck")["outcome"] == "ok"
    assert report["pre_upgrade_volume"] == "live-pre-upgrade"
    assert ledger.reconnects >= 1

    server = live.client(live.new_bin)
    assert server.server_version().startswith("18.")            # same port and socket as before
    assert missing_rows(live.new_bin, live.socket_dir, live.port, acked) == []
    rows_18 = set(map(int, server.psql("SELECT n FROM cowfs_ledger").split()))
    assert set(acked_before) <= rows_18
    assert {"live", "live-pre-upgrade"} <= volume_names(live.store)

    result = live.pg("rollback-cutover", live.store, "live", "--mountpoint", live.mnt,
                     "--old-bin", live.old_bin)
    assert result.returncode == 0, result.stdout + result.stderr
    old = live.client(live.old_bin)
    assert old.server_version().startswith("14.")
    rows_14 = set(map(int, old.psql("SELECT n FROM cowfs_ledger").split()))
    assert set(acked_before) <= rows_14 <= rows_18
    assert max(rows_14) < max(rows_18)             # what was written on 18 stays on 18's volume
    assert any(name.startswith("live-upgraded-") for name in volume_names(live.store))


def test_bad_input_is_one_line_with_exit_code_and_changes_nothing(live, workdir):
    before = volume_names(live.store)
    common = ["--old-bin", live.old_bin, "--new-bin", live.new_bin]
    assert_one_line_error(live.pg("rehearse-upgrade", live.store, "nosuch", "--pgdata", PGDATA,
                                  *common), 3, "nosuch")
    assert_one_line_error(live.pg("rehearse-upgrade", live.store, "live", "--pgdata", PGDATA,
                                  "--old-bin", live.new_bin, "--new-bin", live.old_bin), 2, "newer")
    assert_one_line_error(live.pg("rehearse-upgrade", live.store, "live", "--pgdata", "/abs",
                                  *common), 2, "relative")
    assert_one_line_error(live.pg("rehearse-upgrade", live.store, "live", "--pgdata", PGDATA,
                                  "--check-sql", os.path.join(workdir, "missing.sql"), *common),
                          2, "--check-sql")
    assert_one_line_error(live.pg("rehearse-upgrade", live.store, "live", "--pgdata", PGDATA,
                                  "--old-bin", workdir, "--new-bin", live.new_bin), 1, workdir)
    assert_one_line_error(live.pg("cutover", live.store, "live", "--pgdata", PGDATA,
                                  "--mountpoint", workdir, *common), 2, "--mountpoint")
    assert_one_line_error(live.pg("rollback-cutover", live.store, "live", "--mountpoint", live.mnt,
                                  "--old-bin", live.old_bin), 3, "no cutover record")
    assert_one_line_error(live.pg("rehearse-upgrade", live.store, "live", "--pgdata", "nodata",
                                  *common), 3, "nodata")          # found on the clone, undone
    assert_one_line_error(live.pg("cutover", live.store, "live", "--pgdata", PGDATA,
                                  "--mountpoint", live.mnt, "--old-bin", live.new_bin,
                                  "--new-bin", live.new_bin), 2, "newer")
    assert_one_line_error(live.pg("rehearse-upgrade", live.store), 2, "--help")
    assert_one_line_error(live.pg(), 2, "subcommand")
    assert volume_names(live.store) == before
    assert live.server.server_version().startswith("14.")


def test_cutover_that_fails_verification_restarts_14_on_the_untouched_live_volume(live, workdir):
    check = os.path.join(workdir, "check.sql")
    with open(check, "w") as f:
        f.write("SELECT count(*) = 0 FROM cowfs_ledger;\n")       # false: the ledger has rows
    ledger = Ledger(live.new_bin, live.socket_dir, live.port).start()
    report_path = os.path.join(workdir, "cutover.json")
    try:
        wait_for(lambda: len(ledger.acked) >= 20)
        result = live.pg("cutover", live.store, "live", "--pgdata", PGDATA, "--mountpoint", live.mnt,
                         "--old-bin", live.old_bin, "--new-bin", live.new_bin,
                         "--check-sql", check, "--verify", "light", "--offline",
                         "--json", report_path)
        after = len(ledger.acked)
        wait_for(lambda: len(ledger.acked) >= after + 10)     # the writer is back on 14
    finally:
        acked = ledger.stop().acked
    report = read_json(report_path)
    live.remove_later(os.path.dirname(report["logs"]))
    assert result.returncode == 1, result.stdout + result.stderr
    assert report["failed_step"] == "check-sql"
    # --check-sql is the go/no-go gate: checked on a side socket before any client could write.
    assert step(report, "start-new")["outcome"] == "ok"
    assert "start-new-live" not in [s["name"] for s in report["steps"]]
    assert step(report, "restore-live")["outcome"] == "ok"
    assert "unmount-live" not in [s["name"] for s in report["steps"]]
    assert live.client(live.old_bin).server_version().startswith("14.")
    assert missing_rows(live.new_bin, live.socket_dir, live.port, acked) == []
    names = volume_names(live.store)
    assert "live" in names and "live-pre-upgrade" not in names
    assert any(line.startswith("volume live-upgrade-") for line in report["remains"])


def test_rehearsal_of_an_unmounted_volume_and_cutover_of_a_stopped_server(live):
    live.server.psql("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1234) g")
    live.server.stop("fast")
    live.mount.umount()

    result, report = rehearse(live)                       # through LMDB, no daemon to ask
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean start" in step(report, "recover-old")["detail"]

    live.mount.mount()
    result = live.pg("cutover", live.store, "live", "--pgdata", PGDATA, "--mountpoint", live.mnt,
                     "--old-bin", live.old_bin, "--new-bin", live.new_bin, "--verify", "light",
                     "--offline")
    assert_one_line_error(result, 2, "--port")            # no server: its endpoint is unknown
    result = live.pg("cutover", live.store, "live", "--pgdata", PGDATA, "--mountpoint", live.mnt,
                     "--old-bin", live.old_bin, "--new-bin", live.new_bin, "--verify", "light",
                     "--offline", "--port", str(live.port), "--socket-dir", live.socket_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    server = live.client(live.new_bin)
    assert server.server_version().startswith("18.")
    assert server.psql("SELECT count(*) FROM kept") == "1234"


def test_cutover_stopped_by_sigterm_serves_the_live_cluster_again(live, workdir):
    live.server.psql("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 777) g")
    report_path = os.path.join(workdir, "cutover.json")
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", "pg", "cutover", live.store, "live",
                             "--pgdata", PGDATA, "--mountpoint", live.mnt, "--old-bin", live.old_bin,
                             "--new-bin", live.new_bin, "--offline", "--json", report_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The clone exists: the live server is down, the upgrade is under way.
        wait_for(lambda: any(n.startswith("live-upgrade-") for n in volume_names(live.store))
                 or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = read_json(report_path)
    live.remove_later(os.path.dirname(report["logs"]))
    assert proc.returncode == 1, out + err
    assert "SIGTERM" in (report["error"] or "") + out
    assert step(report, "restore-live")["outcome"] == "ok"
    server = live.client(live.old_bin)
    assert server.server_version().startswith("14.")
    assert server.psql("SELECT count(*) FROM kept") == "777"
    assert "live-pre-upgrade" not in volume_names(live.store)
    assert not os.path.exists(os.path.join(live.mnt, f"{PGDATA}.pg18-new"))   # initdb-ahead undone


def test_late_failure_that_check_misses_is_named_and_the_state_before_it_starts(live, workdir):
    # PostgreSQL 15 removed pg_database.datlastsysoid: --check passes, restoring schemas fails.
    live.server.psql("CREATE VIEW db_sysoids AS SELECT datname, datlastsysoid FROM pg_database")

    result, report = rehearse(live)

    assert result.returncode == 1, result.stdout + result.stderr
    assert step(report, "pg-upgrade-check")["outcome"] == "ok"
    assert report["failed_step"] == "pg-upgrade-link"
    failed = step(report, "pg-upgrade-link")
    assert "Restoring database schemas" in failed["detail"], failed["detail"]
    assert "datlastsysoid does not exist" in failed["detail"], failed["detail"]
    assert "datlastsysoid does not exist" in failed["log"]

    # The snapshot after the check step is the state before the failing one: 14 starts on it.
    before = step(report, "pg-upgrade-check")["snapshot"]
    cowfs("clone", live.store, before, "before-link")
    mount = Mount(live.store, os.path.join(workdir, "before-link"), "before-link").mount()
    server = PgServer(live.old_bin, os.path.join(mount.path, PGDATA))
    try:
        server.start(free_port(exclude=(live.port,)), live.socket_dir)
        assert server.server_version().startswith("14.")
        assert int(server.psql("SELECT count(*) FROM db_sysoids")) >= 2
    finally:
        server.stop("immediate")
        mount.close()
    assert live.server.server_version().startswith("14.")
