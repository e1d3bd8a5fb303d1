"""The primary a cowfs standby follows, reached by a libpq conninfo wherever it runs.

Everything here goes through ``psql`` with the conninfo the user gave,
run as the standby's OS user (``postgres``: its ``~/.pgpass`` is where a
password belongs). Two kinds of connection:

    replication   ``replication=true``, what pg_basebackup and the standby
                  use: IDENTIFY_SYSTEM, SHOW, CREATE/DROP_REPLICATION_SLOT.
                  Needs only the REPLICATION privilege and a ``replication``
                  line in the primary's pg_hba.conf
    SQL           an ordinary session, for the slot's state and the lag
                  (pg_replication_slots, pg_stat_replication); optional:
                  a primary that only admits replication connections still
                  works, `cowfs pg status` then says the slot state is unknown

The primary is never written to, except for the one physical slot a
standby needs (`create_slot`, `drop_slot`).

Passwords: a conninfo may carry one; `redacted` removes it before the
conninfo goes into a record, a report or a message (a later connection
with the redacted conninfo then takes the password from ``~/.pgpass``).
"""

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import CowfsError, ExistsError, UsageError
from .server import PgError, PgServer

CONNECT_TIMEOUT_S = 10
# What a physical standby needs of its primary (docs/postgres.md, "Adopting an existing cluster").
WAL_LEVELS = ("replica", "logical")

_PASSWORD_KV = re.compile(r"\s*\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
_PASSWORD_URI = re.compile(r"^(postgres(?:ql)?://[^:@/]*):[^@/]*@")


def redacted(conninfo: str) -> str:
    """The conninfo without its password (key=value or URI form)."""
    text = _PASSWORD_KV.sub("", conninfo).strip()
    return _PASSWORD_URI.sub(r"\1@", text)


def _is_uri(conninfo: str) -> bool:
    return conninfo.startswith(("postgres://", "postgresql://"))


def with_options(conninfo: str, **options) -> str:
    """The conninfo plus options it does not set already (a URI gets query parameters)."""
    extra = {k: v for k, v in options.items() if not re.search(rf"\b{k}\s*=", conninfo)}
    if not extra:
        return conninfo
    if _is_uri(conninfo):
        joiner = "&" if "?" in conninfo else "?"
        return conninfo + joiner + "&".join(f"{k}={v}" for k, v in extra.items())
    return " ".join([conninfo, *(f"{k}={v}" for k, v in extra.items())])


@dataclass(frozen=True)
class SystemId:
    """IDENTIFY_SYSTEM of the primary, and its version."""

    system_id: str
    timeline: int
    wal_lsn: str
    major: str


class Upstream:
    """The primary at ``conninfo``; ``client`` runs psql (as the standby's OS user)."""

    def __init__(self, conninfo: str, client: PgServer):
        if not conninfo.strip():
            raise UsageError("--primary is empty; give the primary's libpq conninfo, e.g. "
                             "'host=db1 port=5432 user=replicator'")
        self.conninfo = conninfo
        self.client = client

    @property
    def shown(self) -> str:
        return redacted(self.conninfo)

    def _psql(self, conninfo: str, sql: str) -> str:
        conninfo = with_options(conninfo, connect_timeout=CONNECT_TIMEOUT_S)
        try:
            out = self.client.run("psql", "-d", conninfo, "-XAtq", "-v", "ON_ERROR_STOP=1",
                                  "-c", sql, timeout_s=CONNECT_TIMEOUT_S * 6,
                                  what=f"psql {sql.split()[0]}")
        except PgError as exc:
            raise self._explain(str(exc)) from None
        return out.strip()

    def replication(self, command: str) -> str:
        """A replication command (IDENTIFY_SYSTEM, SHOW, ..._REPLICATION_SLOT)."""
        return self._psql(with_options(self.conninfo, replication="true"), command)

    def sql(self, query: str) -> str:
        """An ordinary session; in database postgres unless the conninfo names one.

        (libpq's default database is the user's name, which a replication
        user seldom has.)
        """
        conninfo = self.conninfo if _is_uri(self.conninfo) else with_options(self.conninfo,
                                                                               dbname="postgres")
        return self._psql(conninfo, query)

    def _explain(self, message: str) -> CowfsError:
        """psql's failure as one line that names the primary (not its password) and what to do.

        A primary not set up for replication is bad input (exit 2); one that
        cannot be reached or refuses the user is a failure (exit 1).
        """
        detail = message.split("output: ", 1)[-1].split("; server log", 1)[0]
        detail = detail.replace("psql: error: ", "").strip()
        error = PgError
        if re.search(r"password authentication failed|no password supplied|role .* does not exist|"
                     r"Peer authentication failed|must be superuser or replication", detail):
            hint = ("check the user (it needs the REPLICATION privilege) and its password (put "
                    "the password in ~postgres/.pgpass, not on the command line)")
        elif "no pg_hba.conf entry" in detail:
            hint = ("let the standby in: a 'replication' line in the primary's pg_hba.conf for "
                    "this user and host, then SELECT pg_reload_conf() on the primary")
        elif "max_wal_senders" in detail:
            error = UsageError
            hint = ("the primary is not set up for replication: set wal_level = replica and "
                    "max_wal_senders above 0 there and restart it")
        elif re.search(r"could not connect|Connection refused|No such file|timeout expired|"
                       r"could not translate host name", detail):
            hint = "check host and port in --primary and that the primary runs"
        else:
            hint = "see the primary's log"
        return error(f"the primary {self.shown} refused or did not answer: {detail}; {hint}")

    # --- checks before anything changes ------------------------------------------------------

    def identify(self) -> SystemId:
        """The primary's system identifier and position; fails in one line if unreachable."""
        row = self.replication("IDENTIFY_SYSTEM")
        system_id, timeline, wal_lsn = row.split("|")[:3]
        version = self.replication("SHOW server_version_num")
        return SystemId(system_id, int(timeline), wal_lsn, str(int(version) // 10000))

    def check_settings(self) -> dict:
        """Refuse (one line) a primary a streaming standby cannot follow; its settings."""
        settings = {name: self.replication(f"SHOW {name}") for name in
                    ("wal_level", "max_wal_senders", "max_replication_slots")}
        if settings["wal_level"] not in WAL_LEVELS:
            raise UsageError(f"wal_level is {settings['wal_level']} on the primary {self.shown}; a "
                             "standby needs replica (or logical): ALTER SYSTEM SET wal_level = "
                             "replica and restart the primary")
        if int(settings["max_replication_slots"]) < 1:
            raise UsageError(f"max_replication_slots is 0 on the primary {self.shown}; the standby "
                             "needs one slot: raise it and restart the primary")
        return settings

    def tablespaces(self) -> Optional[list]:
        """User tablespaces of the primary; None when it admits no SQL session to ask.

        pg_basebackup writes a tablespace to the absolute path it has on the
        primary: outside the volume (a clone would share it), and on the
        primary's own machine onto the primary's directory.
        """
        try:
            out = self.sql("SELECT spcname FROM pg_tablespace WHERE spcname NOT IN "
                           "('pg_default', 'pg_global') ORDER BY 1")
        except CowfsError:
            return None
        return out.splitlines()

    # --- the slot ----------------------------------------------------------------------------

    def create_slot(self, name: str) -> None:
        """A physical slot that reserves WAL from now on, so the standby never falls behind it."""
        try:
            self.replication(f"CREATE_REPLICATION_SLOT {name} PHYSICAL RESERVE_WAL")
        except PgError as exc:
            if "already exists" in str(exc):
                raise ExistsError(f"replication slot {name} exists on the primary {self.shown}: "
                                  "another standby uses it or an earlier follow left it; give "
                                  "--slot NAME, or drop it on the primary (SELECT "
                                  f"pg_drop_replication_slot('{name}')) if nothing uses it") from None
            if "all replication slots are in use" in str(exc):
                raise UsageError(f"all max_replication_slots are in use on the primary "
                                 f"{self.shown}; raise it (restart) or drop an unused slot") from None
            raise

    def drop_slot(self, name: str, wait: bool = False) -> bool:
        """Drop the slot if it exists; whether it did.

        ``wait``: until the walsender that uses it lets go (after we ended
        the pg_basebackup that held it: its walsender exits a moment later).
        """
        try:
            self.replication(f"DROP_REPLICATION_SLOT {name}" + (" WAIT" if wait else ""))
            return True
        except PgError as exc:
            if "does not exist" in str(exc):
                return False
            raise

    def slot_state(self, name: str) -> Optional[dict]:
        """The slot as the primary sees it (SQL); None when it does not exist.

        ``active`` (a walsender uses it), ``restart_lsn`` (the oldest WAL it
        keeps), ``retained_bytes`` (WAL held back for the standby),
        ``wal_status``, plus the primary's ``current_lsn`` and the standby's
        ``replay_lsn`` and ``replay_lag_s`` as pg_stat_replication reports them.
        """
        row = self.sql(
            "SELECT s.active, s.restart_lsn, pg_current_wal_lsn(), "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, s.wal_status, "
            "r.replay_lsn, extract(epoch FROM r.replay_lag) "
            "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
            f"WHERE s.slot_name = '{name}'")
        if not row:
            return None
        active, restart_lsn, current_lsn, retained, wal_status, replay_lsn, lag_s = row.split("|")
        return dict(active=active == "t", restart_lsn=restart_lsn or None, current_lsn=current_lsn,
                    retained_bytes=int(retained) if retained else None, wal_status=wal_status,
                    replay_lsn=replay_lsn or None, replay_lag_s=float(lag_s) if lag_s else None)
