"""PostgreSQL workflows on cowfs volumes.

Modules, bottom up:

    server     one cluster (a data directory) driven by the programs of one
               PostgreSQL version: initdb, start/stop, psql, pgbench, pg_amcheck
    cluster    facts about a cluster: postmaster.pid, PG_VERSION, settings, row counts
    report     named, timed steps and the text/JSON report they add up to
    workspace  mounts, sockets and pg_upgrade's directory of one workflow; cleanup
    live       the live volume and the live server's endpoint (both cutovers)
    upgrade    the upgrade steps on a mounted clone (rehearsal and both cutovers)
    replication  logical replication between two clusters: publication, slots,
               subscriptions, DDL block, sequences, fence (online cutover)
    pgbouncer  PgBouncer's admin console (PAUSE/RESUME); an instance for tests
    preconditions  what an online cutover refuses, checked before any change
    window     the record of an open online cutover: who serves, who follows
    switch     the switch between the two behind a PgBouncer pause
    rehearse, cutover (offline), online (cutover --online, rollback, finish),
    bisect     the `cowfs pg` workflows
    ledger     an open-loop write probe: no acknowledged commit lost or doubled

Imports point one way: this package uses the library (admin, snapshots,
volumes, store, daemon's mount helpers); nothing in the library imports it
(only the CLI and tests). See docs/postgres.md.
"""

from .server import PgbenchResult, PgError, PgServer, free_port

__all__ = ["PgServer", "PgError", "PgbenchResult", "free_port"]
