"""Duplicate ``event_id`` detection over a window of event time.

Producers retry and mobile clients resend; the same event must not be
counted twice. Ids are remembered in insertion order and forgotten once the
shard's event time has moved ``window`` past them, so memory is bounded by the
events of one window (plus the allowed lateness).

>>> d = Deduper(window_ms=60_000)
>>> d.seen("e1", 1_000), d.seen("e1", 2_000), d.seen("e2", 2_000)
(False, True, False)
>>> d.expire(watermark=200_000); d.seen("e1", 200_000)
False
"""

from __future__ import annotations


class Deduper:
    """Remembers event ids for ``window_ms`` of event time."""

    __slots__ = ("ids", "window_ms")

    def __init__(self, window_ms: int):
        self.window_ms = window_ms
        self.ids: dict[str, int] = {}

    def seen(self, event_id: str, ts: int) -> bool:
        """True if ``event_id`` was seen within the window; remembers it otherwise."""
        if event_id in self.ids:
            return True
        self.ids[event_id] = ts
        return False

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
