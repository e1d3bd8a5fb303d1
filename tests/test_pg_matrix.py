"""Rehearsals over the upgrade paths users take: 14 -> 15, 16, 17 and 16 -> 18.

14 -> 18, the main path, is rehearsed (and cut over, offline and online)
in test_pg_upgrade.py and test_pg_online.py. Here one live cluster per old
version serves all rehearsals from it; each rehearsal must pass every step
(pg_upgrade --check and --link, the new server's start, analyze, amcheck,
equal row counts) while the live server keeps its data.
"""

import os

import pytest

from helpers import make_workdir, remove_workdir
from pg_helpers import PGDATA, LiveCluster, fingerprint, read_json, step

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _live(old_bin: str, new_bin: str):
    workdir = make_workdir()
    cluster = LiveCluster(workdir, old_bin, new_bin)
    try:
        cluster.create()
        # What the traps are about: a column of a type with a typmod, a sequence, an index.
        cluster.server.psql("CREATE TABLE orders (id bigserial PRIMARY KEY, total numeric(12, 2), "
                            "placed timestamptz DEFAULT now()); CREATE INDEX ON orders (placed);"
                            "INSERT INTO orders (total) SELECT g / 7.0 FROM generate_series(1, 1000) g")
        yield cluster
    finally:
        cluster.close()
        remove_workdir(workdir)


@pytest.fixture(scope="module")
def live14(pg14_bin, pg18_bin):
    yield from _live(pg14_bin, pg18_bin)


@pytest.fixture(scope="module")
def live16(pg16_bin, pg18_bin):
    yield from _live(pg16_bin, pg18_bin)


def rehearse(live: LiveCluster, new_bin: str, name: str) -> dict:
    report_path = os.path.join(live.workdir, f"{name}.json")
    result = live.pg("rehearse-upgrade", live.store, "live", "--pgdata", PGDATA,
                     "--old-bin", live.old_bin, "--new-bin", new_bin, "--clone-name", name,
                     "--json", report_path)
    report = read_json(report_path)
    if report.get("logs"):
        live.remove_later(os.path.dirname(report["logs"]))
    assert result.returncode == 0, result.stdout + result.stderr
    return report


def assert_passed(report: dict, new_major: str) -> None:
    assert report["ok"] and report["new_major"] == new_major
    assert f"PostgreSQL {new_major}." in step(report, "start-new")["detail"]
    assert "equal" in step(report, "row-counts")["detail"]
    assert "checksums off" in step(report, "initdb-new")["detail"]
    carried = "carried the planner statistics" in step(report, "analyze")["detail"]
    assert carried == (int(new_major) >= 18)


@pytest.mark.parametrize("new_major", ["15", "16", "17"])
def test_rehearsal_from_14(live14, new_major, request):
    new_bin = request.getfixturevalue(f"pg{new_major}_bin")
    before = fingerprint(live14.server)
    assert_passed(rehearse(live14, new_bin, f"to{new_major}"), new_major)
    assert fingerprint(live14.server) == before
    assert live14.server.server_version().startswith("14.")


def test_rehearsal_from_16_to_18(live16, pg18_bin):
    assert_passed(rehearse(live16, pg18_bin, "to18"), "18")
    assert live16.server.server_version().startswith("16.")
