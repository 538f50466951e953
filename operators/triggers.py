"""Marketer-defined triggers evaluated on enriched events, with event-time timers.

Two kinds so far:

- ``event``: an event of a listed type arrives and a CEL condition over
  ``event``, ``features`` and ``user`` holds. Conditions are compiled once at
  load; triggers are indexed by event type, so an event only evaluates the
  triggers that can fire on it.
- ``absence``: an ``after`` event with no ``unless`` event within ``within``
  ("add_to_cart, no order within 30 min"). See :func:`resolve_absence` for the
  exact rule; it depends only on the *set* of events, never on their arrival
  order, which is what makes it safe under out-of-order input and replays.

Timers fire when the shard's watermark (:mod:`operators.clock`) passes their
deadline, at the end of each batch, after every event of the batch has had
its chance to cancel them.

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
>>> [(a.trigger_id, a.user_id, a.occurrence) for a in eng.advance(st, eng.watermark(st, now=0))]
[('cart', 'u1', 'e1')]
"""

from __future__ import annotations

import bisect
import re
import hashlib
import heapq
import pickle
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import cel
from bytewax.operators import StatefulBatchLogic

from nudgeflow.events import Action, Decision, Event
from nudgeflow.settings import AbsenceTrigger, EventTrigger, TriggerDef
from operators.clock import PartitionClock
from operators.features import Enriched
from operators.guards import Profile, StateGuards, variant_of
from operators.parse import wall_ms

IDLE_TICK_S = 1.0
"""How often a shard with open timers wakes to advance its watermark by the wall clock."""


def action_id(trigger_id: str, user_id: str, occurrence: str) -> str:
    """The deterministic idempotency key of one firing.

    >>> action_id("cart", "u1", "e1") == action_id("cart", "u1", "e1")
    True
    """
    return hashlib.blake2b(f"{trigger_id}\x1f{user_id}\x1f{occurrence}".encode(), digest_size=16).hexdigest()


_SCORE_REF = re.compile(r"\bscore\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*[\"']([^\"']+)[\"']\s*\])")
_FEATURE_REF = re.compile(r"\bfeatures\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*[\"']([^\"']+)[\"']\s*\])")


def feature_refs(condition: str) -> set[str]:
    """The feature names a CEL condition reads.

    >>> sorted(feature_refs('features.views_1h > 2 && features["cart_value"] > 0'))
    ['cart_value', 'views_1h']
    """
    return {a or b for a, b in _FEATURE_REF.findall(condition)}


def score_refs(condition: str) -> set[str]:
    """The model scores a CEL condition reads.

    >>> sorted(score_refs("score.churn_risk > 0.8 && features.x > 1"))
    ['churn_risk']
    """
    return {a or b for a, b in _SCORE_REF.findall(condition)}


def compile_condition(source: str) -> cel.Program:
    """Compile a CEL condition; raises ValueError with the compiler's message."""
    return cel.compile(source)


class Condition:
    """A compiled CEL condition that is handed only the variables it reads.

    Converting a Python dict into CEL values is most of an evaluation's cost
    (about 50 µs with the full event, features and user maps, a few µs with one
    small map), so the context is built per condition from what
    ``Program.variables()`` says it uses.

    >>> c = Condition("features.views_1h >= 5")
    >>> c.holds(Event("e", "u", "browse", 0), {"views_1h": 7}), c.holds(Event("e", "u", "browse", 0), {"views_1h": 1})
    (True, False)
    """

    __slots__ = ("program", "wants_event", "wants_features", "wants_user", "wants_score", "feature_names")

    def __init__(self, source: str):
        self.program = compile_condition(source)
        names = set(self.program.variables())
        self.wants_event = "event" in names
        self.wants_features = "features" in names
        self.wants_user = "user" in names
        self.wants_score = "score" in names
        self.feature_names = tuple(sorted(feature_refs(source)))

    def holds(self, ev: Event, feats: dict[str, Any], scores: dict[str, float] | None = None) -> bool:
        ctx: dict[str, Any] = {}
        if self.wants_event:
            ctx["event"] = {"type": ev.type, "user_id": ev.user_id, "platform": ev.platform or "", "ts": ev.ts,
                            "props": ev.props}
        if self.wants_features:
            ctx["features"] = {n: feats[n] for n in self.feature_names if n in feats}
        if self.wants_user:
            ctx["user"] = {}
        if self.wants_score:
            ctx["score"] = scores or {}
        try:
            return self.program.execute(ctx) is True
        except Exception:  # a condition reading a missing field is false, not a crash
            return False


class After(NamedTuple):
    """An ``after`` event waiting for its episode to be decided."""

    ts: int
    event_id: str
    ingest_ms: int
    features: dict[str, Any]


def resolve_absence(
    afters: list[After], unless: list[int], within: int, watermark: int
) -> tuple[list[After], list[After]]:
    """Decide the episodes of one (trigger, user) that the watermark allows; returns (fired, still open).

    The rule, on event times only: the earliest ``after`` event ``a`` opens an
    episode ``[a, a + within)``. If an ``unless`` event falls in it, the
    episode is cancelled and the next one opens at the first ``after`` event
    later than that ``unless``. Otherwise it fires once ``watermark`` reaches
    ``a + within`` (``after`` events inside the episode join it) and the next
    opens at the first ``after`` event at or past the deadline. Both lists are
    sorted; ``fired`` holds the events that opened fired episodes.

    >>> A = [After(0, "a0", 0, {}), After(10, "a1", 0, {}), After(50, "a2", 0, {})]
    >>> fired, left = resolve_absence(A, unless=[], within=30, watermark=100)
    >>> [a.event_id for a in fired], left
    (['a0', 'a2'], [])
    >>> fired, left = resolve_absence(A, unless=[5], within=30, watermark=100)
    >>> [a.event_id for a in fired]  # a0 answered at 5; a1 opens the next episode
    ['a1', 'a2']
    """
    fired: list[After] = []
    i = 0
    n = len(afters)
    while i < n:
        a = afters[i]
        deadline = a.ts + within
        j = bisect.bisect_left(unless, a.ts)
        if j < len(unless) and unless[j] < deadline:
            b = unless[j]
            while i < n and afters[i].ts <= b:
                i += 1
            continue
        if deadline > watermark:
            break
        fired.append(a)
        while i < n and afters[i].ts < deadline:
            i += 1
    return fired, afters[i:]


class Timers:
    """The undecided ``after`` events and recent ``unless`` times of one (trigger, user)."""

    __slots__ = ("afters", "unless")

    def __init__(self) -> None:
        self.afters: list[After] = []
        self.unless: list[int] = []

    def __getstate__(self) -> tuple[list[After], list[int]]:
        return (self.afters, self.unless)

    def __setstate__(self, s: tuple[list[After], list[int]]) -> None:
        self.afters, self.unless = s


class TriggerState:
    """Timers of one shard, its users' guard profiles, held actions and its event-time clock."""

    def __init__(self) -> None:
        self.timers: dict[tuple[str, str], Timers] = {}
        #: (earliest possible deadline, trigger, user); stale entries are skipped when popped
        self.heap: list[tuple[int, str, str]] = []
        self.clock = PartitionClock()
        self.profiles: dict[str, Profile] = {}
        #: (release event time, action id, action): candidates held by quiet hours
        self.held: list[tuple[int, str, Action]] = []


class TriggerEngine:
    """Pure trigger logic over one shard's :class:`TriggerState`."""

    def __init__(
        self, triggers: Iterable[TriggerDef], lateness_ms: int, idle_ms: int, now_ms: Callable[[], int] = wall_ms,
        guards: StateGuards | None = None,
    ):
        self.guards = guards
        self.lateness_ms = lateness_ms
        self.idle_ms = idle_ms
        self.now_ms = now_ms
        self.by_type: dict[str, list[tuple[EventTrigger, Condition]]] = {}
        self.after: dict[str, list[AbsenceTrigger]] = {}
        self.unless: dict[str, list[AbsenceTrigger]] = {}
        self.absence: dict[str, AbsenceTrigger] = {}
        self.within_ms: dict[str, int] = {}
        for t in triggers:
            if not t.enabled:
                continue
            if isinstance(t, EventTrigger):
                cond = Condition(t.condition)
                for et in t.on:
                    self.by_type.setdefault(et, []).append((t, cond))
            else:
                self.absence[t.id] = t
                self.within_ms[t.id] = int(t.within * 1000)
                for et in t.after:
                    self.after.setdefault(et, []).append(t)
                for et in t.unless:
                    self.unless.setdefault(et, []).append(t)

    def new_state(self) -> TriggerState:
        return TriggerState()

    def on_event(self, st: TriggerState, en: Enriched, now: int) -> list[Action | Decision]:
        """Evaluate one enriched event: condition triggers fire now, absence timers are fed.

        ``now`` is the batch's wall-clock reading. Timers fire in :meth:`advance`.
        Out come candidate actions, and decisions the in-state guards took.
        """
        ev = en.event
        ts = ev.ts
        st.clock.see(ev.position, ts, now)
        if ev.type in _PROFILE_TYPES and self.guards is not None:
            _profile(st, ev)
        out: list[Action | Decision] = []
        for t, cond in self.by_type.get(ev.type, ()):
            if cond.holds(ev, en.features, en.scores):
                self._fire(st, out, t, ev.user_id, ev.event_id, ts, ev.ingest_ms, en.features, en.scores)
        for t in self.unless.get(ev.type, ()):
            key = (t.id, ev.user_id)
            tm = st.timers.get(key)
            if tm is None:
                # kept for an after-event that happened earlier but arrives later (within the lateness)
                tm = st.timers[key] = Timers()
                heapq.heappush(st.heap, (ts + self.lateness_ms + 1, t.id, ev.user_id))
            bisect.insort(tm.unless, ts)
        for t in self.after.get(ev.type, ()):
            key = (t.id, ev.user_id)
            tm = st.timers.get(key)
            if tm is None:
                tm = st.timers[key] = Timers()
            a = After(ts, ev.event_id, ev.ingest_ms, en.features)
            bisect.insort(tm.afters, a)
            if tm.afters[0] is a:
                heapq.heappush(st.heap, (ts + self.within_ms[t.id], t.id, ev.user_id))
        return out

    def advance(self, st: TriggerState, watermark: int) -> list[Action | Decision]:
        """Fire every episode whose deadline the watermark has reached, release held actions whose quiet
        hours are over; forget what can no longer matter."""
        out: list[Action | Decision] = []
        while st.held and st.held[0][0] <= watermark:
            release, _, a = heapq.heappop(st.held)
            self._guard(st, out, a, release)
        heap = st.heap
        lateness = self.lateness_ms
        while heap and heap[0][0] <= watermark:
            due, tid, uid = heapq.heappop(heap)
            key = (tid, uid)
            tm = st.timers.get(key)
            if tm is None:
                continue
            within = self.within_ms[tid]
            if tm.afters and tm.afters[0].ts + within == due:
                fired, tm.afters = resolve_absence(tm.afters, tm.unless, within, watermark)
                t = self.absence[tid]
                for a in fired:
                    self._fire(st, out, t, uid, a.event_id, a.ts + within, a.ingest_ms, a.features, {})
                if tm.afters:
                    heapq.heappush(heap, (tm.afters[0].ts + within, tid, uid))
            elif tm.afters:
                continue  # a stale entry: the live one for this key is elsewhere in the heap
            # unless-times older than the open episode and than any after-event that may still arrive are dead
            keep_from = min(tm.afters[0].ts if tm.afters else watermark, watermark - lateness)
            tm.unless = tm.unless[bisect.bisect_left(tm.unless, keep_from):]
            if not tm.afters:
                if tm.unless:
                    heapq.heappush(heap, (tm.unless[0] + lateness + 1, tid, uid))
                else:
                    del st.timers[key]
        return out

    def watermark(self, st: TriggerState, now: int) -> int:
        return st.clock.watermark(self.lateness_ms, self.idle_ms, now)

    def _fire(
        self, st: TriggerState, out: list[Action | Decision], t: TriggerDef, user_id: str, occurrence: str,
        event_ts: int, ingest_ms: int, feats: dict[str, Any], scores: dict[str, float],
    ) -> None:
        """A trigger fired: make its candidate action and put it through the in-state guards."""
        payload = dict(t.payload)
        variant = variant_of(user_id, t)
        if variant is not None:
            payload.update(variant.payload)
        a = Action(
            action_id(t.id, user_id, occurrence), t.id, user_id, t.channel, occurrence, event_ts, ingest_ms,
            self.now_ms(), feats, payload, variant.name if variant else "", dict(scores), t.priority,
        )
        self._guard(st, out, a, event_ts)

    def _guard(self, st: TriggerState, out: list[Action | Decision], a: Action, at: int) -> None:
        if self.guards is None:
            out.append(a)
            return
        decided, hold_until = self.guards.check(a, st.profiles.get(a.user_id), at)
        if hold_until is not None:
            heapq.heappush(st.held, (hold_until, a.action_id, a))
        out.append(decided if decided is not None else a)


_PROFILE_TYPES = frozenset({"consent", "identify"})


def _profile(st: TriggerState, ev: Event) -> None:
    """Consent and time zone, from the user's own events, in the order the user sent them."""
    p = st.profiles.get(ev.user_id)
    if p is None:
        p = st.profiles[ev.user_id] = Profile()
    if ev.type == "consent":
        p.consent[ev.props["channel"]] = ev.props["granted"]
    elif ev.props.get("timezone"):
        p.tz = ev.props["timezone"]


TriggerOut = Action | Decision


class TriggerLogic(StatefulBatchLogic[Enriched, TriggerOut, bytes]):
    """Bytewax adapter: one shard's timers; wakes once a second while timers or holds are open."""

    def __init__(self, engine: TriggerEngine, resume: bytes | None):
        self.engine = engine
        self.state: TriggerState = pickle.loads(resume) if resume is not None else engine.new_state()

    def on_batch(self, values: list[Enriched]) -> tuple[list[TriggerOut], bool]:
        eng, st = self.engine, self.state
        now = eng.now_ms()
        on_event = eng.on_event
        out: list[TriggerOut] = []
        for en in values:
            fired = on_event(st, en, now)
            if fired:
                out.extend(fired)
        if st.heap or st.held:
            out.extend(eng.advance(st, eng.watermark(st, now)))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[TriggerOut], bool]:
        eng = self.engine
        return eng.advance(self.state, eng.watermark(self.state, eng.now_ms())), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[TriggerOut], bool]:
        # the input is finished: nothing can still cancel a timer due by the newest event time
        return self.engine.advance(self.state, self.state.clock.max_ts), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.state.heap and not self.state.held:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=IDLE_TICK_S)

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
