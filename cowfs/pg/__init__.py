"""PostgreSQL workflows on cowfs volumes.

Modules, bottom up:

    server     one cluster (a data directory) driven by the programs of one
               PostgreSQL version: initdb, start/stop, psql, pgbench, pg_amcheck
    cluster    facts about a cluster: postmaster.pid, PG_VERSION, settings, row counts
    report     named, timed steps and the text/JSON report they add up to
    workspace  mounts, sockets and pg_upgrade's directory of one workflow; cleanup
    upgrade    the upgrade steps on a mounted clone (shared by rehearsal and cutover)
    rehearse, cutover, bisect   the `cowfs pg` workflows
    ledger     a write probe proving no acknowledged commit is lost

Imports point one way: this package uses the library (admin, snapshots,
volumes, store, daemon's mount helpers); nothing in the library imports it
(only the CLI and tests). See docs/postgres.md.
"""

from .server import PgbenchResult, PgError, PgServer, free_port

__all__ = ["PgServer", "PgError", "PgbenchResult", "free_port"]
