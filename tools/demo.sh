#!/usr/bin/env bash
# The whole cowfs story, end to end, on this machine (run as root):
#
#   1. a live PostgreSQL 14 cluster on a cowfs mount, under load (pgbench rounds
#      and a ledger writer that records every committed row), snapshotted every
#      few seconds;
#   2. an upgrade rehearsal to 16 on an instant clone: it FAILS on a blocker
#      (a regproc column), the live cluster keeps serving;
#   3. the fix on live (ALTER the column), a rehearsal that PASSES;
#   4. the cutover: downtime measured, every acknowledged ledger row checked on 16;
#   5. the rollback: the pre-upgrade volume serves PostgreSQL 14 again;
#   6. a summary. Mounts, servers and the demo directory are cleaned up at the
#      end, also on failure; the exit code is non-zero if any step failed.
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

say "setup (idempotent): venv, FUSE, postgres user, PostgreSQL 14 and 16 binaries"
bash tools/setup.sh | tail -n 1

PY="$ROOT/.venv/bin/python"
cowfs() { "$PY" -m cowfs "$@"; }
B14="$(bash tools/pgbin 14)"
B16="$(bash tools/pgbin 16)"
DEMO="${COWFS_DEMO_DIR:-$(mktemp -d /tmp/cowfs-demo-XXXX)}"
chmod 755 "$DEMO"
STORE="$DEMO/store"; MNT="$DEMO/mnt"; RUN="$DEMO/run"; PGDATA="$MNT/pgdata"
PORT="$("$PY" -c 'from cowfs.pg import free_port; print(free_port())')"
mkdir -p "$MNT" "$RUN"; chown postgres "$RUN"; chmod 700 "$RUN"
as_pg() { runuser -u postgres -- "$@"; }
psql_live() { as_pg "$B16/psql" -h "$RUN" -p "$PORT" -U postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }

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
                [ -f "$pid_file" ] && as_pg "$B16/pg_ctl" stop -D "$(dirname "$pid_file")" -m fast -w >/dev/null 2>&1
            done
            cowfs umount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt"
        fi
    done
    # Workspaces a failed or interrupted command kept for its logs (named in its JSON report).
    for report in "$DEMO"/*.json; do
        [ -f "$report" ] || continue
        logs="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("logs") or "")' \
                "$report" 2>/dev/null)"
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

# --- 1. live cluster ----------------------------------------------------------------------
say "1. a live PostgreSQL 14 cluster on a cowfs mount ($MNT)"
cowfs init "$STORE" >/dev/null
cowfs rename "$STORE" main live >/dev/null
cowfs mount "$STORE" "$MNT" --volume live
mkdir "$PGDATA"; chown postgres "$PGDATA"; chmod 700 "$PGDATA"
as_pg "$B14/initdb" -D "$PGDATA" -U postgres --auth=trust --no-instructions >/dev/null
as_pg "$B14/pg_ctl" start -D "$PGDATA" -l "$RUN/live.log" -w \
    -o "-p $PORT -k $RUN -c listen_addresses=''" >/dev/null
as_pg "$B14/pgbench" -h "$RUN" -p "$PORT" -U postgres -i -s 2 -q postgres 2>/dev/null
psql_live -c "CREATE TABLE app_hooks (id int PRIMARY KEY, handler regproc)" \
          -c "INSERT INTO app_hooks VALUES (1, 'now'::regproc)"
note "PostgreSQL $(psql_live -c 'SHOW server_version') on port $PORT, pgbench scale 2, table app_hooks(handler regproc)"

say "   load: pgbench rounds + a ledger writer; a snapshot every 5 s"
( while [ ! -e "$DEMO/stop" ] && [ ! -e "$DEMO/stop-bench" ]; do
      as_pg "$B14/pgbench" -h "$RUN" -p "$PORT" -U postgres -n -c 2 -T 5 postgres >/dev/null 2>&1 \
          || echo "round failed" >>"$DEMO/bench-failures"
  done ) &
BG_PIDS+=($!)
"$PY" -m cowfs.pg.ledger write --bin "$B16" --host "$RUN" --port "$PORT" --acked "$DEMO/acked" \
    >"$DEMO/ledger.out" 2>&1 &
LEDGER_PID=$!
BG_PIDS+=($LEDGER_PID)
( i=0; while [ ! -e "$DEMO/stop" ] && [ ! -e "$DEMO/stop-snapshots" ]; do
      cowfs snapshot "$STORE" "live@auto-$(date -u +%H%M%S)-$i" >/dev/null || echo x >>"$DEMO/snap-failures"
      i=$((i + 1)); sleep 5
  done ) &
BG_PIDS+=($!)
sleep 6

# --- 2. rehearsal that fails on the blocker -----------------------------------------------
say "2. rehearse the upgrade to 16 on a clone (live keeps serving)"
set +e
cowfs pg rehearse-upgrade "$STORE" live --pgdata pgdata --old-bin "$B14" --new-bin "$B16" \
    --json "$DEMO/rehearsal-1.json" | sed 's/^/   /'
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 1 ] || die "the first rehearsal should fail on the regproc column (exit $rc)"
failed="$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["failed_step"])' "$DEMO/rehearsal-1.json")"
[ "$failed" = "pg-upgrade-check" ] || die "the rehearsal failed at $failed, expected pg-upgrade-check"
note "as expected: the rehearsal failed at $failed; the live server still answers: $(psql_live -c 'SELECT count(*) FROM cowfs_ledger') ledger rows"
logs="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("logs",""))' "$DEMO/rehearsal-1.json")"
[ -n "$logs" ] && rm -rf "$(dirname "$logs")"

# --- 3. the fix, and a rehearsal that passes ----------------------------------------------
say "3. the fix on live: app_hooks.handler regproc -> text; rehearse again with a check"
psql_live -c "ALTER TABLE app_hooks ALTER COLUMN handler TYPE text"
echo "SELECT handler = 'now' FROM app_hooks WHERE id = 1;" >"$DEMO/check.sql"
cowfs pg rehearse-upgrade "$STORE" live --pgdata pgdata --old-bin "$B14" --new-bin "$B16" \
    --check-sql "$DEMO/check.sql" --json "$DEMO/rehearsal-2.json" | sed 's/^/   /' \
    || die "the second rehearsal should pass"
[ ! -s "$DEMO/bench-failures" ] || die "a pgbench round on live failed during the rehearsals"
note "live pgbench: every round succeeded during both rehearsals"

# --- 4. cutover ----------------------------------------------------------------------------
say "4. cutover: stop live, upgrade a clone the rehearsed way, serve it at $MNT"
touch "$DEMO/stop-bench" "$DEMO/stop-snapshots"
sleep 6                                         # let the running pgbench round and snapshot finish
SNAPSHOTS_TAKEN="$(cowfs list "$STORE" | grep -c '^live@auto-' || true)"
ACKED_BEFORE_CUTOVER="$(wc -l <"$DEMO/acked")"
cowfs pg cutover "$STORE" live --pgdata pgdata --mountpoint "$MNT" --old-bin "$B14" --new-bin "$B16" \
    --json "$DEMO/cutover.json" | sed 's/^/   /' || die "the cutover failed"
sleep 2                                         # the ledger writer reconnects to 16 and goes on
kill "$LEDGER_PID"; wait "$LEDGER_PID" || true
cat "$DEMO/ledger.out" | sed 's/^/   /'
VERSION="$(psql_live -c 'SHOW server_version')"
"$PY" -m cowfs.pg.ledger verify --bin "$B16" --host "$RUN" --port "$PORT" --acked "$DEMO/acked" \
    | sed 's/^/   /' || die "acknowledged ledger rows are missing after the cutover"
case "$VERSION" in 16.*) ;; *) die "the server on $MNT is $VERSION, not 16";; esac

# --- 5. rollback ---------------------------------------------------------------------------
say "5. going back is a restart: rollback-cutover serves the pre-upgrade 14 volume again"
cowfs pg rollback-cutover "$STORE" live --mountpoint "$MNT" --old-bin "$B14" \
    --json "$DEMO/rollback.json" | sed 's/^/   /' || die "the rollback failed"
OLD_VERSION="$(psql_live -c 'SHOW server_version')"
case "$OLD_VERSION" in 14.*) ;; *) die "after the rollback the server is $OLD_VERSION, not 14";; esac
before_cutover="$(awk -v n="$ACKED_BEFORE_CUTOVER" 'NR <= n' "$DEMO/acked")"
echo "$before_cutover" >"$DEMO/acked-before-cutover"
"$PY" -m cowfs.pg.ledger verify --bin "$B16" --host "$RUN" --port "$PORT" \
    --acked "$DEMO/acked-before-cutover" | sed 's/^/   /' \
    || die "rows committed before the cutover are missing after the rollback"

# --- 6. summary ----------------------------------------------------------------------------
say "6. summary"
"$PY" - "$DEMO" "$VERSION" "$SNAPSHOTS_TAKEN" <<'EOF'
import json, sys
demo, version, snaps = sys.argv[1], sys.argv[2], sys.argv[3]
load = lambda name: json.load(open(f"{demo}/{name}.json"))
r1, r2, cut = load("rehearsal-1"), load("rehearsal-2"), load("cutover")
acked = sum(1 for line in open(f"{demo}/acked") if line.strip())
dur = lambda r: sum(s["duration_s"] for s in r["steps"])
print(f"   periodic snapshots of live while it served: {snaps}")
print(f"   rehearsal 1: FAILED at {r1['failed_step']} ({dur(r1):.1f} s), live untouched")
print(f"   rehearsal 2: PASSED in {dur(r2):.1f} s (amcheck, row counts, check-sql); it estimated the cutover's downtime at {r2['cutover_estimate_s']:.0f} s")
print(f"   cutover:     PASSED, downtime {cut['downtime_s']:.1f} s; PostgreSQL {version} now serves "
      f"the volume 'live'; the 14 cluster stays as volume {cut['pre_upgrade_volume']}")
print(f"   ledger:      {acked} commits acknowledged, 0 lost")
rb = load("rollback")
print(f"   rollback:    PASSED, downtime {rb['downtime_s']:.1f} s; PostgreSQL 14 with every row "
      "committed before the cutover (the upgraded volume is kept)")
EOF
