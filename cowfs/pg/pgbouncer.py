"""PgBouncer: its admin console (PAUSE, RESUME, SHOW) and, for tests and the demo, an instance.

The online cutover holds clients in PgBouncer while the server behind it
changes: ``PAUSE`` waits until every server connection is released (in
transaction pooling: until running transactions end), then closes them all;
clients' new queries wait in PgBouncer. ``RESUME`` lets them go on, over new
server connections, to whatever server now listens on the address PgBouncer
was configured with. So a switch that keeps the address looks like one slow
commit to a client, not an error.

The console is reached with ``psql`` (it speaks only the simple query
protocol), as the data directory's owner when we are root, so that a
console on a Unix socket only that user may open is reachable.

Facts of PgBouncer 1.18 (src/janitor.c, src/admin.c) this relies on:

- PAUSE completes on the janitor's tick (every 1/3 s) once no server
  connection is active; RESUME releases waiting clients on the next tick. So
  PgBouncer alone adds up to about 0.7 s to a switch.
- A RESUME while a PAUSE still waits cancels the pause (``full_resume``);
  the waiting console session simply never gets its answer.
"""

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import time
from typing import Optional

from ..errors import UsageError
from .server import PgError, PgServer

CONSOLE_DB = "pgbouncer"
CONSOLE_TIMEOUT_S = 30.0


class PauseTimeout(PgError):
    """PAUSE did not complete in time; PgBouncer was resumed again."""


def console_conninfo(conninfo: str) -> str:
    """The user's conninfo, aimed at the admin console database unless it names one."""
    text = conninfo.strip()
    if not text:
        raise UsageError("--pgbouncer needs a conninfo of PgBouncer's admin console, e.g. "
                         "'host=/var/run/postgresql port=6432 user=postgres'")
    if text.startswith(("postgres://", "postgresql://")) or "dbname=" in text:
        return text
    return f"{text} dbname={CONSOLE_DB}"


class PgBouncerConsole:
    """The admin console of a running PgBouncer."""

    def __init__(self, conninfo: str, client: PgServer):
        """``client`` supplies psql and the OS user to run it as (any PgServer will do)."""
        self.conninfo = console_conninfo(conninfo)
        self.client = client

    def _psql_args(self, command: str) -> list:
        return [self.conninfo, "-XAq", "-P", "footer=off", "-F", "|", "-c", command]

    def command(self, command: str, timeout_s: float = CONSOLE_TIMEOUT_S) -> str:
        try:
            return self.client.run("psql", *self._psql_args(command), timeout_s=timeout_s,
                                   what=f"PgBouncer {command}")
        except PgError as exc:
            raise PgError(f"PgBouncer's console ({self.conninfo}) refused {command}: "
                          f"{_last_words(str(exc))}") from None

    def show(self, what: str) -> list:
        """``SHOW <what>`` as a list of {column: value}."""
        lines = self.command(f"SHOW {what}").splitlines()
        if not lines:
            return []
        header = lines[0].split("|")
        return [dict(zip(header, line.split("|"))) for line in lines[1:]]

    def config(self) -> dict:
        return {row["key"]: row["value"] for row in self.show("CONFIG")}

    def pause(self, limit_s: float) -> float:
        """PAUSE; its duration in seconds. Past ``limit_s``: RESUME and raise `PauseTimeout`."""
        started = time.monotonic()
        proc = self.client.popen("psql", *self._psql_args("PAUSE"), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.resume()                 # cancels the waiting PAUSE
            _kill(proc)
            raise PauseTimeout(f"PgBouncer did not pause within {limit_s:g} s: a transaction "
                               "through it stayed open that long (see SHOW SERVERS); clients "
                               "were resumed") from None
        if proc.returncode != 0:
            raise PgError(f"PgBouncer's console ({self.conninfo}) refused PAUSE: "
                          f"{_last_words(err or out)}")
        return time.monotonic() - started

    def resume(self) -> None:
        """RESUME; a PgBouncer that is not paused is fine (nothing to do)."""
        try:
            self.command("RESUME")
        except PgError as exc:
            if "not paused" not in str(exc):
                raise


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _last_words(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --- an instance of our own (tests, tools/demo.sh) ---------------------------------------------

def write_config(directory: str, *, server_socket_dir: str, server_port: int, port: int,
                 pool_mode: str = "transaction", user: str = "postgres") -> str:
    """A pgbouncer.ini routing every database to one server; returns its path.

    PgBouncer listens only on a Unix socket in ``directory``; ``user`` logs in
    without a password (auth_type trust) and may use the admin console.
    """
    ini = os.path.join(directory, "pgbouncer.ini")
    with open(os.path.join(directory, "users.txt"), "w") as f:
        f.write(f'"{user}" ""\n')
    with open(ini, "w") as f:
        f.write(f"""[databases]
* = host={server_socket_dir} port={server_port}

[pgbouncer]
listen_addr =
listen_port = {port}
unix_socket_dir = {directory}
auth_type = trust
auth_file = {directory}/users.txt
admin_users = {user}
pool_mode = {pool_mode}
max_client_conn = 200
default_pool_size = 20
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
""")
    return ini


def program() -> str:
    """Debian installs pgbouncer in /usr/sbin, which a user's PATH may lack."""
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def start(directory: str, *, server_socket_dir: str, server_port: int, port: int,
          user: str = "postgres") -> subprocess.Popen:
    """Run PgBouncer as ``user`` in the foreground, as our child; returns once it listens.

    Stop it with `stop` (by its pid). ``directory`` holds its configuration,
    socket, log and pid file; it is created mode 0700 for ``user``.
    """
    ini = _prepare(directory, server_socket_dir=server_socket_dir, server_port=server_port,
                   port=port, user=user)
    kwargs = dict(user=user) if os.geteuid() == 0 else {}
    proc = subprocess.Popen([program(), ini], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kwargs)
    socket_path = os.path.join(directory, f".s.PGSQL.{port}")
    deadline = time.monotonic() + 30
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise PgError(f"PgBouncer did not start in {directory}; see pgbouncer.log there")
        time.sleep(0.02)
    return proc


def _prepare(directory: str, *, user: str, **config) -> str:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ini = write_config(directory, user=user, **config)
    if os.geteuid() == 0:
        for name in (directory, ini, os.path.join(directory, "users.txt")):
            shutil.chown(name, user)
    return ini


def stop(proc: Optional[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """Stop our PgBouncer (SIGTERM: immediate shutdown) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> int:
    """``python -m cowfs.pg.pgbouncer DIR --server-socket S --server-port P --port N``.

    Writes the configuration and replaces itself with PgBouncer in the
    foreground (so the caller's pid is PgBouncer's: tools/demo.sh stops it by pid).
    """
    parser = argparse.ArgumentParser(prog="python -m cowfs.pg.pgbouncer", description=main.__doc__)
    parser.add_argument("directory")
    parser.add_argument("--server-socket", required=True)
    parser.add_argument("--server-port", required=True, type=int)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--user", default="postgres")
    args = parser.parse_args(argv)
    ini = _prepare(args.directory, server_socket_dir=args.server_socket,
                   server_port=args.server_port, port=args.port, user=args.user)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(args.user)
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    os.execv(program(), ["pgbouncer", ini])


if __name__ == "__main__":
    sys.exit(main())
