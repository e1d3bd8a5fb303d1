"""Facts about a PostgreSQL cluster and its binaries, read the way PostgreSQL writes them.

Nothing here changes a cluster except `forget_stale_pid_file`, which a
clone needs before a server can start on it (see there).
"""

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Optional

from ..errors import NotFoundError, UsageError
from .server import PgError, PgServer

CONFIG_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")

# Per database, one "schema.table|count" line per ordinary user table, via \gexec.
_ROW_COUNT_SQL = r"""
SELECT format('SELECT %L, count(*) FROM %I.%I', n.nspname || '.' || c.relname, n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
 ORDER BY 1
\gexec
"""


# Per database, one "schema.table|rows|md5" line per ordinary user table: the md5 of
# its rows as text in a fixed order, so two servers holding the same rows agree.
_DIGEST_SQL = r"""
SELECT format($q$SELECT %L, count(*), md5(coalesce(string_agg(t::text, E'\n' ORDER BY t::text), ''))
                   FROM %I.%I t$q$, n.nspname || '.' || c.relname, n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
 ORDER BY 1
\gexec
"""


@dataclass(frozen=True)
class PidFile:
    """The lines of ``postmaster.pid`` that tell clients where the server listens."""

    pid: int
    port: int
    socket_dir: str          # first of unix_socket_directories ('' when none)
    listen_address: str      # first of listen_addresses ('' when Unix socket only)


def read_pid_file(data_dir: str) -> Optional[PidFile]:
    """Parse ``postmaster.pid`` (layout in PostgreSQL's pidfile.h), or None if there is none."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 4:
        return None                      # a server still writing the file; treat as absent
    lines += [""] * 6
    return PidFile(pid=int(lines[0]), port=int(lines[3]), socket_dir=lines[4].strip(),
                   listen_address=lines[5].strip())


def forget_stale_pid_file(data_dir: str) -> bool:
    """Remove the ``postmaster.pid`` a clone inherited from the server of its origin.

    A snapshot of a running cluster holds the live postmaster's pid file; the
    live postmaster still runs, so a server started on the clone would refuse
    to start ("lock file already exists"). The file belongs to another
    volume's server, so removing it from the clone is safe. Returns whether
    there was one.
    """
    try:
        os.unlink(os.path.join(data_dir, "postmaster.pid"))
        return True
    except FileNotFoundError:
        return False


def data_dir_major(data_dir: str) -> str:
    """The major version a data directory was created by (its PG_VERSION file)."""
    path = os.path.join(data_dir, "PG_VERSION")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        raise NotFoundError(f"{data_dir} is not a PostgreSQL data directory (no PG_VERSION); "
                            "check --pgdata (the path relative to the volume root)") from None


def bin_major(bin_dir: str) -> str:
    """The major version of the programs in ``bin_dir`` ('14', '16')."""
    PgServer(bin_dir, "/")                       # validates that bin_dir holds a server
    out = subprocess.run([os.path.join(bin_dir, "postgres"), "--version"], capture_output=True,
                         text=True).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise UsageError(f"cannot tell the version of {bin_dir}/postgres ({out.strip()!r}); "
                         "give a PostgreSQL bin directory")
    return match.group(1)


def controldata(server: PgServer) -> dict:
    """``pg_controldata`` of a stopped or running cluster as {label: value}."""
    out = server.run("pg_controldata", "-D", server.data_dir, what="pg_controldata")
    facts = {}
    for line in out.splitlines():
        label, sep, value = line.partition(":")
        if sep:
            facts[label.strip()] = value.strip()
    return facts


def initdb_settings(server: PgServer) -> dict:
    """What a new cluster must share with this running one for pg_upgrade to accept it."""
    row = server.psql("SELECT datcollate, datctype, pg_encoding_to_char(encoding) FROM pg_database "
                      "WHERE datname = 'template0'")
    collate, ctype, encoding = row.split("|")
    control = controldata(server)
    return dict(lc_collate=collate, lc_ctype=ctype, encoding=encoding,
                data_checksums=control.get("Data page checksum version", "0") != "0",
                wal_segsize_mb=int(control.get("Bytes per WAL segment", 16 << 20)) >> 20)


def databases(server: PgServer) -> list:
    out = server.psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
    return [name for name in out.splitlines() if name]


def row_counts(server: PgServer) -> dict:
    """{database: {schema.table: rows}} for every user table of every database."""
    counts = {}
    for database in databases(server):
        out = server.psql(_ROW_COUNT_SQL, database=database)
        table_rows = {}
        for line in out.splitlines():
            name, _, rows = line.rpartition("|")
            if name:
                table_rows[name] = int(rows)
        counts[database] = table_rows
    return counts


def table_digests(server: PgServer, databases: list) -> dict:
    """{database: {schema.table: 'rows|md5'}}: what two copies of a cluster must agree on."""
    digests = {}
    for database in databases:
        lines = server.psql(_DIGEST_SQL, database=database).splitlines()
        digests[database] = {line.split("|", 1)[0]: line.split("|", 1)[1] for line in lines if line}
    return digests


def tablespace_links(data_dir: str) -> list:
    """Entries of pg_tblspc: tablespaces live outside the data directory (and the volume)."""
    try:
        return sorted(os.listdir(os.path.join(data_dir, "pg_tblspc")))
    except FileNotFoundError:
        return []


def check_sql_true(server: PgServer, sql: str, database: str) -> tuple:
    """Run a check; (True, output) when its last output line is 't' (SQL true)."""
    try:
        out = server.psql(sql, database=database)
    except PgError as exc:
        return False, str(exc)
    last = out.strip().splitlines()[-1].strip() if out.strip() else ""
    return last == "t", out.strip()
