"""Marketer-defined triggers evaluated on enriched events, with event-time timers.

Two kinds so far:

- ``event``: an event of a listed type arrives and a CEL condition over
  ``event``, ``features`` and ``user`` holds. Conditions are compiled once at
  load; triggers are indexed by event type, so an event only evaluates the
  triggers that can fire on it.
- ``absence``: an ``after`` event with no ``unless`` event within ``within``
  ("add_to_cart, no order within 30 min"). A timer per (trigger, user) fires
  when the shard's **watermark** passes its deadline.

The watermark is computed as in Flink, not per key: each source partition
(Kafka partition, file, simulator partition) has its own newest event time,
and the watermark is the *oldest* of those minus the allowed lateness. So a
partition that lags behind another never lets a timer fire before the events
that could cancel it have been read. A partition silent for ``idle_timeout``
of wall time stops holding the watermark back; when every partition is
silent, event time moves on with the wall clock (a live shop at night still
gets its cart reminders). Timers fire at the end of each batch, after every
event of the batch has had its chance to cancel them.

>>> from nudgeflow.settings import TriggersFile
>>> from operators.features import Enriched
>>> from nudgeflow.events import Event
>>> tf = TriggersFile.model_validate({"triggers": [{"id": "cart", "kind": "absence",
...     "after": ["add_to_cart"], "unless": ["order"], "within": "30m"}]})
>>> eng = TriggerEngine(tf.triggers, lateness_ms=0, idle_ms=10_000, now_ms=lambda: 0)
>>> st = eng.new_state()
>>> eng.on_event(st, Enriched(Event("e1", "u1", "add_to_cart", 0, position="p:0"), {}), now=0)
[]
>>> eng.on_event(st, Enriched(Event("e2", "u2", "browse", 1_800_000, position="p:1"), {}), now=0)
[]
>>> [a.trigger_id for a in eng.advance(st, eng.watermark(st, now=0))]
['cart']
"""

from __future__ import annotations

import hashlib
import heapq
import pickle
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import cel
from bytewax.operators import StatefulBatchLogic

from nudgeflow.events import Action, Event
from nudgeflow.settings import AbsenceTrigger, EventTrigger, TriggerDef
from operators.features import Enriched
from operators.parse import wall_ms

IDLE_TICK_S = 1.0
"""How often an idle shard advances its watermark by the wall clock."""


def action_id(trigger_id: str, user_id: str, occurrence: str) -> str:
    """The deterministic idempotency key of one firing.

    >>> action_id("cart", "u1", "e1") == action_id("cart", "u1", "e1")
    True
    """
    return hashlib.blake2b(f"{trigger_id}\x1f{user_id}\x1f{occurrence}".encode(), digest_size=16).hexdigest()


def compile_condition(source: str) -> cel.Program:
    """Compile a CEL condition; raises ValueError with the compiler's message."""
    return cel.compile(source)


class Pending:
    """An open absence timer: the first ``after`` event and the deadline."""

    __slots__ = ("start_ts", "deadline", "occurrence", "features", "ingest_ms")

    def __init__(self, start_ts: int, deadline: int, occurrence: str, features: dict[str, Any], ingest_ms: int):
        self.start_ts = start_ts
        self.deadline = deadline
        self.occurrence = occurrence
        self.features = features
        self.ingest_ms = ingest_ms

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.start_ts, self.deadline, self.occurrence, self.features, self.ingest_ms)

    def __setstate__(self, s: tuple[Any, ...]) -> None:
        self.start_ts, self.deadline, self.occurrence, self.features, self.ingest_ms = s


class TriggerState:
    """Timers of one shard plus its event-time clock."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], Pending] = {}
        self.heap: list[tuple[int, str, str]] = []
        #: newest ``unless`` time per (trigger, user), for ``after`` events that arrive late
        self.last_unless: dict[tuple[str, str], int] = {}
        #: newest event time and the wall time it was seen, per source partition
        self.part_max: dict[str, int] = {}
        self.part_wall: dict[str, int] = {}
        self.max_ts = 0
        self.wall_at_max = 0
        self.wm = 0


class TriggerEngine:
    """Pure trigger logic over one shard's :class:`TriggerState`."""

    def __init__(
        self, triggers: Iterable[TriggerDef], lateness_ms: int, idle_ms: int, now_ms: Callable[[], int] = wall_ms
    ):
        self.lateness_ms = lateness_ms
        self.idle_ms = idle_ms
        self.now_ms = now_ms
        self.by_type: dict[str, list[tuple[EventTrigger, cel.Program]]] = {}
        self.after: dict[str, list[AbsenceTrigger]] = {}
        self.unless: dict[str, list[AbsenceTrigger]] = {}
        self.absence: dict[str, AbsenceTrigger] = {}
        for t in triggers:
            if not t.enabled:
                continue
            if isinstance(t, EventTrigger):
                prog = compile_condition(t.condition)
                for et in t.on:
                    self.by_type.setdefault(et, []).append((t, prog))
            else:
                self.absence[t.id] = t
                for et in t.after:
                    self.after.setdefault(et, []).append(t)
                for et in t.unless:
                    self.unless.setdefault(et, []).append(t)
        self.max_within_ms = max((int(t.within * 1000) for t in self.absence.values()), default=0)

    def new_state(self) -> TriggerState:
        return TriggerState()

    def on_event(self, st: TriggerState, en: Enriched, now: int) -> list[Action]:
        """Evaluate one enriched event: condition triggers fire now, timers are armed or cancelled.

        ``now`` is the batch's wall-clock reading. Timers fire in :meth:`advance`.
        """
        ev = en.event
        ts = ev.ts
        part = ev.position.rpartition(":")[0]
        if ts > st.part_max.get(part, -1):
            st.part_max[part] = ts
            st.part_wall[part] = now
            if ts > st.max_ts:
                st.max_ts, st.wall_at_max = ts, now
        out: list[Action] = []
        for t, prog in self.by_type.get(ev.type, ()):
            if self._holds(prog, ev, en.features):
                out.append(self._action(t, ev.user_id, ev.event_id, ts, ev.ingest_ms, en.features))
        for t in self.unless.get(ev.type, ()):
            key = (t.id, ev.user_id)
            if st.last_unless.get(key, -1) < ts:
                st.last_unless[key] = ts
            p = st.pending.get(key)
            if p is not None and p.start_ts <= ts <= p.deadline:
                del st.pending[key]  # its heap entry is skipped when popped
        for t in self.after.get(ev.type, ()):
            self._arm(st, t, ev, en.features)
        return out

    def _arm(self, st: TriggerState, t: AbsenceTrigger, ev: Event, feats: dict[str, Any]) -> None:
        key = (t.id, ev.user_id)
        within = int(t.within * 1000)
        last_b = st.last_unless.get(key)
        if last_b is not None and ev.ts <= last_b <= ev.ts + within:
            return  # answered already: the unless event arrived first but happened later
        p = st.pending.get(key)
        deadline = ev.ts + within
        if p is None:
            st.pending[key] = Pending(ev.ts, deadline, ev.event_id, feats, ev.ingest_ms)
            heapq.heappush(st.heap, (deadline, t.id, ev.user_id))
            return
        if ev.ts < p.start_ts:  # an earlier after-event names the occurrence, whatever the arrival order
            p.start_ts, p.occurrence = ev.ts, ev.event_id
        if deadline > p.deadline:
            p.deadline, p.features, p.ingest_ms = deadline, feats, ev.ingest_ms
            heapq.heappush(st.heap, (deadline, t.id, ev.user_id))

    def advance(self, st: TriggerState, watermark: int) -> list[Action]:
        """Fire every timer whose deadline the watermark has passed."""
        out: list[Action] = []
        heap = st.heap
        while heap and heap[0][0] <= watermark:
            deadline, tid, uid = heapq.heappop(heap)
            p = st.pending.get((tid, uid))
            if p is None or p.deadline != deadline:
                continue  # cancelled, or moved to a later deadline
            del st.pending[(tid, uid)]
            out.append(self._action(self.absence[tid], uid, p.occurrence, deadline, p.ingest_ms, p.features))
        if self.max_within_ms and len(st.last_unless) > 4 * (len(st.pending) + 1024):
            horizon = watermark - self.max_within_ms - self.lateness_ms
            st.last_unless = {k: v for k, v in st.last_unless.items() if v >= horizon}
        return out

    def watermark(self, st: TriggerState, now: int) -> int:
        """Event time up to which every shard input has been seen (monotonic)."""
        active = [m for p, m in st.part_max.items() if now - st.part_wall[p] <= self.idle_ms]
        if active:
            wm = min(active) - self.lateness_ms
        else:  # all inputs silent: event time follows the wall clock
            wm = st.max_ts - self.lateness_ms + max(0, now - st.wall_at_max - self.idle_ms)
        if wm > st.wm:
            st.wm = wm
        return st.wm

    def _holds(self, prog: cel.Program, ev: Event, feats: dict[str, Any]) -> bool:
        ctx = {
            "event": {"type": ev.type, "user_id": ev.user_id, "platform": ev.platform or "", "ts": ev.ts, "props": ev.props},
            "features": feats,
            "user": {},
        }
        try:
            return prog.execute(ctx) is True
        except Exception:  # a condition reading a missing field is false, not a crash
            return False

    def _action(self, t: TriggerDef, user_id: str, occurrence: str, event_ts: int, ingest_ms: int, feats: dict[str, Any]) -> Action:
        return Action(
            action_id(t.id, user_id, occurrence),
            t.id,
            user_id,
            t.channel,
            occurrence,
            event_ts,
            ingest_ms,
            self.now_ms(),
            feats,
            dict(t.payload),
        )


class TriggerLogic(StatefulBatchLogic[Enriched, Action, bytes]):
    """Bytewax adapter: one shard's timers; wakes once a second while timers are open."""

    def __init__(self, engine: TriggerEngine, resume: bytes | None):
        self.engine = engine
        self.state: TriggerState = pickle.loads(resume) if resume is not None else engine.new_state()

    def on_batch(self, values: list[Enriched]) -> tuple[list[Action], bool]:
        eng, st = self.engine, self.state
        now = eng.now_ms()
        on_event = eng.on_event
        out: list[Action] = []
        for en in values:
            fired = on_event(st, en, now)
            if fired:
                out.extend(fired)
        if st.heap:
            out.extend(eng.advance(st, eng.watermark(st, now)))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Action], bool]:
        eng = self.engine
        return eng.advance(self.state, eng.watermark(self.state, eng.now_ms())), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Action], bool]:
        # the input is finished: nothing can still cancel a timer due by the newest event time
        return self.engine.advance(self.state, self.state.max_ts), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.state.pending:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=IDLE_TICK_S)

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)

