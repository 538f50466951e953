"""Feature engine: bucketed windows against brute force, lateness, duplicates, eviction, restarts."""

from __future__ import annotations

import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.events import DeadLetter, Event
from nudgeflow.settings import EventsConfig, FeaturesConfig
from operators.features import EVICT_EVERY, Enriched, FeatureEngine, shard_of
from operators.windows import BucketedCount

HOUR = 3_600_000
BUCKET = 30_000
LATENESS = 300_000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4 * HOUR), max_size=60), st.integers(0, 5 * HOUR))
def test_bucketed_count_is_exact_to_one_bucket(ts_list: list[int], at: int) -> None:
    """Evaluated, as the engine does, at the newest event time seen (nothing later is in it)."""
    ts_list = [ts for ts in ts_list if ts <= at]
    w = BucketedCount(HOUR, BUCKET)
    for ts in ts_list:
        w.add(ts, 1)
    value = w.value(at)
    aligned = sum(1 for ts in ts_list if at // BUCKET - HOUR // BUCKET < ts // BUCKET <= at // BUCKET)
    assert value == aligned
    # the stated error bound: between the exact window and the window one bucket longer
    exact = sum(1 for ts in ts_list if at - HOUR < ts <= at)
    wider = sum(1 for ts in ts_list if at - HOUR - BUCKET < ts <= at)
    assert exact <= value <= wider


streams = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3 * HOUR)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(streams, st.integers(0, 2**32))
def test_features_equal_brute_force_under_out_of_order_arrival(evs: list[tuple[int, int]], seed: int) -> None:
    rnd = random.Random(seed)
    events = [Event(f"e{i}", f"u{u}", "browse", ts) for i, (u, ts) in enumerate(evs)]
    arrivals = sorted(events, key=lambda e: e.ts + rnd.uniform(0, LATENESS))  # disorder within the lateness
    eng = FeatureEngine(FeaturesConfig(window=3600, bucket=30, allowed_lateness=300), EventsConfig())
    state = eng.new_state()
    accepted: list[Event] = []
    for ev in arrivals:
        out = eng.apply(state, ev)
        assert isinstance(out, Enriched), out  # nothing is too late when disorder stays within the lateness
        accepted.append(ev)
        mine = [e.ts for e in accepted if e.user_id == ev.user_id]
        at = max(mine)
        expected = sum(1 for ts in mine if at // BUCKET - HOUR // BUCKET < ts // BUCKET <= at // BUCKET)
        assert out.features["events_1h"] == expected
        assert out.features["last_event_ts"] == at and out.features["first_seen_ts"] == min(mine)


def test_too_late_and_duplicates_are_refused_with_the_original_bytes() -> None:
    eng = FeatureEngine(FeaturesConfig(), EventsConfig())
    s = eng.new_state()
    assert isinstance(eng.apply(s, Event("a", "u1", "browse", 10 * 60_000, raw=b"A")), Enriched)
    late = eng.apply(s, Event("b", "u1", "browse", 10 * 60_000 - LATENESS - 1, raw=b"B", position="t:0:9"))
    assert isinstance(late, DeadLetter) and (late.reason, late.raw, late.position) == ("too_late", b"B", "t:0:9")
    edge = eng.apply(s, Event("c", "u1", "browse", 10 * 60_000 - LATENESS, raw=b"C"))
    assert isinstance(edge, Enriched) and edge.features["events_1h"] == 2
    dup = eng.apply(s, Event("a", "u1", "browse", 11 * 60_000, raw=b"A2"))
    assert isinstance(dup, DeadLetter) and (dup.reason, dup.raw) == ("duplicate", b"A2")
    # a late event of another user is not late: lateness is per user
    assert isinstance(eng.apply(s, Event("d", "u2", "browse", 0)), Enriched)


def test_idle_users_and_old_ids_are_evicted() -> None:
    eng = FeatureEngine(FeaturesConfig(), EventsConfig(dedup_window=600))
    s = eng.new_state()
    n = EVICT_EVERY * 2
    for i in range(n):  # one event per user, a second apart: old users fall out of every window
        eng.apply(s, Event(f"e{i}", f"u{i}", "browse", i * 1000))
    horizon = (n - 1) * 1000 - eng.idle_ms
    assert all(u.last_ts >= horizon - EVICT_EVERY * 1000 for u in s.users.values())
    assert len(s.users) < n and len(s.dedup.ids) < n


def test_state_survives_a_snapshot_round_trip() -> None:
    eng = FeatureEngine(FeaturesConfig(), EventsConfig())
    events = [Event(f"e{i}", f"u{i % 7}", "browse", i * 45_000) for i in range(300)]
    straight = eng.new_state()
    want = [eng.apply(straight, e) for e in events]
    s = eng.new_state()
    got = [eng.apply(s, e) for e in events[:150]]
    s = pickle.loads(pickle.dumps(s))
    got += [eng.apply(s, e) for e in events[150:]]
    assert [g.features for g in got] == [w.features for w in want]


def test_shards_are_stable_and_spread() -> None:
    counts = [0] * 16
    for i in range(16_000):
        counts[int(shard_of(f"user-{i}", 16))] += 1
    # crc32, not Python's salted hash: the same in every process and after every restart
    assert (shard_of("u1", 16), shard_of("user-42", 64)) == ("6", "51")
    assert min(counts) > 800 and max(counts) < 1200
