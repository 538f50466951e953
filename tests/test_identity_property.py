"""Identity through every per-user step at once, on a real Redis hand-over.

Random interleavings of one shopper's events across a device, a web cookie and a customer id, with the
logins (``identify``) arriving anywhere in the stream, in random batches, the shards of each step taking
their batches in random order (as workers do): the identity step, the feature logics and the trigger
logics end with the same features and the same actions as a run in which every event carried the
customer id from the start.

What is left out is what ``FeatureEngine.absorb`` documents as a rule rather than exact: session
features. Distinct values and categories stay under their caps. An action decided before a login is
addressed to the id known then (an event trigger fires at its event); it is compared as the shopper's. Every event lies within the allowed
lateness and within the triggers' windows of each other, so no deadline passes before a login arrives
(``TriggerEngine.absorb``'s condition); a later event of another shopper then moves event time on.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.identity_store import RedisHandoff
from flows.common import shard_batches
from nudgeflow.configload import load_features
from nudgeflow.events import Action, DeadLetter, Event, Merge
from nudgeflow.settings import EventsConfig, FeaturesConfig, IdentityConfig, TriggersFile
from operators.features import Enriched, FeatureEngine, FeatureLogic, UserFeatures
from operators.guards import StateGuards
from operators.identity import IdentityEngine, IdentityGraph
from operators.parse import Parser
from operators.shards import shard_names, shard_of
from operators.triggers import TriggerEngine, TriggerLogic

FEATURES = Path(__file__).parents[1] / "config" / "features.yaml"
T0 = 1_760_000_000_000
MIN = 60_000
SHARDS = shard_names(8)
SESSION = {"session_id", "session_events", "session_pages", "session_duration_s", "sessions_7d", "sessions_30d"}
TRIGGERS = TriggersFile.model_validate({
    "defaults": {"cooldown": 0, "holdout": 0, "consent": "opt_out"},
    "control_group": 0,
    "triggers": [
        {"id": "cart", "kind": "absence", "after": ["add_to_cart"], "unless": ["order"], "within": "30m",
         "channel": "email"},
        {"id": "browse_then_cart", "kind": "sequence", "first": ["browse"], "then": ["add_to_cart"],
         "within": "30m", "channel": "push"},
        {"id": "buyer", "kind": "event", "on": ["order"], "channel": "email"},
    ],
})
#: who carries each event: (the id fields of the record, its platform)
CARRIERS = {
    "app": ({"device_id": "d1"}, "app"),
    "web": ({"anonymous_id": "c1"}, "web"),
    "mini": ({"account_id": "m1"}, "mini_program"),
    "known": ({"user_id": "u1"}, "web"),
}
LOGINS = [{"user_id": "u1", "device_id": "d1"}, {"user_id": "u1", "anonymous_id": "c1"}, {"user_id": "u1", "account_id": "m1"}]


def behaviour() -> st.SearchStrategy[dict[str, Any]]:
    item = st.sampled_from(["i1", "i2", "i3"])
    return st.one_of(
        st.builds(lambda i, c: {"type": "browse", "props": {"item_id": i, "category": c, "price": 10.0}},
                  item, st.sampled_from(["shoes", "bags"])),
        st.builds(lambda i, q: {"type": "add_to_cart", "props": {"item_id": i, "quantity": q, "price": 10.0}},
                  item, st.integers(1, 2)),
        st.builds(lambda i: {"type": "remove_from_cart", "props": {"item_id": i}}, item),
        st.builds(lambda i: {"type": "order", "props": {"items": [{"item_id": i, "price": 10.0, "quantity": 1}]}},
                  item),
    )


@st.composite
def stories(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[int]]:
    """(records as the shop sends them, the same records all under u1, batch sizes)."""
    n = draw(st.integers(3, 18))
    acts = draw(st.lists(behaviour(), min_size=n, max_size=n))
    who = draw(st.lists(st.sampled_from(list(CARRIERS)), min_size=n, max_size=n))
    minutes = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    logins = draw(st.lists(st.integers(0, n), min_size=3, max_size=3))
    shop: list[tuple[int, dict[str, Any]]] = []
    for i, (a, w, m) in enumerate(zip(acts, who, minutes)):
        ids, platform = CARRIERS[w]
        shop.append((i * 2 + 1, {"event_id": f"e{i}", "ts": T0 + m * MIN, "platform": platform, **ids, **a}))
    for j, (at, ids) in enumerate(zip(logins, LOGINS)):
        shop.append((at * 2, {"event_id": f"l{j}", "type": "identify", "ts": T0 + draw(st.integers(0, 20)) * MIN,
                              "platform": "web", **ids}))
    # another shopper, much later: event time moves on and every timer comes due
    shop.append((10**6, {"event_id": "z", "type": "browse", "ts": T0 + 180 * MIN, "user_id": "u2", "platform": "web"}))
    records = [r for _, r in sorted(shop, key=lambda x: x[0])]
    canonical = []
    for r in records:
        c = {k: v for k, v in r.items() if k not in ("device_id", "anonymous_id", "account_id")}
        c["user_id"] = r.get("user_id", "u1") if r["event_id"] == "z" else "u1"
        canonical.append(c)
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=len(records)))
    return [orjson.dumps(r) for r in records], [orjson.dumps(r) for r in canonical], sizes


class Pipeline:
    """The identity step, the feature step and the trigger step over shards, as the main flow wires them."""

    def __init__(self, redis_url: str, prefix: str, order: list[int]):
        events = EventsConfig()
        cfg = FeaturesConfig(allowed_lateness="1h")
        self.parser = Parser(events, now_ms=lambda: T0 + 200 * MIN)
        self.identity, self.graph = IdentityEngine(IdentityConfig()), IdentityGraph()
        self.features = FeatureEngine(load_features(FEATURES, events), cfg, events, needed=["cart_items"])
        self.triggers = TriggerEngine(TRIGGERS, int(cfg.allowed_lateness * 1000), 86_400_000,
                                      now_ms=lambda: T0 + 200 * MIN, guards=StateGuards(TRIGGERS, "UTC"))
        self.handoff = RedisHandoff(redis_url, prefix, 600)
        self.flogic: dict[str, FeatureLogic] = {}
        self.tlogic: dict[str, TriggerLogic] = {}
        self.order = order  # the order shards take each batch in (a permutation of SHARDS)
        self.actions: set[tuple[str, str, str]] = set()

    def _shards(self, keyed: list[tuple[str, Any]]) -> list[tuple[str, list[Any]]]:
        by: dict[str, list[Any]] = {}
        for k, x in keyed:
            by.setdefault(k, []).append(x)
        return sorted(by.items(), key=lambda kv: self.order.index(kv[0]))

    def _trigger(self, keyed: list[tuple[str, Any]]) -> None:
        for k, items in self._shards(keyed):
            lg = self.tlogic.get(k) or self.tlogic.setdefault(k, TriggerLogic(self.triggers, None, self.handoff))
            self._collect(lg.on_batch(items)[0])

    def _collect(self, out: list[Any]) -> None:
        for x in out:
            a = x if type(x) is Action else getattr(x, "action", None)
            if a is not None and (type(x) is Action or x.outcome == "fired"):
                self.actions.add((a.trigger_id, a.user_id, a.occurrence))

    def run(self, records: list[bytes], sizes: list[int]) -> None:
        i = 0
        batches = []
        for n in sizes * (len(records) // max(1, min(sizes)) + 1):
            if i >= len(records):
                break
            batches.append(records[i:i + n])
            i += n
        for b in batches:
            parsed = self.parser.parse_batch([(f"t:0:{j}", r) for j, r in enumerate(b)])
            assert not [x for x in parsed if type(x) is DeadLetter], parsed
            resolved = self.identity.apply_batch(self.graph, parsed)
            ordered: list[tuple[str, Any]] = []  # the flow's keying, the shards in this example's order
            for k, items in sorted(shard_batches([resolved], SHARDS), key=lambda kv: self.order.index(kv[0])):
                lg = self.flogic.get(k) or self.flogic.setdefault(
                    k, FeatureLogic(self.features, None, False, 0.0, self.handoff))
                ordered += [(k, x) for x in lg.on_batch([items])[0] if type(x) in (Enriched, Merge)]
            self._trigger(ordered)
        for lg in self.flogic.values():
            lg.on_eof()
        for k in sorted(self.tlogic, key=lambda k: self.order.index(k)):
            self._collect(self.tlogic[k].on_eof()[0])

    def user(self, uid: str) -> dict[str, Any]:
        lg = self.flogic[shard_of(uid, SHARDS)]
        u = lg.state.users[uid]
        return {k: v for k, v in self.features.read_all(u, u.last_ts).items() if k not in SESSION}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) or isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6):
                return False
        elif isinstance(x, dict):
            if x.keys() != y.keys() or any(not math.isclose(x[c], y[c], rel_tol=1e-9, abs_tol=1e-6) for c in x):
                return False
        elif x != y:
            return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(story=stories(), order=st.permutations(list(SHARDS)))
def test_any_interleaving_of_logins_ends_as_if_the_customer_id_was_there_from_the_start(
    story: tuple[list[bytes], list[bytes], list[int]], order: list[int], redis_url: str, key_prefix: str
) -> None:
    records, canonical, sizes = story
    run = uuid.uuid4().hex[:8]  # hand-overs are keyed by merge number, which each example starts again
    seen = Pipeline(redis_url, f"{key_prefix}:{run}:seen", order)
    seen.run(records, sizes)
    truth = Pipeline(redis_url, f"{key_prefix}:{run}:truth", order)
    truth.run(canonical, sizes)

    got, want = seen.user("u1"), truth.user("u1")
    assert same(got, want), {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if not same(
        {k: got.get(k)}, {k: want.get(k)})}
    # an action decided before a login went to the id known then: it is the same shopper's
    assert {(t, seen.graph.resolve(u), o) for t, u, o in seen.actions} == truth.actions
    # every anonymous id now is the customer, and nothing of them stayed behind in any shard
    assert {seen.graph.resolve(i) for i in ("device:d1", "anon:c1", "account:m1")} == {"u1"}
    assert not [u for lg in seen.flogic.values() for u in lg.state.users if u not in ("u1", "u2")]
    assert all(not lg.desk.waiting for lg in [*seen.flogic.values(), *seen.tlogic.values()])


def test_an_awaited_hand_over_survives_a_restart_and_is_taken_once(redis_url: str, key_prefix: str) -> None:
    """Recovery: the absorbing shard snapshots what it still awaits; restored, it takes the hand-over once."""
    engine = TriggerEngine(TRIGGERS, 60_000, 86_400_000, now_ms=lambda: T0, guards=StateGuards(TRIGGERS, "UTC"))
    handoff = RedisHandoff(redis_url, key_prefix, 600)
    cart = Event("e1", "anon:c1", "add_to_cart", T0, platform="web")
    src = TriggerLogic(engine, None, handoff)
    src.on_batch([Enriched(cart, {})])
    dst = TriggerLogic(engine, None, handoff)
    dst.on_batch([Merge("anon:c1", "u1", 1, T0 + MIN, "absorb")])  # the release has not happened yet
    restored = TriggerLogic(engine, dst.snapshot(), handoff)  # a crash and a restart from the snapshot
    assert restored.desk is not None and [m.seq for m in restored.desk.waiting] == [1]
    assert restored.notify_at() is not None  # it will look again soon, without a new batch
    out, _ = src.on_batch([Merge("anon:c1", "u1", 1, T0 + MIN, "release")])
    assert [type(x) for x in out] == [Merge]  # passed on for the guards step; the timer left the shard
    restored.on_notify()
    late = Event("e2", "u1", "browse", T0 + 60 * MIN, platform="web")
    fired, _ = restored.on_batch([Enriched(late, {})])
    fired += restored.on_eof()[0]
    assert [(a.trigger_id, a.user_id, a.occurrence, a.origin_id) for a in fired if type(a) is Action] == [
        ("cart", "u1", "e1", "anon:c1")
    ]
    assert src.on_eof()[0] == []  # nothing fires for the cookie
