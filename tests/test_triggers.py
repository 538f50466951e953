"""Trigger engine: absence timers against a brute-force model, under out-of-order arrival and restarts."""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.events import IDLE, Event
from nudgeflow.settings import TriggersFile
from operators import triggers
from operators.features import Enriched
from operators.triggers import After, TriggerEngine, drop_settled, resolve_absence

W = 30 * 60_000
DAY = 86_400_000
LATENESS = 5 * 60_000

TRIGGERS = TriggersFile.model_validate({"triggers": [
    {"id": "cart", "kind": "absence", "after": ["add_to_cart"], "unless": ["order"], "within": "30m"},
    {"id": "rich", "kind": "event", "on": ["order"], "condition": "event.props.amount > 100.0 && features.n >= 2"},
]}).triggers


def brute_force(events: list[tuple[int, str, str]], within: int, watermark: int) -> list[str]:
    """The absence rule as a time-ordered state machine (no buffers, no heap): ids of fired episodes."""
    fired: list[str] = []
    open_: tuple[int, str] | None = None
    for ts, kind, eid in sorted(events, key=lambda e: (e[0], e[1] != "after")):
        if open_ is not None and open_[0] + within <= ts:
            if open_[0] + within > watermark:
                return fired  # this episode is undecided until the watermark reaches its deadline
            fired.append(open_[1])
            open_ = None
        if kind == "after" and open_ is None:
            open_ = (ts, eid)
        elif kind == "unless" and open_ is not None:
            open_ = None
    if open_ is not None and open_[0] + within <= watermark:
        fired.append(open_[1])
    return fired


times = st.lists(st.tuples(st.integers(0, 240), st.sampled_from(["after", "unless"])), max_size=30)


@settings(max_examples=400, deadline=None)
@given(times, st.integers(0, 300))
def test_resolve_absence_matches_brute_force(evs: list[tuple[int, str]], wm: int) -> None:
    events = [(ts * 60_000, kind, f"e{i}") for i, (ts, kind) in enumerate(evs)]
    afters = sorted(After(ts, eid, 0, {}) for ts, kind, eid in events if kind == "after")
    unless = sorted(ts for ts, kind, _ in events if kind == "unless")
    fired, left = resolve_absence(afters, unless, W, wm * 60_000)
    expected = brute_force(events, W, wm * 60_000)
    # ties in time between after-events make "which id opened the episode" ambiguous: compare times
    ts_of = {eid: ts for ts, _, eid in events}
    assert [ts_of[a.event_id] for a in fired] == [ts_of[e] for e in expected]
    assert all(a.ts + W > wm * 60_000 for a in left[:1])


@settings(max_examples=400, deadline=None)
@given(times, times, st.integers(0, 300))
def test_dropping_settled_afters_changes_no_firing(seen: list[tuple[int, str]], later: list[tuple[int, str]],
                                                   final_min: int) -> None:
    """Whatever arrives after the watermark reached ``final`` (nothing older than it), the episodes fire alike
    from everything or from what :func:`drop_settled` kept of what was seen before."""
    final = final_min * 60_000
    events = [(ts * 60_000, kind, f"s{i}") for i, (ts, kind) in enumerate(seen)]
    events += [(final + ts * 60_000, kind, f"l{i}") for i, (ts, kind) in enumerate(later)]
    ts_of = {eid: ts for ts, _, eid in events}
    afters = lambda evs: sorted(After(ts, eid, 0, {}) for ts, kind, eid in evs if kind == "after")  # noqa: E731
    unless = sorted(ts for ts, kind, _ in events if kind == "unless")
    kept = drop_settled(afters(events[:len(seen)]), sorted(ts for ts, k, _ in events[:len(seen)] if k == "unless"),
                        W, final)
    for wm in (final, final + 150 * 60_000, 10**9):
        everything = resolve_absence(afters(events), unless, W, wm)[0]
        pruned = resolve_absence(sorted(kept + afters(events[len(seen):])), unless, W, wm)[0]
        assert [ts_of[a.event_id] for a in pruned] == [ts_of[a.event_id] for a in everything]


def shuffle_within(stream: list[Event], lateness: int, rnd: random.Random) -> list[Event]:
    """Arrival order where no event arrives after one more than ``lateness`` newer than it."""
    return sorted(stream, key=lambda e: e.ts + rnd.uniform(0, lateness))


def run(engine: TriggerEngine, arrivals: list[Event], batch: int, restart_at: int | None = None) -> list[tuple[str, str, str]]:
    state = engine.new_state()
    out = []
    for i in range(0, len(arrivals), batch):
        if restart_at is not None and i >= restart_at:
            state = pickle.loads(pickle.dumps(state))  # what Bytewax recovery does with a snapshot
            restart_at = None
        now = 0
        for ev in arrivals[i:i + batch]:
            n = sum(1 for e in arrivals if e.user_id == ev.user_id and e.ts <= ev.ts)
            out += engine.on_event(state, Enriched(ev, {"n": n}), now)
        out += engine.advance(state, engine.watermark(state, now))
    out += engine.advance(state, state.clock.max_ts)  # end of input
    return sorted((a.trigger_id, a.user_id, a.occurrence) for a in out)


user_streams = st.lists(
    st.lists(st.tuples(st.integers(0, 300), st.sampled_from(["add_to_cart", "order", "browse"])), max_size=15),
    min_size=1, max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(user_streams, st.integers(0, 2**32), st.integers(1, 7), st.booleans(), st.booleans())
def test_absence_fires_as_the_model_says_whatever_the_arrival_order(
    per_user: list[list[tuple[int, str]]], seed: int, batch: int, restart: bool, sweep: bool
) -> None:
    rnd = random.Random(seed)
    stream: list[Event] = []
    for u, evs in enumerate(per_user):
        for i, (minute, etype) in enumerate(evs):
            stream.append(Event(f"u{u}-{i}", f"u{u}", etype, minute * 60_000 + u, position=f"t:{u % 2}:{i}"))
    engine = TriggerEngine(TRIGGERS, lateness_ms=LATENESS, idle_ms=10**12, now_ms=lambda: 0)
    # sweep: settled events are forgotten on every advance (a real shard sweeps after ~1,000 of them)
    with patch.object(triggers, "SWEEP_AFTER", -(10**9) if sweep else triggers.SWEEP_AFTER):
        got = run(engine, shuffle_within(stream, LATENESS, rnd), batch, restart_at=len(stream) // 2 if restart else None)
    # the same run in event-time order gives the same firings: arrival order does not matter
    assert got == run(engine, sorted(stream, key=lambda e: e.ts), batch)
    expected = []
    final = max(e.ts for e in stream) if stream else 0
    for u in range(len(per_user)):
        mine = [(e.ts, "after" if e.type == "add_to_cart" else "unless", e.event_id)
                for e in stream if e.user_id == f"u{u}" and e.type in ("add_to_cart", "order")]
        ts_of = {eid: ts for ts, _, eid in mine}
        fired = brute_force(mine, W, final)
        got_u = sorted(ts_of[occ] for trig, user, occ in got if trig == "cart" and user == f"u{u}")
        assert got_u == sorted(ts_of[e] for e in fired)
        expected += fired
    assert len([g for g in got if g[0] == "cart"]) == len(expected)


def test_late_partition_holds_timers_back() -> None:
    """A cart on partition 0 is not reminded while partition 1 lags behind the deadline."""
    engine = TriggerEngine(TRIGGERS, lateness_ms=0, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    engine.on_event(s, Enriched(Event("a", "u1", "add_to_cart", 0, position="t:0:0"), {}), 0)
    engine.on_event(s, Enriched(Event("b", "u2", "browse", 10 * 60_000, position="t:1:0"), {}), 0)
    engine.on_event(s, Enriched(Event("c", "u3", "browse", 60 * 60_000, position="t:0:1"), {}), 0)
    assert engine.advance(s, engine.watermark(s, 0)) == []  # partition 1 is only at 10 min
    engine.on_event(s, Enriched(Event("d", "u1", "order", 20 * 60_000, position="t:1:1"), {}), 0)
    engine.on_event(s, Enriched(Event("e", "u2", "browse", 61 * 60_000, position="t:1:2"), {}), 0)
    assert engine.advance(s, engine.watermark(s, 0)) == []  # the order on the lagging partition cancelled it


def test_idle_partitions_let_event_time_follow_the_wall_clock() -> None:
    clock = [0]
    engine = TriggerEngine(TRIGGERS, lateness_ms=LATENESS, idle_ms=10_000, now_ms=lambda: clock[0])
    s = engine.new_state()
    engine.on_event(s, Enriched(Event("a", "u1", "add_to_cart", 0, position="t:0:0"), {}), 0)
    assert engine.advance(s, engine.watermark(s, 0)) == []
    clock[0] = 10_000 + LATENESS + W  # silent long enough: 30 min + lateness past the cart add
    fired = engine.advance(s, engine.watermark(s, clock[0]))
    assert [(a.trigger_id, a.occurrence, a.event_ts) for a in fired] == [("cart", "a", W)]


def test_condition_trigger_reads_event_and_features() -> None:
    engine = TriggerEngine(TRIGGERS, lateness_ms=0, idle_ms=1, now_ms=lambda: 7)
    s = engine.new_state()
    order = lambda amount: Event("o", "u1", "order", 0, props={"amount": amount}, position="t:0:0")  # noqa: E731
    assert engine.on_event(s, Enriched(order(150.0), {"n": 1}), 0) == []
    assert engine.on_event(s, Enriched(order(50.0), {"n": 2}), 0) == []
    fired = engine.on_event(s, Enriched(order(150.0), {"n": 2}), 0)
    assert [(a.trigger_id, a.decided_ms) for a in fired] == [("rich", 7)]
    # a condition over a field the event lacks is false, not an error
    assert engine.on_event(s, Enriched(Event("p", "u1", "order", 0, position="t:0:1"), {"n": 5}), 0) == []


def test_state_is_bounded_after_resolution() -> None:
    engine = TriggerEngine(TRIGGERS, lateness_ms=LATENESS, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    for i in range(1000):
        etype = ("add_to_cart", "order", "browse")[i % 3]
        engine.on_event(s, Enriched(Event(f"e{i}", f"u{i % 50}", etype, i * 60_000, position="t:0:0"), {}), 0)
        engine.advance(s, engine.watermark(s, 0))
    engine.advance(s, s.clock.max_ts + LATENESS + W + 1)
    assert s.timers == {} and len(s.heap) <= 50


def two_hours_of_browse_abandonment(
    etype: Callable[[int], str], held: Callable[[Any], int]
) -> tuple[TriggerEngine, Any, list[int]]:
    """50 shoppers with an event every 10 s for 2 h (``etype`` of the step) under a 3 h browse abandonment:
    the engine, its state and, after each step, what ``held`` counts over the open timers."""
    tf = TriggersFile.model_validate({"triggers": [
        {"id": "browse", "kind": "absence", "after": ["browse"], "unless": ["order"], "within": "3h"},
    ]})
    engine = TriggerEngine(tf, lateness_ms=60_000, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    out = []
    for i in range(720):
        for u in range(50):
            engine.on_event(s, Enriched(Event(f"e{i}-{u}", f"u{u}", etype(i), i * 10_000, position="t:0:0"), {}), 0)
        engine.advance(s, engine.watermark(s, 0))
        out.append(sum(held(tm) for tm in s.timers.values()))
    return engine, s, out


def test_an_open_episode_holds_its_first_event_and_the_lateness_not_its_window() -> None:
    """Shoppers who only browse: without sweeps every browse (36,000) would wait; what is held stays near
    one sweep's worth, and each shopper still fires once."""
    engine, s, held = two_hours_of_browse_abandonment(lambda i: "browse", lambda tm: len(tm.afters))
    # a sweep's backlog (its threshold: SWEEP_AFTER and one time per timer, plus a batch), and per shopper
    # the first browse and the 7 of the last minute (the lateness: not settled yet)
    assert max(held) <= triggers.SWEEP_AFTER + 50 + 50 + 50 * (1 + 7)
    fired = engine.advance(s, 4 * 3_600_000)
    assert sorted(a.occurrence for a in fired) == sorted(f"e0-{u}" for u in range(50))


def test_a_cancelled_episode_does_not_keep_the_unless_times_that_follow() -> None:
    """A browse, then an order every 10 s: the first order cancels the episode, and the orders after it are
    kept for the lateness only, not until the 3 h deadline of the cancelled browse."""
    engine, s, held = two_hours_of_browse_abandonment(lambda i: "browse" if i == 0 else "order",
                                                      lambda tm: len(tm.unless))
    assert max(held) <= triggers.SWEEP_AFTER + 50 + 50 + 50 * 8  # as above: a sweep's backlog, the lateness
    assert engine.advance(s, 4 * 3_600_000) == []


SEQ = TriggersFile.model_validate({"triggers": [
    {"id": "seq", "kind": "sequence", "first": ["search"], "then": ["click"], "within": "10m"},
]}).triggers
SEQ_W = 10 * 60_000


def seq_brute_force(events: list[Event]) -> list[str]:
    """A ``then`` event fires when some ``first`` event lies in the ``within`` strictly before it."""
    firsts = [e.ts for e in events if e.type == "search"]
    return sorted(e.event_id for e in events if e.type == "click" and any(e.ts - SEQ_W <= a < e.ts for a in firsts))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 120), st.sampled_from(["search", "click", "browse"])), max_size=15),
             min_size=1, max_size=4),
    st.integers(0, 2**32), st.integers(1, 7), st.booleans(),
)
def test_sequence_fires_as_the_model_says_whatever_the_arrival_order(
    per_user: list[list[tuple[int, str]]], seed: int, batch: int, restart: bool
) -> None:
    rnd = random.Random(seed)
    stream = [
        Event(f"u{u}-{i}", f"u{u}", etype, minute * 60_000 + u, position=f"t:{u % 2}:{i}")
        for u, evs in enumerate(per_user) for i, (minute, etype) in enumerate(evs)
    ]
    engine = TriggerEngine(SEQ, lateness_ms=LATENESS, idle_ms=10**12, now_ms=lambda: 0)
    got = run(engine, shuffle_within(stream, LATENESS, rnd), batch, restart_at=len(stream) // 2 if restart else None)
    for u in range(len(per_user)):
        mine = [e for e in stream if e.user_id == f"u{u}"]
        assert sorted(occ for _, user, occ in got if user == f"u{u}") == seq_brute_force(mine)
    assert len(got) == len(set(got))  # each then-event at most once


def test_sequence_state_is_forgotten_once_nothing_can_match() -> None:
    engine = TriggerEngine(SEQ, lateness_ms=0, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    for i, etype in enumerate(["search", "click", "click", "search"]):
        engine.on_event(s, Enriched(Event(f"e{i}", "u1", etype, i * 60_000, position="t:0:0"), {}), 0)
    engine.advance(s, 60 * 60_000)
    assert s.sequences == {} and s.sequence_heap == []


CROSS = TriggersFile.model_validate({"triggers": [
    {"id": "risk", "kind": "crossing", "value": "score.churn", "above": 0.8, "reset_below": 0.6},
]}).triggers


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), max_size=40))
def test_crossing_fires_once_per_rise_with_hysteresis(values: list[float]) -> None:
    engine = TriggerEngine(CROSS, lateness_ms=0, idle_ms=1, now_ms=lambda: 0)
    s = engine.new_state()
    fired = []
    for i, v in enumerate(values):
        en = Enriched(Event(f"e{i}", "u1", "browse", i, position="t:0:0"), {}, scores={"churn": v})
        fired += [a.occurrence for a in engine.on_event(s, en, 0)]
    expected, armed = [], True
    for i, v in enumerate(values):
        if armed and v >= 0.8:
            expected.append(f"e{i}")
            armed = False
        elif not armed and v < 0.6:
            armed = True
    assert fired == expected


def test_a_look_at_a_quiet_shopper_fires_crossings_and_idle_triggers_and_moves_no_timer() -> None:
    """Win-back while the shopper is away: the churn score of a look crosses; ``on: [idle]`` fires on looks
    only; and a look (made from the feature step's watermark) never lets an absence timer fire early."""
    tf = TriggersFile.model_validate({"triggers": [
        *[t.model_dump() for t in CROSS], *[t.model_dump(by_alias=True) for t in TRIGGERS[:1]],
        {"id": "miss_you", "kind": "event", "on": [IDLE], "condition": "features.orders_30d >= 1"},
    ]}).triggers
    engine = TriggerEngine(tf, lateness_ms=0, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    engine.on_event(s, Enriched(Event("a", "u1", "add_to_cart", 0, position="t:0:0"), {}, scores={"churn": 0.1}), 0)
    look = Event(f"{IDLE}:u2:{DAY}", "u2", IDLE, DAY, props={"idle_s": 86400, "look": 1})
    fired = engine.on_event(s, Enriched(look, {"orders_30d": 2}, scores={"churn": 0.9}), 0)
    assert sorted((a.trigger_id, a.occurrence) for a in fired) == [("miss_you", look.event_id), ("risk", look.event_id)]
    assert s.clock.max_ts == 0 and engine.advance(s, engine.watermark(s, 0)) == []  # the cart's 30 min: not yet


def test_date_trigger_fires_in_the_users_zone_yearly_and_follows_a_changed_attribute() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    tf = TriggersFile.model_validate({"triggers": [
        {"id": "bday", "kind": "date", "attribute": "birthday", "annual": True, "offset": "-3d", "at": "10:00",
         "payload": {"coupon": "BDAY", "tier": "${user.tier}"}},
    ]})
    engine = TriggerEngine(tf, lateness_ms=0, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    tokyo = ZoneInfo("Asia/Tokyo")
    ms = lambda *a: int(datetime(*a, tzinfo=tokyo).timestamp() * 1000)  # noqa: E731
    props = {"birthday": "1990-06-15", "timezone": "Asia/Tokyo", "tier": "gold"}
    engine.on_event(s, Enriched(Event("i1", "u1", "identify", ms(2026, 1, 5), props=props, position="t:0:0"), {}), 0)
    assert engine.advance(s, ms(2026, 6, 12, 9, 59)) == []
    [a] = engine.advance(s, ms(2026, 6, 12, 10, 0))
    assert (a.occurrence, a.event_ts, a.payload) == ("birthday:2026-06-15", ms(2026, 6, 12, 10), {"coupon": "BDAY", "tier": "gold"})
    # the next one is a year later; a new birthday replaces it
    engine.on_event(s, Enriched(Event("i2", "u1", "identify", ms(2026, 7, 1), props={"birthday": "1990-09-01"},
                                      position="t:0:1"), {}), 0)
    fired = engine.advance(s, ms(2027, 12, 31))
    assert [f.occurrence for f in fired] == ["birthday:2026-09-01", "birthday:2027-09-01"]


def test_absence_condition_chooses_which_events_open_an_episode() -> None:
    tf = TriggersFile.model_validate({"triggers": [
        {"id": "browse", "kind": "absence", "after": ["browse"], "unless": ["add_to_cart"], "within": "1h",
         "condition": "score.buy > 0.6"},
    ]})
    engine = TriggerEngine(tf, lateness_ms=0, idle_ms=10**12, now_ms=lambda: 0)
    s = engine.new_state()
    for i, (uid, p) in enumerate([("u1", 0.9), ("u2", 0.3)]):
        engine.on_event(s, Enriched(Event(f"b{i}", uid, "browse", 0, position="t:0:0"), {}, scores={"buy": p}), 0)
    assert [(a.user_id, a.occurrence) for a in engine.advance(s, 2 * 3_600_000)] == [("u1", "b0")]


def test_condition_reads_user_attributes_from_identify() -> None:
    tf = TriggersFile.model_validate({"triggers": [
        {"id": "gold", "kind": "event", "on": ["browse"], "condition": 'user.tier == "gold"'},
    ]})
    engine = TriggerEngine(tf, lateness_ms=0, idle_ms=1, now_ms=lambda: 0)
    s = engine.new_state()
    browse = lambda i: Enriched(Event(f"b{i}", "u1", "browse", i, position="t:0:0"), {})  # noqa: E731
    assert engine.on_event(s, browse(0), 0) == []  # nothing known yet: the condition is false
    engine.on_event(s, Enriched(Event("i", "u1", "identify", 1, props={"tier": "gold"}, position="t:0:0"), {}), 0)
    assert [a.trigger_id for a in engine.on_event(s, browse(2), 0)] == ["gold"]


CONDITIONS = [
    "features.views_1h >= 5 && score.purchase_propensity > 0.7 && features.orders_30d == 0",
    "score.purchase_propensity > 0.6",
    "!(features.views_1h == 15)",  # a missing value is an error, not null
    "features.views_1h == 15 || score.churn > 0.5",  # an error on one side, true on the other: true
    "features.affinity.shoes > 1.0",
    'event.props.note == "features.views_1h" && features.views_1h > 1  // features.orders_30d',
    "size(features.tags) > 1 && features.views_1h < 3",
    "has(features.views_1h) && features.views_1h > 2",  # stays on the maps
]
VALUES = st.one_of(st.integers(-3, 20), st.floats(-1, 20, allow_nan=False), st.text(max_size=2),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.sampled_from(["shoes", "bags"]), st.floats(0, 3)))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CONDITIONS), st.dictionaries(st.sampled_from(["views_1h", "orders_30d", "affinity", "tags"]), VALUES),
       st.dictionaries(st.sampled_from(["purchase_propensity", "churn"]), st.floats(0, 1)), st.text(max_size=20))
def test_a_flattened_condition_decides_as_the_maps_do(source: str, feats: dict[str, Any], scores: dict[str, float],
                                                      note: str) -> None:
    """Conditions bind each feature and score they read as a variable of its own (cheaper for CEL than a
    map); whatever the values, and whether they are there or not, the outcome is the map's."""
    flat, maps = triggers.Condition(source), triggers.Condition(source)
    maps.flat = None
    assert (flat.flat is None) == source.startswith("has(")
    ev = Event("e", "u", "browse", 0, props={"note": note})
    assert flat.holds(ev, feats, scores) == maps.holds(ev, feats, scores)


def test_a_reload_drops_the_timers_of_removed_triggers_and_enables_a_disabled_one(tmp_path: Path) -> None:
    """Hot reload, in the engine: a disabled trigger never fires until an edit enables it; an absence trigger
    the edit removes never fires its pending timer, nor keeps it, while one that stays fires on time; a removed
    sequence trigger's waiting event is forgotten."""
    from nudgeflow.configload import TriggerSource, load_triggers
    from nudgeflow.settings import EventsConfig

    body = """
triggers:
  - {{id: ping, kind: event, on: [browse], enabled: {enabled}}}
  - {{id: cart, kind: absence, after: [add_to_cart], unless: [order], within: 30m}}
{rest}"""
    removed = """  - {id: look, kind: absence, after: [browse], unless: [add_to_cart], within: 30m}
  - {id: seq, kind: sequence, first: [favourite], then: [add_to_cart], within: 1d}
"""
    path = tmp_path / "triggers.yaml"
    path.write_text(body.format(enabled="false", rest=removed))
    check = lambda p: load_triggers(p, EventsConfig())  # noqa: E731
    src = TriggerSource(path, check(path), check, every=0)
    engine = TriggerEngine(src.current, lateness_ms=LATENESS, idle_ms=10**12, now_ms=lambda: 0, source=src)
    s = engine.new_state()

    def feed(eid: str, uid: str, etype: str, ts: int) -> list[str]:
        ev = Event(eid, uid, etype, ts, position=f"t:0:{eid}")
        return [a.trigger_id for a in engine.on_event(s, Enriched(ev, {}), 0) if type(a) is triggers.Action]

    assert feed("b1", "u1", "browse", 0) == []  # disabled: no action, and the look timer opens
    assert feed("c1", "u2", "add_to_cart", 0) == []  # the cart timer opens; seq waits for a late favourite
    assert set(s.sequences) == {("seq", "u2")} and {k[0] for k in s.timers} == {"look", "cart"}
    path.write_text(body.format(enabled="true", rest=""))
    engine.refresh()
    assert feed("b2", "u3", "browse", 60_000) == ["ping"]
    fired = [a.trigger_id for a in engine.advance(s, W + LATENESS + 60_000) if type(a) is triggers.Action]
    assert fired == ["cart"] and not s.timers and not s.sequences
