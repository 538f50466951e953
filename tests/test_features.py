"""Feature engine: every window feature against brute force under out-of-order input; the other kinds by example."""

from __future__ import annotations

import copyreg
import io
import pickle
import random
import threading
from pathlib import Path

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.configload import load_features
from nudgeflow.events import FEEDBACK_TYPES, IDLE, DeadLetter, Event
from nudgeflow.settings import EventsConfig, FeatureDefs, FeaturesConfig
from operators.features import (EVICT_EVERY, MAX_VALUE, SCALE, Enriched, FeatureEngine, FeatureLogic, FeaturePlan, Frozen, ShardState,
                                UserFeatures, UserState, ZSTD_MAGIC, _codec, window_label)
from operators.windows import PackedWindow, delta, unpack

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
LATENESS = 5 * MIN
CONFIG = Path(__file__).parents[1] / "config" / "features.yaml"

DEFS = FeatureDefs.model_validate({
    "buckets_per_window": 120,
    "counts": [
        {"name": "events", "types": "any", "windows": ["5m", "1h", "24h", "7d"]},
        {"name": "views", "types": ["browse"], "windows": ["1h", "24h"]},
        {"name": "orders", "types": ["order"], "windows": ["24h", "7d"]},
    ],
    "sums": [{"name": "revenue", "types": ["order"], "field": "amount", "windows": ["1h", "7d"], "average": "aov"}],
    "distinct": [{"name": "cats", "types": ["browse"], "field": "category", "windows": ["1h", "24h"]}],
    "recency": {"event": "any", "order": ["order"]},
})
WINDOW_FEATURES = {  # name -> (window ms, predicate on an event, value of an event)
    **{f"events_{window_label(w / 1000)}": (w, lambda e: True, lambda e: 1) for w in (5 * MIN, HOUR, DAY, 7 * DAY)},
    **{f"views_{window_label(w / 1000)}": (w, lambda e: e.type == "browse", lambda e: 1) for w in (HOUR, DAY)},
    **{f"orders_{window_label(w / 1000)}": (w, lambda e: e.type == "order", lambda e: 1) for w in (DAY, 7 * DAY)},
    **{f"revenue_{window_label(w / 1000)}": (w, lambda e: e.type == "order", lambda e: e.props["amount"]) for w in (HOUR, 7 * DAY)},
}


def bucketed(events: list[Event], at: int, window: int, pred, value) -> float:
    """The window as the buckets define it: bucket-aligned at the old edge."""
    b = window // 120
    return sum(value(e) for e in events if pred(e) and at // b - 120 <= e.ts // b <= at // b)


BOUND = int(MAX_VALUE * SCALE)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4 * HOUR), st.integers(-BOUND, BOUND)), max_size=60), st.integers(0, 5 * HOUR))
def test_packed_window_is_exact_to_one_bucket_and_slots_never_carry(adds: list[tuple[int, int]], at: int) -> None:
    """Evaluated, as the engine does, at the newest event time seen (nothing later is in it).

    Slot 1 takes signed values as large as sums allow; slots 0 and 2 count: a carry or borrow
    between slots would show in all three.
    """
    adds = [(ts, v) for ts, v in adds if ts <= at]
    w = PackedWindow(HOUR, 30_000)
    for ts, v in adds:
        w.add(ts, delta({0: 1, 1: v, 2: 1}))
    count, total, again = unpack(w.total(at), 3)
    kept = [(ts, v) for ts, v in adds if at // 30_000 - 120 <= ts // 30_000 <= at // 30_000]
    assert (count, total, again) == (len(kept), sum(v for _, v in kept), len(kept))
    # the stated error bound: between the exact window and the window one bucket longer
    exact = sum(1 for ts, _ in adds if at - HOUR < ts <= at)
    wider = sum(1 for ts, _ in adds if at - HOUR - 30_000 < ts <= at)
    assert exact <= count <= wider


event_lists = st.lists(  # feedback on our messages (delivered, opened) is no shopping: it must change nothing
    st.tuples(st.integers(0, 2), st.integers(0, 9 * DAY), st.sampled_from(["browse", "order", "search", "delivered", "opened"]),
              st.integers(1, 400), st.sampled_from(["shoes", "bags", "toys", "tv"])),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(event_lists, st.integers(0, 2**32))
def test_window_features_equal_brute_force_under_out_of_order_arrival(evs: list, seed: int) -> None:
    rnd = random.Random(seed)
    events = [
        Event(f"e{i}", f"u{u}", t, ts, props={"amount": float(a), "category": c}) for i, (u, ts, t, a, c) in enumerate(evs)
    ]
    arrivals = sorted(events, key=lambda e: e.ts + rnd.uniform(0, LATENESS))  # disorder within the lateness
    eng = FeatureEngine(DEFS, FeaturesConfig(allowed_lateness=LATENESS / 1000), EventsConfig())
    state = eng.new_state()
    seen: list[Event] = []
    for ev in arrivals:
        out = eng.apply(state, ev)
        assert isinstance(out, Enriched), out  # nothing is too late when disorder stays within the lateness
        seen.append(ev)
        mine = [e for e in seen if e.user_id == ev.user_id and e.type not in FEEDBACK_TYPES]
        f = out.features
        if not mine:  # feedback for a shopper not seen shopping: blank features, and no state kept
            assert f["events_7d"] == 0 and f["last_event_ts"] == -1 and ev.user_id not in state.users
            continue
        at = max(e.ts for e in mine)
        for name, (window, pred, value) in WINDOW_FEATURES.items():
            assert abs(f[name] - bucketed(mine, at, window, pred, value)) < 1e-6, name
        orders_7d = bucketed(mine, at, 7 * DAY, lambda e: e.type == "order", lambda e: 1)
        assert abs(f["aov_7d"] - (round(f["revenue_7d"] / orders_7d, 2) if orders_7d else 0.0)) < 0.011
        for name, window in (("cats_1h", HOUR), ("cats_24h", DAY)):
            assert f[name] == len({e.props["category"] for e in mine if e.type == "browse" and at - window < e.ts <= at})
        assert f["last_event_ts"] == at and f["first_seen_ts"] == min(e.ts for e in mine)
        orders = sorted(e.ts for e in mine if e.type == "order")
        assert f["last_order_ts"] == (orders[-1] if orders else -1)


IDLE_SPANS = (HOUR, 6 * HOUR)
LOOK_DEFS = DEFS.model_copy(update={"idle": [s / 1000 for s in IDLE_SPANS]})


@settings(max_examples=150, deadline=None)
@given(event_lists, st.integers(0, 2**32), st.integers(0, 60))
def test_looks_at_quiet_shoppers_are_exact_and_taken_once_across_a_restart(evs: list, seed: int, cut: int) -> None:
    """Every quiet spell of each span gets exactly one look, at its moment, with the features brute force
    gives as of then, under disorder within the lateness, compaction, and a snapshot restored mid-stream."""
    rnd = random.Random(seed)
    events = [
        Event(f"e{i}", f"u{u}", t, ts, props={"amount": float(a), "category": c}) for i, (u, ts, t, a, c) in enumerate(evs)
    ]
    arrivals = sorted(events, key=lambda e: e.ts + rnd.uniform(0, LATENESS))
    eng = FeatureEngine(LOOK_DEFS, FeaturesConfig(allowed_lateness=LATENESS / 1000, compact_after=1800),
                        EventsConfig(), needed=list(WINDOW_FEATURES) + ["since_last_event_s", "last_event_ts"])
    state = eng.new_state()
    looks: list[Enriched] = []
    for i, ev in enumerate(arrivals):
        if i == cut:  # a restart from a snapshot: the looks taken so far are not taken again
            state = pickle.loads(pickle.dumps(state))
        batch = eng.apply_batch(state, [ev])
        assert isinstance(batch[-1], Enriched) and batch[-1].event is ev  # a look taken as they came back: before
        looks += batch[:-1]
        looks += [x for x in eng.flush(state) if isinstance(x, Enriched)]
    looks += eng.look(state, final=True)
    assert all(x.event.type == IDLE for x in looks)
    shopping = [e for e in events if e.type not in FEEDBACK_TYPES]  # our messages end no quiet spell
    until = max(e.ts for e in events) - LATENESS
    required, allowed = set(), set()  # quiet past the look's moment plus the lateness / past the moment
    for uid in {e.user_id for e in shopping}:
        times = sorted({e.ts for e in shopping if e.user_id == uid})
        for last, nxt in zip(times, times[1:] + [1 << 62]):
            allowed |= {(uid, last + span) for span in IDLE_SPANS if last + span < nxt and last + span <= until}
            required |= {(uid, last + span) for span in IDLE_SPANS if last + span + LATENESS < nxt and last + span <= until}
    got = [(x.event.user_id, x.event.ts) for x in looks]
    assert required <= set(got) <= allowed and len(set(got)) == len(got)
    for x in looks:
        at, mine = x.event.ts, [e for e in shopping if e.user_id == x.event.user_id and e.ts <= x.event.ts]
        last = max(e.ts for e in mine)
        assert x.features["last_event_ts"] == last and x.features["since_last_event_s"] == (at - last) // 1000
        assert x.event.props == {"idle_s": (at - last) // 1000, "look": IDLE_SPANS.index(at - last) + 1}
        for name, (window, pred, value) in WINDOW_FEATURES.items():
            assert abs(x.features[name] - bucketed(mine, at, window, pred, value)) < 1e-6, name


def test_a_look_leaves_the_state_as_its_events_made_it_and_a_new_event_starts_a_new_spell() -> None:
    eng = FeatureEngine(LOOK_DEFS, FeaturesConfig(allowed_lateness=0), EventsConfig(), needed=["since_last_event_s"])
    s = eng.new_state()
    eng.apply_batch(s, [Event("a", "u1", "browse", 0)])
    before = pickle.dumps(eng.plan.values(s.users["u1"], 0))
    eng.apply_batch(s, [Event("b", "u2", "browse", 2 * HOUR)])
    (look,) = [x for x in eng.flush(s) if isinstance(x, Enriched)]
    assert (look.event.event_id, look.event.ts, look.features) == (f"{IDLE}:u1:{HOUR}", HOUR, {"since_last_event_s": 3600})
    user = s.users["u1"]
    user = user.thaw(s.zdict) if isinstance(user, Frozen) else user
    assert pickle.dumps(eng.plan.values(user, 0)) == before and user.looks == 1
    assert eng.look(s) == []  # taken once
    eng.apply_batch(s, [Event("c", "u1", "browse", 2 * HOUR + MIN)])  # back: the next spell gets its own looks
    back = eng.apply_batch(s, [Event("d", "u2", "browse", 9 * HOUR)])  # u2 back: its spell's looks, just before
    assert [x.event.event_id for x in back] == [f"{IDLE}:u2:{3 * HOUR}", f"{IDLE}:u2:{8 * HOUR}", "d"]
    assert sorted(x.event.event_id for x in back[:2] + eng.look(s)) == [
        f"{IDLE}:u1:{3 * HOUR + MIN}", f"{IDLE}:u1:{8 * HOUR + MIN}", f"{IDLE}:u2:{3 * HOUR}", f"{IDLE}:u2:{8 * HOUR}"]
    assert s.looked == 5  # nudgeflow_idle_looks


def test_a_lagging_partition_holds_the_looks_at_its_shoppers_back() -> None:
    """Catching up after a restart, partition 1 is a day behind partition 0: its shopper's look waits for it
    (their events of that day are still to be read); once partition 1 is read past the moment, it comes."""
    eng = FeatureEngine(LOOK_DEFS, FeaturesConfig(allowed_lateness=0), EventsConfig(), needed=["since_last_event_s"])
    s = eng.new_state()
    eng.apply_batch(s, [Event("a", "u1", "browse", 0, position="t:1:0"), Event("b", "u2", "browse", 0, position="t:0:0")])
    eng.apply_batch(s, [Event("c", "u2", "browse", DAY, position="t:0:1")])  # partition 0 a day on
    assert eng.look(s) == []  # partition 1 still at 0: u1 may have shopped since
    eng.apply_batch(s, [Event("d", "u3", "browse", 2 * HOUR, position="t:1:1")])  # partition 1 read to 2 h
    assert [x.event.event_id for x in eng.look(s)] == [f"{IDLE}:u1:{HOUR}"]


def test_a_shopper_from_a_snapshot_before_looks_loads_with_none_taken() -> None:
    eng = FeatureEngine(LOOK_DEFS, FeaturesConfig(allowed_lateness=0), EventsConfig(), needed=["views_1h"])
    s = eng.new_state()
    eng.apply(s, Event("a", "u1", "browse", 0))
    user = s.users["u1"]
    user.looks = 2
    old = UserState.__new__(UserState)
    old.__setstate__(tuple(getattr(user, k) for k in UserState.__slots__)[:-1])  # the slots a snapshot of then holds
    assert old.looks == 0 and old.last_ts == 0
    frozen = Frozen(user, None)
    older = Frozen.__new__(Frozen)
    older.__setstate__((None, {"last_ts": frozen.last_ts, "blob": frozen.blob}))  # a compacted shopper of then
    assert (older.looks, older.thaw(None).looks, pickle.loads(pickle.dumps(frozen)).thaw(None).looks) == (0, 0, 2)


def test_refusals_keep_the_original_bytes() -> None:
    eng = FeatureEngine(DEFS, FeaturesConfig(), EventsConfig())
    s = eng.new_state()
    assert isinstance(eng.apply(s, Event("a", "u1", "browse", 10 * MIN, raw=b"A")), Enriched)
    late = eng.apply(s, Event("b", "u1", "browse", 10 * MIN - LATENESS - 1, raw=b"B", position="t:0:9"))
    assert isinstance(late, DeadLetter) and (late.reason, late.raw, late.position) == ("too_late", b"B", "t:0:9")
    edge = eng.apply(s, Event("c", "u1", "browse", 10 * MIN - LATENESS, raw=b"C"))
    assert isinstance(edge, Enriched) and edge.features["views_1h"] == 2
    dup = eng.apply(s, Event("a", "u1", "browse", 11 * MIN, raw=b"A2"))
    assert isinstance(dup, DeadLetter) and (dup.reason, dup.raw) == ("duplicate", b"A2")
    assert isinstance(eng.apply(s, Event("d", "u2", "browse", 0)), Enriched)  # lateness is per user


def test_feedback_on_our_messages_changes_no_feature() -> None:
    """A win-back message delivered, opened and clicked must not make a lapsed shopper look active."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(), EventsConfig())
    s = eng.new_state()
    eng.apply(s, Event("b", "u", "browse", 0, props={"item_id": "i1", "category": "shoes"}))
    before = eng.apply(s, Event("o", "u", "order", 5 * MIN, props={"amount": 20.0, "item_count": 1}))
    state = pickle.dumps(s.users["u"])
    for i, kind in enumerate(("delivered", "opened", "clicked", "unsubscribed")):
        fb = eng.apply(s, Event(f"f{i}", "u", kind, 45 * DAY + i * MIN, platform="app", props={"action_id": "a1"}))
        assert isinstance(fb, Enriched) and fb.features == before.features
    assert pickle.dumps(s.users["u"]) == state
    assert before.features["lifecycle_stage"] == "active" and before.features["events_30d"] == 2
    back = eng.apply(s, Event("b2", "u", "browse", 46 * DAY, props={"item_id": "i2", "category": "bags"})).features
    assert back["since_last_event_s"] == (46 * DAY - 5 * MIN) // 1000 and back["lifecycle_stage"] == "dormant"
    assert isinstance(eng.apply(s, Event("f0", "u", "opened", 46 * DAY)), DeadLetter)  # duplicates still refused

def shopper(defs: FeatureDefs) -> tuple[FeatureEngine, list[Enriched]]:
    """A scripted shopper through the repo's own features.yaml."""
    eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig())
    s = eng.new_state()
    t = 100 * DAY
    script = [
        Event("1", "u", "browse", t, props={"item_id": "i1", "category": "shoes", "price": 50.0}),
        Event("2", "u", "browse", t + MIN, props={"item_id": "i2", "category": "shoes", "price": 30.0}),
        Event("3", "u", "add_to_cart", t + 2 * MIN, props={"item_id": "i1", "category": "shoes", "price": 50.0, "quantity": 2}),
        Event("4", "u", "add_to_cart", t + 3 * MIN, props={"item_id": "i3", "category": "bags", "price": 20.0, "quantity": 1}),
        Event("5", "u", "remove_from_cart", t + 4 * MIN, props={"item_id": "i1", "quantity": 1}),
        Event("6", "u", "order", t + 5 * MIN, props={"amount": 70.0, "item_count": 2, "items": [
            {"item_id": "i1", "quantity": 1, "price": 50.0}, {"item_id": "i3", "quantity": 1, "price": 20.0}]}),
        Event("7", "u", "browse", t + 2 * HOUR, props={"item_id": "i4", "category": "toys", "price": 10.0}),
        Event("8", "u", "order", t + 40 * DAY, props={"amount": 500.0, "item_count": 1}),
    ]
    return eng, [eng.apply(s, e) for e in script]


def test_session_cart_recency_rfm_lifecycle_affinity_by_example() -> None:
    eng, out = shopper(load_features(CONFIG, EventsConfig()))
    f = [o.features for o in out]
    # sessions: a 30 min gap closes one (events carry no session id here)
    assert (f[5]["session_events"], f[5]["session_pages"], f[5]["session_duration_s"]) == (6, 2, 300)
    assert (f[6]["session_events"], f[6]["sessions_7d"]) == (1, 2)
    # cart: add 2 × i1, add i3, remove one i1, the order buys the rest
    assert (f[3]["cart_items"], f[3]["cart_quantity"], f[3]["cart_value"]) == (2, 3, 120.0)
    assert (f[4]["cart_quantity"], f[4]["cart_value"]) == (2, 70.0)
    assert (f[5]["cart_items"], f[5]["cart_value"]) == (0, 0.0)
    # recency: seconds from the previous such event
    assert f[1]["since_last_event_s"] == 60 and f[0]["since_last_event_s"] == -1
    assert f[6]["since_last_order_s"] == (2 * HOUR - 5 * MIN) // 1000
    assert f[7]["since_last_order_s"] == (40 * DAY - 5 * MIN) // 1000
    # RFM over 90 days: two orders worth 570, the last one now
    assert (f[7]["rfm_frequency"], f[7]["rfm_monetary"], f[7]["rfm_r"], f[7]["rfm_f"], f[7]["rfm_m"]) == (2, 570.0, 5, 3, 4)
    assert f[7]["rfm_segment"] == "534" and f[7]["repeat_buyer"] is True and f[5]["repeat_buyer"] is False
    # lifecycle: new until the first order, then by the gap before each event
    assert f[0]["lifecycle_stage"] == "new" and f[5]["lifecycle_stage"] == "active"
    assert f[7]["lifecycle_stage"] == "dormant"  # 40 days of silence before this order
    # affinity: shoes (two views and a cart add) lead, decayed by time
    assert f[3]["top_categories"] == ["shoes", "bags"]
    assert f[6]["top_categories"][0] == "shoes" and set(f[6]["category_affinity"]) == set(f[6]["top_categories"])


@pytest.mark.parametrize("windows", [["1h"], ["1h", "400d"]])
def test_a_shopper_back_after_every_stage_is_churned_until_forgotten(windows: list[str]) -> None:
    """The lifecycle stage comes from the gap before the event, whatever the feature windows: a shopper is held
    ``lifecycle.remember`` past their last event even when every window is shorter (else a 40-day gap would
    read as a new shopper, and nobody would ever be churned); one back later is new again, unless a longer
    window keeps them."""
    defs = FeatureDefs.model_validate({
        "counts": [{"name": "events", "types": "any", "windows": windows}], "recency": {},
        "lifecycle": {}, "rfm": None, "session": None, "affinity": None, "distinct": [],
    })
    eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig(), needed=["lifecycle_stage", "user_age_s"])
    s = eng.new_state()
    stages, t = [], 0
    for i, gap in enumerate([0, 20, 40, 100, 300]):  # days of silence before each visit
        t += gap * DAY
        en = eng.apply(s, Event(f"e{i}", "u", "browse", t))
        assert isinstance(en, Enriched)
        stages.append((en.features["lifecycle_stage"], en.features["user_age_s"] // 86400))
    last = ("churned", 460) if "400d" in windows else ("new", 0)  # 300 days: forgotten after the default 180
    assert stages == [("new", 0), ("at_risk", 20), ("dormant", 60), ("churned", 160), last]


def test_flush_publishes_each_changed_user_once_with_every_feature() -> None:
    defs = load_features(CONFIG, EventsConfig()).model_copy(update={"idle": []})  # publication alone, no looks
    eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig(), needed=["views_1h"])
    s = eng.new_state()
    for i in range(10):
        out = eng.apply(s, Event(f"e{i}", f"u{i % 3}", "browse", i * MIN))
        assert set(out.features) == {"views_1h"}  # per event: only what downstream reads
    published = eng.flush(s)
    assert sorted(p.user_id for p in published) == ["u0", "u1", "u2"]
    assert all(set(p.features) == set(eng.names) for p in published)
    assert {p.user_id: p.ts for p in published} == {"u0": 9 * MIN, "u1": 7 * MIN, "u2": 8 * MIN}
    assert eng.flush(s) == []
    # every feature read alone (its windows unpacked only as far as it needs) is what reading all gives
    _, shopped = shopper(eng.plan.defs)
    st2 = eng.new_state()
    for o in shopped:
        eng.apply(st2, o.event)
    user = st2.users["u"]
    at = user.last_ts
    assert eng.plan.values(user, at) == {n: eng.plan.reader([n])(user, at)[n] for n in eng.plan.getters}


def test_idle_users_and_old_ids_are_evicted() -> None:
    defs = FeatureDefs.model_validate({"counts": [{"name": "views", "types": "any", "windows": ["1h"]}],
                                       "session": None, "rfm": None, "lifecycle": None, "affinity": None})
    eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig(dedup_window=600))
    s = eng.new_state()
    n = EVICT_EVERY * 2
    for i in range(n):  # one event per user, a second apart: old users fall out of every window
        eng.apply(s, Event(f"e{i}", f"u{i}", "browse", i * 1000))
    assert eng.idle_ms == HOUR + LATENESS
    assert len(s.users) <= (eng.idle_ms // 1000) + EVICT_EVERY and len(s.dedup.ids) < n


def test_distinct_values_past_the_longest_window_are_forgotten_and_counts_stay_exact() -> None:
    defs = FeatureDefs.model_validate({
        "distinct": [{"name": "items", "types": ["browse"], "field": "item_id", "windows": ["1m", "10m"],
                      "max_values": 100_000}],
        "session": None, "rfm": None, "lifecycle": None, "affinity": None,
    })
    eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig())
    s = eng.new_state()
    n = EVICT_EVERY * 3
    for i in range(n):  # a busy shopper: a new item every second
        en = eng.apply(s, Event(f"e{i}", "u", "browse", i * 1000, props={"item_id": f"i{i}"}))
    assert len(s.users["u"].distinct[0]) <= 600 + EVICT_EVERY  # the last 10 minutes, and what came since the sweep
    assert isinstance(en, Enriched) and (en.features["items_1m"], en.features["items_10m"]) == (60, 600)


def test_a_distinct_count_keeps_at_most_max_values_the_newest_ones() -> None:
    """``max_values`` bounds a shopper's state whatever they browse: the newest values are kept (a value seen
    again is new again), so the count reads at most that many."""
    defs = FeatureDefs.model_validate({
        "distinct": [{"name": "items", "types": ["browse"], "field": "item_id", "windows": ["1h"], "max_values": 3}],
        "session": None, "rfm": None, "lifecycle": None, "affinity": None,
    })
    eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig())
    s = eng.new_state()
    counts = [eng.apply(s, Event(f"e{i}", "u", "browse", i * MIN, props={"item_id": item})).features["items_1h"]
              for i, item in enumerate(["a", "b", "c", "d", "b", "e"])]
    assert counts == [1, 2, 3, 3, 3, 3] and list(s.users["u"].distinct[0]) == ["d", "b", "e"]


def test_state_survives_a_snapshot_round_trip() -> None:
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(), EventsConfig())
    events = [Event(f"e{i}", f"u{i % 7}", ("browse", "add_to_cart", "order")[i % 3], i * 45 * MIN,
                    props={"item_id": f"i{i % 5}", "category": f"c{i % 4}", "price": 10.0, "amount": 25.0})
              for i in range(300)]
    straight = eng.new_state()
    want = [eng.apply(straight, e) for e in events]
    s = eng.new_state()
    got = [eng.apply(s, e) for e in events[:150]]
    s = pickle.loads(pickle.dumps(s))
    got += [eng.apply(s, e) for e in events[150:]]
    assert [g.features for g in got] == [w.features for w in want]


class _PicklerOfThen(pickle.Pickler):
    """Pickles shoppers as the code before ``UserState.__reduce__`` did: a class reference and its slots' tuple."""

    def reducer_override(self, obj: object) -> object:
        if type(obj) is UserState:
            return copyreg.__newobj__, (UserState,), tuple(getattr(obj, k) for k in UserState.__slots__)
        return NotImplemented


def _every_slot(obj: object) -> object:
    """An object's slots, and those of the objects in them, as plain values (what equality can compare)."""
    if isinstance(obj, (list, tuple)):
        return [_every_slot(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _every_slot(v) for k, v in obj.items()}
    slots = getattr(type(obj), "__slots__", None)
    return {k: _every_slot(getattr(obj, k)) for k in slots} if slots else obj


def test_shoppers_pickled_by_the_older_code_load_exactly_and_pickle_flat_again() -> None:
    """Snapshots and compacted blobs made before shoppers pickled flat still load, to the same shopper."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(compact_after=None), EventsConfig())
    s = eng.new_state()
    for i in range(200):
        eng.apply(s, Event(f"e{i}", f"u{i % 5}", ("browse", "add_to_cart", "remove_from_cart", "order")[i % 4],
                           i * 7 * MIN, props={"item_id": f"i{i % 6}", "category": f"c{i % 3}", "price": 10.0 + i,
                                                 "amount": 30.0, "quantity": 1 + i % 2}))
    assert any(u.cart for u in s.users.values())  # cart lines are part of what is pickled
    for user in s.users.values():
        assert _every_slot(pickle.loads(pickle.dumps(user))) == _every_slot(user)  # a slot left out would show
        buf = io.BytesIO()
        _PicklerOfThen(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(user)
        then = buf.getvalue()
        assert then != pickle.dumps(user, protocol=pickle.HIGHEST_PROTOCOL)
        loaded = pickle.loads(then)
        assert pickle.dumps(loaded) == pickle.dumps(user)
        assert eng.read_all(loaded, user.last_ts) == eng.read_all(user, user.last_ts)
        frozen = Frozen.__new__(Frozen)
        frozen.last_ts, frozen.looks, frozen.blob = user.last_ts, user.looks, zstandard.ZstdCompressor().compress(then)
        assert pickle.dumps(frozen.thaw(None)) == pickle.dumps(user)


steps = st.lists(st.one_of(
    st.tuples(st.just("event"), st.integers(0, 3), st.integers(0, 20 * DAY),
              st.sampled_from(["browse", "add_to_cart", "remove_from_cart", "order", "search", "favourite"]),
              st.integers(0, 5), st.sampled_from(["shoes", "bags", "toys"]), st.sampled_from(["web", "app", None])),
    st.tuples(st.just("merge"), st.integers(0, 3), st.integers(0, 3)),
), min_size=1, max_size=50)


@settings(max_examples=100, deadline=None)
@given(steps)
def test_compacting_idle_users_never_changes_a_feature(script: list[tuple]) -> None:
    """The same events and identity merges through an engine that never compacts and one that compacts every
    user at every step (``compact_after: 0``, a sweep after each): every enriched event, every look at a quiet
    user, every published user and the refusals are the same, so features do not depend on when a user was
    compacted."""
    defs = load_features(CONFIG, EventsConfig())
    never = FeatureEngine(defs, FeaturesConfig(allowed_lateness="30d", compact_after=None), EventsConfig())
    always = FeatureEngine(defs, FeaturesConfig(allowed_lateness="30d", compact_after=0), EventsConfig())
    a, b = never.new_state(), always.new_state()
    for i, step in enumerate(script):
        if step[0] == "event":
            _, u, ts, etype, item, cat, platform = step
            ev = Event(f"e{i}", f"u{u}", etype, ts, platform=platform, props={
                "item_id": f"i{item}", "category": cat, "price": 10.0 + item, "quantity": 1 + item % 2,
                "amount": 20.0 * (item + 1), "item_count": 1})
            got, want = always.apply_batch(b, [ev]), never.apply_batch(a, [ev])  # with the looks they bring
            assert [g.features if isinstance(g, Enriched) else g.reason for g in got] == \
                [w.features if isinstance(w, Enriched) else w.reason for w in want]
        else:
            _, src, dst = step
            if src != dst:
                part_a, part_b = never.release(a, f"u{src}"), always.release(b, f"u{src}")
                assert (part_a is None) == (part_b is None)
                if part_a is not None and part_b is not None:
                    never.absorb(a, f"u{dst}", part_a)
                    always.absorb(b, f"u{dst}", part_b)
        assert sorted(map(repr, always.flush(b))) == sorted(map(repr, never.flush(a)))
        always.evict(b)
        never.evict(a)
    assert b.users.keys() == a.users.keys() and all(type(u) is Frozen for u in b.users.values())
    assert not any(type(u) is Frozen for u in a.users.values())
    assert (b.compacted, a.compacted) == (len(b.users), 0)  # what feature_users{state="compacted"} reads


def _shoppers(eng: FeatureEngine, n: int = 40) -> ShardState:
    """A shard of ``n`` shoppers with a few visits each (the shipped features), swept once after they went idle."""
    rng = random.Random(7)
    st_ = eng.new_state()
    for i in range(n * 12):
        u, ts = rng.randrange(n), DAY + i * 20_000
        etype = rng.choice(["browse", "browse", "search", "add_to_cart", "favourite", "order"])
        item = rng.randrange(50)
        eng.apply(st_, Event(f"e{i}", f"u{u}", etype, ts, platform=rng.choice(["web", "app"]), props={
            "item_id": f"i{item}", "category": f"c{item % 7}", "price": 5.0 + item, "quantity": 1,
            "amount": 30.0 + item, "item_count": 1}))
    eng.flush(st_)
    st_.max_ts += 2 * HOUR  # everyone idle past compact_after (the sweep reads the shard's clock)
    eng.evict(st_)
    return st_


def test_a_shard_compacts_with_a_dictionary_of_its_first_shoppers_and_keeps_it_in_its_snapshot() -> None:
    """Compacted shoppers are compressed with the shard's dictionary (half of what a shopper's pickle repeats is
    the same in every pickle); a restored shard thaws them with the dictionary its snapshot carries."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(allowed_lateness="30d", compact_after="1h"),
                        EventsConfig())
    st_ = _shoppers(eng)
    assert st_.zdict and st_.compacted == len(st_.users) == 40 and all(type(u) is Frozen for u in st_.users.values())
    plain = [len(Frozen(u.thaw(st_.zdict), None).blob) for u in st_.users.values()]
    assert sum(len(u.blob) for u in st_.users.values()) < 0.85 * sum(plain)
    back = pickle.loads(pickle.dumps(st_))
    assert back.zdict == st_.zdict
    want = {uid: eng.read_all(u.thaw(st_.zdict), u.last_ts) for uid, u in st_.users.items()}
    assert {uid: eng.read_all(u.thaw(back.zdict), u.last_ts) for uid, u in back.users.items()} == want
    ev = Event("late", "u3", "browse", back.users["u3"].last_ts + 1, props={"category": "c1"})
    assert isinstance(eng.apply(back, ev), Enriched) and type(back.users["u3"]) is not Frozen


def test_a_shards_dictionary_is_trained_on_its_shoppers_even_when_one_is_idle_at_its_first_compaction() -> None:
    """The first compaction of a shard may find a single idle shopper; the dictionary, kept for good, is then
    trained on the shard's shoppers, active ones too, not made of that one pickle."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(allowed_lateness="30d", compact_after="1h"),
                        EventsConfig())
    st_ = eng.new_state()
    eng.apply(st_, Event("e0", "idle", "browse", DAY, props={"category": "c1"}))
    for i in range(30):
        eng.apply(st_, Event(f"e{i + 1}", f"u{i}", "browse", DAY + 2 * HOUR + i, props={"category": f"c{i % 5}"}))
    eng.flush(st_)
    eng.evict(st_)
    assert type(st_.users["idle"]) is Frozen and st_.compacted == 1
    assert st_.zdict is not None and st_.zdict.startswith(b"\x37\xa4\x30\xec")  # zstd's dictionary magic: trained
    assert eng.read_all(st_.users["idle"].thaw(st_.zdict), DAY)["events_24h"] == 1


def test_shoppers_published_idle_by_the_shards_clock_are_compacted_by_that_flush() -> None:
    """Shoppers changed since the last flush, and idle past ``compact_after`` by the shard's clock (their partition
    behind the others, or a sweep between flushes, which leaves the changed ones to the flush): the flush that
    publishes them compacts them, not the next sweep, an hour of event time later (a second of a replay)."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(allowed_lateness="30d", compact_after="1h"),
                        EventsConfig())
    st_ = eng.new_state()
    for i in range(10):
        eng.apply(st_, Event(f"e{i}", f"u{i}", "browse", DAY + i, props={"category": "c1"}))
    eng.apply(st_, Event("busy", "busy", "browse", DAY + 2 * HOUR))  # the shard's clock: 2 h on
    st_.swept_ts = st_.max_ts  # a sweep just ran (as apply does every EVICT_EVERY events): none is due
    want = {f"u{i}": eng.read_all(st_.users[f"u{i}"], DAY + i) for i in range(10)}  # type: ignore[arg-type]
    published = [x for x in eng.flush(st_) if type(x) is UserFeatures]
    assert {x.user_id: x.features for x in published if x.user_id != "busy"} == want and len(published) == 11
    assert all(type(st_.users[uid]) is Frozen for uid in want) and type(st_.users["busy"]) is UserState
    assert st_.compacted == 10 and st_.zdict and st_.swept_ts == st_.max_ts
    assert {uid: eng.read_all(st_.users[uid].thaw(st_.zdict), DAY + i) for i, uid in enumerate(want)} == want


def _lz4(u: UserState, zdict: bytes | None) -> Frozen:
    """A shopper compacted as versions before zstd did: an LZ4 block, with the shard's dictionary if any."""
    f = Frozen.__new__(Frozen)
    f.last_ts, f.looks = u.last_ts, u.looks
    f.blob = lz4.block.compress(pickle.dumps(u, protocol=pickle.HIGHEST_PROTOCOL), dict=zdict)
    return f


def test_a_snapshot_from_before_dictionaries_still_thaws_its_shoppers() -> None:
    """A shard snapshotted by a version without dictionaries (five fields, LZ4 blobs compressed without one) thaws
    its compacted shoppers, and goes on compacting without a dictionary."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(allowed_lateness="30d", compact_after="1h"),
                        EventsConfig())
    st_ = _shoppers(eng)
    users = {uid: _lz4(u.thaw(st_.zdict), None) for uid, u in st_.users.items()}
    old = st_.__class__.__new__(st_.__class__)
    old.__setstate__((users, st_.dedup.ids, st_.dedup.window_ms, st_.max_ts, set()))
    assert old.zdict == b"" and all(type(u) is Frozen for u in old.users.values())
    assert [eng.read_all(u.thaw(old.zdict), u.last_ts) for u in old.users.values()] == \
        [eng.read_all(u.thaw(st_.zdict), u.last_ts) for u in st_.users.values()]
    eng.apply(old, Event("again", "u5", "browse", old.max_ts, props={"category": "c2"}))
    eng.flush(old)
    old.max_ts += 2 * HOUR
    eng.evict(old)
    assert old.zdict == b"" and old.users["u5"].blob.startswith(ZSTD_MAGIC)
    assert eng.read_all(old.users["u5"].thaw(b""), old.users["u5"].last_ts)["events_24h"] >= 1


def test_a_snapshot_of_lz4_blobs_thaws_them_and_compacts_with_zstd_and_its_dictionary() -> None:
    """A shard snapshotted before zstd: its dictionary is its first shoppers' pickles, its blobs LZ4 blocks made
    with it. They thaw as they were; a shopper compacted again is a zstd frame with the same bytes as a raw-content
    dictionary, and thaws exactly."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(allowed_lateness="30d", compact_after="1h"),
                        EventsConfig())
    st_ = _shoppers(eng)
    thawed = {uid: u.thaw(st_.zdict) for uid, u in st_.users.items()}
    zdict = b"".join(pickle.dumps(thawed[f"u{i}"], protocol=pickle.HIGHEST_PROTOCOL) for i in range(4))[-16_384:]
    old = pickle.loads(pickle.dumps(st_))
    old.zdict, old.users = zdict, {uid: _lz4(u, zdict) for uid, u in thawed.items()}
    back = pickle.loads(pickle.dumps(old))
    want = {uid: eng.read_all(u, u.last_ts) for uid, u in thawed.items()}
    assert {uid: eng.read_all(u.thaw(back.zdict), u.last_ts) for uid, u in back.users.items()} == want
    assert not any(u.blob.startswith(ZSTD_MAGIC) for u in back.users.values())
    eng.apply(back, Event("again", "u5", "browse", back.max_ts, props={"category": "c2"}))
    eng.flush(back)
    back.max_ts += 2 * HOUR
    eng.evict(back)
    again = back.users["u5"]
    assert back.zdict == zdict and type(again) is Frozen and again.blob.startswith(ZSTD_MAGIC)
    assert len(again.blob) < len(Frozen(again.thaw(zdict), None).blob)  # the old dictionary still helps
    assert eng.read_all(again.thaw(zdict), again.last_ts)["events_24h"] == want["u5"]["events_24h"] + 1


def test_worker_threads_compact_with_contexts_of_their_own() -> None:
    """zstd's contexts release the interpreter lock and are not for two threads at once; a process's worker
    threads (``-w N``) share the shards without a dictionary, so each thread compacts with its own."""
    eng = FeatureEngine(load_features(CONFIG, EventsConfig()), FeaturesConfig(allowed_lateness="30d", compact_after="1h"),
                        EventsConfig())
    users = [u.thaw(st_.zdict) for st_ in [_shoppers(eng)] for u in st_.users.values()]
    want = [pickle.dumps(u) for u in users]
    contexts: dict[int, object] = {}
    failures: list[int] = []

    def work(n: int) -> None:
        contexts[n] = _codec(None)[0].__self__  # type: ignore[attr-defined]
        for _ in range(50):
            if [pickle.dumps(Frozen(u, None).thaw(None)) for u in users] != want:
                failures.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len({id(c) for c in contexts.values()}) == 4


def test_repo_definitions_compile_and_name_what_the_issue_asks_for() -> None:
    names = set(FeaturePlan(load_features(CONFIG, EventsConfig())).names)
    for w in ("5m", "1h", "24h", "7d", "30d"):
        assert f"views_{w}" in names and f"events_{w}" in names
    assert {"revenue_30d", "avg_order_value_30d", "items_ordered_30d", "categories_viewed_24h", "items_viewed_1h",
            "since_last_event_s", "since_last_browse_s", "since_last_cart_s", "since_last_order_s", "first_seen_ts",
            "session_id", "session_events", "session_pages", "session_duration_s", "sessions_7d",
            "cart_items", "cart_quantity", "cart_value", "rfm_r", "rfm_f", "rfm_m", "lifecycle_stage",
            "repeat_buyer", "top_categories"} <= names


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30 * DAY), st.sampled_from("abcdefgh"),
                          st.sampled_from(["browse", "favourite", "add_to_cart"])), max_size=60))
def test_affinity_keeps_the_best_categories_ranked_whatever_the_order(adds: list[tuple[int, str, str]]) -> None:
    """Late events and more categories than are kept: never a crash, and the top list is ranked by score."""
    defs = FeatureDefs.model_validate({"affinity": {
        "half_life": "7d", "weights": {"browse": 1.0, "favourite": 2.0, "add_to_cart": 3.0}, "top": 3, "max_categories": 4,
    }})
    eng = FeatureEngine(defs, FeaturesConfig(allowed_lateness="40d"), EventsConfig(), needed=None)
    st_ = eng.new_state()
    for i, (ts, cat, etype) in enumerate(adds):
        eng.apply(st_, Event(f"e{i}", "u1", etype, ts, props={"category": cat}))
    for u in st_.users.values():
        assert len(u.aff) <= 4 and len(u.top) <= 3 and set(u.top) <= set(u.aff)
        assert u.top == sorted(u.top, key=u.aff.__getitem__, reverse=True)


def test_a_shard_publishes_at_most_once_per_interval_whatever_wakes_it() -> None:
    """An early wake (a hand-over awaited by another shard wakes them all every 0.1 s) publishes nothing;
    the interval's end or the end of input does."""
    logic = FeatureLogic(FeatureEngine(DEFS, FeaturesConfig(), EventsConfig()), None, False, 3600.0)
    out, _ = logic.on_batch([[Event("e1", "u1", "browse", HOUR, position="p:0")]])
    assert [type(x) for x in out] == [Enriched]
    assert logic.notify_at() is not None and logic.on_notify()[0] == []
    logic.publish.mono = 0.0  # the interval has passed
    assert [(x.user_id, type(x)) for x in logic.on_notify()[0]] == [("u1", UserFeatures)]
    logic.on_batch([[Event("e2", "u2", "browse", HOUR, position="p:0")]])
    assert [x.user_id for x in logic.on_eof()[0] if type(x) is UserFeatures] == ["u2"]
