"""Sliding event-time windows kept as sparse buckets, so a user's state stays small.

A window of width ``W`` is kept as counts per bucket of width ``B`` (``B``
divides ``W``). "As of time t" the window holds the buckets ``t//B - W/B + 1 …
t//B``: every event of the last ``W`` is in, and events up to ``B`` older may
be too. That is the whole error: at most one bucket at the old edge, i.e. a
relative error in time of ``B/W`` (30 s in 1 h = 0.83 %).

Buckets are a dict of the non-empty ones only: a shopper with three events in
an hour costs three entries, not ``W/B`` slots.

>>> w = BucketedCount(window_ms=3_600_000, bucket_ms=30_000)
>>> w.add(1_000, 1); w.add(700_000, 1); w.add(3_700_000, 1)
>>> w.value(3_700_000)  # the first event fell out of the hour
2
"""

from __future__ import annotations


class BucketedCount:
    """A sum over a sliding event-time window, exact to one bucket at the old edge."""

    __slots__ = ("buckets", "bucket_ms", "n")

    def __init__(self, window_ms: int, bucket_ms: int):
        self.bucket_ms = bucket_ms
        self.n = window_ms // bucket_ms
        self.buckets: dict[int, float] = {}

    def add(self, ts: int, amount: float) -> None:
        """Add ``amount`` at event time ``ts`` (any order)."""
        b = ts // self.bucket_ms
        buckets = self.buckets
        buckets[b] = buckets.get(b, 0) + amount

    def value(self, at_ts: int) -> float:
        """The window's sum as of event time ``at_ts``; drops buckets that expired."""
        newest = at_ts // self.bucket_ms
        oldest = newest - self.n + 1
        buckets = self.buckets
        total = 0
        stale = None
        for b, v in buckets.items():
            if b >= oldest:
                if b <= newest:
                    total += v
            else:
                stale = stale or []
                stale.append(b)
        if stale:
            for b in stale:
                del buckets[b]
        return total

    def __getstate__(self) -> tuple[dict[int, float], int, int]:
        return (self.buckets, self.bucket_ms, self.n)

    def __setstate__(self, state: tuple[dict[int, float], int, int]) -> None:
        self.buckets, self.bucket_ms, self.n = state
