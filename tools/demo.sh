#!/usr/bin/env bash
# The whole cowfs story, end to end, on this machine (run as root):
#
#   1. a live PostgreSQL 14 cluster on a cowfs mount, clients reaching it through
#      PgBouncer (transaction pooling): pgbench rounds and an open-loop ledger that
#      records every acknowledged commit and its wait; a snapshot every few seconds;
#   2. an upgrade rehearsal to 18 on an instant clone: it FAILS on a blocker
#      (a regproc column), the live cluster keeps serving;
#   3. the fix on live, a rehearsal that PASSES;
#   4. the online cutover: refused first, in one line (a table without a primary
#      key), then, after the fix, done while live serves: clients wait in PgBouncer
#      for a moment (write_pause_s) instead of seeing errors;
#   5. the online rollback: 14 serves again, with every write made on 18;
#   6. finish-cutover closes the window; both servers held the same rows;
#   7. a summary. Mounts, servers, PgBouncer and the demo directory are cleaned up
#      at the end, also on failure; the exit code is non-zero if any step failed.
#
#   bash tools/demo.sh
#
# Environment: COWFS_DEMO_DIR (default: a new /tmp/cowfs-demo-XXXX, removed at
# the end), COWFS_DEMO_KEEP=1 keeps that directory (store and logs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (FUSE mounts for the postgres user)" >&2; exit 1; }

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die()  { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }
indent() { sed 's/^/   /'; }

say "setup (idempotent): venv, FUSE, postgres user, PostgreSQL 14 and 18, PgBouncer"
bash tools/setup.sh | tail -n 1

PY="$ROOT/.venv/bin/python"
cowfs() { "$PY" -m cowfs "$@"; }
B14="$(bash tools/pgbin 14)"
B18="$(bash tools/pgbin 18)"
DEMO="${COWFS_DEMO_DIR:-$(mktemp -d /tmp/cowfs-demo-XXXX)}"
chmod 755 "$DEMO"
STORE="$DEMO/store"; MNT="$DEMO/mnt"; RUN="$DEMO/run"; PGB="$DEMO/pgbouncer"; PGDATA="$MNT/pgdata"
read -r PORT PGB_PORT < <("$PY" -c 'from cowfs.pg import free_port as f; a = f(); print(a, f(exclude=(a,)))')
BOUNCER="host=$PGB port=$PGB_PORT user=postgres"
mkdir -p "$MNT" "$RUN"; chown postgres "$RUN"; chmod 700 "$RUN"
as_pg() { runuser -u postgres -- "$@"; }
psql_live() { as_pg "$B18/psql" -h "$RUN" -p "$PORT" -U postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }
psql_bouncer() { as_pg "$B18/psql" -h "$PGB" -p "$PGB_PORT" -U postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }
field() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or "")' "$@"; }

BG_PIDS=()
cleanup() {
    rc=$?
    trap - EXIT INT TERM
    set +e
    touch "$DEMO/stop"
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    # Stop every server and unmount every mount of the demo store (also clones
    # a failed command left behind), each by its own pid file / mount point.
    for mnt in $(awk '$3 == "fuse.cowfs" {print $2}' /proc/mounts); do
        if "$PY" -c "import sys; from cowfs import daemon as d; e = d.find_mount(sys.argv[1]); \
r = e and d.read_registry(e['dev']); sys.exit(0 if r and r.get('store') == sys.argv[2] else 1)" \
                "$mnt" "$STORE" 2>/dev/null; then
            for pid_file in "$mnt"/*/postmaster.pid; do
                [ -f "$pid_file" ] && as_pg "$B18/pg_ctl" stop -D "$(dirname "$pid_file")" -m fast -w >/dev/null 2>&1
            done
            cowfs umount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt"
        fi
    done
    # Workspaces a command kept for its logs or its window (named in its JSON report).
    for report in "$DEMO"/*.json; do
        [ -f "$report" ] || continue
        logs="$(field "$report" logs 2>/dev/null)"
        case "$logs" in /tmp/cowfs-pg-*/run) rm -rf "$(dirname "$logs")";; esac
    done
    if [ "${COWFS_DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $DEMO"
    else
        rm -rf "$DEMO"
    fi
    [ "$rc" -eq 0 ] && echo "demo: cleaned up" || echo "demo: cleaned up after a failure (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT INT TERM

# --- 1. live cluster behind PgBouncer -------------------------------------------------------
say "1. a live PostgreSQL 14 cluster on a cowfs mount ($MNT), clients through PgBouncer"
cowfs init "$STORE" >/dev/null
cowfs rename "$STORE" main live >/dev/null
cowfs mount "$STORE" "$MNT" --volume live
mkdir "$PGDATA"; chown postgres "$PGDATA"; chmod 700 "$PGDATA"
as_pg "$B14/initdb" -D "$PGDATA" -U postgres --auth=trust --no-instructions >/dev/null
# What an online cutover needs (it refuses, in one line, to start without it).
printf "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n" >>"$PGDATA/postgresql.conf"
as_pg "$B14/pg_ctl" start -D "$PGDATA" -l "$RUN/live.log" -w \
    -o "-p $PORT -k $RUN -c listen_addresses=''" >/dev/null
as_pg "$B14/pgbench" -h "$RUN" -p "$PORT" -U postgres -i -s 2 -q postgres 2>/dev/null
psql_live -c "CREATE TABLE app_hooks (id int PRIMARY KEY, handler regproc)" \
          -c "INSERT INTO app_hooks VALUES (1, 'now'::regproc)"
"$PY" -m cowfs.pg.pgbouncer "$PGB" --server-socket "$RUN" --server-port "$PORT" --port "$PGB_PORT" \
    >/dev/null 2>&1 &
BOUNCER_PID=$!
BG_PIDS+=($BOUNCER_PID)
for _ in $(seq 100); do [ -S "$PGB/.s.PGSQL.$PGB_PORT" ] && break; sleep 0.1; done
note "PostgreSQL $(psql_bouncer -c 'SHOW server_version') on port $PORT; PgBouncer (pid $BOUNCER_PID, transaction pooling) on port $PGB_PORT"

say "   load through PgBouncer: pgbench at 50 tx/s, a ledger at 40 tx/s; a snapshot every 5 s"
( while [ ! -e "$DEMO/stop" ]; do
      as_pg "$B14/pgbench" -h "$PGB" -p "$PGB_PORT" -U postgres -n -c 2 -R 50 -T 5 postgres >/dev/null 2>&1 \
          || echo "round failed" >>"$DEMO/bench-failures"
  done ) &
BG_PIDS+=($!)
"$PY" -m cowfs.pg.ledger write --bin "$B18" --host "$PGB" --port "$PGB_PORT" --acked "$DEMO/acked" \
    --rate 40 >"$DEMO/ledger.out" 2>&1 &
LEDGER_PID=$!
BG_PIDS+=($LEDGER_PID)
( i=0; while [ ! -e "$DEMO/stop" ] && [ ! -e "$DEMO/stop-snapshots" ]; do
      cowfs snapshot "$STORE" "live@auto-$(date -u +%H%M%S)-$i" >/dev/null || echo x >>"$DEMO/snap-failures"
      i=$((i + 1)); sleep 5
  done ) &
BG_PIDS+=($!)
sleep 6

# --- 2. rehearsal that fails on the blocker -----------------------------------------------
say "2. rehearse the upgrade to 18 on a clone (live keeps serving)"
set +e
cowfs pg rehearse-upgrade "$STORE" live --pgdata pgdata --old-bin "$B14" --new-bin "$B18" \
    --json "$DEMO/rehearsal-1.json" | indent
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 1 ] || die "the first rehearsal should fail on the regproc column (exit $rc)"
failed="$(field "$DEMO/rehearsal-1.json" failed_step)"
[ "$failed" = "pg-upgrade-check" ] || die "the rehearsal failed at $failed, expected pg-upgrade-check"
note "as expected: the rehearsal failed at $failed; the live server still answers: $(psql_bouncer -c 'SELECT count(*) FROM cowfs_ledger') ledger rows"

# --- 3. the fix, and a rehearsal that passes ----------------------------------------------
say "3. the fix on live: app_hooks.handler regproc -> text; rehearse again with a check"
psql_live -c "ALTER TABLE app_hooks ALTER COLUMN handler TYPE text"
echo "SELECT handler = 'now' FROM app_hooks WHERE id = 1;" >"$DEMO/check.sql"
cowfs pg rehearse-upgrade "$STORE" live --pgdata pgdata --old-bin "$B14" --new-bin "$B18" \
    --check-sql "$DEMO/check.sql" --json "$DEMO/rehearsal-2.json" | indent \
    || die "the second rehearsal should pass"
touch "$DEMO/stop-snapshots"
SNAPSHOTS_TAKEN="$(cowfs list "$STORE" | grep -c '^live@auto-' || true)"

# --- 4. online cutover -----------------------------------------------------------------------
CUTOVER=(cowfs pg cutover "$STORE" live --pgdata pgdata --mountpoint "$MNT" --old-bin "$B14"
         --new-bin "$B18" --online --pgbouncer "$BOUNCER" --check-sql "$DEMO/check.sql")
say "4. online cutover to 18 while live serves"
set +e
"${CUTOVER[@]}" --json "$DEMO/refused.json" 2>"$DEMO/refusal"
rc=$?
set -e
[ "$rc" -eq 2 ] || die "the cutover should refuse pgbench_history (exit $rc)"
note "refused, before changing anything: $(cat "$DEMO/refusal")"
note "the fix: pgbench_history only gets INSERTs, so its whole row identifies it"
psql_live -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL"
"${CUTOVER[@]}" --json "$DEMO/cutover.json" | indent || die "the online cutover failed"
VERSION="$(psql_bouncer -c 'SHOW server_version')"
case "$VERSION" in 18.*) ;; *) die "clients reach $VERSION, not 18";; esac
note "clients now reach PostgreSQL $VERSION through the same PgBouncer; 14 follows on port $(field "$DEMO/cutover.json" old_side_port)"
sleep 5

# --- 5. online rollback ----------------------------------------------------------------------
say "5. rollback-cutover --online: 14 serves again, with every write made on 18"
cowfs pg rollback-cutover "$STORE" live --mountpoint "$MNT" --online --pgbouncer "$BOUNCER" \
    --json "$DEMO/rollback.json" | indent || die "the online rollback failed"
OLD_VERSION="$(psql_bouncer -c 'SHOW server_version')"
case "$OLD_VERSION" in 14.*) ;; *) die "after the rollback clients reach $OLD_VERSION, not 14";; esac
sleep 5
kill "$LEDGER_PID"; wait "$LEDGER_PID" || true
touch "$DEMO/stop"
cat "$DEMO/ledger.out" | indent
"$PY" -m cowfs.pg.ledger verify --bin "$B18" --host "$PGB" --port "$PGB_PORT" --acked "$DEMO/acked" \
    | indent || die "the ledger on 14 is not what clients were told"
[ ! -s "$DEMO/bench-failures" ] || die "a pgbench round through PgBouncer failed"
note "pgbench through PgBouncer: every round succeeded, across both switches"

# --- 6. both servers agree; finish -----------------------------------------------------------
say "6. after the drain both servers hold the same rows; finish-cutover closes the window"
"$PY" - "$DEMO/rollback.json" "$B14" "$B18" "$PGDATA" "$RUN" "$PORT" <<'EOF' | indent || die "the servers differ"
import json, os, sys, time
from cowfs.pg import PgServer
from cowfs.pg.cluster import table_digests
report, b14, b18, pgdata, run, port = sys.argv[1:]
report = json.load(open(report))
serving = PgServer(b14, pgdata)
serving.port, serving.socket_dir = int(port), run
following = PgServer(b18, os.path.join(report["new_mountpoint"], "pgdata"))
following.port, following.socket_dir = report["new_side_port"], report["logs"]
for _ in range(300):
    a, b = table_digests(serving, ["postgres"]), table_digests(following, ["postgres"])
    if a == b:
        break
    time.sleep(0.2)
for table, digest in sorted(a["postgres"].items()):
    print(f"{table:28} rows|md5 {digest}  {'equal' if b['postgres'].get(table) == digest else 'DIFFERENT'}")
sys.exit(0 if a == b else 1)
EOF
cowfs pg finish-cutover "$STORE" live --json "$DEMO/finish.json" | indent || die "finish-cutover failed"
psql_bouncer -c "CREATE TABLE after_the_window (id int PRIMARY KEY)" && note "DDL works again"

# --- 7. summary ------------------------------------------------------------------------------
say "7. summary"
"$PY" - "$DEMO" "$SNAPSHOTS_TAKEN" <<'EOF'
import json, sys
demo, snaps = sys.argv[1], sys.argv[2]
load = lambda name: json.load(open(f"{demo}/{name}.json"))
r1, r2, cut, back = load("rehearsal-1"), load("rehearsal-2"), load("cutover"), load("rollback")
dur = lambda r: sum(s["duration_s"] for s in r["steps"])
ledger = open(f"{demo}/ledger.out").read().strip()
print(f"   periodic snapshots of live while it served: {snaps}")
print(f"   rehearsal 1: FAILED at {r1['failed_step']} ({dur(r1):.1f} s), live untouched")
print(f"   rehearsal 2: PASSED in {dur(r2):.1f} s (amcheck, row counts, check-sql)")
print(f"   cutover:     online in {dur(cut):.1f} s while live served; clients waited "
      f"{cut['write_pause_s']:.2f} s in PgBouncer (write_pause_s); 18 served from volume {cut['new_volume']}")
print(f"   rollback:    online, clients waited {back['write_pause_s']:.2f} s; 14 serves with every write made on 18")
print(f"   {ledger}")
print("   finish:      replication, slots, publication and DDL block removed; 18's volume kept, unmounted")
EOF
