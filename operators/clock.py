"""Event time for timers: a watermark over source partitions, as Flink computes it.

Each source partition (Kafka partition, file, simulator partition; the part of
an event's position before the last ``:``) has its own newest event time. The
watermark is the *oldest* of those minus the allowed lateness, so a partition
that lags behind another never lets a timer fire before the events that could
change its outcome have been read. A partition silent for ``idle_ms`` of wall
time stops holding the watermark back; when every partition is silent, event
time moves on with the wall clock (a live shop at night still gets its
reminders). Steps with timers (triggers, label resolution) each keep one clock
per shard.

>>> c = PartitionClock()
>>> c.see("t:0:5", 1_000, now=0); c.see("t:1:9", 9_000, now=0)
>>> c.watermark(lateness_ms=0, idle_ms=10_000, now=0)  # partition 0 is behind
1000
>>> c.watermark(lateness_ms=0, idle_ms=10_000, now=20_000)  # both silent: the wall clock moves it
19000
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone


def wall_ms() -> int:
    """Wall-clock epoch milliseconds."""
    return time.time_ns() // 1_000_000


class PartitionClock:
    """Newest event time per source partition, and the watermark they allow."""

    __slots__ = ("part_max", "part_wall", "max_ts", "wall_at_max", "wm")

    def __init__(self) -> None:
        self.part_max: dict[str, int] = {}
        self.part_wall: dict[str, int] = {}
        self.max_ts = 0
        self.wall_at_max = 0
        self.wm = 0

    def see(self, position: str, ts: int, now: int) -> None:
        """Note an event from ``position`` at event time ``ts``; ``now`` is the batch's wall clock."""
        part = position.rpartition(":")[0]
        if ts > self.part_max.get(part, -1):
            self.part_max[part] = ts
            self.part_wall[part] = now
            if ts > self.max_ts:
                self.max_ts, self.wall_at_max = ts, now

    def watermark(self, lateness_ms: int, idle_ms: int, now: int) -> int:
        """Event time up to which every input has been seen (never goes back)."""
        active = [m for p, m in self.part_max.items() if now - self.part_wall[p] <= idle_ms]
        if active:
            wm = min(active) - lateness_ms
        else:
            wm = self.max_ts - lateness_ms + max(0, now - self.wall_at_max - idle_ms)
        if wm > self.wm:
            self.wm = wm
        return self.wm

    def __getstate__(self) -> tuple[dict[str, int], dict[str, int], int, int, int]:
        return (self.part_max, self.part_wall, self.max_ts, self.wall_at_max, self.wm)

    def __setstate__(self, s: tuple[dict[str, int], dict[str, int], int, int, int]) -> None:
        self.part_max, self.part_wall, self.max_ts, self.wall_at_max, self.wm = s


class Deadline:
    """A moment ``every_s`` of wall time ahead, for a logic that acts on a schedule: checked on the monotonic
    clock, and handed to Bytewax's ``notify_at`` as the UTC datetime made when it was set. Bytewax asks
    ``notify_at`` after every call of every key, and making the datetime there cost ~1.5 µs a call, most
    of a shard's own work in a live batch of one event.

    >>> d = Deadline(0.0)
    >>> d.due(), d.at <= datetime.now(timezone.utc)
    (True, True)
    >>> d = Deadline(60.0); d.due(), d.due(early_s=61.0)
    (False, True)
    """

    __slots__ = ("every_s", "mono", "at")

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.reset()

    def reset(self) -> None:
        """The next moment: ``every_s`` from now."""
        self.mono = time.monotonic() + self.every_s
        self.at = datetime.now(timezone.utc) + timedelta(seconds=self.every_s)

    def due(self, early_s: float = 0.0) -> bool:
        """Whether the moment has come (or comes within ``early_s``)."""
        return time.monotonic() >= self.mono - early_s
