"""Marketer-defined triggers evaluated on enriched events, with event-time timers.

Two kinds so far:

- ``event``: an event of a listed type arrives and a CEL condition over
  ``event``, ``features`` and ``user`` holds. Conditions are compiled once at
  load; triggers are indexed by event type, so an event only evaluates the
  triggers that can fire on it.
- ``absence``: an ``after`` event with no ``unless`` event within ``within``
  ("add_to_cart, no order within 30 min"). A timer per (trigger, user) fires
  when the shard's **watermark** passes its deadline; the watermark is the
  newest event time minus the allowed lateness, advanced by the wall clock
  while the stream is idle (as Bytewax's EventClock does), so an ``unless``
  that arrives late but within the lateness still cancels the timer.

>>> from nudgeflow.settings import TriggersFile
>>> from operators.features import Enriched
>>> from nudgeflow.events import Event
>>> tf = TriggersFile.model_validate({"triggers": [{"id": "cart", "kind": "absence",
...     "after": ["add_to_cart"], "unless": ["order"], "within": "30m"}]})
>>> eng = TriggerEngine(tf.triggers, lateness_ms=0, now_ms=lambda: 0)
>>> st = eng.new_state()
>>> eng.on_event(st, Enriched(Event("e1", "u1", "add_to_cart", 0), {}))
[]
>>> [a.trigger_id for a in eng.on_event(st, Enriched(Event("e2", "u2", "browse", 1_800_000), {}))]
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
        self.max_ts = 0
        self.wall_at_max = 0


class TriggerEngine:
    """Pure trigger logic over one shard's :class:`TriggerState`."""

    def __init__(self, triggers: Iterable[TriggerDef], lateness_ms: int, now_ms: Callable[[], int] = wall_ms):
        self.lateness_ms = lateness_ms
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

    def on_event(self, st: TriggerState, en: Enriched) -> list[Action]:
        """Evaluate one enriched event; returns actions fired by it or by timers it made due."""
        ev = en.event
        out: list[Action] = []
        for t, prog in self.by_type.get(ev.type, ()):
            if self._holds(prog, ev, en.features):
                out.append(self._action(t, ev.user_id, ev.event_id, ev.ts, ev.ingest_ms, en.features))
        for t in self.unless.get(ev.type, ()):
            key = (t.id, ev.user_id)
            if st.last_unless.get(key, -1) < ev.ts:
                st.last_unless[key] = ev.ts
            p = st.pending.get(key)
            if p is not None and ev.ts >= p.start_ts:
                del st.pending[key]  # its heap entry is skipped when popped
        for t in self.after.get(ev.type, ()):
            self._arm(st, t, ev, en.features)
        if ev.ts > st.max_ts:
            st.max_ts = ev.ts
            st.wall_at_max = self.now_ms()
            out.extend(self.advance(st, st.max_ts - self.lateness_ms))
        return out

    def _arm(self, st: TriggerState, t: AbsenceTrigger, ev: Event, feats: dict[str, Any]) -> None:
        key = (t.id, ev.user_id)
        within = int(t.within * 1000)
        last_b = st.last_unless.get(key)
        if last_b is not None and ev.ts <= last_b <= ev.ts + within:
            return  # answered already: the unless event came first in arrival, later in time
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

    def idle_watermark(self, st: TriggerState) -> int:
        """The watermark while no events arrive: event time moves on with the wall clock."""
        return st.max_ts - self.lateness_ms + max(0, self.now_ms() - st.wall_at_max)

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
        on_event, st = self.engine.on_event, self.state
        out: list[Action] = []
        for en in values:
            fired = on_event(st, en)
            if fired:
                out.extend(fired)
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Action], bool]:
        return self.engine.advance(self.state, self.engine.idle_watermark(self.state)), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Action], bool]:
        # the input is finished: nothing later can arrive, so lateness no longer holds timers back
        return self.engine.advance(self.state, self.state.max_ts), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.state.pending:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=IDLE_TICK_S)

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)

