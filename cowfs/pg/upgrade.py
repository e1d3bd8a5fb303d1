"""The upgrade itself, on a mounted clone: what rehearsal and cutover share.

Steps, each timed, each followed by a snapshot of the clone
(``CLONE@step-N-<name>``, ``...-failed`` when the step failed), so that the
state *before* any step can be cloned and started again:

    recover-old        start the old server on the clone (crash recovery of the
                       snapshot), read its locale/encoding/checksum settings and
                       every table's row count, drop the clone's copies of live's
                       logical replication slots, stop it cleanly
    initdb-new         a new cluster beside it with the same settings (checksums
                       too: initdb 18 turns them on by default, pg_upgrade
                       refuses a mismatch)
    pg-upgrade-check   pg_upgrade --check
    pg-upgrade-link    pg_upgrade --link (safe here: it only touches the clone)
    install-new        the new cluster takes the old one's path; the old one
                       stays beside it as PGDATA.pgOLD-old; configuration files
                       carried over
    start-new          the new server starts on the clone
    analyze            vacuumdb --analyze-in-stages; from 18 on pg_upgrade carries
                       the planner statistics, so only the missing ones
    amcheck            pg_amcheck on every database
    row-counts         every table has the row count counted in recover-old
    check-sql          the user's check returns true (skipped without one)
    stop-new           clean shutdown, so the last snapshot is a clean cluster

The clone is a copy: every write here lands on the clone only. The
rehearsal runs all of it (`Upgrader.run`); the cutovers run the steps they
need, in their own order (cutover.py, online.py).

Why initdb and pg_upgrade run with --no-sync: both would fsync every file of
the new cluster, file by file, which on this machine is most of their time
(and, in a cutover, of the downtime). On cowfs one snapshot does the same for
the whole volume at once: the daemon flushes every acknowledged write and
commits it with the snapshot (DESIGN rules 2 and 5), and a snapshot follows
every step. Should that snapshot fail, the clone's unmount flushes and
reports failure before anything goes live (cutover's unmount-clone step).
"""

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import admin
from ..errors import CowfsError, ExistsError, UsageError
from . import cluster, replication
from .report import Report, StepError
from .server import PgServer, free_port
from .workspace import Workspace

# Settings for servers on clones: never archive into the live server's archive, and
# never start a logical replication worker: a clone's copy of a subscription would
# connect to its publisher and consume the changes meant for the live subscriber.
CLONE_SERVER_SETTINGS = {"archive_mode": "off", "max_logical_replication_workers": "0"}
ANALYZE_TIMEOUT_S = 6 * 3600


@dataclass
class UpgradePlan:
    store: object                      # cowfs.store.Store
    clone: str                         # volume name of the clone
    mountpoint: str                    # where the clone is mounted
    pgdata: str                        # data directory relative to the volume root
    old_bin: str
    new_bin: str
    old_major: str
    new_major: str
    check_sql: Optional[str] = None    # SQL text
    check_sql_name: str = ""           # for messages (the file name)
    database: str = "postgres"
    port: Optional[int] = None
    row_counts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)   # initdb settings; a cutover reads them on live
    server_settings: dict = field(default_factory=lambda: dict(CLONE_SERVER_SETTINGS))
    # Live's logical slots copied into the clone belong to live's subscribers: a rehearsal
    # and an online cutover drop them; an offline cutover's clone *is* the next live.
    drop_copied_slots: bool = True

    @property
    def data_dir(self) -> str:
        return os.path.join(self.mountpoint, self.pgdata)

    @property
    def new_data_dir(self) -> str:
        return f"{self.data_dir}.pg{self.new_major}-new"

    @property
    def old_moved_dir(self) -> str:
        return f"{self.data_dir}.pg{self.old_major}-old"


def check_pgdata(pgdata: str) -> str:
    """PGDATA is a path inside the volume: relative, normalised, not escaping the root."""
    norm = os.path.normpath(pgdata)
    if os.path.isabs(pgdata) or norm.startswith("..") or norm == ".":
        raise UsageError(f"--pgdata {pgdata!r} must be the data directory's path relative to the "
                         "volume root, e.g. pgdata (not absolute, not the root itself)")
    return norm


def check_versions(old_bin: str, new_bin: str) -> tuple:
    old_major, new_major = cluster.bin_major(old_bin), cluster.bin_major(new_bin)
    if int(new_major) <= int(old_major):
        raise UsageError(f"--new-bin is PostgreSQL {new_major}, not newer than --old-bin "
                         f"({old_major}); pg_upgrade only goes to a newer major version")
    return old_major, new_major


def read_check_sql(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read --check-sql file {path}: {exc.strerror}; give a readable "
                         "SQL file whose last result is true when the cluster is right") from None


def check_data_dir(data_dir: str, pgdata: str, old_major: str) -> None:
    """Bad input a user must fix before anything runs: not a cluster, wrong version, tablespaces."""
    major = cluster.data_dir_major(data_dir)
    if major != old_major:
        raise UsageError(f"{pgdata} is a PostgreSQL {major} data directory but --old-bin is "
                         f"PostgreSQL {old_major}; give the bin directory of {major}")
    if cluster.tablespace_links(data_dir):
        raise UsageError(f"{pgdata} uses tablespaces (pg_tblspc is not empty); their files live "
                         "outside the volume, so a clone would share them with the live cluster; "
                         "cowfs cannot upgrade such a cluster")


class Upgrader:
    """Runs the upgrade steps on a mounted clone, recording them in a report."""

    def __init__(self, plan: UpgradePlan, report: Report, workspace: Workspace):
        self.plan, self.report, self.ws = plan, report, workspace

    # --- steps with a snapshot after each ----------------------------------------------------

    def step(self, name: str):
        return _SnapshottingStep(self, name)

    def snapshot_clone(self, step) -> None:
        suffix = "-failed" if step.outcome == "failed" else ""
        target = f"{self.plan.clone}@step-{step.number}-{step.name}{suffix}"
        try:
            admin.snapshot(self.plan.store, target)
        except CowfsError as exc:
            step.detail += f" (no snapshot after this step: {exc})"
            return
        step.snapshot = target
        self.report.snapshots.append(target)

    # --- the procedure -------------------------------------------------------------------------

    def run(self, stop_at_end: bool = True) -> Optional[PgServer]:
        """The rehearsal: every step; returns the running new server unless ``stop_at_end``."""
        self.recover_old(count_rows=True)
        self.initdb_new()
        self.pg_upgrade("check")
        self.pg_upgrade("link")
        self.install_new()
        server = self.start_new()
        self.analyze(server)
        self.amcheck(server)
        self.compare_row_counts(server)
        self.check_sql(server)
        if stop_at_end:
            self.stop_new(server)
        return server

    def _port(self) -> int:
        return self.plan.port or free_port()

    def recover_old(self, count_rows: bool = True,
                    inspect: Optional[Callable[[PgServer], str]] = None) -> None:
        """Crash recovery on the clone, then facts the later steps need; stops cleanly.

        ``inspect(server)`` runs while the recovered server is up (before
        anything else touches it) and returns a phrase for the step's detail.
        """
        plan = self.plan
        with self.step("recover-old") as step:
            check_data_dir(plan.data_dir, plan.pgdata, plan.old_major)
            stale = cluster.forget_stale_pid_file(plan.data_dir)
            server = self.ws.started(PgServer(plan.old_bin, plan.data_dir))
            server.start(self._port(), self.ws.run_dir, settings=CLONE_SERVER_SETTINGS)
            facts = [inspect(server)] if inspect else []
            plan.settings = cluster.initdb_settings(server)
            if count_rows:
                plan.row_counts = cluster.row_counts(server)
                tables = sum(len(t) for t in plan.row_counts.values())
                facts.append(f"{tables} tables in {len(plan.row_counts)} databases counted")
            if plan.drop_copied_slots:
                dropped = replication.drop_logical_slots(server)
                if dropped:
                    facts.append(f"dropped the copies of live's logical slots {', '.join(dropped)}")
            server.stop("fast")
            origin = "crash recovery of a running snapshot" if stale else "clean start"
            step.detail = "; ".join([origin, *facts, "stopped cleanly"])

    def initdb_new(self) -> None:
        plan = self.plan
        with self.step("initdb-new") as step:
            for path in (plan.new_data_dir, plan.old_moved_dir):
                if os.path.exists(path):
                    raise ExistsError(f"{path} exists on the clone; move it away in the live "
                                      "volume (a leftover of an earlier upgrade?)")
            step.detail = initdb_like(plan.new_bin, plan.new_data_dir, plan.new_major,
                                      plan.settings, owner_of=plan.data_dir)

    def pg_upgrade(self, mode: str) -> None:
        plan = self.plan
        with self.step(f"pg-upgrade-{mode}") as step:
            new = PgServer(plan.new_bin, plan.new_data_dir)
            cwd = self.ws.upgrade_dir(new.owner_ids())
            old_port = self._port()
            new_port = free_port(exclude=(old_port,))
            result = new.run_result(
                "pg_upgrade", f"--{mode}", "-b", plan.old_bin, "-B", plan.new_bin,
                "-d", plan.data_dir, "-D", plan.new_data_dir, "-p", old_port, "-P", new_port,
                "-s", cwd, "-U", "postgres", "--no-sync", "--jobs", os.cpu_count() or 1,
                cwd=cwd, timeout_s=3600)
            if result.returncode != 0:
                log = _pg_upgrade_log(result.stdout, plan.new_data_dir, cwd)
                raise StepError(f"pg_upgrade --{mode} failed: {_cause(result.stdout, log)}", log=log)
            step.detail = ("clusters are compatible" if mode == "check"
                           else "upgrade complete (relation files hard-linked)")

    def install_new(self) -> None:
        plan = self.plan
        with self.step("install-new") as step:
            os.rename(plan.data_dir, plan.old_moved_dir)
            os.rename(plan.new_data_dir, plan.data_dir)
            carried = []
            for name in cluster.CONFIG_FILES:
                source = os.path.join(plan.old_moved_dir, name)
                if os.path.isfile(source):
                    target = os.path.join(plan.data_dir, name)
                    # Replace, not overwrite in place: a new file never depends on
                    # open(O_TRUNC) shrinking the old one, and a crash leaves
                    # either file whole.
                    tmp = f"{target}.cowfs-tmp"
                    shutil.copy2(source, tmp)
                    os.replace(tmp, target)
                    st = os.stat(source)
                    os.chown(target, st.st_uid, st.st_gid)
                    carried.append(name)
            step.detail = (f"{plan.pgdata} is now PostgreSQL {plan.new_major}; the old cluster is "
                           f"{os.path.basename(plan.old_moved_dir)}; carried over {', '.join(carried)}")

    def start_new(self) -> PgServer:
        plan = self.plan
        with self.step("start-new") as step:
            server = self.ws.started(PgServer(plan.new_bin, plan.data_dir))
            server.start(self._port(), self.ws.run_dir, settings=plan.server_settings)
            version = server.server_version()
            if not version.startswith(f"{plan.new_major}."):
                raise StepError(f"the new server reports version {version}, not {plan.new_major}")
            step.detail = f"PostgreSQL {version} accepts connections"
        return server

    def analyze(self, server: PgServer) -> None:
        with self.step("analyze") as step:
            step.detail = analyze_in_stages(server, self.plan.new_major)

    def stop_new(self, server: PgServer) -> None:
        with self.step("stop-new") as step:
            server.stop("fast")
            step.detail = "clean shutdown"

    def amcheck(self, server: PgServer) -> None:
        with self.step("amcheck") as step:
            server.amcheck()
            step.detail = "pg_amcheck --all --heapallindexed: no corruption"

    def compare_row_counts(self, server: PgServer) -> None:
        with self.step("row-counts") as step:
            after = cluster.row_counts(server)
            before = self.plan.row_counts
            diffs = [f"{db}.{table}: {rows} before, {after.get(db, {}).get(table)} after"
                     for db, tables in before.items() for table, rows in tables.items()
                     if after.get(db, {}).get(table) != rows]
            if diffs:
                raise StepError(f"{len(diffs)} tables differ in row count after the upgrade: "
                                + "; ".join(diffs[:5]), log="\n".join(diffs))
            tables = sum(len(t) for t in before.values())
            step.detail = f"{tables} tables, {sum(sum(t.values()) for t in before.values())} rows: equal"

    def check_sql(self, server: PgServer) -> None:
        plan = self.plan
        if plan.check_sql is None:
            self.report.skip("check-sql", "no --check-sql given")
            return
        with self.step("check-sql") as step:
            ok, output = cluster.check_sql_true(server, plan.check_sql, plan.database)
            if not ok:
                shown = output.splitlines()[-1] if output else "no output"
                raise StepError(f"--check-sql {plan.check_sql_name} did not return true on "
                                f"database {plan.database} (last line: {shown[:200]})", log=output)
            step.detail = f"{plan.check_sql_name} returned true"


def initdb_like(new_bin: str, new_data_dir: str, new_major: str, settings: dict,
                owner_of: str) -> str:
    """initdb a new cluster that pg_upgrade accepts for one with ``settings``; a detail line.

    The owner is that of ``owner_of`` (the old data directory). Checksums
    follow the old cluster both ways: initdb 18 enables them unless told not
    to, and pg_upgrade refuses clusters that differ. The detail reports what
    the new cluster's pg_control says, not what was asked for.
    """
    owner = os.stat(owner_of)
    server = PgServer(new_bin, new_data_dir)
    extra = [f"--wal-segsize={settings['wal_segsize_mb']}", "--no-sync"]
    if not settings["data_checksums"] and int(new_major) >= 18:
        extra.append("--no-data-checksums")
    server.initdb(data_checksums=settings["data_checksums"], encoding=settings["encoding"],
                  lc_collate=settings["lc_collate"], lc_ctype=settings["lc_ctype"],
                  extra_args=extra, os_owner=(owner.st_uid, owner.st_gid))
    checksums = cluster.controldata(server).get("Data page checksum version", "0") != "0"
    return (f"{os.path.basename(new_data_dir)}: encoding {settings['encoding']}, collate "
            f"{settings['lc_collate']}, checksums {'on' if checksums else 'off'}")


def analyze_in_stages(server: PgServer, major: str) -> str:
    """vacuumdb --all --analyze-in-stages on a running new server; a detail line.

    pg_upgrade does not carry planner statistics before 18, so a new server
    plans blind until ANALYZE: the stages give every table rough statistics
    first, then better ones. From 18 on pg_upgrade carries them, and only
    what it does not (extended statistics) is analyzed.
    """
    args = ["--all", "--analyze-in-stages"]
    carried = int(major) >= 18
    if carried:
        args.append("--missing-stats-only")
    server.run("vacuumdb", *server.connection_args(), *args, timeout_s=ANALYZE_TIMEOUT_S,
               what="vacuumdb --analyze-in-stages")
    if carried:
        return "pg_upgrade carried the planner statistics; analyzed only what was missing"
    return "every database analyzed in 3 stages (pg_upgrade does not carry statistics)"


class _SnapshottingStep:
    """`Report.step` plus a snapshot of the clone afterwards, whatever the outcome."""

    def __init__(self, upgrader: Upgrader, name: str):
        self.upgrader, self.name = upgrader, name

    def __enter__(self):
        self._cm = self.upgrader.report.step(self.name)
        return self._cm.__enter__()

    def __exit__(self, *exc_info):
        try:
            return self._cm.__exit__(*exc_info)
        finally:
            self.upgrader.snapshot_clone(self.upgrader.report.steps[-1])


# --- reading pg_upgrade's output -----------------------------------------------------------------

def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _cause(stdout: str, log: str) -> str:
    """What failed, as one line.

    A failed check prints "<check> ... fatal" and an explanation (from 17
    on, data type checks print "<group> ... failed check: <check>", a
    heading line ending in ":", then the explanation); a failed action (e.g.
    restoring schemas, which --check does not try) prints the action, then
    "*failure*", and the reason is an ERROR line in its logs.
    """
    lines = [line.rstrip() for line in stdout.splitlines()]
    first_error = next((l.strip() for l in log.splitlines()
                        if re.search(r"\b(ERROR|FATAL|PANIC):", l)), "")
    first_error = re.sub(r"^.*?\b(ERROR|FATAL|PANIC):\s*", "", first_error)
    for i, line in enumerate(lines):
        failed_check = re.search(r"\bfailed check:\s*(.+)$", line)
        if re.search(r"\bfatal\s*$", line) or failed_check:
            check = (failed_check.group(1) if failed_check
                     else re.sub(r"\s+fatal\s*$", "", line)).strip()
            following = [l.strip() for l in lines[i + 1:i + 6]
                         if l.strip() and not l.strip().endswith(":")]
            sentence = " ".join(following[:3]).split(". ")[0].rstrip(".")
            return f"{check}: fatal ({sentence})"
        if line.strip() == "*failure*":
            action = next((l.strip() for l in reversed(lines[:i]) if l.strip()), "a step")
            return f"{action}: failure ({first_error or 'see the log'})"[:400]
    return (first_error or _last_line(stdout))[:400]


def _pg_upgrade_log(stdout: str, new_data_dir: str, cwd: str) -> str:
    """pg_upgrade's report plus what its output directory says about the failure.

    PostgreSQL 15+ writes the files listing problem objects and its logs
    under NEW/pg_upgrade_output.d/<time>/; older ones wrote them into the
    working directory. Lists (``*.txt``) are shown whole; of the logs, the
    lines with errors and the last lines.
    """
    parts = [stdout.rstrip()]
    for root in (os.path.join(new_data_dir, "pg_upgrade_output.d"), cwd):
        for dirpath, _dirs, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if name.endswith(".txt"):
                    parts.append(f"--- {path}\n{_read(path).rstrip()}")
                elif name.endswith(".log"):
                    interesting = _interesting_log_lines(_read(path))
                    if interesting:
                        parts.append(f"--- {path} (errors and last lines)\n{interesting}")
    return "\n".join(parts)


def _interesting_log_lines(text: str) -> str:
    lines = text.splitlines()
    errors = [l for l in lines if re.search(r"\b(ERROR|FATAL|PANIC)\b", l)][:20]
    tail = lines[-5:]
    return "\n".join(dict.fromkeys(errors + tail)) if errors else ""


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read(200_000)
    except OSError as exc:
        return f"(unreadable: {exc.strerror})"
