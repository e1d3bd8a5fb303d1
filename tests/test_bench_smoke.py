"""The benchmark suite runs end to end on its cheap workloads and writes what it promises.

No timing assertions: the figures only have to exist and be positive.
"""

import json
import os
import subprocess
import sys

from helpers import REPO, make_workdir, remove_workdir


def test_quick_suite_writes_json_markdown_and_positive_figures():
    out = make_workdir("cowfs-bench-smoke-")
    try:
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, "bench", "suite.py"), "--quick",
             "--only", "seqio,snapshot", "--out", out, "--dir", out, "--stem", "smoke"],
            capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        with open(os.path.join(out, "smoke.json")) as f:
            data = json.load(f)
        for key in ("date", "machine", "git", "config", "summary", "metrics", "rss", "errors"):
            assert key in data, f"{key} missing from the JSON report"
        assert data["errors"] == {}
        rows = {row["name"]: row for row in data["summary"]}
        for name in ("seq_write", "seq_read", "snapshot_latency", "clone_latency", "daemon_peak_rss"):
            assert name in rows, f"{name} missing from the summary: {sorted(rows)}"
            assert isinstance(rows[name]["met"], bool)
        for name in ("seq_write", "seq_read", "snapshot_latency", "clone_latency"):
            row = rows[name]
            assert row["base"] > 0 and row["value"] > 0 and row["ratio"] > 0, row
            assert "target" in row
        assert rows["daemon_peak_rss"]["value"] > 0
        with open(os.path.join(out, "smoke.md")) as f:
            table = f.read()
        assert "| seq_write |" in table and "Machine:" in table
        # Nothing of this run is left mounted (other runs of the suite may be going on).
        with open("/proc/self/mounts") as f:
            assert f" {out}/" not in f.read()
    finally:
        remove_workdir(out)
