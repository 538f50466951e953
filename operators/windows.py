"""Sliding event-time windows kept as sparse buckets with running totals, every slot packed in one integer.

A window of width ``W`` is kept as sums per bucket of width ``B`` (``W/B``
buckets, 120 by default). "As of time t" the window holds the buckets
``t//B - W/B … t//B`` (one more than ``W/B``: the oldest is partly outside, and
with one bucket fewer an event just inside ``W`` could be left out): every event
of the last ``W`` is in, and events up to ``B`` older may be too. That is the whole error: at most one bucket at the
old edge, a relative error in time of ``B/W`` (1/120 = 0.83 %).

One window serves every feature of the same width (views, carts, revenue …):
each feature is a *slot*, a 64-bit field of one Python integer, so a bucket
is a single ``int`` and adding an event to all the slots it feeds is a single
integer addition of a precomputed *delta* (:func:`delta`). The window keeps
the running total the same way, so reading a feature is a shift and a mask.
Fields are read with a bias of 2**63, so a slot may hold any integer of
magnitude below 2**63 (refunds can make a sum negative) and additions never
carry from one slot into the next. Buckets are a dict of the non-empty ones
only: a shopper with three events in a month costs three entries, not 120.

>>> w = PackedWindow(window_ms=3_600_000, bucket_ms=30_000)
>>> w.add(1_000, delta({0: 1})); w.add(700_000, delta({0: 1})); w.add(3_700_000, delta({0: 1, 1: 95}))
>>> unpack(w.total(3_700_000), 2)  # the first event fell out of the hour
(2, 95)
>>> w.add(3_700_000, delta({1: -100})); unpack(w.total(3_700_000), 2)
(2, -5)
"""

from __future__ import annotations

import struct
from collections.abc import Callable

SLOT_BITS = 64
SLOT_MASK = (1 << SLOT_BITS) - 1
SLOT_HALF = 1 << (SLOT_BITS - 1)
_NO_BUCKET = 1 << 62
"""``lo`` of an empty window: above any bucket index."""


def delta(amounts: dict[int, int]) -> int:
    """The packed integer adding ``amount`` to each ``slot`` of ``amounts``."""
    return sum(amount << (SLOT_BITS * slot) for slot, amount in amounts.items())


def bias(slots: int) -> int:
    """What :func:`slot` needs added to a packed total of ``slots`` slots before it is read."""
    return sum(SLOT_HALF << (SLOT_BITS * i) for i in range(slots))


def slot(biased: int, i: int) -> int:
    """Slot ``i`` of a packed total that had :func:`bias` added."""
    return ((biased >> (SLOT_BITS * i)) & SLOT_MASK) - SLOT_HALF


def unpacker(slots: int, held: int | None = None) -> Callable[[int], tuple[int, ...]]:
    """A function giving slots ``0 … slots-1`` of a packed total of ``held`` slots (all of them when
    None) at once, in C: after the bias each field holds ``v + 2**63``; flipping the top bit of each
    field makes it ``v`` as a signed 64-bit integer, which ``struct`` reads. Reading the first slots
    only costs in proportion to them (reading a slot needs nothing above it).

    >>> packed = delta({0: 3, 1: -2, 2: 7})
    >>> unpacker(3)(packed), unpacker(2, held=3)(packed)
    ((3, -2, 7), (3, -2))
    """
    h = bias(slots)
    fmt = struct.Struct(f"<{slots}q")
    size, read = fmt.size, fmt.unpack
    if held is None or held == slots:

        def unpack_(packed: int) -> tuple[int, ...]:
            return read(((packed + h) ^ h).to_bytes(size, "little"))

        return unpack_
    low = (1 << (SLOT_BITS * slots)) - 1

    def unpack_low(packed: int) -> tuple[int, ...]:
        return read((((packed + h) & low) ^ h).to_bytes(size, "little"))

    return unpack_low


def unpack(packed: int, slots: int) -> tuple[int, ...]:
    """Every slot of a packed total."""
    return unpacker(slots)(packed)


class PackedWindow:
    """Integer sums of several slots over one sliding event-time window, exact to one bucket at the old edge.

    Integers keep sums exact whatever the order of adds and expiries (callers scale
    fractional values), which is what makes a replay give identical results.
    """

    __slots__ = ("bucket_ms", "n", "buckets", "tot", "lo")

    def __init__(self, window_ms: int, bucket_ms: int):
        self.bucket_ms = bucket_ms
        self.n = max(1, window_ms // bucket_ms)
        self.buckets: dict[int, int] = {}
        #: the packed total of every bucket held
        self.tot = 0
        #: the oldest bucket held (a lower bound); ``_NO_BUCKET`` when empty
        self.lo = _NO_BUCKET

    def add(self, ts: int, packed: int) -> None:
        """Add a packed delta at event time ``ts`` (any order)."""
        b = ts // self.bucket_ms
        buckets = self.buckets
        buckets[b] = buckets.get(b, 0) + packed
        self.tot += packed
        if b < self.lo:
            self.lo = b

    def total(self, at_ts: int) -> int:
        """The packed sums as of event time ``at_ts`` (no event after ``at_ts`` may have been added)."""
        oldest = at_ts // self.bucket_ms - self.n
        if self.lo < oldest:
            buckets = self.buckets
            for b in [b for b in buckets if b < oldest]:
                self.tot -= buckets.pop(b)
            self.lo = min(buckets) if buckets else _NO_BUCKET
        return self.tot

    def merge(self, other: PackedWindow) -> None:
        """Add another window of the same shape into this one (two shoppers found to be one).

        Bucket indexes are absolute (``ts // bucket_ms``), so the buckets of both simply add: the result
        is exactly the window that had seen every event of both. Buckets the other window expired are
        older than its newest read, so they are also gone from any read this window makes afterwards
        (reads are as of the newest event of both).

        >>> a, b = PackedWindow(3_600_000, 30_000), PackedWindow(3_600_000, 30_000)
        >>> a.add(1_000, delta({0: 1})); b.add(1_000, delta({0: 1, 1: 5})); b.add(90_000, delta({1: 2}))
        >>> a.merge(b); unpack(a.total(90_000), 2), sorted(a.buckets)
        ((2, 7), [0, 3])
        """
        if (other.bucket_ms, other.n) != (self.bucket_ms, self.n):
            raise ValueError(f"windows of different shapes: {other.n} x {other.bucket_ms} ms into {self.n} x {self.bucket_ms} ms")
        buckets = self.buckets
        for b, packed in other.buckets.items():
            buckets[b] = buckets.get(b, 0) + packed
        self.tot += other.tot
        self.lo = min(self.lo, other.lo)

    def __getstate__(self) -> tuple[int, int, dict[int, int], int, int]:
        return (self.bucket_ms, self.n, self.buckets, self.tot, self.lo)

    def __setstate__(self, s: tuple[int, int, dict[int, int], int, int]) -> None:
        self.bucket_ms, self.n, self.buckets, self.tot, self.lo = s


def window(bucket_ms: int, n: int, buckets: dict[int, int], tot: int, lo: int) -> PackedWindow:
    """A window from its state (:meth:`PackedWindow.__getstate__`) without a ``__setstate__`` call: how a
    shopper's pickled windows are rebuilt (``operators.features``).

    >>> w = PackedWindow(3_600_000, 30_000); w.add(1_000, delta({0: 2}))
    >>> unpack(window(*w.__getstate__()).total(1_000), 1)
    (2,)
    """
    w = _new(PackedWindow)
    w.bucket_ms, w.n, w.buckets, w.tot, w.lo = bucket_ms, n, buckets, tot, lo
    return w


_new = object.__new__
