"""Marketer-defined triggers evaluated on enriched events, with event-time timers.

Five kinds:

- ``event``: an event of a listed type arrives and a CEL condition over
  ``event``, ``features``, ``score`` and ``user`` holds. Conditions are
  compiled once at load; triggers are indexed by event type, so an event only
  evaluates the triggers that can fire on it.
- ``absence``: an ``after`` event with no ``unless`` event within ``within``
  ("add_to_cart, no order within 30 min"). See :func:`resolve_absence` for the
  exact rule; it depends only on the *set* of events, never on their arrival
  order, which is what makes it safe under out-of-order input and replays.
- ``sequence``: a ``then`` event with a ``first`` event in the ``within``
  before it, in event time (a late ``first`` still completes it).
- ``crossing``: a score or feature rising to a threshold fires once, and
  re-arms only below ``reset_below`` (hysteresis).
- ``date``: a date among the user's attributes (birthday, expiry …), at a time
  of day in the user's zone, yearly or once.

Timers fire when the shard's watermark (:mod:`operators.clock`) passes their
deadline, at the end of each batch, after every event of the batch has had
its chance to cancel them. Every firing becomes a candidate action with a
deterministic ``action_id`` (trigger, user, occurrence), a payload from the
trigger's template (:mod:`operators.payload`), and goes through the guards
decided in this keyed state (:mod:`operators.guards`).

When an identity link merges two shoppers, :meth:`TriggerEngine.release` takes
what a shard keeps about the merged-away id and :meth:`TriggerEngine.absorb`
merges it into the canonical user, in that user's shard.

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

A cart left by a cookie that then logs in as ``u3`` (whose state lives in another shard):

>>> eng.on_event(st, Enriched(Event("e3", "anon:c", "add_to_cart", 2_000_000, position="p:2"), {}), now=0)
[]
>>> other = eng.new_state()
>>> eng.absorb(other, "u3", eng.release(st, "anon:c"))
[]
>>> [(a.user_id, a.occurrence, a.origin_id) for a in eng.advance(other, 3_800_000)]
[('u3', 'e3', 'anon:c')]
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, NamedTuple

import cel
from bytewax.operators import StatefulBatchLogic

from nudgeflow.events import IDLE, Action, Consent, Decision, Event, Merge
from nudgeflow.settings import (
    AbsenceTrigger, CrossingTrigger, DateTrigger, EventTrigger, Reloadable, SequenceTrigger, TriggerDef, TriggersFile,
)
from operators.clock import PartitionClock
from operators.features import Enriched
from operators.guards import Profile, StateGuards, variant_of, zone
from operators.merge import Handoff, MergeDesk, pop_user, restore, snapshot
from operators.clock import wall_ms
from operators.payload import PayloadTemplate

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


#: the feature naming the platform a shopper was last seen on (``web``, ``app``, ``mini_program``)
PLATFORM_FEATURE = "last_platform"


def channel_of(t: TriggerDef, feats: dict[str, Any]) -> str:
    """The channel of a firing: the one ``channel_by_platform`` names for the platform the shopper was last seen
    on (the feature ``last_platform`` of the triggering event), else the trigger's ``channel``. The guards
    (consent, rate limit per channel) then judge the channel chosen.

    >>> from nudgeflow.settings import EventTrigger
    >>> t = EventTrigger(id="t", kind="event", on=["browse"], channel="email", channel_by_platform={"app": "push"})
    >>> channel_of(t, {"last_platform": "app"}), channel_of(t, {"last_platform": "web"}), channel_of(t, {})
    ('push', 'email', 'email')
    """
    by = t.channel_by_platform
    return by.get(feats.get(PLATFORM_FEATURE), t.channel) if by else t.channel


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


#: in a CEL source: a string literal or a comment (kept as they are), or a field of ``features`` or ``score``
#: selected by name (not a method called on the map, not a field of something else)
_SELECTION = re.compile(
    r"""(?P<keep>[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')"""
    r"|//[^\n]*)"
    r"|(?<![\w.])(?P<map>features|score)\s*\.\s*(?P<name>[A-Za-z_]\w*)\b(?!\s*\()"
)
_FLAT = {"features": "_f_", "score": "_s_"}

FlatRefs = tuple[tuple[str, bool, str], ...]
"""The variables of a flattened condition: (variable, from the features? else the scores, name)."""


def flatten(source: str) -> tuple[cel.Program, FlatRefs] | None:
    """The condition with each ``features.x`` and ``score.x`` a variable of its own (``_f_x``, ``_s_x``), and
    those variables; None when it reads the maps any other way (``features["x"]``, ``has(features.x)``,
    the map itself) or reads neither.

    Handing CEL a map costs ~2.5 µs per evaluation to convert it, a number as a variable ~0.3 µs: the
    same values, bound one by one. :meth:`Condition.holds` takes this path only when every value is there,
    so a missing one still fails the condition exactly as it fails with the map.

    >>> program, refs = flatten('features.views_1h >= 5 && score.buy > 0.5 && event.props.score.x == "features.y"')
    >>> program.source
    '_f_views_1h >= 5 && _s_buy > 0.5 && event.props.score.x == "features.y"'
    >>> refs
    (('_f_views_1h', True, 'views_1h'), ('_s_buy', False, 'buy'))
    >>> flatten("has(features.views_1h)") is None, flatten('features["views_1h"] > 1') is None
    (True, True)
    """
    refs: dict[str, tuple[str, bool, str]] = {}

    def flat(m: re.Match[str]) -> str:
        if m["keep"] is not None:
            return m["keep"]
        var = _FLAT[m["map"]] + m["name"]
        refs[var] = (var, m["map"] == "features", m["name"])
        return var

    try:
        program = cel.compile(_SELECTION.sub(flat, source))
    except (ValueError, RuntimeError):  # e.g. has() wants a field selection
        return None
    if not refs or not set(program.variables()) <= set(refs) | {"event", "user"}:
        return None
    return program, tuple(refs.values())


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

    __slots__ = ("program", "wants_event", "wants_features", "wants_user", "wants_score", "feature_names", "flat")

    def __init__(self, source: str):
        self.program = compile_condition(source)
        names = set(self.program.variables())
        self.wants_event = "event" in names
        self.wants_features = "features" in names
        self.wants_user = "user" in names
        self.wants_score = "score" in names
        self.feature_names = tuple(sorted(feature_refs(source)))
        self.flat = flatten(source)

    def holds(
        self, ev: Event, feats: dict[str, Any], scores: dict[str, float] | None = None, user: dict[str, Any] | None = None
    ) -> bool:
        ctx: dict[str, Any] = {}
        program = self.program
        if self.flat is not None:
            for var, is_feature, name in self.flat[1]:
                values = feats if is_feature else scores
                if values is None or name not in values:  # the maps then, to fail (or not) as CEL says
                    ctx = {}
                    break
                ctx[var] = values[name]
            else:
                program = self.flat[0]
        if self.wants_event:
            ctx["event"] = {"type": ev.type, "user_id": ev.user_id, "platform": ev.platform or "", "ts": ev.ts,
                            "props": ev.props}
        if self.wants_user:
            ctx["user"] = user or {}
        if program is self.program:
            if self.wants_features:
                ctx["features"] = {n: feats[n] for n in self.feature_names if n in feats}
            if self.wants_score:
                ctx["score"] = scores or {}
        try:
            return program.execute(ctx) is True
        except Exception:  # a condition reading a missing field is false, not a crash
            return False


class After(NamedTuple):
    """An ``after`` event waiting for its episode to be decided."""

    ts: int
    event_id: str
    ingest_ms: int
    features: dict[str, Any]
    #: the id the event carried when it was not its user's canonical id (the action reports it)
    origin_id: str = ""


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


def drop_settled(afters: list[After], unless: list[int], within: int, final: int) -> list[After]:
    """The ``after`` events of one (trigger, user) that can still change what :func:`resolve_absence`
    decides, once every event before ``final`` (the watermark) is known; both lists sorted.

    An episode with a known ``unless`` before ``final`` is cancelled whatever still arrives, and an
    ``after`` event before ``final`` inside the open episode only joins it (an ``unless`` that would
    make it open the next one would have to be older than ``final``). What is left is the open
    episode's first event and the events from ``final`` on: a browse held an hour by browse
    abandonment no longer keeps every later browse of that hour.

    >>> A = [After(0, "a0", 0, {}), After(10, "a1", 0, {}), After(20, "a2", 0, {}), After(50, "a3", 0, {})]
    >>> [a.event_id for a in drop_settled(A, unless=[], within=30, final=40)]  # a1, a2 join a0's episode
    ['a0', 'a3']
    >>> [a.event_id for a in drop_settled(A, unless=[15], within=30, final=40)]  # cancelled at 15: a2 opens
    ['a2', 'a3']
    >>> [a.event_id for a in drop_settled(A, unless=[15], within=30, final=12)]  # only a1 is settled yet
    ['a0', 'a2', 'a3']
    """
    i, n = 0, len(afters)
    while i < n:
        a = afters[i]
        j = bisect.bisect_left(unless, a.ts)
        if j < len(unless) and unless[j] < min(a.ts + within, final):
            b = unless[j]
            while i < n and afters[i].ts <= b:
                i += 1
            continue
        break
    if i >= n:
        return []
    head = afters[i]
    end = min(head.ts + within, final)
    k = i + 1
    while k < n and afters[k].ts < end:
        k += 1
    return [head, *afters[k:]] if i or k > 1 else afters


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


class Sequence:
    """The recent ``first`` times and the ``then`` events still waiting for a late ``first``, of one (trigger, user)."""

    __slots__ = ("firsts", "waiting")

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.waiting: list[After] = []

    def __getstate__(self) -> tuple[list[int], list[After]]:
        return (self.firsts, self.waiting)

    def __setstate__(self, s: tuple[list[int], list[After]]) -> None:
        self.firsts, self.waiting = s


def next_date(value: Any, t: DateTrigger, tz: str, after_ms: int) -> tuple[int, str] | None:
    """(UTC ms, the date it is for) of the first firing of a date trigger later than ``after_ms``; None if none.

    The date is local to the user: ``t.at`` o'clock in zone ``tz``, moved by ``t.offset``. A yearly
    date on 29 February falls on the 28th in other years.

    >>> from nudgeflow.settings import DateTrigger
    >>> bday = DateTrigger(id="b", kind="date", attribute="birthday", annual=True, offset="-1d", at="09:00")
    >>> ms, day = next_date("1990-03-10", bday, "Europe/Berlin", after_ms=1_773_000_000_000)  # 2026-03-08
    >>> day, datetime.fromtimestamp(ms / 1000, zone("Europe/Berlin")).isoformat()
    ('2026-03-10', '2026-03-09T09:00:00+01:00')
    >>> next_date("1990-03-10", bday, "Europe/Berlin", after_ms=ms)[1]  # once fired, next year's
    '2027-03-10'
    >>> next_date("2004-02-29", bday, "UTC", after_ms=ms)[1]  # no 29th in 2027
    '2027-02-28'
    >>> expiry = DateTrigger(id="e", kind="date", attribute="coupon_expires", at="10:00")  # once, not yearly
    >>> next_date("2026-03-01", expiry, "UTC", after_ms=ms), next_date("soon", expiry, "UTC", after_ms=ms)  # past; no date
    (None, None)
    """
    try:
        d = date.fromisoformat(str(value)[:10])
    except ValueError:
        return None
    tzinfo = zone(tz)
    at = time.fromisoformat(t.at)
    offset = timedelta(seconds=t.offset)
    if not t.annual:
        years = [d.year]
    else:
        year = datetime.fromtimestamp(after_ms / 1000, tzinfo).year
        years = [year - 1, year, year + 1, year + 2]
    for y in years:
        try:
            day = d.replace(year=y)
        except ValueError:  # 29 February in a year without one
            day = date(y, 2, 28)
        ms = int((datetime.combine(day, at, tzinfo) + offset).timestamp() * 1000)
        if ms > after_ms:
            return ms, day.isoformat()
    return None


class TriggerState:
    """Timers of one shard, its users' profiles, held actions and its event-time clock."""

    def __init__(self) -> None:
        self.timers: dict[tuple[str, str], Timers] = {}
        #: (earliest possible deadline, trigger, user); stale entries are skipped when popped
        self.heap: list[tuple[int, str, str]] = []
        self.clock = PartitionClock()
        self.profiles: dict[str, Profile] = {}
        #: (release event time, action id, action): candidates held by quiet hours
        self.held: list[tuple[int, str, Action]] = []
        self.sequences: dict[tuple[str, str], Sequence] = {}
        #: (when the entry may be pruned, trigger, user)
        self.sequence_heap: list[tuple[int, str, str]] = []
        #: (trigger, user) whose crossing value is above its threshold (fired, not yet re-armed)
        self.above: set[tuple[str, str]] = set()
        #: (trigger, user) -> (UTC ms, date) of the next date firing; the heap holds (ms, trigger, user)
        self.dates: dict[tuple[str, str], tuple[int, str]] = {}
        self.date_heap: list[tuple[int, str, str]] = []
        #: profiles of users an identity merge released while actions of theirs were held: the holds end
        #: with the consent and time zone their user had (dropped with the user's last held action)
        self.departed: dict[str, Profile] = {}
        #: ``after`` and ``unless`` times added to timers since the last sweep (see ``TriggerEngine._sweep``)
        self.added = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]  # a snapshot from before a kind existed lacks its fields
        self.__dict__.update(state)


@dataclass(slots=True)
class TriggerPart:
    """Everything a trigger shard kept about one user, per trigger id: what an identity merge hands to the
    shard of the user it merged into (pickled through Redis when that is another process)."""

    timers: dict[str, Timers]
    sequences: dict[str, Sequence]
    #: crossing triggers fired and not yet re-armed
    above: set[str]
    profile: Profile | None
    dates: dict[str, tuple[int, str]]


def _stamped(pending: list[After], uid: str) -> list[After]:
    """Pending events leaving ``uid`` remember it as the id they carried, unless they already name one."""
    return [a if a.origin_id else a._replace(origin_id=uid) for a in pending]


def _has_first(firsts: list[int], ts: int, within: int) -> bool:
    """Whether a ``first`` time lies in ``[ts - within, ts)`` (``firsts`` sorted).

    >>> _has_first([0, 50], 40, 30), _has_first([0, 50], 50, 30)
    (False, False)
    >>> _has_first([0, 50], 60, 30)
    True
    """
    i = bisect.bisect_left(firsts, ts - within)
    return i < len(firsts) and firsts[i] < ts


class TriggerEngine:
    """Pure trigger logic over one shard's :class:`TriggerState`.

    ``source``: a trigger file that may change while the flow runs (hot reload). The engine rebuilds
    its indexes when the source has a new valid version; timers of triggers that are gone are dropped
    when they come due, those of triggers that stay keep running.
    """

    def __init__(
        self, triggers: TriggersFile | Iterable[TriggerDef], lateness_ms: int, idle_ms: int,
        now_ms: Callable[[], int] = wall_ms, guards: StateGuards | None = None, source: Reloadable | None = None,
    ):
        self.guards = guards
        self.lateness_ms = lateness_ms
        self.idle_ms = idle_ms
        self.now_ms = now_ms
        self.source = source
        self.version = source.version if source is not None else 0
        #: the newest event time any shard of this process has seen: at the end of a bounded input a
        #: shard whose own shoppers went quiet early still fires what the input as a whole has passed
        self.max_ts = 0
        self._build(triggers.triggers if isinstance(triggers, TriggersFile) else triggers)

    def _build(self, triggers: Iterable[TriggerDef]) -> None:
        self.triggers: dict[str, TriggerDef] = {}
        self.by_type: dict[str, list[tuple[EventTrigger, Condition]]] = {}
        #: (trigger, its condition on the after event; None when it always holds)
        self.after: dict[str, list[tuple[AbsenceTrigger, Condition | None]]] = {}
        self.unless: dict[str, list[AbsenceTrigger]] = {}
        self.first: dict[str, list[SequenceTrigger]] = {}
        self.then: dict[str, list[SequenceTrigger]] = {}
        self.crossing: dict[str, list[CrossingTrigger]] = {}
        self.crossing_any: list[CrossingTrigger] = []
        self.dated: dict[str, list[DateTrigger]] = {}
        self.within_ms: dict[str, int] = {}
        self.templates: dict[tuple[str, str], PayloadTemplate] = {}
        #: per trigger, the features its payloads read: all a pending event (absence, sequence) keeps
        self.kept: dict[str, tuple[str, ...]] = {}
        for t in triggers:
            if not t.enabled:
                continue
            self.triggers[t.id] = t
            self.templates[(t.id, "")] = PayloadTemplate(dict(t.payload))
            for v in t.variants:
                self.templates[(t.id, v.name)] = PayloadTemplate({**t.payload, **v.payload})
            self.kept[t.id] = tuple(sorted({
                ref.partition(".")[2] for (tid, _), tpl in self.templates.items() if tid == t.id
                for ref in tpl.refs if ref.startswith("features.")
            } | ({PLATFORM_FEATURE} if t.channel_by_platform else set())))
            if isinstance(t, EventTrigger):
                cond = Condition(t.condition)
                for et in t.on:
                    self.by_type.setdefault(et, []).append((t, cond))
            elif isinstance(t, AbsenceTrigger):
                self.within_ms[t.id] = int(t.within * 1000)
                opens = None if t.condition.strip() == "true" else Condition(t.condition)
                for et in t.after:
                    self.after.setdefault(et, []).append((t, opens))
                for et in t.unless:
                    self.unless.setdefault(et, []).append(t)
            elif isinstance(t, SequenceTrigger):
                self.within_ms[t.id] = int(t.within * 1000)
                for et in t.first:
                    self.first.setdefault(et, []).append(t)
                for et in t.then:
                    self.then.setdefault(et, []).append(t)
            elif isinstance(t, CrossingTrigger):
                if t.on == "any":
                    self.crossing_any.append(t)
                else:
                    for et in t.on:
                        self.crossing.setdefault(et, []).append(t)
            else:
                self.dated.setdefault(t.attribute, []).append(t)

    def refresh(self) -> None:
        """Pick up a new version of the trigger file, if the source has one (hot reload)."""
        src = self.source
        if src is None:
            return
        src.poll()
        if src.version != self.version:
            self.version = src.version
            self._build(src.current.triggers)
            if self.guards is not None:
                self.guards = StateGuards(src.current, self.guards.default_tz)

    def new_state(self) -> TriggerState:
        return TriggerState()

    def on_event(self, st: TriggerState, en: Enriched, now: int) -> list[Action | Decision | Consent]:
        """Evaluate one enriched event: condition, crossing and sequence triggers fire now, timers are fed.

        ``now`` is the batch's wall-clock reading. Timers fire in :meth:`advance`.
        Out come candidate actions, decisions the in-state guards took, and a consent event's statement.
        """
        ev = en.event
        ts = ev.ts
        uid = ev.user_id
        if ev.type != IDLE:  # a look comes from the feature step's watermark, not from a source partition
            st.clock.see(ev.position, ts, now)
            if ts > self.max_ts:
                self.max_ts = ts
        out: list[Action | Decision | Consent] = []
        if ev.type in _PROFILE_TYPES:
            self._profile(st, ev)
            if ev.type == "consent":  # for the Redis consent store, before anything it decides
                out.append(Consent(uid, ev.props["channel"], ev.props["granted"], ts))
        for t, cond in self.by_type.get(ev.type, ()):
            if self._holds(st, cond, en):
                self._fire(st, out, t, uid, ev.event_id, ts, ev.ingest_ms, en.features, en.scores, ev.origin_id)
        crossing = self.crossing.get(ev.type)
        if crossing or self.crossing_any:
            for t in (crossing or []) + self.crossing_any:
                self._cross(st, out, t, en)
        for t in self.then.get(ev.type, ()):
            self._then(st, out, t, en)
        for t in self.first.get(ev.type, ()):
            self._first(st, out, t, en)
        for t in self.unless.get(ev.type, ()):
            key = (t.id, uid)
            tm = st.timers.get(key)
            if tm is None:
                # kept for an after-event that happened earlier but arrives later (within the lateness)
                tm = st.timers[key] = Timers()
                heapq.heappush(st.heap, (ts + self.lateness_ms + 1, t.id, uid))
            bisect.insort(tm.unless, ts)
            st.added += 1
        for t, opens in self.after.get(ev.type, ()):
            if opens is not None and not self._holds(st, opens, en):
                continue
            key = (t.id, uid)
            tm = st.timers.get(key)
            if tm is None:
                tm = st.timers[key] = Timers()
            a = After(ts, ev.event_id, ev.ingest_ms, self._keep(t.id, en.features), ev.origin_id)
            bisect.insort(tm.afters, a)
            if tm.afters[0] is a:
                heapq.heappush(st.heap, (ts + self.within_ms[t.id], t.id, uid))
            st.added += 1
        return out

    def _keep(self, tid: str, feats: dict[str, Any]) -> dict[str, Any]:
        """What a pending event keeps of its features: those its trigger's payloads read, often none. A pending
        event can wait an hour (browse abandonment), so keeping every enriched feature would cost about a
        kilobyte per event held."""
        names = self.kept[tid]
        return {n: feats[n] for n in names if n in feats} if names else _NO_FEATURES

    @staticmethod
    def _holds(st: TriggerState, cond: Condition, en: Enriched) -> bool:
        profile = st.profiles.get(en.event.user_id) if cond.wants_user else None
        return cond.holds(en.event, en.features, en.scores, profile.attrs if profile else None)

    def _cross(self, st: TriggerState, out: list[Action | Decision], t: CrossingTrigger, en: Enriched) -> None:
        kind, name = t.source
        v = (en.features if kind == "features" else en.scores).get(name)
        if type(v) is not int and type(v) is not float:
            return
        key = (t.id, en.event.user_id)
        if key in st.above:
            if v < (t.reset_below if t.reset_below is not None else t.above):
                st.above.discard(key)
        elif v >= t.above:
            st.above.add(key)
            ev = en.event
            self._fire(st, out, t, ev.user_id, ev.event_id, ev.ts, ev.ingest_ms, en.features, en.scores, ev.origin_id)

    def _then(self, st: TriggerState, out: list[Action | Decision], t: SequenceTrigger, en: Enriched) -> None:
        """A ``then`` event: fires if a ``first`` is known in the window before it, else waits for a late one."""
        ev = en.event
        key = (t.id, ev.user_id)
        seq = st.sequences.get(key)
        if seq is None:
            seq = st.sequences[key] = Sequence()
        if _has_first(seq.firsts, ev.ts, self.within_ms[t.id]):
            self._fire(st, out, t, ev.user_id, ev.event_id, ev.ts, ev.ingest_ms, en.features, en.scores, ev.origin_id)
        else:
            b = After(ev.ts, ev.event_id, ev.ingest_ms, self._keep(t.id, en.features), ev.origin_id)
            bisect.insort(seq.waiting, b)
            heapq.heappush(st.sequence_heap, (ev.ts, t.id, ev.user_id))

    def _first(self, st: TriggerState, out: list[Action | Decision], t: SequenceTrigger, en: Enriched) -> None:
        """A ``first`` event: remembered for later ``then`` events, and completes any that were waiting for it."""
        ev = en.event
        within = self.within_ms[t.id]
        key = (t.id, ev.user_id)
        seq = st.sequences.get(key)
        if seq is None:
            seq = st.sequences[key] = Sequence()
        bisect.insort(seq.firsts, ev.ts)
        heapq.heappush(st.sequence_heap, (ev.ts + within, t.id, ev.user_id))
        done = [b for b in seq.waiting if ev.ts < b.ts <= ev.ts + within]
        for b in done:
            self._fire(st, out, t, ev.user_id, b.event_id, b.ts, b.ingest_ms, b.features, {}, b.origin_id)
        if done:
            seq.waiting = [b for b in seq.waiting if not ev.ts < b.ts <= ev.ts + within]

    def advance(self, st: TriggerState, watermark: int) -> list[Action | Decision]:
        """Fire what the watermark has made due (absence deadlines, dates, quiet hours that ended), and
        forget what can no longer matter."""
        out: list[Action | Decision] = []
        while st.held and st.held[0][0] <= watermark:
            release, _, a = heapq.heappop(st.held)
            self._guard(st, out, a, release)
            if a.user_id in st.departed and not any(h[2].user_id == a.user_id for h in st.held):
                del st.departed[a.user_id]
        if st.heap:
            self._advance_absence(st, out, watermark)
        if st.added > len(st.timers) + SWEEP_AFTER:
            self._sweep(st, watermark)
        if st.sequence_heap:
            self._advance_sequences(st, watermark)
        if st.date_heap:
            self._advance_dates(st, out, watermark)
        return out

    def _advance_absence(self, st: TriggerState, out: list[Action | Decision], watermark: int) -> None:
        heap = st.heap
        lateness = self.lateness_ms
        while heap and heap[0][0] <= watermark:
            due, tid, uid = heapq.heappop(heap)
            key = (tid, uid)
            tm = st.timers.get(key)
            if tm is None:
                continue
            t = self.triggers.get(tid)
            if not isinstance(t, AbsenceTrigger):  # removed by a reload
                del st.timers[key]
                continue
            within = self.within_ms[tid]
            if tm.afters and tm.afters[0].ts + within == due:
                fired, tm.afters = resolve_absence(tm.afters, tm.unless, within, watermark)
                for a in fired:
                    self._fire(st, out, t, uid, a.event_id, a.ts + within, a.ingest_ms, a.features, {}, a.origin_id)
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

    def _sweep(self, st: TriggerState, watermark: int) -> None:
        """Forget the ``after`` events the watermark has settled (:func:`drop_settled`) and the ``unless``
        times older than what is left, in every timer with an open episode. Run once as many times were
        added as there are timers (O(1) an event, amortised), so an open episode holds its first event
        and those of the lateness, not every event of its window. Timers of ``unless`` times alone are
        pruned by their own heap entries."""
        st.added = 0
        lateness = self.lateness_ms
        for (tid, uid), tm in st.timers.items():
            within = self.within_ms.get(tid)
            if within is None or not tm.afters:
                continue
            head = tm.afters[0]
            tm.afters = drop_settled(tm.afters, tm.unless, within, watermark)
            keep_from = min(tm.afters[0].ts if tm.afters else watermark, watermark - lateness)
            tm.unless = tm.unless[bisect.bisect_left(tm.unless, keep_from):]
            if tm.afters:
                if tm.afters[0] is not head:  # cancelled: the next episode's deadline gets an entry
                    heapq.heappush(st.heap, (tm.afters[0].ts + within, tid, uid))
            elif tm.unless:  # cancelled, nothing left open: its unless times are pruned as those of no episode
                heapq.heappush(st.heap, (tm.unless[0] + lateness + 1, tid, uid))

    def _advance_sequences(self, st: TriggerState, watermark: int) -> None:
        """Forget ``first`` times no later ``then`` can match and ``then`` events no late ``first`` can reach."""
        heap = st.sequence_heap
        while heap and heap[0][0] <= watermark:
            _, tid, uid = heapq.heappop(heap)
            key = (tid, uid)
            seq = st.sequences.get(key)
            if seq is None:
                continue
            within = self.within_ms.get(tid)
            if within is None:  # removed by a reload
                del st.sequences[key]
                continue
            seq.firsts = seq.firsts[bisect.bisect_left(seq.firsts, watermark - within):]
            seq.waiting = [b for b in seq.waiting if b.ts > watermark]
            if not seq.firsts and not seq.waiting:
                del st.sequences[key]

    def _advance_dates(self, st: TriggerState, out: list[Action | Decision], watermark: int) -> None:
        heap = st.date_heap
        while heap and heap[0][0] <= watermark:
            due, tid, uid = heapq.heappop(heap)
            key = (tid, uid)
            t = self.triggers.get(tid)
            scheduled = st.dates.get(key)
            if scheduled is None or scheduled[0] != due:
                continue  # stale: the attribute changed since
            del st.dates[key]
            if not isinstance(t, DateTrigger):
                continue
            self._fire(st, out, t, uid, f"{t.attribute}:{scheduled[1]}", due, due, {}, {}, "")
            if t.annual:
                self._schedule(st, t, uid, due)

    def _profile(self, st: TriggerState, ev: Event) -> None:
        """Consent and attributes from the user's own events, in the order the user sent them."""
        p = st.profiles.get(ev.user_id)
        if p is None:
            p = st.profiles[ev.user_id] = Profile()
        if ev.type == "consent":
            p.state(ev.props["channel"], ev.props["granted"], ev.ts)
        elif ev.type == "identify":
            p.attrs.update(ev.props)
            for attr in ev.props.keys() & self.dated.keys():
                for t in self.dated[attr]:
                    self._schedule(st, t, ev.user_id, ev.ts)

    def _schedule(self, st: TriggerState, t: DateTrigger, uid: str, after_ms: int) -> None:
        p = st.profiles.get(uid)
        nxt = next_date(p.attrs.get(t.attribute), t, (p.tz if p else None) or "UTC", after_ms) if p else None
        key = (t.id, uid)
        if nxt is None:
            st.dates.pop(key, None)
            return
        st.dates[key] = nxt
        heapq.heappush(st.date_heap, (nxt[0], t.id, uid))

    def watermark(self, st: TriggerState, now: int) -> int:
        return st.clock.watermark(self.lateness_ms, self.idle_ms, now)

    def release(self, st: TriggerState, uid: str) -> TriggerPart | None:
        """Remove everything this shard keeps about ``uid`` and return it (an identity merge moves ``uid`` into
        another user); None when the shard knows nothing of ``uid``. O(triggers + the user's state).

        Heap entries of ``uid`` stay behind and are skipped as stale when they come due. Held (quiet-hours)
        actions stay too: they are candidates already decided for ``uid``, and end their hold with the
        profile ``uid`` had (:attr:`TriggerState.departed`). Pending events remember ``uid`` as their origin.
        """
        ids = self.triggers
        timers = pop_user(st.timers, ids, uid)
        sequences = pop_user(st.sequences, ids, uid)
        dates = pop_user(st.dates, ids, uid)
        above = {tid for tid in ids if (tid, uid) in st.above}
        st.above.difference_update((tid, uid) for tid in above)
        profile = st.profiles.pop(uid, None)
        if not (timers or sequences or dates or above or profile):
            return None
        if profile is not None and any(h[2].user_id == uid for h in st.held):
            st.departed[uid] = profile
        for tm in timers.values():
            tm.afters = _stamped(tm.afters, uid)
        for seq in sequences.values():
            seq.waiting = _stamped(seq.waiting, uid)
        return TriggerPart(timers, sequences, above, profile, dates)

    def absorb(self, st: TriggerState, uid: str, part: TriggerPart) -> list[Action | Decision]:
        """Merge a released part into user ``uid`` of this shard; returns the firings it completes.

        Exact (as if every event had carried ``uid``), because the rules depend only on the *sets* of event
        times, never on which id or arrival order brought them: absence timers (``after`` and ``unless``
        times are merged and decided by :func:`resolve_absence` at the merged deadline) and sequences
        (``first`` times merged; a ``then`` of either id waiting for a ``first`` the other id had fires
        now). This holds as long as neither shard had already decided or forgotten an affected event
        when the merge arrived: an episode whose deadline passed, an ``unless`` time past ``ts + lateness``
        that no open episode of its own id still needed, a ``first`` past ``ts + within``, a waiting
        ``then`` past its own time (each as far as that shard's watermark goes). Rules: a crossing fired by either id stays fired (the merged shopper re-arms
        once the value falls below ``reset_below``, so one rise is not messaged twice); consent: per
        channel the newer statement (at equal times the refusal); attributes: ``uid``'s own values win,
        the released ones fill the gaps; a date schedule follows
        its attribute (the released schedule only where ``uid`` had no such attribute). Features that
        pending events kept are those of the id they carried. Triggers a reload removed meanwhile drop
        their part.
        """
        out: list[Action | Decision] = []
        for tid, tm in part.timers.items():
            if not isinstance(self.triggers.get(tid), AbsenceTrigger):
                continue
            mine = st.timers.setdefault((tid, uid), tm)
            if mine is not tm:
                mine.afters = list(heapq.merge(mine.afters, tm.afters))
                mine.unless = list(heapq.merge(mine.unless, tm.unless))
            if mine.afters:  # the merged head may be new: an entry at its deadline (an older one goes stale)
                heapq.heappush(st.heap, (mine.afters[0].ts + self.within_ms[tid], tid, uid))
            elif mine.unless:
                heapq.heappush(st.heap, (mine.unless[0] + self.lateness_ms + 1, tid, uid))
        for tid, seq in part.sequences.items():
            t = self.triggers.get(tid)
            if not isinstance(t, SequenceTrigger):
                continue
            within = self.within_ms[tid]
            mine_seq = st.sequences.setdefault((tid, uid), seq)
            if mine_seq is not seq:
                mine_seq.firsts = list(heapq.merge(mine_seq.firsts, seq.firsts))
                mine_seq.waiting = list(heapq.merge(mine_seq.waiting, seq.waiting))
            waiting = []
            for b in mine_seq.waiting:
                if _has_first(mine_seq.firsts, b.ts, within):
                    self._fire(st, out, t, uid, b.event_id, b.ts, b.ingest_ms, b.features, {}, b.origin_id)
                else:
                    waiting.append(b)
            mine_seq.waiting = waiting
            for f in seq.firsts:
                heapq.heappush(st.sequence_heap, (f + within, tid, uid))
            for b in seq.waiting:
                heapq.heappush(st.sequence_heap, (b.ts, tid, uid))
        st.above.update((tid, uid) for tid in part.above if tid in self.triggers)
        own = st.profiles.get(uid)
        for tid, due in part.dates.items():
            t = self.triggers.get(tid)
            if isinstance(t, DateTrigger) and (own is None or t.attribute not in own.attrs):
                st.dates[(tid, uid)] = due
                heapq.heappush(st.date_heap, (due[0], tid, uid))
        if part.profile is not None:
            if own is None:
                st.profiles[uid] = part.profile
            else:
                own.take_consent(part.profile)
                own.attrs = {**part.profile.attrs, **own.attrs}
        return out

    def _fire(
        self, st: TriggerState, out: list[Action | Decision], t: TriggerDef, user_id: str, occurrence: str,
        event_ts: int, ingest_ms: int, feats: dict[str, Any], scores: dict[str, float], origin_id: str,
    ) -> None:
        """A trigger fired: make its candidate action and put it through the in-state guards.

        ``origin_id``: the id the triggering event carried, when not ``user_id`` (see ``Event.origin_id``).
        """
        variant = variant_of(user_id, t)
        vname = variant.name if variant else ""
        template = self.templates[(t.id, vname)]
        aid = action_id(t.id, user_id, occurrence)
        decided = self.now_ms()
        channel = channel_of(t, feats)
        payload = template.payload
        if template.refs:
            p = st.profiles.get(user_id)
            payload = template.render({
                "user_id": user_id, "trigger": t.id, "variant": vname, "channel": channel, "action_id": aid,
                "event_ts": event_ts, "decided_ms": decided,
                **{f"features.{k}": v for k, v in feats.items()},
                **{f"score.{k}": v for k, v in scores.items()},
                **({f"user.{k}": v for k, v in p.attrs.items()} if p else {}),
            })
        a = Action(
            aid, t.id, user_id, channel, occurrence, event_ts, ingest_ms, decided, feats, payload, vname,
            dict(scores), t.priority, origin_id,
        )
        self._guard(st, out, a, event_ts)

    def _guard(self, st: TriggerState, out: list[Action | Decision], a: Action, at: int) -> None:
        if self.guards is None:
            out.append(a)
            return
        profile = st.profiles.get(a.user_id)
        if profile is None and st.departed:
            profile = st.departed.get(a.user_id)
        decided, hold_until = self.guards.check(a, profile, at)
        if hold_until is not None:
            heapq.heappush(st.held, (hold_until, a.action_id, a))
        out.append(decided if decided is not None else a)


_PROFILE_TYPES = frozenset({"consent", "identify"})
_NO_FEATURES: dict[str, Any] = {}  # shared by every pending event that keeps none: nothing writes to it
#: times added to a shard's timers, beyond one per timer, before a sweep (a small shard sweeps rarely)
SWEEP_AFTER = 1024


TriggerOut = Action | Decision | Merge | Consent
"""Candidates, decisions taken in state, merges passed on (the guards step moves counters there) and consent
statements (the guards step writes them to the Redis consent store)."""


def _open(st: TriggerState) -> bool:
    """Whether anything may still fire without a new event (timers, holds, dates, waiting sequences)."""
    return bool(st.heap or st.held or st.sequence_heap or st.date_heap)


class TriggerLogic(StatefulBatchLogic[Enriched | Merge, TriggerOut, bytes]):
    """Bytewax adapter: one shard's timers; wakes once a second while timers or holds are open.

    ``handoff``: where merged shoppers' timers travel between shards (:mod:`operators.merge`; None: the
    flow has no identity step and sends no merges). ``recover``: whether recovery is on (see ``FeatureLogic``).
    """

    def __init__(
        self, engine: TriggerEngine, resume: bytes | None, handoff: Handoff | None = None, recover: bool = True
    ):
        self.engine = engine
        self.recover = recover
        self.state, waiting = restore(resume, engine.new_state)
        self.desk = MergeDesk("triggers", handoff, waiting) if handoff is not None else None

    def on_batch(self, values: list[Enriched | Merge]) -> tuple[list[TriggerOut], bool]:
        eng, st, desk = self.engine, self.state, self.desk
        eng.refresh()
        now = eng.now_ms()
        on_event = eng.on_event
        out: list[TriggerOut] = []
        for en in values:
            if type(en) is Merge:
                assert desk is not None  # merges come only from the identity step, which gives a hand-over
                out.extend(desk.take(eng, st, en))
                if en.side != "absorb":  # after the shopper's candidates: the guards step moves its counters
                    out.append(en)
                continue
            fired = on_event(st, en, now)
            if fired:
                out.extend(fired)
        if desk is not None:
            out.extend(desk.settle(eng, st))
        if _open(st):
            out.extend(eng.advance(st, eng.watermark(st, now)))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[TriggerOut], bool]:
        eng = self.engine
        eng.refresh()
        out = self.desk.settle(eng, self.state) if self.desk is not None else []
        return out + eng.advance(self.state, eng.watermark(self.state, eng.now_ms())), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[TriggerOut], bool]:
        # the input is finished: nothing can still cancel a timer due by the newest event time it holds
        out = self.desk.finish(self.engine, self.state) if self.desk is not None else []
        at = max(self.state.clock.max_ts, self.engine.max_ts)
        return out + self.engine.advance(self.state, at), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        at = datetime.now(timezone.utc) + timedelta(seconds=IDLE_TICK_S) if _open(self.state) else None
        return self.desk.wake(at) if self.desk is not None else at

    def snapshot(self) -> bytes:
        return snapshot(self.state, self.desk) if self.recover else b""
