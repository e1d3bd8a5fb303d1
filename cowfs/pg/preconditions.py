"""What an online cutover needs of the live cluster and of PgBouncer, checked before anything changes.

Each unmet condition is refused in one line that names what to change (or
to use ``--offline``, the stop-the-world cutover, which needs none of it).
The checks only read.

Why each one:

- ``wal_level = logical``: logical decoding needs it; changing it needs a restart.
- free replication slots, WAL senders and logical replication workers:
  one of each per replicated database, on both servers (the new one runs
  with the old one's configuration).
- a primary key or replica identity on every table: once a table is
  published, PostgreSQL refuses UPDATE and DELETE on it *on the live
  server itself* unless it can identify rows.
- no large objects: logical replication does not carry them.
- no unlogged tables: they are not replicated, and a clone's copy is
  empty after crash recovery.
- no prepared transactions: creating a slot waits until every running
  transaction ends, and a prepared one may never end on its own.
- no existing subscriptions or logical slots: their senders and receivers
  would see the clone's copies (the clone would consume another
  subscriber's changes), and rolling back would not know whose they are.
- no leftovers of an earlier cutover (publication or schema cowfs_cutover).
"""

from ..errors import UsageError
from .pgbouncer import PgBouncerConsole
from .replication import PUBLICATION, SCHEMA
from .server import PgServer

SHOW_AT_MOST = 3
OFFLINE = "(or cut over with --offline)"

_USER_TABLES = """
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""

_NO_IDENTITY_SQL = f"""
SELECT format('%I.%I', n.nspname, c.relname) {_USER_TABLES}
   AND c.relpersistence = 'p'
   AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (
        SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
 ORDER BY 1
"""

_UNLOGGED_SQL = f"SELECT format('%I.%I', n.nspname, c.relname) {_USER_TABLES} AND c.relpersistence = 'u' ORDER BY 1"


def _setting(server: PgServer, name: str) -> str:
    return server.psql(f"SHOW {name}")


def _count(server: PgServer, sql: str, database: str = "postgres") -> int:
    return int(server.psql(sql, database=database))


def check_live(server: PgServer, databases: list) -> None:
    """Refuse (`UsageError`, one line) the first unmet condition of an online cutover."""
    wal_level = _setting(server, "wal_level")
    if wal_level != "logical":
        raise UsageError(f"wal_level is {wal_level} on the live server; an online cutover needs "
                         "logical: ALTER SYSTEM SET wal_level = logical and restart it " + OFFLINE)
    _check_capacity(server, len(databases))
    _check_cluster_wide(server)
    for database in databases:
        _check_database(server, database)


def _check_capacity(server: PgServer, needed: int) -> None:
    slots_max = int(_setting(server, "max_replication_slots"))
    slots_used = _count(server, "SELECT count(*) FROM pg_replication_slots")
    senders_max = int(_setting(server, "max_wal_senders"))
    senders_used = _count(server, "SELECT count(*) FROM pg_stat_replication")
    workers_max = int(_setting(server, "max_logical_replication_workers"))
    per_db = f"one per replicated database ({needed})"
    if slots_max - slots_used < needed:
        raise UsageError(f"max_replication_slots is {slots_max} with {slots_used} in use; an online "
                         f"cutover needs {per_db} free: raise it and restart {OFFLINE}")
    if senders_max - senders_used < needed:
        raise UsageError(f"max_wal_senders is {senders_max} with {senders_used} in use; an online "
                         f"cutover needs {per_db} free: raise it and restart {OFFLINE}")
    if workers_max < needed:
        raise UsageError(f"max_logical_replication_workers is {workers_max}; an online cutover "
                         f"needs {per_db}: raise it and restart {OFFLINE}")


def _check_cluster_wide(server: PgServer) -> None:
    prepared = _count(server, "SELECT count(*) FROM pg_prepared_xacts")
    if prepared:
        raise UsageError(f"{prepared} prepared transaction(s) on the live server would hold the "
                         "replication slot's creation: COMMIT PREPARED or ROLLBACK PREPARED them "
                         "(see pg_prepared_xacts) " + OFFLINE)
    subscriptions = _names(server, "SELECT subname FROM pg_subscription ORDER BY 1")
    if subscriptions:
        raise UsageError(f"the live server has subscriptions ({subscriptions}); an online cutover "
                         "would copy them onto the clone: drop them first " + OFFLINE)
    slots = _names(server, "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical' "
                           "ORDER BY 1")
    if slots:
        what = "an earlier cutover left them: 'cowfs pg finish-cutover' or drop them" \
            if "cowfs_to" in slots else "drop them first"
        raise UsageError(f"the live server has logical replication slots ({slots}); {what} "
                         + OFFLINE)


def _check_database(server: PgServer, database: str) -> None:
    where = f"in database {database}"
    tables = _names(server, _NO_IDENTITY_SQL, database)
    if tables:
        raise UsageError(f"tables without a primary key or replica identity {where}: {tables}; "
                         "once published, UPDATE and DELETE on them would fail on the live server: "
                         "add a primary key or ALTER TABLE ... REPLICA IDENTITY FULL " + OFFLINE)
    large_objects = _count(server, "SELECT count(*) FROM pg_largeobject_metadata", database)
    if large_objects:
        raise UsageError(f"{large_objects} large object(s) {where}; logical replication does not "
                         "carry them: move them into bytea columns " + OFFLINE)
    unlogged = _names(server, _UNLOGGED_SQL, database)
    if unlogged:
        raise UsageError(f"unlogged tables {where}: {unlogged}; logical replication does not carry "
                         "them: ALTER TABLE ... SET LOGGED " + OFFLINE)
    leftovers = _count(server, f"SELECT (SELECT count(*) FROM pg_publication WHERE pubname = "
                               f"'{PUBLICATION}') + (SELECT count(*) FROM pg_namespace WHERE "
                               f"nspname = '{SCHEMA}')", database)
    if leftovers:
        raise UsageError(f"publication or schema {PUBLICATION} exists {where}: an earlier online "
                         "cutover is still open ('cowfs pg finish-cutover' closes it) or left them; "
                         "drop them first")


def _names(server: PgServer, sql: str, database: str = "postgres") -> str:
    """The first few names a query returns, as one comma-separated string ('' if none)."""
    names = [n for n in server.psql(sql, database=database).splitlines() if n]
    shown = ", ".join(names[:SHOW_AT_MOST])
    return shown + (f" and {len(names) - SHOW_AT_MOST} more" if len(names) > SHOW_AT_MOST else "")


def check_pgbouncer(console: PgBouncerConsole, live_port: int) -> dict:
    """PgBouncer's console answers, routes to the live port, and can pause; its SHOW CONFIG."""
    config = console.config()
    routes = [row for row in console.show("DATABASES")
              if row.get("name") != "pgbouncer" and row.get("port") == str(live_port)]
    if not routes:
        raise UsageError(f"PgBouncer at {console.conninfo} routes no database to the live server's "
                         f"port {live_port} (SHOW DATABASES); give the console of the PgBouncer "
                         "your clients use, with the live server in its [databases]")
    default_mode = config.get("pool_mode", "session")
    session = [row["name"] for row in routes if (row.get("pool_mode") or default_mode) == "session"]
    if session:
        raise UsageError(f"PgBouncer pools {', '.join(session)} in session mode: its PAUSE would wait "
                         "for every client to disconnect; use pool_mode = transaction "
                         "(or run without --pgbouncer)")
    return config
