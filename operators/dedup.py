"""Duplicate ``event_id`` detection over a window of event time.

Producers retry and mobile clients resend; the same event must not be
counted twice. Ids are remembered in insertion order and forgotten once the
shard's event time has moved ``window`` past them, so memory is bounded by the
events of one window (plus the allowed lateness).

>>> d = Deduper(window_ms=60_000)
>>> d.add("e1", 1_000); "e1" in d, "e2" in d
(True, False)
>>> d.expire(watermark=200_000); "e1" in d
False
"""

from __future__ import annotations


class Deduper:
    """Remembers event ids for ``window_ms`` of event time."""

    __slots__ = ("ids", "window_ms")

    def __init__(self, window_ms: int):
        self.window_ms = window_ms
        self.ids: dict[str, int] = {}

    def __contains__(self, event_id: str) -> bool:
        return event_id in self.ids

    def add(self, event_id: str, ts: int) -> None:
        """Remember an accepted event's id."""
        self.ids[event_id] = ts

    def expire(self, watermark: int) -> None:
        """Forget ids older than the window before ``watermark``.

        Insertion order is close to event-time order, so the scan stops at the
        first id still inside the window; a late id is kept a little longer,
        never forgotten early.
        """
        horizon = watermark - self.window_ms
        ids = self.ids
        drop = []
        for eid, ts in ids.items():
            if ts >= horizon:
                break
            drop.append(eid)
        for eid in drop:
            del ids[eid]
