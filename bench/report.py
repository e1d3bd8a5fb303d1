"""Targets, their evaluation, and the three outputs: JSON, a markdown table, PNG plots.

Every ratio figure is the median over rounds of (cowfs / baseline) measured
in the same round. Throughput-like figures must reach their target
(``>=``), time-like ones must stay under it (``<=``).
"""

import json
import os
import platform
import statistics
import subprocess
from collections import Counter
from typing import Optional

MIB = 1 << 20

# name -> (comparison, target, description)
TARGETS = {
    "tpcb": (">=", 0.75, "pgbench TPC-B, 4 clients: TPS cowfs / plain"),
    "select_only": (">=", 0.90, "pgbench select-only, 4 clients: TPS cowfs / plain"),
    "pgbench_init": ("<=", 2.0, "pgbench -i load: time cowfs / plain"),
    "initdb": ("<=", 3.0, "initdb: time cowfs / plain"),
    "seq_write": (">=", 0.80, "sequential write + fsync: throughput cowfs / plain"),
    "seq_read": (">=", 0.60, "sequential read, caches dropped: throughput cowfs / plain"),
    "rand_8k": (">=", 0.50, "random 8 KiB read/write 50/50: IOPS cowfs / plain"),
    "snapshot_latency": ("<=", 1.5, "snapshot latency: large / small volume (and < 20 ms)"),
    "clone_latency": ("<=", 1.5, "clone latency: large / small volume (and < 20 ms)"),
    "live_with_clone": (">=", 0.70, "live TPC-B TPS with a busy clone / live alone"),
    "clone_to_ready": ("<=", 2.0, "crash recovery of one crash image, start to ready: cowfs clone / plain copy"),
    "flushes_per_commit": ("<=", 1.1, "device flushes per single-client TPC-B commit: the cowfs figure itself",
                           "value"),
}
# A target's optional 4th element says what it bounds: "ratio" (default) or the cowfs "value".
LATENCY_LIMIT_MS = 20.0
RSS_LIMIT_BYTES = 300 * MIB


def median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def evaluate(metric: dict) -> dict:
    """Median figures, the target, whether it is met and by how much it is missed."""
    name = metric["name"]
    rounds = metric["rounds"]
    row = dict(name=name, unit=metric["unit"], base_label=metric["base_label"],
               value_label=metric["value_label"], base=median(r["base"] for r in rounds),
               value=median(r["value"] for r in rounds), ratio=median(r["ratio"] for r in rounds),
               ratios=[round(r["ratio"], 3) for r in rounds if r["ratio"] is not None],
               daemon_cpu_util=median(r.get("daemon_cpu_util") for r in rounds))
    if any("plain_pair_ratio" in r for r in rounds):
        row["plain_pair_ratio"] = median(r.get("plain_pair_ratio") for r in rounds)
    if name not in TARGETS or row["ratio"] is None:
        return row
    op, target, text, *on = TARGETS[name]
    on = on[0] if on else "ratio"
    ratio = row[on]
    met = ratio >= target if op == ">=" else ratio <= target
    if name.endswith("_latency"):
        slowest = max(metric.get("small_max_ms", 0), metric.get("large_max_ms", 0))
        met = met and max(row["base"], row["value"]) < LATENCY_LIMIT_MS
        row["max_ms"] = slowest
    row.update(target=f"{op} {target:g}" if on == "ratio" else f"cowfs {op} {target:g}", target_value=target,
               target_on=on, op=op, description=text, met=met)
    if not met:
        if op == ">=":
            row["missed_by"] = (f"{target - ratio:.2f} short ({ratio / target:.0%} of target; "
                                f"needs {target / ratio:.1f}x)")
        else:
            row["missed_by"] = f"{ratio - target:.2f} over ({ratio / target:.1f}x the limit)"
    return row


def evaluate_rss(peaks: dict) -> dict:
    peak = max((p["hwm"] for p in peaks.values()), default=0)
    worst = max(peaks.values(), key=lambda p: p["hwm"], default=None)
    anon = max((p.get("anon", 0) for p in peaks.values()), default=0)
    row = dict(name="daemon_peak_rss", unit="MiB", value=peak / MIB, target="< 300 MiB",
               peak_anon_mib=round(anon / MIB, 1),
               met=peak < RSS_LIMIT_BYTES, where=worst["label"] if worst else None,
               per_daemon={f"{p['label']}": round(p["hwm"] / MIB, 1) for p in peaks.values()})
    if not row["met"]:
        row["missed_by"] = f"{(peak - RSS_LIMIT_BYTES) / MIB:.0f} MiB over"
    return row


# --- machine -----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    disk = _run(["findmnt", "-no", "SOURCE,FSTYPE", "--target", "/var/tmp"]) or "?"
    return dict(cpu=cpu, cores=os.cpu_count(), ram_gib=round(ram_gib, 1), kernel=platform.release(),
                disk=disk, python=platform.python_version(),
                summary=f"{os.cpu_count()} cores ({cpu}), {ram_gib:.0f} GiB RAM, "
                        f"{disk} virtio disk, Linux {platform.release()}")


def git_state(repo: str) -> dict:
    status = _run(["git", "-C", repo, "status", "--porcelain", "--", "cowfs"], strip=False) or ""
    return dict(commit=_run(["git", "-C", repo, "rev-parse", "--short", "HEAD"]),
                dirty=[line[3:] for line in status.splitlines() if line.strip()])


def _run(argv, strip: bool = True) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return out.strip() if strip else out
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- py-spy profiles ---------------------------------------------------------------------------

IDLE_LEAVES = ("get_events", "_io_epoll", "wait_readable", "select", "poll")


def _frame_name(frame: str) -> str:
    """'write (cowfs/filesystem.py:123)' -> 'write (cowfs/filesystem.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0] if where else ""
    short = path.split("site-packages/")[-1].split("/work/main/")[-1]
    return f"{name} ({short})" if short else name


def summarize_profile(path: str, top: int = 18) -> dict:
    """Self and inclusive shares of the samples in a py-spy raw (collapsed) file."""
    inclusive, leaf = Counter(), Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_frame_name(fr) for fr in stack.split(";") if fr and not fr.startswith("process ")]
            if not frames:
                continue
            total += n
            if any(key in frames[-1] for key in IDLE_LEAVES) and "cowfs/" not in frames[-1]:
                idle += n
                continue
            leaf[frames[-1]] += n
            for fr in set(frames):
                inclusive[fr] += n
    busy = total - idle
    share = lambda c: [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)]  # noqa: E731
    cowfs_incl = Counter({k: v for k, v in inclusive.items() if "cowfs/" in k or "lmdb" in k
                          or "xxhash" in k or "numpy" in k})
    return dict(samples=total, idle_pct=round(100 * idle / total, 1) if total else None,
                busy_pct=round(100 * busy / total, 1) if total else None,
                self_top=share(leaf), inclusive_top=share(cowfs_incl), file=os.path.basename(path))


# --- outputs -----------------------------------------------------------------------------------

def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "–"
    if unit in ("s",) or (isinstance(value, float) and value < 10):
        return f"{value:.2f}"
    return f"{value:,.0f}"


def markdown(result: dict) -> str:
    lines = [f"# cowfs benchmark suite, {result['date']}", "",
             f"Machine: {result['machine']['summary']}. "
             f"{result['notes']['shared']}", "",
             f"Commit {result['git']['commit']}"
             + (f" with uncommitted changes in {', '.join(result['git']['dirty'])}" if result['git']['dirty'] else "")
             + f"; rounds: {result['config']['rounds']}{' (quick)' if result['config'].get('quick') else ''}; "
               "figures are medians over rounds, ratios are medians of per-round ratios."
             + (f" PostgreSQL settings: {', '.join(result['config']['pg_settings'])}."
                if result['config'].get('pg_settings') else "")
             + (f" **EXPERIMENT: cowfs stores on {result['config']['store_dir']}, not on the plain "
                "directory's disk.**" if result['config'].get('store_dir') else "")
             + (" **Profiled run (py-spy attached): cowfs figures are depressed.**"
                if result['config'].get('profile') else "")
             + _load_text(result['notes'].get('load_average')), "",
             "| benchmark | plain | cowfs | ratio | target | met | missed by | rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        if row["name"] == "daemon_peak_rss":
            anon = f" (anon peak {row['peak_anon_mib']:.0f})" if row.get("peak_anon_mib") else ""
            lines.append(f"| daemon peak RSS (VmHWM) | | {row['value']:.0f} MiB{anon} | | {row['target']} | "
                         f"{'yes' if row['met'] else 'NO'} | {row.get('missed_by', '')} | |")
            continue
        label = row["name"]
        base = f"{_fmt(row['base'], row['unit'])} {row['unit']}"
        value = f"{_fmt(row['value'], row['unit'])} {row['unit']}"
        if row["base_label"] != "plain":
            base = f"{row['base_label']}: {base}"
            value = f"{row['value_label']}: {value}"
        met = "" if "met" not in row else ("yes" if row["met"] else "NO")
        lines.append(f"| {label} | {base} | {value} | {_fmt(row['ratio'])} | {row.get('target', 'report')} "
                     f"| {met} | {row.get('missed_by', '')} | {', '.join(f'{x:.2f}' for x in row['ratios'])} |")
    for row in result["summary"]:
        if row.get("plain_pair_ratio") is not None:
            lines += ["", f"Reference for {row['name']}: on the plain disk, a cluster beside a second "
                      f"busy cluster of the same size kept {row['plain_pair_ratio']:.2f} of its TPS alone "
                      "(same rounds, median)."]
    for metric in result["metrics"]:
        lines += _durability_lines(metric)
    for extra in result["extras"]:
        if extra["name"] == "snapshots_under_load":
            lines += ["", f"**Snapshots under load** ({extra['snapshots']} snapshots, one every "
                      f"{extra['interval_s']} s during TPC-B at {extra['pgbench_tps']:.0f} TPS): "
                      f"WAL written {extra['wal_bytes'] / MIB:.1f} MiB "
                      f"({extra['wal_bytes_per_snapshot'] / MIB:.2f} MiB per snapshot); referenced "
                      f"chunk bytes grew {extra['referenced_chunk_growth_bytes'] / MIB:.1f} MiB "
                      f"(**{extra['stored_bytes_per_snapshot'] / MIB:.2f} MiB per snapshot**, "
                      f"{extra['stored_per_wal']:.2f}x the WAL); pack+metadata disk use grew "
                      f"{extra['disk_growth_bytes'] / MIB:.1f} MiB; snapshot latency under load "
                      f"median {extra['snapshot_ms_median']:.1f} ms, max {extra['snapshot_ms_max']:.1f} ms."]
        if extra["name"] == "chunk_sizes":
            lines += ["", "**Chunk size** (ratios to plain in the same round, medians):", "",
                      "| chunk size | TPC-B TPS ratio | seq write ratio | pgbench -i s | store bytes after load |",
                      "|---|---|---|---|---|"]
            for row in extra["rows"]:
                lines.append(f"| {row['chunk_size'] // 1024} KiB | {median(x['ratio'] for x in row['tpcb']):.2f} "
                             f"| {median(x['ratio'] for x in row['seq_write']):.2f} | {row['load_s']:.1f} "
                             f"| {row['store_bytes_after_load'] / MIB:.0f} MiB |")
    if result.get("profiles"):
        lines += ["", "**Profiles** (py-spy, daemon, % of all samples incl. idle):"]
        for key, prof in result["profiles"].items():
            top = "; ".join(f"{n} {p}%" for n, p in prof["self_top"][:6])
            lines.append(f"- {key}: idle {prof['idle_pct']}%, busy {prof['busy_pct']}%; top self: {top}")
    if result.get("errors"):
        lines += ["", "**Errors**:"] + [f"- {name}: {err}" for name, err in result["errors"].items()]
    return "\n".join(lines) + "\n"


def _load_text(load) -> str:
    if not load:
        return ""
    fmt = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
    return f" Load average (1/5/15 min): {fmt(load['start'])} at the start, {fmt(load['end'])} at the end."


def _durability_lines(metric: dict) -> list:
    """What the two issue-14 figures rest on: device, probe, per-commit I/O, redo volume."""
    rounds = metric["rounds"]
    if metric["name"] == "flushes_per_commit":
        probe = metric["probe"]
        per = lambda side, key: median(r[side][key] for r in rounds)  # noqa: E731
        return ["", f"**Flushes per commit**: {metric['transactions']} single-client TPC-B transactions "
                f"(scale {metric['scale']}, autovacuum off) per side and round on {metric['device']}, an ext4 "
                f"image of its own ({metric['image_bytes'] / (1 << 30):.0f} GiB, loop device without FUA: "
                f"an 8 KiB overwrite + fdatasync counted {probe['overwrite_fdatasync']:.1f} flush, an append + "
                f"fdatasync {probe['append_fdatasync']:.1f}, the journal commit). Per commit, medians: "
                f"plain {per('plain', 'flushes_per_commit'):.2f} flushes, {per('plain', 'write_ios_per_commit'):.2f} "
                f"write requests, {per('plain', 'write_bytes_per_commit') / 1024:.1f} KiB written, "
                f"{per('plain', 'tps'):.0f} TPS; cowfs {per('cowfs', 'flushes_per_commit'):.2f} flushes, "
                f"{per('cowfs', 'write_ios_per_commit'):.2f} write requests, "
                f"{per('cowfs', 'write_bytes_per_commit') / 1024:.1f} KiB written, {per('cowfs', 'tps'):.0f} TPS."]
    if metric["name"] == "clone_to_ready":
        mib = lambda key: (median(r.get(key) for r in rounds) or 0) / MIB  # noqa: E731
        secs = lambda key: median(r.get(key) for r in rounds)  # noqa: E731
        redo = lambda key: f"{secs(key):.2f} s" if secs(key) is not None else "?"  # noqa: E731
        return ["", f"**Clone to ready**: crash image = snapshot after `pgbench -i -s {metric['scale']}` "
                f"({metric['pgbench_init_s']:.0f} s on cowfs) and {metric['load_under_snapshot_s']} s of TPC-B; "
                f"redo {mib('cowfs_redo_bytes'):.0f} MiB on the clone, {mib('plain_redo_bytes'):.0f} MiB on the "
                f"copy; PostgreSQL's own redo time {redo('cowfs_redo_elapsed_s')} (clone) vs "
                f"{redo('plain_redo_elapsed_s')} (copy); caches dropped before each start; clone "
                f"{1000 * (secs('clone_s') or 0):.1f} ms, plain copy (not counted) {secs('plain_copy_s') or 0:.1f} s."]
    return []


def write_outputs(result: dict, out_dir: str, stem: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown(result))
    try:
        paths += plots(result, out_dir, stem)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
    return paths


def plots(result: dict, out_dir: str, stem: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    rows = [r for r in result["summary"] if r.get("ratio") is not None and "target_value" in r
            and r.get("target_on", "ratio") == "ratio"]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
        names = [r["name"] for r in rows]
        # Everything as "speed relative to plain": time ratios are inverted.
        speed = [r["ratio"] if r["op"] == ">=" else 1 / r["ratio"] for r in rows]
        goal = [r["target_value"] if r["op"] == ">=" else 1 / r["target_value"] for r in rows]
        colors = ["tab:green" if r["met"] else "tab:red" for r in rows]
        ax.barh(names, speed, color=colors)
        ax.scatter(goal, names, marker="|", s=400, color="black", label="target", zorder=3)
        ax.axvline(1.0, color="grey", linestyle=":")
        ax.set_xlabel("cowfs relative to baseline (higher is better; time ratios inverted)")
        ax.set_title(f"cowfs vs plain disk, {result['date']} (green: target met)")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        fig.tight_layout()
        paths.append(_save(fig, out_dir, f"{stem}-ratios.png"))
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
        for i, r in enumerate(rows):
            ax.scatter(r["ratios"], [i] * len(r["ratios"]), color="tab:blue")
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xlabel("per-round ratio cowfs / baseline")
        ax.set_title("spread between rounds (shared machine)")
        fig.tight_layout()
        paths.append(_save(fig, out_dir, f"{stem}-rounds.png"))
    for extra in result["extras"]:
        if extra["name"] == "chunk_sizes":
            fig, ax = plt.subplots(figsize=(7, 4))
            sizes = [row["chunk_size"] // 1024 for row in extra["rows"]]
            for key, label in (("tpcb", "TPC-B TPS"), ("seq_write", "seq write MiB/s")):
                ax.plot(sizes, [median(x["ratio"] for x in row[key]) for row in extra["rows"]],
                        marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [f"{s} KiB" for s in sizes])
            ax.set_ylabel("cowfs / plain")
            ax.set_title("chunk size")
            ax.legend()
            fig.tight_layout()
            paths.append(_save(fig, out_dir, f"{stem}-chunks.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
