"""`cowfs metrics`: the figures of a store and its mounted volumes in Prometheus' format.

Written for node_exporter's textfile collector (`--output DIR/cowfs.prom`,
written atomically by `prometheus_client.write_to_textfile`) or read from
stdout. The text format itself is `prometheus_client`'s; this module only
decides what to export:

* per mounted volume, every figure of its daemon's ``stats`` answer as
  ``cowfs_volume_<figure>`` (names ending in ``_total`` are counters, the
  rest gauges: a figure the daemon adds is exported without a change here),
  ``cowfs_volume_up`` (1 mounted and healthy), uptime, and the fsync latency
  histogram ``cowfs_fsync_latency_seconds``;
* per volume, space: ``cowfs_volume_logical_bytes``, ``..._unique_bytes``
  (what destroying it frees), ``cowfs_volume_snapshots``;
* per store: stored and referenced chunk bytes, dedup ratio, pack bytes on
  disk, filesystem size/free/reserve, and the last scrub's outcome.

Costs: the store figures read the whole chunk index and each volume's
records (like `cowfs df`), so scrape every minute or so, not every second.
"""

from typing import Optional

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import reports, scrub, status
from .store import Store

PREFIX = "cowfs"


class _Collector:
    """A one-shot prometheus_client collector over figures gathered beforehand."""

    def __init__(self, families: list):
        self._families = families

    def collect(self):
        return iter(self._families)


def gather(store_path: str) -> list:
    """The metric families of a store and its mounted volumes, gathered now."""
    store = Store.open(store_path)
    try:
        families = _store_families(store)
        families += _space_families(store)
    finally:
        store.close()
    families += _daemon_families(status.gather(store_path)["mounts"])
    return families


def render(families: list) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(families))
    return generate_latest(registry)


def write_textfile(families: list, path: str) -> None:
    """Atomically (temp file + rename), as node_exporter's textfile collector needs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(families))
    write_to_textfile(path, registry)


# --- store ---------------------------------------------------------------------------------

def _gauge(name: str, doc: str, value: float, labels: Optional[dict] = None) -> GaugeMetricFamily:
    labels = labels or {}
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _store_families(store: Store) -> list:
    labels = dict(store=store.path)
    totals = reports.totals(store)
    space = store.packs.space.figures()
    families = [
        _gauge("stored_bytes", "Chunk bytes stored once (after dedup).", totals["chunk_bytes"], labels),
        _gauge("referenced_bytes", "Chunk bytes as referenced by every record version (before dedup).",
               totals["referenced_bytes"], labels),
        _gauge("dedup_ratio", "referenced_bytes / stored_bytes.", totals["dedup_ratio"], labels),
        _gauge("chunks", "Chunks stored.", totals["chunks"], labels),
        _gauge("pack_disk_bytes", "Disk space the pack files take.", totals["pack_bytes"], labels),
        _gauge("reclaimable_bytes", "Pack bytes no chunk refers to (cowfs gc reclaims them).",
               totals["garbage_bytes"], labels),
    ]
    for key, doc in (("size_bytes", "Size of the filesystem holding the store."),
                     ("free_bytes", "Free space of that filesystem."),
                     ("reserve_bytes", "Free space kept for commits that free space."),
                     ("grace_bytes", "Free space kept for finishing writes when the store fills.")):
        families.append(_gauge(f"filesystem_{key}", doc, space[key], labels))
    families += _scrub_families(store, labels)
    return families


def _scrub_families(store: Store, labels: dict) -> list:
    last = scrub.last(store)
    if last is None:
        return [_gauge("scrub_last_run_timestamp_seconds", "When the last scrub finished (0: never).", 0, labels)]
    return [
        _gauge("scrub_last_run_timestamp_seconds", "When the last scrub finished (0: never).",
               last["finished_ns"] / 1e9, labels),
        _gauge("scrub_last_damaged_chunks", "Damaged chunks the last scrub found.", last["damaged"], labels),
        _gauge("scrub_last_chunks", "Chunks the last scrub verified.", last["chunks"], labels),
        _gauge("scrub_last_bytes", "Bytes the last scrub read.", last["bytes"], labels),
    ]


def _space_families(store: Store) -> list:
    logical = GaugeMetricFamily(f"{PREFIX}_volume_logical_bytes", "Bytes of the files of a volume head.",
                                labels=["store", "volume"])
    unique = GaugeMetricFamily(f"{PREFIX}_volume_unique_bytes",
                               "Bytes only this volume and its snapshots hold (destroying it frees them).",
                               labels=["store", "volume"])
    count = GaugeMetricFamily(f"{PREFIX}_volume_snapshots", "Named snapshots of a volume.",
                              labels=["store", "volume"])
    for row in reports.volume_space(store):
        logical.add_metric([store.path, row["volume"]], row["logical_bytes"])
        unique.add_metric([store.path, row["volume"]], row["unique_bytes"])
        count.add_metric([store.path, row["volume"]], row["snapshots"])
    return [logical, unique, count]


# --- mounted volumes ---------------------------------------------------------------------------

_LABELS = ["store", "volume", "mountpoint"]


def _daemon_families(mounts: list) -> list:
    up = GaugeMetricFamily(f"{PREFIX}_volume_up", "1 when the volume is mounted and its daemon "
                           "answers with writes accepted, else 0.", labels=_LABELS)
    uptime = GaugeMetricFamily(f"{PREFIX}_volume_uptime_seconds", "Seconds since the mount.", labels=_LABELS)
    latency = HistogramMetricFamily(f"{PREFIX}_fsync_latency_seconds",
                                    "Time fsync, fdatasync and fsyncdir took in the daemon.", labels=_LABELS)
    figures: dict = {}
    for mount in mounts:
        labels = [mount["store"] or "", mount["volume"] or "", mount["mountpoint"]]
        up.add_metric(labels, 1 if mount["state"] in ("mounted", "read-only") else 0)
        if mount["uptime_s"] is not None:
            uptime.add_metric(labels, mount["uptime_s"])
        for name, value in mount["figures"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures.setdefault(name, []).append((labels, value))
        hist = mount.get("fsync_latency")
        if hist:
            latency.add_metric(labels, [(_le(bound), count) for bound, count in hist["buckets"]], hist["sum_s"])
    return [up, uptime, latency] + [_figure_family(name, samples) for name, samples in sorted(figures.items())]


def _le(bound) -> str:
    return "+Inf" if bound == "+Inf" else repr(float(bound))


def _figure_family(name: str, samples: list):
    doc = f"Daemon figure '{name}' (see the control socket's stats request)."
    if name.endswith("_total"):
        family = CounterMetricFamily(f"{PREFIX}_volume_{name[:-len('_total')]}", doc, labels=_LABELS)
    else:
        family = GaugeMetricFamily(f"{PREFIX}_volume_{name}", doc, labels=_LABELS)
    for labels, value in samples:
        family.add_metric(labels, value)
    return family
