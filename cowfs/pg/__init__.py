"""PostgreSQL workflows on cowfs volumes.

`server` drives one cluster (a data directory) with the programs of one
PostgreSQL version: initdb, start/stop, psql, pgbench, pg_amcheck. The
upgrade rehearsal, cutover and bisect commands build on it.

Imports point one way: this package uses only `cowfs.errors` and the
standard library; nothing in the library imports it (only the CLI and tests).
"""

from .server import PgbenchResult, PgError, PgServer, free_port

__all__ = ["PgServer", "PgError", "PgbenchResult", "free_port"]
