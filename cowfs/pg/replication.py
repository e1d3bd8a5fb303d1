"""PostgreSQL's logical replication between two clusters, as the online cutover uses it.

Everything here is SQL run with psql on one database of one server
(`PgServer.psql`). The names are fixed so that a later command (rollback,
finish) and a person reading ``pg_replication_slots`` recognise them:

    publication  cowfs_cutover                  FOR ALL TABLES, on both servers
    DDL block    schema cowfs_cutover, event triggers cowfs_cutover_ddl_end
                 and cowfs_cutover_sql_drop
    handover     table cowfs_cutover.handover: a switch writes a row into it on
                 the serving server once that takes no more writes; when the
                 row shows on the follower, so has every earlier commit
    slot and     cowfs_to<MAJOR>_<N>: the link that carries changes TO the
    subscription server of version MAJOR, for the N-th replicated database;
                 the slot lives on the sender, the subscription (same name) on
                 the receiver

Why the DDL block: logical replication carries rows, not schema changes.
A table altered on one side only stops replication at the next row that
does not fit. The event triggers fail any DDL in the replicated databases
while a cutover is open, except on temporary objects (applications create
temporary tables) and in sessions of cowfs itself, which set
``cowfs.allow_ddl``. It is a guard rail against accidents, not a security
boundary: a superuser can set the same variable.
"""

import time
from typing import Iterable

from .server import PgError, PgServer

PUBLICATION = "cowfs_cutover"
SCHEMA = "cowfs_cutover"
ALLOW_DDL = "SET cowfs.allow_ddl = on;\n"
POLL_S = 0.02
SLOT_RELEASE_TIMEOUT_S = 30.0

_BLOCK_DDL_SQL = f"""
CREATE SCHEMA {SCHEMA};
CREATE FUNCTION {SCHEMA}.block_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
    blocked boolean;
BEGIN
    IF current_setting('cowfs.allow_ddl', true) = 'on' THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        SELECT bool_or(NOT is_temporary) INTO blocked FROM pg_event_trigger_dropped_objects();
    ELSIF TG_TAG LIKE 'DROP %' THEN
        blocked := false;         -- sql_drop, which fires first, judged what it dropped
    ELSE
        -- No object reported, or one outside a temporary schema: blocked.
        SELECT coalesce(bool_or(schema_name IS NULL OR (schema_name <> 'pg_temp'
                                AND schema_name NOT LIKE 'pg\\_temp\\_%')), true)
          INTO blocked FROM pg_event_trigger_ddl_commands();
    END IF;
    IF blocked THEN
        RAISE EXCEPTION 'cowfs: % is blocked while an online cutover is open (logical replication does not carry schema changes)', TG_TAG
              USING HINT = 'Run it after ''cowfs pg finish-cutover'' closes the cutover window.';
    END IF;
END
$fn$;
CREATE TABLE {SCHEMA}.handover (n bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE EVENT TRIGGER cowfs_cutover_ddl_end ON ddl_command_end
    EXECUTE FUNCTION {SCHEMA}.block_ddl();
CREATE EVENT TRIGGER cowfs_cutover_sql_drop ON sql_drop
    EXECUTE FUNCTION {SCHEMA}.block_ddl();
"""

_UNBLOCK_DDL_SQL = f"""
DROP EVENT TRIGGER IF EXISTS cowfs_cutover_ddl_end;
DROP EVENT TRIGGER IF EXISTS cowfs_cutover_sql_drop;
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
"""


def link_name(receiver_major: str, db_index: int) -> str:
    """Slot and subscription name of the link carrying database ``db_index`` to ``receiver_major``."""
    return f"cowfs_to{receiver_major}_{db_index}"


def databases(server: PgServer) -> list:
    """The databases replicated: every one that accepts connections, templates aside.

    Templates hold no application data, and a walsender connected to
    template1 would make CREATE DATABASE fail for as long as it runs.
    """
    out = server.psql("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                      "ORDER BY datname")
    return [name for name in out.splitlines() if name]


def conninfo(socket_dir: str, port: int, database: str) -> str:
    """A libpq conninfo to one database of a server on a Unix socket, as the superuser."""
    return " ".join(f"{key}={_conninfo_value(str(value))}" for key, value in
                    (("host", socket_dir), ("port", port), ("user", "postgres"),
                     ("dbname", database)))


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


# --- the publishing side --------------------------------------------------------------------

def block_ddl(server: PgServer, database: str) -> None:
    server.psql(ALLOW_DDL + _BLOCK_DDL_SQL, database=database)


def unblock_ddl(server: PgServer, database: str) -> None:
    server.psql(ALLOW_DDL + _UNBLOCK_DDL_SQL, database=database)


def create_publication(server: PgServer, database: str) -> None:
    server.psql(ALLOW_DDL + f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES", database=database)


def drop_publication(server: PgServer, database: str) -> None:
    server.psql(ALLOW_DDL + f"DROP PUBLICATION IF EXISTS {PUBLICATION}", database=database)


def create_slot(server: PgServer, database: str, name: str, timeout_s: float) -> str:
    """A logical slot (pgoutput) in ``database``; its consistent point (an LSN).

    PostgreSQL waits until every transaction running at this moment has
    ended: a transaction left open on the server holds this call.
    """
    try:
        return server.psql(f"SELECT lsn FROM pg_create_logical_replication_slot({literal(name)}, "
                           "'pgoutput')", database=database, timeout_s=timeout_s)
    except PgError as exc:
        if "did not finish" in str(exc):
            raise PgError(f"creating replication slot {name} waited {timeout_s:g} s for the "
                          "transactions running on the server to end; end or wait out the "
                          "long transaction (see pg_stat_activity) and try again") from None
        raise


def drop_slot(server: PgServer, name: str) -> None:
    """Drop a slot if it exists, once its walsender let go of it (terminated if it does not)."""
    started = time.monotonic()
    while True:
        row = server.psql(f"SELECT active, active_pid FROM pg_replication_slots "
                          f"WHERE slot_name = {literal(name)}")
        if not row:
            return
        active, pid = row.split("|")
        if active != "t":
            break
        waited_s = time.monotonic() - started
        if waited_s > 2 * SLOT_RELEASE_TIMEOUT_S:
            raise PgError(f"replication slot {name} on {server.data_dir} stays in use (pid {pid}); "
                          "drop the subscription that uses it, then the slot")
        if waited_s > SLOT_RELEASE_TIMEOUT_S:
            server.psql(f"SELECT pg_terminate_backend({pid})")
        time.sleep(POLL_S * 5)
    server.psql(f"SELECT pg_drop_replication_slot({literal(name)})")


def existing_slots(server: PgServer, names: Iterable[str]) -> list:
    wanted = ", ".join(literal(n) for n in names) or "NULL"
    out = server.psql(f"SELECT slot_name FROM pg_replication_slots WHERE slot_name IN ({wanted})")
    return out.splitlines()


def drop_logical_slots(server: PgServer) -> list:
    """Drop every logical slot (each from its own database); their names."""
    rows = server.psql("SELECT slot_name, database FROM pg_replication_slots "
                       "WHERE slot_type = 'logical' ORDER BY 1").splitlines()
    for row in rows:
        name, database = row.split("|")
        server.psql(f"SELECT pg_drop_replication_slot({literal(name)})", database=database)
    return [row.split("|")[0] for row in rows]


def current_lsn(server: PgServer) -> str:
    return server.psql("SELECT pg_current_wal_lsn()")


def lag_bytes(server: PgServer, slots: list, lsn: str) -> int:
    """How far (bytes) the least advanced of ``slots`` is confirmed behind ``lsn``; 0 when caught up."""
    names = ", ".join(literal(n) for n in slots)
    out = server.psql(f"SELECT count(*), coalesce(max(greatest(0, pg_wal_lsn_diff({literal(lsn)}, "
                      f"coalesce(confirmed_flush_lsn, '0/0')))), 0)::bigint "
                      f"FROM pg_replication_slots WHERE slot_name IN ({names})")
    found, lag = out.split("|")
    if int(found) != len(slots):
        raise PgError(f"replication slots {', '.join(slots)} are not all on {server.data_dir}; "
                      "someone dropped one")
    return int(lag)


def mark(server: PgServer, database: str) -> int:
    """A handover row committed on ``server`` (even when `fence` made it read-only); its number."""
    n = time.time_ns()
    server.psql(f"SET default_transaction_read_only = off;\n"
                f"INSERT INTO {SCHEMA}.handover (n) VALUES ({n})", database=database)
    return n


def wait_marked(server: PgServer, database: str, n: int, timeout_s: float) -> None:
    """Wait until handover row ``n`` was applied on ``server``.

    A subscription applies the sender's transactions in commit order, so
    every commit before the row is applied too. (The slot's confirmed
    position says the same, but only once the receiver reports it: up to a
    second later.)
    """
    deadline = time.monotonic() + timeout_s
    while server.psql(f"SELECT count(*) FROM {SCHEMA}.handover WHERE n = {n}",
                      database=database) != "1":
        if time.monotonic() > deadline:
            raise server.error(f"the handover row of database {database} did not arrive within "
                               f"{timeout_s:g} s; replication stalls")
        time.sleep(POLL_S)


def checkpoint(server: PgServer) -> None:
    """CHECKPOINT now, so that a shutdown shortly after has little to write."""
    server.psql("CHECKPOINT")


# --- the receiving side ---------------------------------------------------------------------

def subscribe(server: PgServer, database: str, name: str, publisher: str, *,
              start_lsn: str = "", enabled: bool = True) -> None:
    """A subscription on the existing slot ``name``: no initial copy, no new slot.

    ``start_lsn``: the sender's WAL position where this receiver's data ends;
    the subscription's replication origin is advanced to it before it is
    enabled, so the sender starts there (rather than at the slot's own start,
    which lies before it and would apply those transactions twice).
    """
    sql = (ALLOW_DDL + f"CREATE SUBSCRIPTION {name} CONNECTION {literal(publisher)} "
           f"PUBLICATION {PUBLICATION} WITH (copy_data = false, create_slot = false, "
           f"enabled = false, slot_name = {literal(name)});\n")
    if start_lsn:
        sql += _advance_sql(name, start_lsn)
    if enabled:
        sql += f"ALTER SUBSCRIPTION {name} ENABLE;\n"
    server.psql(sql, database=database)


def _advance_sql(name: str, lsn: str) -> str:
    return (f"SELECT pg_replication_origin_advance('pg_' || oid, {literal(lsn)}) "
            f"FROM pg_subscription WHERE subname = {literal(name)} AND "
            "subdbid = (SELECT oid FROM pg_database WHERE datname = current_database());\n")


def start_at(server: PgServer, database: str, name: str, lsn: str) -> None:
    """Let a disabled subscription start at the sender's WAL position ``lsn`` once enabled.

    Allowed on a server that `fence` made read-only: the replication origin
    is not a table.
    """
    server.psql("SET default_transaction_read_only = off;\n" + _advance_sql(name, lsn),
                database=database)


def repoint(server: PgServer, database: str, name: str, publisher: str) -> None:
    """Aim a subscription at where its sender now listens, and enable it (if not so already).

    Left alone when it is: ALTER SUBSCRIPTION restarts its worker, and the
    launcher may take seconds to start it again.
    """
    state = server.psql(f"SELECT subenabled, subconninfo = {literal(publisher)} FROM pg_subscription "
                        f"WHERE subname = {literal(name)}", database=database)
    if state == "t|t":
        return
    server.psql(ALLOW_DDL + f"ALTER SUBSCRIPTION {name} CONNECTION {literal(publisher)};\n"
                f"ALTER SUBSCRIPTION {name} ENABLE;", database=database)


def disable(server: PgServer, database: str, name: str) -> None:
    server.psql(ALLOW_DDL + f"ALTER SUBSCRIPTION {name} DISABLE", database=database)


def unsubscribe(server: PgServer, database: str, name: str) -> None:
    """Drop a subscription if it exists, leaving its slot on the sender (dropped separately)."""
    exists = server.psql(f"SELECT count(*) FROM pg_subscription WHERE subname = {literal(name)}",
                         database=database)
    if exists == "0":
        return
    server.psql(ALLOW_DDL + f"ALTER SUBSCRIPTION {name} DISABLE;\n"
                f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE);\n"
                f"DROP SUBSCRIPTION {name};", database=database)


# --- the switch -------------------------------------------------------------------------------

_SEQUENCES_SQL = """
SELECT format('SELECT setval(%L, %s, %s);', format('%I.%I', schemaname, sequencename),
              coalesce(last_value, start_value), (last_value IS NOT NULL)::text)
  FROM pg_sequences ORDER BY 1
"""


def copy_sequences(source: PgServer, target: PgServer, database: str) -> int:
    """Give every sequence on ``target`` the state it has on ``source``; how many.

    Logical replication carries rows, not sequences. ``last_value`` is the
    last value handed out (sessions caching values included), so the next
    value on ``target`` follows every value used on ``source``.
    """
    statements = source.psql(_SEQUENCES_SQL, database=database)
    if statements:
        target.psql(statements, database=database)
    return len(statements.splitlines())


_FENCE_SQL = """
ALTER SYSTEM SET default_transaction_read_only = on;
SELECT pg_reload_conf();
"""
_UNFENCE_SQL = "ALTER SYSTEM RESET default_transaction_read_only;\n"

# Client sessions other than ours inside a transaction that began before the fence.
_UNFENCED_SQL = """
SELECT count(*) FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
   AND xact_start IS NOT NULL AND xact_start < {since}::timestamptz
"""


def fence(server: PgServer, timeout_s: float) -> None:
    """Make the server refuse writes from clients that bypass PgBouncer; wait for running ones.

    New transactions default to read-only (a reload makes every session
    take it at its next command; nextval() fails too). Transactions that
    began before may still write: wait until they end, up to ``timeout_s``.
    Through a paused PgBouncer no client session is left, so this is quick.
    """
    since = server.psql(_FENCE_SQL + "SELECT now()").splitlines()[-1]
    deadline = time.monotonic() + timeout_s
    while int(server.psql(_UNFENCED_SQL.format(since=literal(since)))) > 0:
        if time.monotonic() > deadline:
            raise PgError(f"transactions of clients connected to {server.data_dir} directly (not "
                          f"through PgBouncer) stayed open past {timeout_s:g} s; see "
                          "pg_stat_activity")
        time.sleep(POLL_S)


def unfence(server: PgServer, *, reload: bool) -> None:
    """Undo `fence` in the configuration; ``reload`` applies it at once (else at the next start)."""
    server.psql(_UNFENCE_SQL + ("SELECT pg_reload_conf();" if reload else ""))


def end_of_recovery_lsn(server: PgServer) -> str:
    """The LSN where a server that just finished crash recovery wrote its checkpoint.

    Everything before it was replayed from the snapshot; nothing after it
    was. A checkpoint that ends recovery is a shutdown checkpoint: its
    location equals its redo location. If they differ, another checkpoint
    has happened since, and the point is lost.
    """
    row = server.psql("SELECT checkpoint_lsn, redo_lsn FROM pg_control_checkpoint()")
    checkpoint_lsn, redo_lsn = row.split("|")
    if checkpoint_lsn != redo_lsn:
        raise PgError(f"the clone's latest checkpoint ({checkpoint_lsn}, redo {redo_lsn}) is not "
                      "the one that ended its recovery; the point where replication must start "
                      "is unknown")
    return checkpoint_lsn
