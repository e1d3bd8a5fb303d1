"""Drive one PostgreSQL cluster with the programs of one PostgreSQL version.

A `PgServer` is a data directory plus the ``bin/`` directory of the version
that serves it. Every method runs a PostgreSQL program in a subprocess and
waits for it; there is no client library and no state beyond what the
programs themselves keep (``postmaster.pid``, the server log).

Who runs the programs
    PostgreSQL refuses to run as root. When we are root, every program runs
    as the owner of the data directory (or as ``os_user`` while the directory
    does not exist yet or still belongs to root, i.e. before `initdb`), with
    that user's groups and home. Otherwise programs run as ourselves.

Environment
    A clean one, so that a caller's ``PGDATA``/``PGPORT``/``PGHOST`` cannot
    redirect a command to another cluster: ``PATH`` starts with the version's
    ``bin/``, ``LC_ALL=C.UTF-8``, ``HOME``/``USER`` of the running user. The
    working directory is that user's home (``pg_upgrade`` and friends write
    into it), or ``/`` when it has none; `run` and `popen` take ``cwd=``.

Connections
    Only over the Unix socket in ``socket_dir`` (``listen_addresses=''``), so
    a rehearsal server on the same machine is unreachable from the network
    and two servers only need distinct ports, not distinct addresses.

Failures
    Every failure raises `PgError`: one line naming the program, the data
    directory, the program's last output and the tail of the server log,
    which is where PostgreSQL explains most failures.
"""

import os
import pwd
import random
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import CowfsError

DB_SUPERUSER = "postgres"
DEFAULT_OS_USER = "postgres"
DEFAULT_TIMEOUT_S = 300.0
START_TIMEOUT_S = 300.0          # crash recovery of a large cluster takes a while
LOG_TAIL_LINES = 3
MESSAGE_MAX_CHARS = 900
PORT_RANGE = (55000, 55999)
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
PID_FILE_STATUS_LINE = 7         # 0-based; PostgreSQL's pidfile.h LOCK_FILE_LINE_PM_STATUS


class PgError(CowfsError):
    """A PostgreSQL program failed; the message ends with the tail of the server log."""


@dataclass(frozen=True)
class PgbenchResult:
    """What one pgbench run reports."""

    tps: float                     # without the initial connection time
    transactions: int              # transactions actually processed
    latency_avg_ms: Optional[float]
    output: str                    # pgbench's full report, for logs


@dataclass(frozen=True)
class _OsUser:
    uid: int
    gid: int
    name: str
    home: str


def free_port(first: int = PORT_RANGE[0], last: int = PORT_RANGE[1], exclude=()) -> int:
    """A TCP port in [first, last] that nobody listens on and that is not in ``exclude``.

    The servers started here listen only on a Unix socket, so a port taken
    by one of them does not show on TCP: pass the ports already handed out
    in ``exclude``. The search starts at a random offset so that concurrent
    test runs rarely collide.
    """
    span = last - first + 1
    offset = random.randrange(span)
    for step in range(span):
        port = first + (offset + step) % span
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise PgError(f"no free TCP port between {first} and {last}; stop some servers and retry")


def _text(output) -> str:
    """TimeoutExpired carries bytes even in text mode."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class PgServer:
    """One data directory served by the programs in ``bin_dir``."""

    def __init__(self, bin_dir: str, data_dir: str, *, os_user: str = DEFAULT_OS_USER,
                 log_path: Optional[str] = None):
        """``log_path`` defaults to ``<socket_dir>/postgresql-<port>.log`` at `start`.

        The log lives outside the data directory on purpose: when the
        filesystem under the data directory fails, the log must stay readable.
        """
        self.bin_dir = os.path.abspath(bin_dir)
        self.data_dir = os.path.abspath(data_dir)
        self.os_user = os_user
        self.log_path = log_path
        self.port: Optional[int] = None
        self.socket_dir: Optional[str] = None
        if not os.access(os.path.join(self.bin_dir, "postgres"), os.X_OK):
            raise PgError(f"{self.bin_dir} holds no PostgreSQL server programs "
                          "(expected bin/postgres); see tools/fetch-postgres.sh")

    # --- running programs ----------------------------------------------------------------

    def _owner(self) -> Optional[_OsUser]:
        """The user to switch to, or None when no switch is needed (we are not root)."""
        if os.geteuid() != 0:
            return None
        try:
            uid = os.stat(self.data_dir).st_uid
        except FileNotFoundError:
            uid = 0
        try:
            entry = pwd.getpwuid(uid) if uid != 0 else pwd.getpwnam(self.os_user)
        except KeyError:
            if uid == 0:
                raise PgError(f"user {self.os_user!r} does not exist; PostgreSQL refuses to run as "
                              "root (create it: useradd --system postgres)") from None
            # A data directory restored from another machine: a uid without a name.
            return _OsUser(uid, os.stat(self.data_dir).st_gid, str(uid), "/")
        return _OsUser(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)

    def _spawn_kwargs(self, cwd: Optional[str]) -> dict:
        owner = self._owner()
        env = {"PATH": f"{self.bin_dir}:/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8",
               "LANG": "C.UTF-8"}
        if owner is None:
            env.update(HOME=os.environ.get("HOME", "/"), USER=os.environ.get("USER", ""))
            return dict(env=env, cwd=cwd)
        env.update(HOME=owner.home, USER=owner.name, LOGNAME=owner.name)
        if cwd is None:
            cwd = owner.home if os.path.isdir(owner.home) else "/"
        groups = os.getgrouplist(owner.name, owner.gid) if owner.name != str(owner.uid) else []
        return dict(env=env, cwd=cwd, user=owner.uid, group=owner.gid, extra_groups=groups)

    def program(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    def popen(self, program: str, *args: str, cwd: Optional[str] = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start ``bin/<program> ARGS`` as the data directory's owner; the caller waits for it."""
        return subprocess.Popen([self.program(program), *map(str, args)],
                                **self._spawn_kwargs(cwd), **popen_kwargs)

    def run(self, program: str, *args: str, input: Optional[str] = None, cwd: Optional[str] = None,
            timeout_s: float = DEFAULT_TIMEOUT_S, what: Optional[str] = None) -> str:
        """Run ``bin/<program> ARGS`` as the owner; its stdout, or `PgError` if it fails."""
        what = what or f"{program} {' '.join(map(str, args))}"
        try:
            result = subprocess.run([self.program(program), *map(str, args)], input=input,
                                    capture_output=True, text=True, timeout=timeout_s,
                                    **self._spawn_kwargs(cwd))
        except subprocess.TimeoutExpired as exc:
            # subprocess.run has killed the program already.
            raise self.error(f"{what} did not finish within {timeout_s:.0f} s",
                             _text(exc.stderr)) from None
        if result.returncode != 0:
            raise self.error(f"{what} failed (exit {result.returncode})",
                             result.stderr if result.stderr.strip() else result.stdout)
        return result.stdout

    def run_result(self, program: str, *args: str, cwd: Optional[str] = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run ``bin/<program> ARGS`` as the owner and return its full result, failed or not.

        For programs whose complete output is the report (pg_upgrade): the
        caller decides what a non-zero exit means and what to show of it.
        stderr is merged into stdout so the text reads in the order written.
        """
        try:
            return subprocess.run([self.program(program), *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
                                  **self._spawn_kwargs(cwd))
        except subprocess.TimeoutExpired as exc:
            raise self.error(f"{program} did not finish within {timeout_s:.0f} s",
                             _text(exc.output)) from None

    def owner_ids(self) -> Optional[tuple]:
        """(uid, gid) programs run as, or None when we are not root (no switch)."""
        owner = self._owner()
        return None if owner is None else (owner.uid, owner.gid)

    def error(self, summary: str, output: str = "") -> PgError:
        """A one-line `PgError`: summary, the program's last words, the server log's tail."""
        parts = [f"{summary} on {self.data_dir}"]
        last_words = _one_line("\n".join((output or "").splitlines()[-LOG_TAIL_LINES:]))
        if last_words:
            parts.append(f"output: {last_words}")
        tail = self.log_tail()
        if tail:
            parts.append(f"server log {self.log_path}: {tail}")
        message = "; ".join(parts)
        if len(message) > MESSAGE_MAX_CHARS:
            message = message[:MESSAGE_MAX_CHARS - 3] + "..."
        return PgError(message)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server log as one line ('' if there is none yet)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return _one_line("\n".join(text.splitlines()[-lines:]))

    # --- cluster lifecycle ---------------------------------------------------------------

    def initdb(self, *, data_checksums: bool = False, extra_args: Sequence[str] = (),
               encoding: str = "UTF8", lc_collate: Optional[str] = None,
               lc_ctype: Optional[str] = None, os_owner: Optional[tuple] = None) -> None:
        """Create the cluster; the data directory may be missing or empty.

        When we are root, a missing or root-owned empty directory is first
        given to ``os_user`` (or ``os_owner`` = (uid, gid)) with mode 0700,
        as PostgreSQL demands. ``lc_collate``/``lc_ctype`` default to the
        locale C.UTF-8; an upgrade passes the old cluster's values, which
        pg_upgrade requires to match.
        """
        self._prepare_data_dir(os_owner)
        args = ["-D", self.data_dir, "--locale=C.UTF-8", "-E", encoding, "-U", DB_SUPERUSER,
                "--auth=trust", "--no-instructions"]
        if lc_collate:
            args.append(f"--lc-collate={lc_collate}")
        if lc_ctype:
            args.append(f"--lc-ctype={lc_ctype}")
        if data_checksums:
            args.append("--data-checksums")
        self.run("initdb", *args, *extra_args, what="initdb")

    def _prepare_data_dir(self, os_owner: Optional[tuple] = None) -> None:
        if not os.path.exists(self.data_dir):
            os.mkdir(self.data_dir, 0o700)
        owner = self._owner()
        if owner is not None and os.stat(self.data_dir).st_uid == 0:
            uid, gid = os_owner or (owner.uid, owner.gid)
            os.chown(self.data_dir, uid, gid)
        os.chmod(self.data_dir, 0o700)

    def start(self, port: int, socket_dir: str, *, settings: Optional[dict] = None,
              timeout_s: float = START_TIMEOUT_S, listen_addresses: str = "",
              poll_s: Optional[float] = None) -> None:
        """Start the server and return once it accepts connections (``pg_ctl -w``).

        ``socket_dir`` is created (mode 0700, owned by the server's user) if
        missing. ``settings`` become ``-c name=value`` options for this run.
        ``listen_addresses`` is empty (Unix socket only) unless a caller, such
        as a cutover that takes over a live server's addresses, says otherwise.
        Crash recovery happens here, so the timeout is generous.

        ``poll_s``: watch postmaster.pid ourselves at this interval instead of
        ``pg_ctl -w``, which looks every 100 ms; for a switch with clients held.
        """
        self.port, self.socket_dir = int(port), os.path.abspath(socket_dir)
        self._prepare_socket_dir()
        if self.log_path is None:
            self.log_path = os.path.join(self.socket_dir, f"postgresql-{self.port}.log")
        options = ["-p", str(self.port), "-k", self.socket_dir,
                   "-c", f"listen_addresses={listen_addresses}"]
        for name, value in (settings or {}).items():
            options += ["-c", f"{name}={value}"]
        # pg_ctl hands -o to /bin/sh, hence the quoting.
        self.run("pg_ctl", "start", "-D", self.data_dir, "-l", self.log_path,
                 "-w" if poll_s is None else "-W", "-t", str(int(timeout_s)),
                 "-o", " ".join(shlex.quote(o) for o in options),
                 timeout_s=timeout_s + 30, what=f"starting PostgreSQL on port {self.port}")
        if poll_s is not None:
            self._wait_ready(timeout_s, poll_s)

    def _wait_ready(self, timeout_s: float, poll_s: float) -> None:
        """Until postmaster.pid says "ready" (what ``pg_ctl -w`` waits for)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) > PID_FILE_STATUS_LINE and lines[PID_FILE_STATUS_LINE].strip() == "ready":
                return
            if lines and not os.path.exists(f"/proc/{lines[0].strip()}"):
                raise self.error(f"PostgreSQL on port {self.port} exited while starting")
            if time.monotonic() > deadline:
                raise self.error(f"PostgreSQL on port {self.port} was not ready within "
                                 f"{timeout_s:.0f} s")
            time.sleep(poll_s)

    def _prepare_socket_dir(self) -> None:
        if os.path.isdir(self.socket_dir):
            return
        os.makedirs(self.socket_dir, 0o700)
        owner = self._owner()
        if owner is not None:
            os.chown(self.socket_dir, owner.uid, owner.gid)

    def stop(self, mode: str = "fast", timeout_s: float = DEFAULT_TIMEOUT_S,
             poll_s: Optional[float] = None) -> None:
        """Stop the server and wait until it is gone; nothing to do if none runs.

        ``mode`` is pg_ctl's: ``smart`` waits for clients, ``fast`` (default)
        disconnects them and checkpoints, ``immediate`` exits without a
        checkpoint (the next start runs crash recovery). ``poll_s``: signal
        the postmaster and watch for its pid file to go at this interval, as
        ``pg_ctl stop`` does every 100 ms.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise PgError(f"unknown shutdown mode {mode!r} (use smart, fast or immediate)")
        if poll_s is not None and self._signal_stop(mode, timeout_s, poll_s):
            return
        if not self.is_running():
            return
        self.run("pg_ctl", "stop", "-D", self.data_dir, "-m", mode, "-w", "-t", str(int(timeout_s)),
                 timeout_s=timeout_s + 30, what=f"stopping PostgreSQL ({mode})")

    def _signal_stop(self, mode: str, timeout_s: float, poll_s: float) -> bool:
        """Stop by signal; False when the postmaster cannot be signalled (pg_ctl then tries)."""
        pid = self.postmaster_pid()
        if pid is None:
            return True
        try:
            os.kill(pid, STOP_SIGNALS[mode])
        except ProcessLookupError:
            return False                 # a stale pid file: pg_ctl knows what to do
        except PermissionError:
            return False
        pid_file = os.path.join(self.data_dir, "postmaster.pid")
        deadline = time.monotonic() + timeout_s
        while os.path.exists(pid_file):
            if time.monotonic() > deadline:
                raise self.error(f"PostgreSQL did not stop ({mode}) within {timeout_s:.0f} s")
            time.sleep(poll_s)
        return True

    def is_running(self) -> bool:
        """Whether a server runs on the data directory (``pg_ctl status``)."""
        try:
            self.run("pg_ctl", "status", "-D", self.data_dir, what="pg_ctl status")
            return True
        except PgError as exc:
            if "(exit 3)" in str(exc):       # pg_ctl: "no server running"
                return False
            raise

    def postmaster_pid(self) -> Optional[int]:
        """The pid in ``postmaster.pid``, or None when the file is absent.

        Read it while the data directory is readable: a supervisor that must
        kill a server whose filesystem died needs it beforehand.
        """
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except FileNotFoundError:
            return None

    # --- clients ---------------------------------------------------------------------------

    def connection_args(self) -> list:
        """``-h SOCKET_DIR -p PORT -U postgres`` for client programs of this server."""
        if self.port is None:
            raise PgError(f"the server of {self.data_dir} has not been started by this program; "
                          "call start(port, socket_dir) first")
        return ["-h", self.socket_dir, "-p", str(self.port), "-U", DB_SUPERUSER]

    def psql(self, sql: str, *, database: str = "postgres",
             timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
        """Run SQL (any number of statements, psql meta-commands allowed); unaligned tuples out.

        Stops at the first error (``ON_ERROR_STOP``). Each statement commits on
        its own unless the SQL says BEGIN.
        """
        out = self.run("psql", *self.connection_args(), "-d", database, "-XAtq",
                       "-v", "ON_ERROR_STOP=1", "-f", "-", input=sql, timeout_s=timeout_s,
                       what=f"psql ({_one_line(sql)[:80]})")
        return out.rstrip("\n")

    def server_version(self) -> str:
        """The running server's version, e.g. '14.23'."""
        return self.psql("SHOW server_version")

    def pgbench_init(self, scale: int, *, database: str = "postgres",
                     timeout_s: float = DEFAULT_TIMEOUT_S * 4) -> None:
        """Create the pgbench tables at ``scale`` (100,000 accounts per unit), replacing old ones."""
        self.run("pgbench", *self.connection_args(), "-i", "-s", str(scale), "-q", database,
                 timeout_s=timeout_s, what=f"pgbench -i -s {scale}")

    def pgbench(self, clients: int, *, seconds: Optional[float] = None,
                transactions: Optional[int] = None, threads: Optional[int] = None,
                database: str = "postgres", extra_args: Sequence[str] = ()) -> PgbenchResult:
        """Run the TPC-B-like workload for ``seconds`` or ``transactions`` per client."""
        if (seconds is None) == (transactions is None):
            raise PgError("pgbench needs exactly one of seconds= or transactions=")
        threads = threads or min(clients, os.cpu_count() or 1)
        limit = ["-T", str(int(seconds))] if seconds is not None else ["-t", str(transactions)]
        timeout_s = (seconds or 0) * 2 + DEFAULT_TIMEOUT_S
        out = self.run("pgbench", *self.connection_args(), "-c", str(clients), "-j", str(threads),
                       *limit, *extra_args, database, timeout_s=timeout_s,
                       what=f"pgbench -c {clients} {' '.join(limit)}")
        return parse_pgbench(out)

    def amcheck(self, *, timeout_s: float = DEFAULT_TIMEOUT_S * 2) -> str:
        """Check every table and B-tree index of every database (``pg_amcheck``).

        Installs the ``amcheck`` extension where it is missing, so this writes
        to the cluster. Corruption raises `PgError` naming the first findings.
        """
        return self.run("pg_amcheck", *self.connection_args(), "--all", "--install-missing",
                        "--heapallindexed", timeout_s=timeout_s, what="pg_amcheck")


_TPS = re.compile(r"^tps = ([0-9.]+) \((without initial connection time|excluding connections)",
                  re.MULTILINE)
_TRANSACTIONS = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


def parse_pgbench(output: str) -> PgbenchResult:
    """Parse the report of pgbench 13 to 18."""
    tps, transactions = _TPS.search(output), _TRANSACTIONS.search(output)
    if tps is None or transactions is None:
        raise PgError(f"cannot read the pgbench report: {_one_line(output)[-300:]}")
    latency = _LATENCY.search(output)
    return PgbenchResult(tps=float(tps.group(1)), transactions=int(transactions.group(1)),
                         latency_avg_ms=float(latency.group(1)) if latency else None, output=output)
