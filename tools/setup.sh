#!/usr/bin/env bash
# Prepare this machine for cowfs development and CI (Debian 12, run as root).
#
# Idempotent: a second run installs nothing and downloads nothing.
#   - apt packages (only the missing ones; apt-get update only if needed)
#   - .venv at the repo root + `pip install -e '.[test]'` (skipped while
#     .venv/.installed-stamp is newer than pyproject.toml)
#   - /dev/fuse
#   - system user `postgres` (PostgreSQL refuses to run as root)
#   - PostgreSQL server binaries under .cache/postgresql/ (tools/fetch-postgres.sh):
#     14 -> 18 is the main upgrade path, 15/16/17 the rest of the rehearsal matrix
#   - pgbouncer (Debian's package; its service stays stopped: the online cutover's
#     tests and the demo start their own instance as the postgres user)
#
# Environment:
#   COWFS_PYTHON    interpreter for a new .venv (default: /usr/bin/python3,
#                   else python3 on PATH); must be >= 3.11
#   COWFS_PG_CACHE  where PostgreSQL binaries go (default: <repo>/.cache/postgresql)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PG_VERSIONS=(14.23.0 15.19.0 16.15.0 17.11.0 18.6.0)

# Debian packages. The lib* runtime packages are what the prebuilt PostgreSQL
# binaries link against (see `readelf -d bin/postgres bin/psql`); most are
# present on a normal Debian install but not on a minimal image.
APT_PACKAGES=(
    fuse3 libfuse3-dev pkg-config
    python3 python3-venv python3-dev gcc git
    procps util-linux psmisc
    ca-certificates
    libssl3 libgssapi-krb5-2 libxml2 liblz4-1 zlib1g libreadline8
    pgbouncer
    systemd
)

log()  { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
FAILED=()

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

# --- 1. apt packages ---------------------------------------------------------
pkg_installed() {
    dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'
}
missing=()
for p in "${APT_PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "apt: all ${#APT_PACKAGES[@]} packages present"
elif [ "$IS_ROOT" -ne 1 ]; then
    echo "setup: ERROR: missing Debian packages (${missing[*]}) and not root; run as root" >&2
    exit 1
else
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null >/dev/null
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null >/dev/null
    log "apt: installed ${#missing[@]} package(s)"
fi

# --- 2. virtualenv + editable install ------------------------------------------
py_ok() {  # usable interpreter >= 3.11 ?
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}
if [ -x .venv/bin/python ] && py_ok .venv/bin/python; then
    log "venv: .venv exists ($(.venv/bin/python -V 2>&1))"
else
    if [ -e .venv ]; then
        warn ".venv exists but its python does not run (or is < 3.11); recreating it"
        rm -rf .venv
    fi
    PY="${COWFS_PYTHON:-}"
    if [ -z "$PY" ]; then
        if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY="$(command -v python3)"; fi
    fi
    if ! py_ok "$PY"; then
        echo "setup: ERROR: $PY is not Python >= 3.11" >&2
        exit 1
    fi
    log "venv: creating .venv with $PY ($("$PY" -V 2>&1))"
    "$PY" -m venv .venv
fi

STAMP=.venv/.installed-stamp
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
    log "pip: up to date (stamp newer than pyproject.toml)"
else
    log "pip: installing -e '.[test]' into .venv"
    if .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' </dev/null; then
        touch "$STAMP"
    else
        warn "pip install -e '.[test]' failed"
        FAILED+=("pip install -e '.[test]'")
    fi
fi

# --- 3. /dev/fuse ------------------------------------------------------------
if [ -c /dev/fuse ]; then
    log "fuse: /dev/fuse present"
else
    modprobe fuse >/dev/null 2>&1 || true
    if [ ! -c /dev/fuse ] && [ "$IS_ROOT" -eq 1 ]; then
        mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    fi
    if [ -c /dev/fuse ]; then
        log "fuse: created /dev/fuse"
    else
        warn "/dev/fuse is missing and could not be created; FUSE mounts will fail"
        FAILED+=("/dev/fuse")
    fi
fi
command -v fusermount3 >/dev/null || warn "fusermount3 not found (package fuse3)"

# --- 4. postgres user ----------------------------------------------------------
if id -u postgres >/dev/null 2>&1; then
    log "user: postgres exists (uid $(id -u postgres))"
elif [ "$IS_ROOT" -eq 1 ]; then
    useradd --system --create-home --shell /bin/bash postgres
    log "user: created postgres (uid $(id -u postgres))"
else
    warn "user postgres missing and not root; cannot create it"
    FAILED+=("user postgres")
fi

# --- 5. PostgreSQL binaries ----------------------------------------------------
log "postgres: fetching ${PG_VERSIONS[*]}"
if ! bash "$ROOT/tools/fetch-postgres.sh" "${PG_VERSIONS[@]}"; then
    FAILED+=("tools/fetch-postgres.sh")
fi

# --- done --------------------------------------------------------------------
if [ "${#FAILED[@]}" -ne 0 ]; then
    printf 'setup: FAILED: %s\n' "$(IFS=,; echo "${FAILED[*]}")" >&2
    exit 1
fi
log "done: venv=$ROOT/.venv  python=$ROOT/.venv/bin/python  postgres=${COWFS_PG_CACHE:-$ROOT/.cache/postgresql}/<version>/bin (tools/pgbin 14|15|16|17|18)  pgbouncer=$(command -v pgbouncer || echo missing)"
