#!/usr/bin/env bash
# The test command: set the machine up (idempotent), then run pytest.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
rc=0
.venv/bin/python -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: FAILED: no tests collected (pytest exit code 5); a run with no tests is a defect" >&2
    exit 1
fi
exit "$rc"
