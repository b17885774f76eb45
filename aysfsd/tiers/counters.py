"""What the fetcher counts (shown by `aysctl status` and the metrics)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    memory_hits: int = 0
    errors: int = 0
    errors_remembered: int = 0  # reads answered at once by a fetch that had just failed
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: {"local": 0, "grid": 0, "stor": 0})
    writebacks: int = 0
    writeback_errors: int = 0
    writebacks_skipped: int = 0
    packs: int = 0  # packs downloaded
    tree_packs: int = 0  # of them, tree packs (see aysfsd.tree.packs)
    pack_members: int = 0  # blobs (files, directory objects) had from them


class Account(dict[str, int]):
    """A mount's bytes by tier (the dict), and in `blobs` the downloads made for it by tier."""

    def __init__(self) -> None:
        super().__init__(local=0, grid=0, stor=0)
        self.blobs = {"grid": 0, "stor": 0}


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Latency:
    """A histogram of request times (seconds) in fixed buckets, read by the metrics collector."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bucket
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def public(self) -> dict[str, object]:
        return {"buckets": list(LATENCY_BUCKETS), "counts": list(self.counts), "sum": round(self.sum, 6)}
