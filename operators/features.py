"""Rolling per-user features in event time, kept in keyed Bytewax state.

State is keyed by **shard** (a stable hash of the user id), each shard holding
the compact state of its users. Keying by user would give Bytewax one logic
object and one call per shopper per batch; a shard gets the whole batch of its
users in one ``on_batch`` call, which is what keeps the per-event cost near a
bare counter. Users idle for longer than any window are evicted from the shard
(Redis keeps serving their last values until the TTL), so state does not grow
with the number of shoppers ever seen.

Out-of-order events within ``allowed_lateness`` of the user's newest event
update the right buckets; later ones are refused as ``too_late``. Duplicate
event ids are refused as ``duplicate``. Both go to the dead-letter stream.
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass
from typing import Any

from bytewax.operators import StatefulBatchLogic

from nudgeflow.events import DeadLetter, Event
from nudgeflow.settings import EventsConfig, FeaturesConfig
from operators.dedup import Deduper
from operators.windows import BucketedCount

EVICT_EVERY = 4096
"""Events between scans for idle users (a scan is O(users in the shard))."""


def shard_of(user_id: str, shards: int) -> str:
    """The state key of a user: stable across processes and restarts (unlike ``hash``).

    >>> shard_of("u1", 16) == shard_of("u1", 16)
    True
    """
    return str(zlib.crc32(user_id.encode()) % shards)


def window_label(seconds: float) -> str:
    """A short name for a window, used in feature names.

    >>> window_label(3600), window_label(300), window_label(7 * 86400), window_label(45)
    ('1h', '5m', '7d', '45s')
    """
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


@dataclass(slots=True)
class Enriched:
    """An event with its user's features as of that event: what scoring and triggers see."""

    event: Event
    features: dict[str, Any]


class UserState:
    """One shopper's compact feature state."""

    __slots__ = ("first_ts", "last_ts", "events")

    def __init__(self, first_ts: int, window_ms: int, bucket_ms: int):
        self.first_ts = first_ts
        self.last_ts = first_ts
        self.events = BucketedCount(window_ms, bucket_ms)

    def __getstate__(self) -> tuple[int, int, BucketedCount]:
        return (self.first_ts, self.last_ts, self.events)

    def __setstate__(self, state: tuple[int, int, BucketedCount]) -> None:
        self.first_ts, self.last_ts, self.events = state


class ShardState:
    """The users, the dedup memory and the event-time high mark of one shard."""

    __slots__ = ("users", "dedup", "max_ts", "since_evict")

    def __init__(self, dedup_window_ms: int):
        self.users: dict[str, UserState] = {}
        self.dedup = Deduper(dedup_window_ms)
        self.max_ts = 0
        self.since_evict = 0

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.users, self.dedup.ids, self.dedup.window_ms, self.max_ts)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.users, ids, window_ms, self.max_ts = state
        self.dedup = Deduper(window_ms)
        self.dedup.ids = ids
        self.since_evict = 0


class FeatureEngine:
    """Pure feature logic: ``apply`` one event to a shard, get the enriched event or a refusal.

    >>> from nudgeflow.settings import EventsConfig, FeaturesConfig
    >>> eng = FeatureEngine(FeaturesConfig(), EventsConfig())
    >>> st = eng.new_state()
    >>> out = [eng.apply(st, Event(f"e{i}", "u1", "browse", 1_000_000 + i * 60_000)) for i in range(3)]
    >>> out[-1].features["events_1h"]
    3
    >>> eng.apply(st, Event("e1", "u1", "browse", 1_200_000)).reason
    'duplicate'
    """

    def __init__(self, cfg: FeaturesConfig, events: EventsConfig):
        self.window_ms = int(cfg.window * 1000)
        self.bucket_ms = int(cfg.bucket * 1000)
        self.lateness_ms = int(cfg.allowed_lateness * 1000)
        self.dedup_ms = int(events.dedup_window * 1000)
        self.count_name = f"events_{window_label(cfg.window)}"
        # a user idle this long has nothing left in any window
        self.idle_ms = self.window_ms + self.lateness_ms

    def new_state(self) -> ShardState:
        return ShardState(self.dedup_ms)

    def apply(self, st: ShardState, ev: Event) -> Enriched | DeadLetter:
        ts = ev.ts
        if ev.event_id in st.dedup:
            return _refuse(ev, "duplicate", f"event_id {ev.event_id[:60]!r} seen within events.dedup_window")
        user = st.users.get(ev.user_id)
        if user is not None and ts < user.last_ts - self.lateness_ms:
            return _refuse(ev, "too_late", f"{(user.last_ts - ts) / 1000:.0f}s behind the user's newest event")
        st.dedup.add(ev.event_id, ts)
        if user is None:
            user = st.users[ev.user_id] = UserState(ts, self.window_ms, self.bucket_ms)
        elif ts < user.first_ts:
            user.first_ts = ts
        if ts > user.last_ts:
            user.last_ts = ts
        if ts > st.max_ts:
            st.max_ts = ts
        user.events.add(ts, 1)
        at = user.last_ts
        feats = {
            self.count_name: int(user.events.value(at)),
            "last_event_ts": at,
            "first_seen_ts": user.first_ts,
        }
        st.since_evict += 1
        if st.since_evict >= EVICT_EVERY:
            self.evict(st)
        return Enriched(ev, feats)

    def evict(self, st: ShardState) -> None:
        """Drop users idle past every window and ids past the dedup window."""
        st.since_evict = 0
        horizon = st.max_ts - self.idle_ms
        idle = [uid for uid, u in st.users.items() if u.last_ts < horizon]
        for uid in idle:
            del st.users[uid]
        st.dedup.expire(st.max_ts - self.lateness_ms)


def _refuse(ev: Event, reason: str, detail: str) -> DeadLetter:
    """A refusal after parsing, still carrying the record as it was received."""
    return DeadLetter(reason, detail, ev.raw, ev.position, ev.ingest_ms)


class FeatureLogic(StatefulBatchLogic[Event, "Enriched | DeadLetter", bytes]):
    """Bytewax adapter: one shard's :class:`FeatureEngine` state, snapshotted as a pickle."""

    def __init__(self, engine: FeatureEngine, resume: bytes | None):
        self.engine = engine
        self.state = pickle.loads(resume) if resume is not None else engine.new_state()

    def on_batch(self, values: list[Event]) -> tuple[list[Enriched | DeadLetter], bool]:
        apply, st = self.engine.apply, self.state
        return [apply(st, ev) for ev in values], StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
