"""PostgreSQL 14 on a cowfs mount: it runs, and its data survives an unmount.

A cluster with data checksums is created on the mount and loaded with
pgbench; after a clean stop and `cowfs umount`, fsck must be clean, the
remounted data directory must be byte-identical, and the restarted server
must return the same data and pass pg_amcheck.
"""

import os

import pytest

from cowfs.pg import PgError, PgServer, free_port
from helpers import dump, fsck_clean, tree_snapshot

pytestmark = pytest.mark.postgres

SCALE = 2                  # 200,000 accounts: small, CI runs everything in 30 min
CLIENTS = 4
BENCH_SECONDS = 5

# Everything pgbench can change, with pgbench's own invariant: each
# transaction adds the same delta to one account, teller, branch and history
# row, so the four sums are equal after any number of complete transactions.
FINGERPRINT_SQL = """
SELECT count(*), sum(abalance), md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid))
  FROM pgbench_accounts;
SELECT count(*), sum(tbalance), md5(string_agg(tid || ':' || tbalance, ',' ORDER BY tid))
  FROM pgbench_tellers;
SELECT count(*), sum(bbalance), md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid))
  FROM pgbench_branches;
SELECT count(*), sum(delta), md5(string_agg(concat_ws(':', tid, bid, aid, delta, mtime), ','
                                            ORDER BY mtime, tid, bid, aid, delta))
  FROM pgbench_history;
"""


def fingerprint(pg: PgServer) -> dict:
    rows = pg.psql(FINGERPRINT_SQL).splitlines()
    tables = ["accounts", "tellers", "branches", "history"]
    return {table: row.split("|") for table, row in zip(tables, rows)}


def assert_pgbench_invariant(fp: dict) -> None:
    sums = {table: int(values[1] or 0) for table, values in fp.items()}
    assert len(set(sums.values())) == 1, f"pgbench balances disagree: {sums}"


@pytest.fixture
def pg(mounted, pg14_bin):
    """A PostgreSQL 14 server object for a data directory on the mount; stopped afterwards."""
    server = PgServer(pg14_bin, os.path.join(mounted.path, "pgdata"))
    try:
        yield server
    finally:
        if os.path.isdir(server.data_dir):      # not when the test failed while unmounted
            server.stop("fast")


def test_cluster_survives_stop_unmount_and_remount(pg, mounted, store, workdir):
    socket_dir, port = os.path.join(workdir, "pgrun"), free_port()
    pg.initdb(data_checksums=True)
    pg.start(port, socket_dir)
    assert pg.server_version().startswith("14.")
    pg.pgbench_init(SCALE)
    result = pg.pgbench(CLIENTS, seconds=BENCH_SECONDS)
    assert result.transactions > 0, result.output
    before = fingerprint(pg)
    assert before["accounts"][0] == str(SCALE * 100_000)
    assert int(before["history"][0]) == result.transactions
    assert_pgbench_invariant(before)
    pg.stop("fast")
    files_before = tree_snapshot(pg.data_dir)

    mounted.umount()
    fsck_clean(store)
    mounted.mount()

    files_after = tree_snapshot(pg.data_dir)
    assert files_after == files_before, "data directory changed across the remount:\n" + dump(
        {name: (files_before.get(name), files_after.get(name))
         for name in sorted(set(files_before) | set(files_after))
         if files_before.get(name) != files_after.get(name)})
    pg.start(port, socket_dir)
    assert fingerprint(pg) == before
    pg.amcheck()


def test_failed_start_reports_the_server_log(pg, workdir):
    pg.initdb()
    with pytest.raises(PgError) as caught:
        pg.start(free_port(), os.path.join(workdir, "pgrun"), settings={"shared_buffers": "lots"})
    message = str(caught.value)
    assert "\n" not in message
    assert 'invalid value for parameter "shared_buffers"' in message, message
    assert not pg.is_running()
