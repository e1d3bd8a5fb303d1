"""A running PostgreSQL cluster copied to a second store with send/receive, then started there.

pgbench and a ledger client (numbered rows recorded only after their COMMIT
returned) run on the source volume while snapshots s1 and s2 are taken. s1
goes over in full, s1->s2 incrementally, into a second store. There the
received s2 mounts read-only and reads exactly like the sender's s2, has the
same content digest, and a clone of it starts a server that holds every
ledger row committed before s2 was requested and passes pg_amcheck. The
incremental stream is smaller than the full one: it carries what changed.
"""

import json
import os

import pytest

from cowfs.pg import PgServer, free_port
from helpers import Mount, cowfs, fsck_clean, tree_snapshot
from pg_helpers import start_ledger_cluster
from test_crash import Client, Ledger
from test_send_receive import digest_of, new_store, receive

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SCALE = 2
STATIC_MIB = 40           # data nobody changes between s1 and s2: in the full stream only
LEDGER_ROWS = 150


@pytest.fixture
def cluster(store, workdir, pg14_bin):
    """A live server on 'main' of `store`; every server and mount stopped afterwards."""
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    server = PgServer(pg14_bin, os.path.join(mount.path, "pgdata"))
    started, mounts = [], [mount]
    try:
        yield server, started, mounts
    finally:
        for srv in reversed(started):
            srv.stop("fast")
        for m in reversed(mounts):
            m.close()
    fsck_clean(store)


def test_cluster_sent_in_full_then_incrementally_starts_on_the_receiving_store(cluster, store, workdir, pg14_bin):
    live, started, mounts = cluster
    socket_dir = os.path.join(workdir, "pgrun")
    start_ledger_cluster(live, socket_dir, started, SCALE)
    live.psql(f"CREATE TABLE static AS SELECT g, md5(g::text) || repeat('x', 200) AS pad "
              f"FROM generate_series(1, {STATIC_MIB * 4000}) g; CHECKPOINT")

    load = Client(live, "pgbench", "-c", "2", "-j", "2", "-T", "20", "postgres")
    ledger = Ledger(live, 1, os.path.join(workdir, "ledger.err"))
    try:
        ledger.wait_acked(LEDGER_ROWS)
        cowfs("snapshot", store, "main@s1")
        ledger.wait_acked(len(ledger.acked) + LEDGER_ROWS)
        acked_before_s2 = list(ledger.acked)         # copied before the request is made
        cowfs("snapshot", store, "main@s2")
        ledger.wait_acked(len(acked_before_s2) + 20)
    finally:
        ledger.finish()
    assert load.wait() == 0, "\n".join(load.lines[-10:])

    full, inc = os.path.join(workdir, "s1.cows"), os.path.join(workdir, "s2.cows")
    sent_full = json.loads(cowfs("send", store, "main@s1", "-o", full, "--json").stdout)
    sent_inc = json.loads(cowfs("send", store, "main@s2", "--from", "main@s1", "-o", inc, "--json").stdout)
    print(f"full stream {sent_full['stream_bytes']} bytes, incremental {sent_inc['stream_bytes']} bytes")
    assert sent_inc["stream_bytes"] < sent_full["stream_bytes"] - STATIC_MIB * 2**20, \
        "the incremental stream must not carry the data nobody changed"

    backup = new_store(workdir, "backup")
    receive(backup, full)
    receive(backup, inc)
    for snap in ("main@s1", "main@s2"):
        assert digest_of(backup, snap) == digest_of(store, snap)

    received = Mount(backup, os.path.join(workdir, "received"), "main@s2")
    sent = Mount(store, os.path.join(workdir, "sent"), "main@s2")
    mounts.extend([received, sent])
    received.mount()
    sent.mount()
    assert tree_snapshot(received.path) == tree_snapshot(sent.path)
    received.close()
    sent.close()

    cowfs("clone", backup, "main@s2", "restored")
    restored_mount = Mount(backup, os.path.join(workdir, "restored"), "restored")
    mounts.append(restored_mount)
    restored_mount.mount()
    restored = PgServer(pg14_bin, os.path.join(restored_mount.path, "pgdata"))
    os.unlink(os.path.join(restored.data_dir, "postmaster.pid"))    # the live postmaster's
    restored.start(free_port(exclude={live.port}), socket_dir)
    started.append(restored)
    in_restored = {int(n) for n in restored.psql("SELECT n FROM ledger").split()}
    missing = sorted(set(acked_before_s2) - in_restored)
    assert not missing, f"{len(missing)} rows committed before s2 are missing: {missing[:10]}"
    restored.amcheck()
    restored.stop("fast")
    started.remove(restored)
    restored_mount.umount()
    fsck_clean(backup)
