"""A small fixed-bucket latency histogram, cheap enough for every fsync.

The daemon keeps one per timed operation (`counted_ops`) and reports it in
the control socket's ``stats`` answer; `cowfs metrics` turns it into a
Prometheus histogram (cumulative ``le`` buckets, ``_sum``, ``_count``).
Fixed buckets, so observing is one bisect and one increment, and snapshots
from different daemons add up bucket by bucket.
"""

import bisect

# Upper bounds in seconds: from a page-cache-fast fsync (0.1 ms) to a device
# that stalls for seconds; the last bucket (+Inf) takes everything slower.
BUCKET_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    def __init__(self, bounds_s: tuple = BUCKET_BOUNDS_S):
        self.bounds_s = bounds_s
        self.counts = [0] * (len(bounds_s) + 1)        # per bucket, the last is +Inf
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds_s, seconds)] += 1
        self.sum_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict:
        """JSON-ready: cumulative counts per upper bound ("+Inf" last), sum and count."""
        cumulative, running = [], 0
        for bound, n in zip(list(self.bounds_s) + ["+Inf"], self.counts):
            running += n
            cumulative.append([bound, running])
        return dict(buckets=cumulative, sum_s=self.sum_s, count=running)
