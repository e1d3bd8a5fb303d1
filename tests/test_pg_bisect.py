"""`cowfs pg bisect`: the first snapshot where a check turns false, with few server starts.

Ten snapshots of a live PostgreSQL 14 cluster are taken while it serves
(each one needs crash recovery when started); the change that breaks the
check lands between the 6th and 7th. Bisect must name exactly that pair and
start no more servers than a binary search needs: ceil(log2(N+1)) for N
candidates (see cowfs/pg/bisect.py for why that bound).
"""

import os

import pytest

from helpers import cowfs, make_workdir, remove_workdir
from pg_helpers import LiveCluster, PGDATA, assert_one_line_error, bisect_bound, read_json, volume_names

pytestmark = pytest.mark.postgres

SNAPSHOTS = 10
BREAKS_AT = 6                  # snapshot s6 is the first with a negative balance
CHECK = "SELECT count(*) = 0 FROM pgbench_accounts WHERE abalance < 0"


@pytest.fixture(scope="module")
def history(pg14_bin, pg16_bin):
    """A live cluster with snapshots s0..s9; s6 onwards fail CHECK."""
    workdir = make_workdir()
    cluster = LiveCluster(workdir, pg14_bin, pg16_bin)
    try:
        cluster.create()
        for i in range(SNAPSHOTS):
            delta = -1000 if i == BREAKS_AT else 1
            cluster.server.psql(f"UPDATE pgbench_accounts SET abalance = abalance + {delta} "
                                f"WHERE aid = {i + 1}")
            cowfs("snapshot", cluster.store, f"live@s{i}")
        yield cluster
    finally:
        cluster.close()
        remove_workdir(workdir)


def bisect(cluster: LiveCluster, *extra):
    report_path = os.path.join(cluster.workdir, "bisect.json")
    if os.path.exists(report_path):
        os.unlink(report_path)
    result = cluster.pg("bisect", cluster.store, "live", "--pgdata", PGDATA, "--bin",
                        cluster.old_bin, "--check", CHECK, "--json", report_path, *extra)
    return result, read_json(report_path) if os.path.exists(report_path) else None


def test_bisect_names_exactly_the_breaking_snapshot_within_the_binary_search_bound(history):
    volumes_before = volume_names(history.store)
    result, report = bisect(history)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["last_good"]["snapshot"] == f"live@s{BREAKS_AT - 1}"
    assert report["first_bad"]["snapshot"] == f"live@s{BREAKS_AT}"
    assert report["last_good"]["created"] < report["first_bad"]["created"]
    assert report["candidates"] == SNAPSHOTS
    assert report["max_servers"] == bisect_bound(SNAPSHOTS) == 4
    assert 1 <= report["servers_started"] <= bisect_bound(SNAPSHOTS)
    assert report["servers_started"] == len(report["probes"])
    assert f"live@s{BREAKS_AT}" in result.stdout
    # Every probe clone was destroyed; the live cluster still serves, unchanged.
    assert volume_names(history.store) == volumes_before
    assert history.server.psql(CHECK) == "f"


def test_bisect_within_from_to_and_edge_ranges(history):
    result, report = bisect(history, "--from", "s3", "--to", "s9")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["first_bad"]["snapshot"] == f"live@s{BREAKS_AT}"
    assert report["servers_started"] <= bisect_bound(7) == 3

    result, report = bisect(history, "--from", "s0", "--to", "s2")
    assert result.returncode == 0
    assert report["first_bad"] is None and report["last_good"]["snapshot"] == "live@s2"
    assert "every snapshot in the range is good" in result.stdout

    result, report = bisect(history, "--from", "live@s7")
    assert result.returncode == 0
    assert report["last_good"] is None and report["first_bad"]["snapshot"] == "live@s7"


def test_bisect_bad_input_and_a_check_that_errors(history):
    before = volume_names(history.store)
    assert_one_line_error(history.pg("bisect", history.store, "live", "--pgdata", PGDATA, "--bin",
                                     history.old_bin, "--check", CHECK, "--from", "nosuch"),
                          3, "nosuch")
    assert_one_line_error(history.pg("bisect", history.store, "live", "--pgdata", PGDATA, "--bin",
                                     history.old_bin, "--check", CHECK, "--from", "s5", "--to", "s2"),
                          2, "no snapshots")
    assert_one_line_error(history.pg("bisect", history.store, "live", "--pgdata", PGDATA, "--bin",
                                     history.old_bin), 2, "--check")
    result, report = bisect(history, "--from", "s0", "--to", "s0")
    assert result.returncode == 0 and report["servers_started"] == 1

    report_path = os.path.join(history.workdir, "error.json")
    result = history.pg("bisect", history.store, "live", "--pgdata", PGDATA, "--bin",
                        history.old_bin, "--check", "SELECT 1/0 = 1", "--json", report_path)
    assert result.returncode == 1
    report = read_json(report_path)
    history.remove_later(os.path.dirname(report["logs"]))
    assert "division by zero" in report["steps"][0]["detail"]
    assert report["servers_started"] == 1
    assert volume_names(history.store) == before
