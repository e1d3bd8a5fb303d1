#!/usr/bin/env bash
# The benchmark command: set the machine up (idempotent), install what the
# suite needs, then run it.
#   bash tools/bench.sh [bench/suite.py args...]     e.g. --quick, --only tpcb,seqio, --rounds 5
# Results: bench/results/suite-<UTC date>.{json,md} and suite-<UTC date>-*.png
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh

# fio for the random 8 KiB I/O benchmark (the suite falls back to a Python
# loop without it, and says so in its report).
if ! command -v fio >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "bench: apt: installing fio"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fio </dev/null >/dev/null \
            || { apt-get update -q </dev/null >/dev/null &&
                 DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fio </dev/null >/dev/null; } \
            || echo "bench: WARNING: fio could not be installed; random I/O uses the Python fallback" >&2
    else
        echo "bench: WARNING: fio missing and not root; random I/O uses the Python fallback" >&2
    fi
fi

# matplotlib for the plots, py-spy for --profile.
if ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
    echo "bench: pip: installing matplotlib"
    .venv/bin/pip install -q --disable-pip-version-check matplotlib </dev/null \
        || echo "bench: WARNING: matplotlib could not be installed; no plots" >&2
fi
if [ ! -x .venv/bin/py-spy ]; then
    echo "bench: pip: installing py-spy"
    .venv/bin/pip install -q --disable-pip-version-check py-spy </dev/null \
        || echo "bench: WARNING: py-spy could not be installed; --profile will not work" >&2
fi

exec .venv/bin/python bench/suite.py "$@"
