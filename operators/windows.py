"""Sliding event-time windows kept as sparse buckets with running totals.

A window of width ``W`` is kept as sums per bucket of width ``B`` (``W/B``
buckets, 120 by default). "As of time t" the window holds the buckets
``t//B - W/B + 1 … t//B``: every event of the last ``W`` is in, and events up
to ``B`` older may be too. That is the whole error: at most one bucket at the
old edge, a relative error in time of ``B/W`` (1/120 = 0.83 %).

One window serves every feature of the same width: a bucket holds a small
vector, one slot per feature (views, carts, revenue …), and the window keeps
the running total of each slot, so reading a feature is O(1). Buckets that
fall out of the window are subtracted when the window is read past them.
Buckets are a dict of the non-empty ones only: a shopper with three events in
a month costs three entries, not 120.

>>> w = SlotWindow(window_ms=3_600_000, bucket_ms=30_000, slots=2)
>>> w.add(1_000, 0, 1); w.add(700_000, 0, 1); w.add(3_700_000, 0, 1); w.add(3_700_000, 1, 95)
>>> w.totals(3_700_000)  # the first event fell out of the hour
[2, 95]
"""

from __future__ import annotations

from collections.abc import Iterable


class SlotWindow:
    """Integer sums of several slots over one sliding event-time window, exact to one bucket at the old edge.

    Integers keep sums exact whatever the order of adds and expiries (callers scale
    fractional values), which is what makes a replay give identical results.
    """

    __slots__ = ("bucket_ms", "n", "buckets", "tot", "lo")

    def __init__(self, window_ms: int, bucket_ms: int, slots: int):
        self.bucket_ms = bucket_ms
        self.n = max(1, window_ms // bucket_ms)
        self.buckets: dict[int, list[int]] = {}
        self.tot: list[int] = [0] * slots
        #: the oldest bucket held (a lower bound); -1 when empty
        self.lo = -1

    def add(self, ts: int, slot: int, amount: int) -> None:
        """Add ``amount`` to ``slot`` at event time ``ts`` (any order)."""
        self.add_many(ts, ((slot, amount),))

    def add_many(self, ts: int, adds: Iterable[tuple[int, int]]) -> None:
        """Add several ``(slot, amount)`` at event time ``ts``: one bucket lookup for all."""
        b = ts // self.bucket_ms
        vec = self.buckets.get(b)
        if vec is None:
            vec = self.buckets[b] = [0] * len(self.tot)
            if self.lo < 0 or b < self.lo:
                self.lo = b
        tot = self.tot
        for slot, amount in adds:
            vec[slot] += amount
            tot[slot] += amount

    def totals(self, at_ts: int) -> list[int]:
        """Every slot's sum as of event time ``at_ts`` (no event after ``at_ts`` may have been added)."""
        oldest = at_ts // self.bucket_ms - self.n + 1
        if 0 <= self.lo < oldest:
            self._expire(oldest)
        return self.tot

    def _expire(self, oldest: int) -> None:
        tot = self.tot
        buckets = self.buckets
        for b in [b for b in buckets if b < oldest]:
            for i, v in enumerate(buckets.pop(b)):
                tot[i] -= v
        self.lo = min(buckets) if buckets else -1

    def __getstate__(self) -> tuple[int, int, dict[int, list[int]], list[int], int]:
        return (self.bucket_ms, self.n, self.buckets, self.tot, self.lo)

    def __setstate__(self, s: tuple[int, int, dict[int, list[int]], list[int], int]) -> None:
        self.bucket_ms, self.n, self.buckets, self.tot, self.lo = s
