"""Cross-platform identity: the graph's rules, the identity step's outputs, and its Redis side on a real server."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone
import random
from typing import Any

import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.identity_store import (
    IdentitySink, RedisHandoff, canon_key, history_key, load_graph, seq_key,
)
from connectors.redis_store import FeatureReader, RedisFeatureSink
from nudgeflow.events import DeadLetter, Event, Link, Merge
from nudgeflow.settings import EventsConfig, IdentityConfig, RedisConfig
from operators.features import UserFeatures
from operators.identity import IdentityEngine, IdentityGraph, IdentityLogic, is_known
from operators.merge import MergeDesk
from operators.merge import snapshot as merge_snapshot
from operators.parse import Parser

HOUR_MS = 3_600_000


def graph(**limits: object) -> IdentityGraph:
    return IdentityGraph(IdentityConfig(**limits))


def ev(uid: str, *aliases: str, etype: str = "browse", ts: int = 1_000, eid: str = "e1") -> Event:
    return Event(eid, uid, etype, ts, platform="web", position=f"t:0:{eid}", raw=f"raw-{eid}".encode(),
                 ingest_ms=7, aliases=aliases)


# -- the rules, one by one


def test_merged_known_root_wins_whichever_side_it_is_on() -> None:
    g = graph()
    a = g.link("anon:c1", "u1", "implicit", 1)
    assert (a.outcome, a.canonical, a.seq, a.moved) == ("merged", "u1", 1, ("anon:c1",))
    b = g.link("u2", "device:d1", "implicit", 2)  # the known src survives, not dst
    assert (b.outcome, b.canonical, b.seq, b.moved) == ("merged", "u2", 2, ("device:d1",))
    assert (g.resolve("anon:c1"), g.resolve("device:d1"), g.resolve("u1"), g.resolve("nobody")) == (
        "u1", "u2", "u1", "nobody")


def test_anonymous_clusters_merge_into_dst_root_and_the_whole_cluster_moves() -> None:
    g = graph()
    g.link("device:d1", "anon:c1", "implicit", 1)
    g.link("account:a1", "anon:c2", "implicit", 2)
    m = g.link("device:d1", "account:a1", "implicit", 3)  # roots anon:c1 and anon:c2: dst's root wins
    assert (m.canonical, m.seq, set(m.moved), m.moved[0]) == ("anon:c2", 3, {"anon:c1", "device:d1"}, "anon:c1")
    assert {g.resolve(x) for x in ("anon:c1", "device:d1", "account:a1", "anon:c2")} == {"anon:c2"}
    assert sorted(g.members["anon:c2"]) == ["account:a1", "anon:c1", "device:d1"] and "anon:c1" not in g.members


def test_repeat_changes_and_reports_nothing() -> None:
    g = graph()
    g.link("anon:c1", "u1", "implicit", 1)
    g.link("device:d1", "u1", "implicit", 1)
    before = (dict(g.canon), g.seq)
    assert g.link("anon:c1", "u1", "implicit", 2).outcome == "repeat"
    assert g.link("anon:c1", "device:d1", "implicit", 2).outcome == "repeat"  # any id of the cluster
    assert (dict(g.canon), g.seq) == before


def test_cycle_self_alias_and_conflict_are_rejected_without_a_change() -> None:
    g = graph()
    assert g.link("u1", "u2", "alias", 1).canonical == "u2"
    assert g.link("u2", "u1", "alias", 2).reason == "cycle"
    assert g.link("anon:c", "anon:c", "implicit", 2).reason == "self_alias"
    g.link("device:d1", "u3", "implicit", 3)
    outcomes = []
    for kind in ("implicit", "identify"):  # a shared device: the second customer is no merge
        r = g.link("device:d1", "u4", kind, 4)
        outcomes.append((r.outcome, r.reason))
    assert outcomes == [("rejected", "conflict"), ("repeat", "conflict")]  # refused again: reported once
    assert (g.resolve("device:d1"), g.resolve("u4"), g.resolve("u1")) == ("u3", "u4", "u2")
    assert g.link("u3", "u4", "alias", 5).canonical == "u4"  # only the shop's alias merges two customers


def test_alias_storm_counts_distinct_ids_within_the_window_and_forgets_older_ones() -> None:
    g = graph(max_links_per_id=2, storm_window="1h")
    assert g.link("device:k", "u1", "implicit", 0).outcome == "merged"
    assert g.link("device:k", "u2", "implicit", 10).reason == "conflict"  # an attempt, though rejected
    for _ in range(3):
        assert g.link("device:k", "u1", "implicit", 20).outcome == "repeat"  # not an attempt
    assert g.link("device:k", "u2", "implicit", 30).reason == "conflict"  # the same id again: no storm
    assert g.link("device:k", "u3", "implicit", 40).reason == "alias_storm"
    assert g.resolve("u3") == "u3" and len(g.attempts["device:k"]) == 2
    assert g.link("device:k", "u3", "implicit", 40 + HOUR_MS).reason == "conflict"  # the window moved on


def test_storm_memory_stays_bounded() -> None:
    g = graph(storm_window="1s")
    for i in range(20_000):
        g.link(f"anon:{i}", f"anon:x{i}", "implicit", i * 100)
    assert len(g.attempts) <= 1100 and "anon:0" not in g.attempts and "anon:19999" in g.attempts


def test_cluster_too_big() -> None:
    g = graph(max_cluster_ids=3)
    g.link("anon:a", "u1", "implicit", 1)
    g.link("anon:b", "u1", "implicit", 1)
    assert g.link("anon:c", "u1", "implicit", 1).reason == "cluster_too_big"
    g.link("device:d", "anon:x", "implicit", 1)
    assert g.link("anon:x", "anon:a", "implicit", 1).reason == "cluster_too_big"  # 3 + 2 ids
    assert (g.resolve("anon:c"), g.resolve("anon:x"), g.seq) == ("anon:c", "anon:x", 3)


def test_self_alias_and_bad_ids_are_refused_at_parse() -> None:
    p = Parser(EventsConfig(max_id_length=8), now_ms=lambda: 10_000)

    def parse(**doc: object) -> Event | DeadLetter:
        return p.parse("t:0:1", orjson.dumps({"event_id": "e", "type": "alias", "ts": 1, **doc}), 0)

    assert parse(user_id="u1", previous_id="u1").reason == "self_alias"
    assert parse(user_id="u1", previous_id="u123456789").reason == "id_too_long"
    ok = parse(user_id="u1", previous_id="u0", anonymous_id="c")
    assert (ok.user_id, ok.aliases) == ("u1", ("u0", "anon:c"))


# -- the step


def test_apply_batch_emits_link_merge_then_the_resolved_event_and_passes_refusals() -> None:
    eng, g = IdentityEngine(IdentityConfig()), graph()
    dl = DeadLetter("malformed_json", "x", b"{", "t:0:9", 0)
    login = ev("u1", "anon:c1", etype="identify", ts=500)
    out = eng.apply_batch(g, [dl, login])
    assert out[0] is dl
    link, merge, event = out[1:]
    assert isinstance(link, Link)
    assert (link.kind, link.outcome, link.src, link.dst) == ("identify", "merged", "anon:c1", "u1")
    assert (link.event_id, link.platform, link.position) == ("e1", "web", "t:0:e1")
    assert merge == Merge("anon:c1", "u1", 1, 500, "merge")
    assert event is login  # carried the canonical id
    again = ev("u1", "anon:c1", eid="e2")
    assert eng.apply_batch(g, [again]) == [again]  # repeat: nothing but the event
    anon = ev("anon:c1", eid="e3")
    (resolved,) = eng.apply_batch(g, [anon])
    assert (resolved.user_id, resolved.origin_id, resolved.event_id) == ("u1", "anon:c1", "e3")
    stranger = ev("u9", eid="e4")
    assert eng.apply_batch(g, [stranger])[0] is stranger


def test_a_rejected_link_reports_and_the_event_goes_on() -> None:
    eng, g = IdentityEngine(IdentityConfig()), graph()
    eng.apply_batch(g, [ev("u1", "device:d1")])
    shared = ev("u2", "device:d1", eid="e2")
    link, dead, event = eng.apply_batch(g, [shared])
    assert (link.outcome, link.reason, link.kind) == ("rejected", "conflict", "implicit")
    assert isinstance(dead, DeadLetter) and (dead.reason, dead.raw, dead.position, dead.ingest_ms) == (
        "conflict", b"raw-e2", "t:0:e2", 7)
    assert event is shared and g.resolve("device:d1") == "u1"


def test_an_event_whose_own_id_loses_the_merge_goes_on_as_the_canonical() -> None:
    eng, g = IdentityEngine(IdentityConfig()), graph()
    eng.apply_batch(g, [ev("anon:b", "device:d")])  # device:d -> anon:b
    out = eng.apply_batch(g, [ev("anon:a", "device:d", eid="e2"), ev("anon:b", eid="e3")])
    link, merge, first, second = out
    assert (link.kind, link.canonical, merge.src, merge.dst, merge.seq) == ("implicit", "anon:a", "anon:b", "anon:a", 2)
    assert (first.user_id, first.origin_id) == ("anon:a", "")
    assert (second.user_id, second.origin_id) == ("anon:a", "anon:b")


def test_alias_events_link_with_kind_alias() -> None:
    eng, g = IdentityEngine(IdentityConfig()), graph()
    eng.apply_batch(g, [ev("u1", "anon:c", ts=1)])
    link, merge, event = eng.apply_batch(g, [ev("u2", "u1", etype="alias", ts=2, eid="e2")])
    assert (link.kind, link.canonical, set(link.moved), merge.src) == ("alias", "u2", {"u1", "anon:c"}, "u1")
    assert g.resolve("anon:c") == "u2"


def test_logic_loads_without_a_snapshot_and_resumes_from_one_with_the_running_limits() -> None:
    loads: list[int] = []

    def load() -> IdentityGraph:
        loads.append(1)
        return IdentityGraph.from_canon({"anon:c": "u1"}, 4)

    logic = IdentityLogic(IdentityEngine(IdentityConfig()), None, load)
    assert loads == [1]
    [out], _ = logic.on_batch([[ev("anon:c")], [ev("u2", "device:d", eid="e2")]])  # two upstream batches
    assert out[0].user_id == "u1" and out[2].seq == 5
    snap = logic.snapshot()
    strict = IdentityEngine(IdentityConfig(max_cluster_ids=2))
    resumed = IdentityLogic(strict, snap, load)
    assert loads == [1] and resumed.graph.resolve("device:d") == "u2" and resumed.graph.seq == 5
    [out], _ = resumed.on_batch([[ev("u2", "anon:x", eid="e3")]])
    assert out[0].reason == "cluster_too_big"  # the limits are the running config's, not the snapshot's
    assert IdentityLogic(strict, None, load, recover=False).snapshot() == b""


# -- properties

KNOWN = ["u0", "u1", "u2"]
ANON = ["anon:a", "anon:b", "device:c", "device:d", "account:e", "account:f"]
IDS = KNOWN + ANON
links = st.lists(
    st.tuples(st.sampled_from(IDS), st.sampled_from(IDS), st.sampled_from(["implicit", "identify", "alias"]),
              st.integers(0, 4 * HOUR_MS)),
    max_size=40,
)
TIGHT = {"max_links_per_id": 2, "max_cluster_ids": 4, "storm_window": "1h"}


def clusters(g: IdentityGraph, ids: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for x in ids:
        out.setdefault(g.resolve(x), set()).add(x)
    return out


@settings(max_examples=300, deadline=None)
@given(links)
def test_resolve_is_idempotent_and_a_cluster_with_a_known_id_has_a_known_root(seq: list) -> None:
    g = graph(**TIGHT)
    for src, dst, kind, ts in seq:
        g.link(src, dst, kind, ts)
        for x in IDS:
            assert g.resolve(g.resolve(x)) == g.resolve(x)
        for root, members in clusters(g, IDS).items():
            assert root in members
            if any(is_known(m) for m in members):
                assert is_known(root)
            assert set(g.members.get(root, ())) == members - {root}
        assert set(g.canon) == {m for ms in g.members.values() for m in ms}


@settings(max_examples=300, deadline=None)
@given(links)
def test_rejected_links_never_change_a_resolution_and_a_merge_moves_only_its_ids(seq: list) -> None:
    g = graph(**TIGHT)
    for src, dst, kind, ts in seq:
        before = {x: g.resolve(x) for x in IDS}
        link = g.link(src, dst, kind, ts)
        after = {x: g.resolve(x) for x in IDS}
        if link.outcome == "merged":
            assert {x for x in IDS if before[x] != after[x]} == set(link.moved)
            assert all(after[x] == link.canonical for x in link.moved)
        else:
            assert before == after


@st.composite
def component_links(draw: st.DrawFn) -> tuple[list[list[str]], list[tuple[str, str, str, int]]]:
    """Clusters with at most one known id each, and links joining each into one (random directions, extras)."""
    comps: list[list[str]] = []
    n = 0
    for known in draw(st.lists(st.sampled_from([True, False]), min_size=1, max_size=4)):
        size = draw(st.integers(1, 4))
        comp = [f"{prefix}{n + i}" for i, prefix in enumerate(draw(st.lists(
            st.sampled_from(["anon:", "device:", "account:"]), min_size=size, max_size=size)))]
        n += size
        comps.append(([f"u{n}"] if known else []) + comp)
    out = []
    for comp in comps:
        for i in range(1, len(comp)):  # a random spanning tree
            j = draw(st.integers(0, i - 1))
            a, b = (comp[i], comp[j]) if draw(st.booleans()) else (comp[j], comp[i])
            out.append((a, b))
        for _ in range(draw(st.integers(0, 3))):
            a, b = draw(st.sampled_from(comp)), draw(st.sampled_from(comp))
            if a != b:
                out.append((a, b))
    kinds = st.sampled_from(["implicit", "identify", "alias"])
    return comps, [(a, b, draw(kinds), 0) for a, b in out]


@settings(max_examples=300, deadline=None)
@given(component_links(), st.randoms(use_true_random=False))
def test_any_order_of_conflict_free_links_gives_the_same_clusters_and_canonicals(
    drawn: tuple[list[list[str]], list[tuple[str, str, str, int]]], rnd: random.Random
) -> None:
    comps, seq = drawn
    shuffled = list(seq)
    rnd.shuffle(shuffled)
    ids = [x for comp in comps for x in comp]
    results = []
    for order in (seq, shuffled):
        g = graph()
        for link in order:
            judged = g.link(*link)
            assert judged.outcome != "rejected" or judged.reason == "cycle"
        results.append(g)
    expected = {frozenset(c) for c in comps}
    for g in results:
        assert {frozenset(m) for m in clusters(g, ids).values()} == expected
        for comp in comps:
            known = [x for x in comp if is_known(x)]
            if known:
                assert {g.resolve(x) for x in comp} == set(known)


# -- Redis


def merges(g: IdentityGraph) -> list[Link]:
    """Links judged by the step, in order; every outcome, as the sink receives them."""
    eng = IdentityEngine(IdentityConfig())
    batch = [
        ev("u1", "anon:c1", ts=1), ev("anon:c2", "device:d2", ts=2), ev("u1", "device:d2", ts=3),
        ev("u1", "anon:c1", ts=4), ev("u9", "device:d2", ts=5), ev("u8", "u1", etype="alias", ts=6),
    ]
    return [x for x in eng.apply_batch(g, batch) if isinstance(x, Link)]


def test_sink_then_load_resolves_every_id_the_same(redis_url: str, key_prefix: str) -> None:
    g = graph()
    judged = merges(g)
    assert [link.outcome for link in judged] == ["merged", "merged", "merged", "rejected", "merged"]
    IdentitySink(redis_url, key_prefix).build("s", 0, 1).write_batch(judged)
    loaded = load_graph(redis_url, key_prefix)
    ids = ["u1", "u8", "u9", "anon:c1", "anon:c2", "device:d2", "nobody"]
    assert {x: loaded.resolve(x) for x in ids} == {x: g.resolve(x) for x in ids}
    assert loaded.resolve("device:d2") == "u8" and loaded.seq == g.seq == 4
    assert {k: sorted(v) for k, v in loaded.members.items()} == {k: sorted(v) for k, v in g.members.items()}


def test_history_has_one_entry_per_merge_when_a_batch_is_replayed(redis_url: str, key_prefix: str) -> None:
    judged = merges(graph())
    sink = IdentitySink(redis_url, key_prefix).build("s", 0, 1)
    sink.write_batch(judged[:2])
    sink.write_batch(judged)  # a replay after a crash: merges 1 and 2 again, then 3 and 4
    sink.write_batch(judged)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    history = r.xrange(history_key(key_prefix))
    assert [entry_id for entry_id, _ in history] == ["1-1", "2-1", "3-1", "4-1"]
    last = history[-1][1]
    assert (last["kind"], last["src"], last["dst"], last["canonical"]) == ("alias", "u1", "u8", "u8")
    assert set(orjson.loads(last["moved"])) == {"u1", "anon:c1", "anon:c2", "device:d2"}
    assert r.get(seq_key(key_prefix)) == "4" and r.hget(canon_key(key_prefix), "anon:c2") == "u8"


def test_repeats_and_rejections_write_nothing(redis_url: str, key_prefix: str) -> None:
    rejected = Link(1, "device:d", "u2", "implicit", "rejected", "conflict")
    IdentitySink(redis_url, key_prefix).build("s", 0, 1).write_batch([rejected])
    assert redis.Redis.from_url(redis_url).keys(f"{key_prefix}*") == []
    assert load_graph(redis_url, key_prefix).canon == {}


def test_handoff_put_get_and_ttl(redis_url: str, key_prefix: str) -> None:
    h = RedisHandoff(redis_url, key_prefix, ttl_s=IdentityConfig(handoff_ttl="2h").handoff_ttl)
    blob = pickle.dumps({"cart": {"i1": [2, 9.5]}})
    h.put_many("features", [(7, blob), (9, b"")])
    assert h.get_many("features", [7, 7]) == [blob, blob]  # a replay finds it again
    other = RedisHandoff(redis_url, key_prefix, ttl_s=60)  # another process: from Redis
    assert other.local == {} and other.get_many("features", [7]) == [blob]
    assert h.get_many("features", [8, 9]) == [None, b""] and h.get_many("triggers", [7]) == [None]
    ttl = redis.Redis.from_url(redis_url).pttl(f"{key_prefix}:handoff:features:7")
    assert 2 * HOUR_MS - 60_000 < ttl <= 2 * HOUR_MS


def test_a_snapshot_writes_out_the_hand_overs_still_held_back(redis_url: str, key_prefix: str) -> None:
    """A release within ``FLUSH_S`` of the last write waits in memory; the epoch's snapshot must not be
    taken before it is in Redis (after a crash, nothing would put it again for another process)."""
    h = RedisHandoff(redis_url, key_prefix, ttl_s=60)
    desk: MergeDesk[Any, Any] = MergeDesk("features", h)
    h.put_many("features", [(1, b"first")])  # the first write goes at once
    h.put_many("features", [(2, b"second")])  # within FLUSH_S of it: held back
    other = RedisHandoff(redis_url, key_prefix, ttl_s=60)
    assert h.pending() and other.get_many("features", [1, 2]) == [b"first", None]
    merge_snapshot({}, desk)
    assert not h.pending()
    other.next_get = 0.0
    assert other.get_many("features", [2]) == [b"second"]


def test_only_the_desk_that_held_back_a_hand_over_wakes_until_it_is_written(redis_url: str, key_prefix: str) -> None:
    """Every shard of every step shares the process's handoff: the shard that put a held-back hand-over wakes
    soon to write it; the others keep their own schedule (all of them waking every ``RETRY_S`` while any
    was held back cost thousands of empty calls a second), and the putter stops once it is written."""
    h = RedisHandoff(redis_url, key_prefix, ttl_s=60)
    shelf: dict[str, Any] = {"anon:1": 3}

    class Shelf:
        def release(self, st: dict[str, Any], uid: str) -> Any:
            return st.pop(uid, None)

        def absorb(self, st: dict[str, Any], uid: str, part: Any) -> list[Any]:
            return []

    putter: MergeDesk[Any, Any] = MergeDesk("features", h)
    bystander: MergeDesk[Any, Any] = MergeDesk("features", h)
    h.put_many("features", [(1, b"first")])  # the first write goes at once: the next is held back
    putter.take(Shelf(), shelf, Merge("anon:1", "u1", 2, 0, "release"))
    putter.settle(Shelf(), shelf)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    assert h.pending()
    assert putter.wake(later) < later and putter.wake(None) is not None  # soon, to write it
    assert bystander.wake(later) == later and bystander.wake(None) is None
    h.flush()  # written (by any desk's settle, a snapshot, or the end of the input)
    assert not h.pending() and putter.wake(later) == later and putter.wake(None) is None
    assert RedisHandoff(redis_url, key_prefix, ttl_s=60).get_many("features", [2]) != [None]


def test_feature_reader_resolves_any_id_to_the_canonical_features(redis_url: str, key_prefix: str) -> None:
    cfg = RedisConfig(url=redis_url, key_prefix=key_prefix, ttl=120)
    RedisFeatureSink(cfg, redis_url).build("s", 0, 1).write_batch([
        UserFeatures("u1", 10, {"views_1h": 3}), UserFeatures("u2", 10, {"views_1h": 5}),
    ])
    g = graph()
    links = [g.link("anon:c1", "u1", "implicit", 1), g.link("device:d1", "u1", "implicit", 1)]
    IdentitySink(redis_url, key_prefix).build("s", 0, 1).write_batch(links)
    reader = FeatureReader(redis_url, key_prefix)
    assert reader.get("anon:c1") == reader.get("u1") and reader.get("u1")["views_1h"] == 3
    many = reader.get_many(["device:d1", "u2", "anon:nobody"])
    assert (many["device:d1"]["views_1h"], many["u2"]["views_1h"], many["anon:nobody"]) == (3, 5, {})
    assert reader.get_many([]) == {}


def test_a_shared_device_conflict_is_reported_once_per_storm_window() -> None:
    eng, g = IdentityEngine(IdentityConfig(storm_window="1h")), IdentityGraph()
    eng.apply_batch(g, [ev("u1", "device:d", ts=0)])
    reasons = []
    for ts in (1_000, 2_000, 3_000, 3_700_000):  # u2 on u1's device, event after event, then an hour later
        out = eng.apply_batch(g, [ev("u2", "device:d", eid=f"e{ts}", ts=ts)])
        reasons.append([x.reason for x in out if isinstance(x, DeadLetter)])
        assert out[-1].user_id == "u2"  # the event itself always goes on, as u2's
    assert reasons == [["conflict"], [], [], ["conflict"]] and g.resolve("device:d") == "u1"
