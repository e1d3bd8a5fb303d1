"""Snapshot schedules and retention: durations, policy records, what to keep.

A policy says how often the daemon mounting a volume takes an automatic
snapshot (``auto-<UTC time>``) and which automatic snapshots to keep. The
retention math here is pure: it takes snapshot times and a clock value and
returns decisions, so tests drive it with an injected clock instead of
waiting for hours.

Retention rules (the sanoid / borg "prune" model), each applied on its own,
a snapshot survives if any rule keeps it:

* ``keep_last N``    the N newest automatic snapshots;
* ``keep_hourly N``  the newest snapshot of each of the N most recent UTC
  hours that have one (likewise ``daily``, ``weekly`` (ISO weeks),
  ``monthly``).

Only automatic snapshots are counted and pruned. Manual snapshots, held
snapshots and snapshots a clone depends on are never pruned (`plan_prune`).
"""

import calendar
import re
import time
from dataclasses import dataclass
from typing import Optional

from . import schema
from .errors import UsageError

DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+)([smhdw])")
MAX_KEEP = 1_000_000
CALENDAR_RULES = ("hourly", "daily", "weekly", "monthly")
AUTO_PREFIX = "auto-"


# --- durations ---------------------------------------------------------------------------

def parse_duration(text: str) -> int:
    """'1s', '15m', '1h', '1d', '2w', '1h30m' -> seconds (at least 1)."""
    cleaned = (text or "").strip().lower()
    parts = _DURATION_RE.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise UsageError(f"invalid duration {text!r}: use a number and a unit s, m, h, d or w, "
                         "e.g. 1s, 15m, 1h, 1d, 1h30m")
    seconds = sum(int(n) * DURATION_UNITS_S[u] for n, u in parts)
    if seconds < 1:
        raise UsageError(f"duration {text!r} is zero; the shortest schedule is 1s")
    return seconds


def format_duration(seconds: int) -> str:
    """Seconds -> the shortest text `parse_duration` reads back, e.g. 5400 -> '1h30m'."""
    out = []
    for unit in ("w", "d", "h", "m", "s"):
        count, seconds = divmod(seconds, DURATION_UNITS_S[unit])
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"


# --- policy records ------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    every_s: int
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def check(self) -> "Policy":
        if self.every_s < 1:
            raise UsageError("a schedule needs --every of at least 1s")
        keeps = [self.keep_last] + [getattr(self, f"keep_{rule}") for rule in CALENDAR_RULES]
        if any(k < 0 or k > MAX_KEEP for k in keeps):
            raise UsageError(f"--keep values must be between 0 and {MAX_KEEP}")
        if not any(keeps):
            raise UsageError("give at least one of --keep, --keep-hourly, --keep-daily, "
                             "--keep-weekly, --keep-monthly, so that automatic snapshots "
                             "cannot fill the disk")
        return self

    def describe(self) -> str:
        rules = [f"keep {self.keep_last} newest"] if self.keep_last else []
        rules += [f"{getattr(self, 'keep_' + rule)} {rule}" for rule in CALENDAR_RULES
                  if getattr(self, "keep_" + rule)]
        return f"every {format_duration(self.every_s)}, " + ", ".join(rules)


def get(txn, env, vol_id: int) -> Optional[Policy]:
    raw = txn.get(schema.policy_key(vol_id), db=env.policies)
    return None if raw is None else Policy(**schema.unpack_policy(bytes(raw)))


def put(txn, env, vol_id: int, policy: Policy) -> None:
    txn.put(schema.policy_key(vol_id), schema.pack_policy(policy.check().__dict__), db=env.policies)


def delete(txn, env, vol_id: int) -> bool:
    return txn.delete(schema.policy_key(vol_id), db=env.policies)


def all_policies(txn, env) -> list[tuple[int, Policy]]:
    return [(schema.read_u64(bytes(key)), Policy(**schema.unpack_policy(bytes(raw))))
            for key, raw in txn.cursor(db=env.policies)]


# --- scheduling --------------------------------------------------------------------------------

def is_due(policy: Policy, last_auto_ns: Optional[int], now_ns: int) -> bool:
    """Is the next automatic snapshot due? The first one is due at once.

    `last_auto_ns` is the time of the most recently *taken* one. If the clock
    went back past it (a bad clock fixed by NTP), waiting for the old rhythm
    could mean hours without snapshots: take one now and start again.
    """
    if last_auto_ns is None or now_ns < last_auto_ns:
        return True
    return now_ns - last_auto_ns >= policy.every_s * 1_000_000_000


def auto_name(now_ns: int) -> str:
    """'auto-20261122T193500.123Z': millisecond resolution, so 1 s schedules never collide."""
    seconds, rest_ns = divmod(now_ns, 1_000_000_000)
    return (AUTO_PREFIX + time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
            + f".{rest_ns // 1_000_000:03d}Z")


def fmt_utc(ns: int) -> str:
    """A time as shown to people: '2026-11-22T19:35:00Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def tick_interval_s(policy: Optional[Policy]) -> float:
    """How often the scheduler looks: often enough that a snapshot is never late by
    more than a quarter of its period, and at least once a second so that policy
    changes take effect without a remount."""
    if policy is None:
        return 1.0
    return min(1.0, max(0.1, policy.every_s / 4))


# --- retention ---------------------------------------------------------------------------------

def _period(rule: str, created_ns: int):
    t = time.gmtime(created_ns // 1_000_000_000)
    if rule == "hourly":
        return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour)
    if rule == "daily":
        return (t.tm_year, t.tm_mon, t.tm_mday)
    if rule == "weekly":
        return _iso_week(t)
    return (t.tm_year, t.tm_mon)


def _iso_week(t) -> tuple[int, int]:
    import datetime
    year, week, _ = datetime.date(t.tm_year, t.tm_mon, t.tm_mday).isocalendar()
    return (year, week)


def retained(created_ns_list: list[int], policy: Policy) -> set[int]:
    """Indexes (into `created_ns_list`) of the automatic snapshots the policy keeps."""
    newest_first = sorted(range(len(created_ns_list)), key=lambda i: created_ns_list[i], reverse=True)
    keep = set(newest_first[:policy.keep_last])
    for rule in CALENDAR_RULES:
        count = getattr(policy, f"keep_{rule}")
        periods = []
        for i in newest_first:
            if len(periods) >= count:
                break
            period = _period(rule, created_ns_list[i])
            if not periods or periods[-1] != period:
                periods.append(period)
                keep.add(i)
    return keep


@dataclass(frozen=True)
class SnapInfo:
    """What pruning needs to know about one snapshot."""
    gen: int
    name: str
    created_ns: int
    auto: bool
    held: bool
    has_clones: bool


def plan_prune(snaps: list[SnapInfo], policy: Policy) -> list[SnapInfo]:
    """The snapshots the policy removes, oldest first.

    Retention counts every automatic snapshot (held ones too: a hold keeps a
    snapshot, it does not make room for one more). Never removed: manual,
    held, clone-dependent snapshots.
    """
    auto = [s for s in snaps if s.auto]
    keep = retained([s.created_ns for s in auto], policy)
    doomed = [s for i, s in enumerate(auto) if i not in keep and not s.held and not s.has_clones]
    return sorted(doomed, key=lambda s: s.created_ns)


def utc_ns(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """A UTC wall-clock time in ns (for injected clocks and tests of calendar rules)."""
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) * 1_000_000_000
