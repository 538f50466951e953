"""Identity merges in the trigger, label and guard steps, and the channel chosen by the platform last seen.

A merge moves what one shard keeps about a merged-away id (``anon:c1``) to the canonical user (``u1``),
possibly in another process (the part goes through pickle); the result must be what one shard would
have done had every event carried ``u1`` from the start.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from connectors.guard_store import DAY_MS, RedisGuards
from nudgeflow.configload import load_triggers, trigger_features
from nudgeflow.events import Action, Decision, Event, Merge
from nudgeflow.settings import EventsConfig, ModelsFile, TriggersFile
from nudgeflow.yamlconf import ConfigError
from operators.features import Enriched
from operators.guards import StateGuards
from operators.models import LabelEngine, Resolved
from operators.triggers import TriggerEngine, TriggerState

MIN = 60_000
LATENESS = 5 * MIN
CART_W = 30 * MIN
SEQ_W = 10 * MIN
ANON, USER = "anon:c1", "u1"

TRIGGERS = TriggersFile.model_validate({"triggers": [
    {"id": "cart", "kind": "absence", "after": ["add_to_cart"], "unless": ["order"], "within": "30m"},
    {"id": "browsed_then_cart", "kind": "sequence", "first": ["browse"], "then": ["add_to_cart"], "within": "10m"},
]})


def engine(tf: TriggersFile = TRIGGERS, guards: StateGuards | None = None) -> TriggerEngine:
    return TriggerEngine(tf, lateness_ms=LATENESS, idle_ms=10**12, now_ms=lambda: 0, guards=guards)


def ev(eid: str, user: str, etype: str, ts: int, origin: str = "", **props: object) -> Event:
    return Event(eid, user, etype, ts, props=dict(props), position="t:0:0", origin_id=origin)


def moved(eng: TriggerEngine, src: TriggerState, dst: TriggerState, uid: str = ANON, to: str = USER) -> list:
    """Release from one shard, hand over as another process would (pickled), absorb in the other."""
    part = eng.release(src, uid)
    return eng.absorb(dst, to, pickle.loads(pickle.dumps(part))) if part is not None else []


def key(a: Action) -> tuple[str, str, str]:
    """An action as the property compares it: trigger, canonical user, occurrence."""
    return a.trigger_id, USER if a.user_id == ANON else a.user_id, a.occurrence


moments = st.sampled_from(["add_to_cart", "order", "browse"])
carriers = st.sampled_from([ANON, USER])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2 * LATENESS // 1000), moments, carriers), max_size=12),
    st.lists(st.tuples(st.integers(0, 120), moments, carriers), max_size=12),
    st.integers(0, 2**32), st.integers(1, 5),
)
def test_a_merge_gives_the_actions_of_one_id_from_the_start(
    before: list[tuple[int, str, str]], after: list[tuple[int, str, str]], seed: int, batch: int
) -> None:
    """Cart abandonment (absence) and browse-then-cart (sequence) over one shopper seen as ``anon:c1`` and
    ``u1`` until a merge, then always as ``u1`` (the identity step resolves later events, late ones too):
    released from the anonymous shard and absorbed in the user's, the actions are those of one shard
    that saw every event as ``u1``, and those of events the cookie carried name it as their origin.

    Condition (what "the merge arrives before the affected deadlines" means for each kept event): when
    the merge is processed, neither shard's watermark has reached an ``add_to_cart``'s time (as a
    ``then`` it waits for a late ``browse`` only that long; its absence deadline is later still), an
    ``order``'s time + lateness (how long an order is kept with no open cart) or a ``browse``'s time +
    10 min. Events before the merge span up to twice the lateness; those that break it are assumed away.
    """
    rnd = random.Random(seed)
    pre = [(i, LATENESS + s * 1000, etype, who) for i, (s, etype, who) in enumerate(before)]
    start = max((ts for _, ts, _, _ in pre), default=LATENESS) - LATENESS  # later arrivals are at most this late
    post = [(len(pre) + i, start + m * MIN, etype, who) for i, (m, etype, who) in enumerate(after)]
    arrivals = [sorted(part, key=lambda e: e[1] + rnd.uniform(0, LATENESS)) for part in (pre, post)]
    carried = {f"e{i}": who for i, _, _, who in pre + post}

    one, two = engine(), engine()  # two worlds: one shard for u1 from the start; two shards and a merge
    alone, shards = one.new_state(), {ANON: two.new_state(), USER: two.new_state()}
    got_one: list[Action] = []
    got_two: list[Action] = []
    for phase, events in enumerate(arrivals):
        if phase == 1:  # the merge
            marks = [two.watermark(s, 0) for s in shards.values()]
            w = max(marks)
            for _, ts, etype, _ in pre:
                assume(w < {"add_to_cart": ts, "order": ts + LATENESS, "browse": ts + SEQ_W}[etype])
            got_two += moved(two, shards[ANON], shards[USER])
        for i in range(0, len(events), batch):
            for n, ts, etype, who in events[i:i + batch]:
                got_one += one.on_event(alone, Enriched(ev(f"e{n}", USER, etype, ts), {}), 0)
                if phase == 0:
                    got_two += two.on_event(shards[who], Enriched(ev(f"e{n}", who, etype, ts), {}), 0)
                else:
                    origin = ANON if who == ANON else ""
                    got_two += two.on_event(shards[USER], Enriched(ev(f"e{n}", USER, etype, ts, origin), {}), 0)
            got_one += one.advance(alone, one.watermark(alone, 0))
            for s in shards.values():
                got_two += two.advance(s, two.watermark(s, 0))
    got_one += one.advance(alone, max(alone.clock.max_ts, one.max_ts))  # end of input
    for s in shards.values():
        got_two += two.advance(s, max(s.clock.max_ts, two.max_ts))

    assert sorted(map(key, got_two)) == sorted(map(key, got_one))
    assert len({key(a) for a in got_two}) == len(got_two)  # each occurrence once
    for a in got_two:
        # actions of the canonical user name the cookie when the cookie carried the event
        assert a.origin_id == ("" if a.user_id == ANON or carried[a.occurrence] == USER else ANON)
    released = shards[ANON]
    assert not (released.timers or released.sequences or released.profiles)


def test_an_order_by_the_known_user_cancels_the_cart_of_the_cookie_and_a_browse_completes_a_sequence() -> None:
    eng = engine()
    anon, known = eng.new_state(), eng.new_state()
    assert eng.on_event(anon, Enriched(ev("b", ANON, "browse", 0), {}), 0) == []
    assert eng.on_event(known, Enriched(ev("c", USER, "add_to_cart", 2 * MIN), {}), 0) == []  # waits for a browse
    assert eng.on_event(anon, Enriched(ev("c2", ANON, "add_to_cart", 3 * MIN), {}), 0) != []  # anon's own browse
    fired = moved(eng, anon, known)
    # the cookie's browse completes the user's cart event at once, as one shard would have
    assert [(a.trigger_id, a.user_id, a.occurrence, a.origin_id) for a in fired] == [
        ("browsed_then_cart", USER, "c", "")]
    eng.on_event(known, Enriched(ev("o", USER, "order", 20 * MIN), {}), 0)
    eng.on_event(known, Enriched(ev("x", USER, "browse", 3 * CART_W), {}), 0)
    # the order answers both carts: the user's own and the one the cookie added
    assert eng.advance(known, eng.watermark(known, 0)) == []
    assert eng.advance(anon, 10 * CART_W) == [] and eng.release(anon, ANON) is None


def test_profiles_crossings_and_dates_follow_their_rules() -> None:
    tf = TriggersFile.model_validate({"triggers": [
        {"id": "hot", "kind": "crossing", "value": "features.views", "above": 5, "reset_below": 2},
        {"id": "bday", "kind": "date", "attribute": "birthday", "annual": True},
        {"id": "member", "kind": "date", "attribute": "member_since"},
    ]})
    eng = engine(tf)
    anon, known = eng.new_state(), eng.new_state()
    eng.on_event(anon, Enriched(ev("v", ANON, "browse", 0), {"views": 6}), 0)  # fires: anon is above
    eng.on_event(anon, Enriched(ev("i", ANON, "identify", 0, birthday="1990-03-10", tier="gold"), {}), 0)
    eng.on_event(anon, Enriched(ev("k", ANON, "consent", 0, channel="email", granted=False), {}), 0)
    eng.on_event(anon, Enriched(ev("k2", ANON, "consent", 2, channel="sms", granted=False), {}), 0)
    eng.on_event(known, Enriched(ev("j", USER, "identify", 0, member_since="1970-06-01", tier="silver"), {}), 0)
    eng.on_event(known, Enriched(ev("l", USER, "consent", 1, channel="email", granted=True), {}), 0)
    eng.on_event(known, Enriched(ev("l2", USER, "consent", 1, channel="sms", granted=True), {}), 0)
    moved(eng, anon, known)
    p = known.profiles[USER]
    # consent: the newer statement, whichever id made it; attributes: the user's own win, the cookie's fill gaps
    assert p.consent == {"email": True, "sms": False}
    assert p.attrs == {"birthday": "1990-03-10", "member_since": "1970-06-01", "tier": "silver"}
    # fired by the cookie: the merged shopper does not fire again until the value falls below reset_below
    assert eng.on_event(known, Enriched(ev("v2", USER, "browse", 1), {"views": 7}), 0) == []
    eng.on_event(known, Enriched(ev("v3", USER, "browse", 2), {"views": 1}), 0)
    rises = eng.on_event(known, Enriched(ev("v4", USER, "browse", 3), {"views": 6}), 0)
    assert [a.trigger_id for a in rises] == ["hot"]
    # the birthday schedule moved with the birthday; both dates fire for the user in their shard
    dates = eng.advance(known, 2 * 365 * DAY_MS)
    assert {(a.trigger_id, a.user_id) for a in dates} == {("bday", USER), ("member", USER)}
    assert eng.advance(anon, 2 * 365 * DAY_MS) == []


def test_a_held_action_ends_its_hold_with_the_profile_its_user_had() -> None:
    tf = TriggersFile.model_validate({"triggers": [
        {"id": "welcome", "kind": "event", "on": ["browse"],
         "guards": {"consent": "opt_in", "quiet_hours": {"start": "21:00", "end": "08:00"}}},
    ]})
    eng = engine(tf, StateGuards(tf))
    anon, known = eng.new_state(), eng.new_state()
    eng.on_event(anon, Enriched(ev("k", ANON, "consent", 0, channel="email", granted=True), {}), 0)
    night = 22 * 3_600_000  # 22:00 UTC
    [held] = eng.on_event(anon, Enriched(ev("b", ANON, "browse", night), {}), 0)
    assert isinstance(held, Decision) and held.outcome == "held"
    moved(eng, anon, known)
    assert USER in known.profiles and ANON in anon.departed
    [decided] = eng.advance(anon, night + 11 * 3_600_000)
    # granted by the cookie before the merge: the held message goes out as decided, not refused for consent
    assert (decided.user_id, decided.action_id) == (ANON, held.action.action_id) and not anon.departed


# -- channel by platform

CHANNELS = {"id": "hello", "kind": "event", "on": ["browse"], "channel": "sms",
            "channel_by_platform": {"app": "push", "web": "email"}, "payload": {"via": "${channel}"}}


def test_the_channel_follows_the_platform_last_seen_and_its_guards_judge_it() -> None:
    tf = TriggersFile.model_validate({"triggers": [
        CHANNELS,
        {"id": "cart", "kind": "absence", "after": ["add_to_cart"], "unless": ["order"], "within": "30m",
         "channel_by_platform": {"mini_program": "wechat"}},
    ]})
    eng = engine(tf, StateGuards(tf))
    s = eng.new_state()
    fired = [eng.on_event(s, Enriched(ev(f"b{p}", USER, "browse", 0), feats), 0)[0]
             for p, feats in enumerate([{"last_platform": "app"}, {"last_platform": "web"},
                                        {"last_platform": "mini_program"}, {}])]
    assert [(a.channel, a.payload["via"]) for a in fired] == [
        ("push", "push"), ("email", "email"), ("sms", "sms"), ("sms", "sms")]  # unlisted or unknown: `channel`
    eng.on_event(s, Enriched(ev("k", USER, "consent", 1, channel="push", granted=False), {}), 0)
    [refused] = eng.on_event(s, Enriched(ev("b9", USER, "browse", 2), {"last_platform": "app"}), 0)
    [ok] = eng.on_event(s, Enriched(ev("b10", USER, "browse", 3), {"last_platform": "web"}), 0)
    assert (refused.outcome, refused.reason, refused.action.channel) == ("suppressed", "no_consent", "push")
    assert type(ok) is Action and ok.channel == "email"
    # a pending cart keeps the platform of the event that opened it, and fires on that platform's channel
    eng.on_event(s, Enriched(ev("c", USER, "add_to_cart", 0), {"last_platform": "mini_program", "n": 1}), 0)
    [cart] = eng.advance(s, CART_W)
    assert (cart.channel, cart.features) == ("wechat", {"last_platform": "mini_program"})
    assert trigger_features(tf) == {"last_platform"}
    assert trigger_features(TRIGGERS) == set()


def test_unknown_platforms_are_refused_naming_trigger_and_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="trigger 'hello': channel_by_platform has unknown platform 'tv'"):
        TriggersFile.model_validate({"triggers": [CHANNELS | {"channel_by_platform": {"tv": "push"}}]})
    path = tmp_path / "triggers.yaml"
    path.write_text("triggers:\n  - id: hello\n    kind: event\n    on: [browse]\n"
                    "    channel_by_platform:\n      ios: push\n")
    with pytest.raises(ConfigError) as e:
        load_triggers(path, EventsConfig())
    msg = str(e.value)
    assert "triggers.yaml:6: triggers.0.channel_by_platform:" in msg and "'ios'" in msg and "write 'app'" in msg
    with pytest.raises(ValidationError, match="names no channel"):
        TriggersFile.model_validate({"triggers": [CHANNELS | {"channel_by_platform": {"web": ""}}]})


# -- labels

MODELS = ModelsFile.model_validate({"models": [
    {"name": "buy", "label": {"events": ["order"], "within": "1h"}, "features": ["views"], "sample_every": "1h"},
]})
HOUR = 3_600_000


def scored(eid: str, user: str, ts: int, etype: str = "browse") -> Enriched:
    return Enriched(ev(eid, user, etype, ts), {}, {"buy": 0.3}, {"buy": (1, {"views": 1.0})})


def label_moved(eng: LabelEngine, src: object, dst: object) -> list[Resolved]:
    part = eng.release(src, ANON)  # type: ignore[arg-type]
    assert part is not None
    return eng.absorb(dst, USER, pickle.loads(pickle.dumps(part)))  # type: ignore[arg-type]


def test_pending_examples_move_and_resolve_once_for_the_canonical_user() -> None:
    eng = LabelEngine(MODELS, lateness_ms=0, idle_ms=10**12)
    anon, known = eng.new_state(), eng.new_state()
    eng.on_event(anon, scored("a", ANON, 0), 0)
    eng.on_event(known, scored("k", USER, 10 * 60_000), 0)
    assert label_moved(eng, anon, known) == []
    # one pending example per user per sample_every: the cookie's (earlier) stays, the user's later one goes
    assert [p.event_id for p in known.pending[("buy", USER)]] == ["a"] and eng.release(anon, ANON) is None
    eng.on_event(known, scored("o", USER, 20 * 60_000, "order"), 0)  # labels it; learned at its deadline
    [r] = eng.advance(known, HOUR)
    assert (r.user_id, r.event_id, r.label, r.resolved_ts) == (USER, "a", True, 20 * 60_000)
    # nothing resolves again: not in the user's shard, not in the cookie's
    assert eng.advance(known, 10 * HOUR) == [] and eng.advance(anon, 10 * HOUR) == []
    eng.on_event(known, scored("p", USER, 10 * HOUR), 0)  # sampling goes on for the user
    assert [p.event_id for p in known.pending[("buy", USER)]] == ["p"]


def test_a_label_the_user_already_had_settles_the_cookies_example() -> None:
    eng = LabelEngine(MODELS, lateness_ms=0, idle_ms=10**12)
    anon, known = eng.new_state(), eng.new_state()
    eng.on_event(anon, scored("a", ANON, 0), 0)
    eng.on_event(known, scored("o", USER, 30 * 60_000, "order"), 0)
    assert label_moved(eng, anon, known) == []
    # labelled by the user's order; the user's own example at 30 min is one the shopper would not have had
    # (within sample_every of the cookie's): dropped, and the next sample is due an hour after the cookie's
    assert [(p.event_id, p.labelled) for p in known.pending[("buy", USER)]] == [("a", 30 * 60_000)]
    assert known.last_sample[("buy", USER)] == 0
    [r] = eng.advance(known, HOUR)  # learned at its deadline
    assert (r.user_id, r.event_id, r.label, r.resolved_ts) == (USER, "a", True, 30 * 60_000)
    assert eng.advance(known, 10 * HOUR) == [] and eng.advance(anon, 10 * HOUR) == []


# -- guard counters in Redis

@pytest.fixture
def guards(guards_of) -> Callable[..., RedisGuards]:
    def make(**file: object) -> RedisGuards:
        return guards_of(TriggersFile.model_validate({"defaults": {"cooldown": 0}, "triggers": [
            {"id": "t0", "kind": "event", "on": ["browse"]},
            {"id": "t1", "kind": "event", "on": ["browse"], "guards": {"cooldown": "1d"}},
        ]} | file))

    return make


DAY = 20_000 * DAY_MS


def send(g: RedisGuards, trigger: str, user: str, occurrence: str, ts: int) -> str:
    a = Action(f"{trigger}/{user}/{occurrence}", trigger, user, "email", occurrence, ts, ts, ts, {}, {})
    [d] = g.decide_batch([a])
    return d.outcome if d.outcome == "fired" else d.reason


def merge_link(seq: int, ts: int = DAY, src: str = "anon:x") -> Merge:
    return Merge(src, USER, seq, ts, "release")


def test_a_message_to_the_cookie_counts_against_the_users_cap_after_a_merge(guards) -> None:
    g = guards(frequency_cap={"per_day": 1, "per_week": 10})
    cookie = Action("t0/anon:x/1", "t0", "anon:x", "email", "1", DAY + HOUR, DAY + HOUR, DAY + HOUR, {}, {})
    # in stream order: the cookie's candidate, then the merge its shard passed on after it
    assert [d.outcome for d in g.decide_batch([cookie, merge_link(1)])] == ["fired"]
    assert send(g, "t0", USER, "2", DAY + 2 * HOUR) == "frequency_cap"
    assert send(g, "t0", USER, "3", DAY + DAY_MS) == "fired"  # a new day
    # no counter left under the cookie (a cluster keeps its idempotency key and what the merge took there)
    assert [k for k in g.client.keys(f"{g.prefix}:{{anon:x}}:*") if b":idem:" not in k and b":moved:" not in k] == []


def test_a_replayed_merge_counts_once_and_cooldowns_keep_the_later_send(guards) -> None:
    g = guards(frequency_cap={"per_day": 3, "per_week": 10})
    assert send(g, "t1", "anon:x", "1", DAY + 5 * HOUR) == "fired"  # t1 has a one-day cooldown
    assert send(g, "t0", USER, "2", DAY + HOUR) == "fired"
    for _ in range(2):  # the same links again: a replay after a crash
        g.decide_batch([merge_link(7)])
    day = DAY // DAY_MS
    assert g.client.get(f"{g.prefix}:{{{USER}}}:cap:d:{day}") == b"2"
    assert g.client.get(f"{g.prefix}:{{{USER}}}:cap:w:{(day + 3) // 7}") == b"2"
    assert 0 < g.client.pttl(f"{g.prefix}:{{{USER}}}:cap:d:{day}") <= 2 * DAY_MS
    assert send(g, "t1", USER, "3", DAY + 6 * HOUR) == "cooldown"  # the cookie's send started it
    assert send(g, "t0", USER, "4", DAY + 7 * HOUR) == "fired"
    assert send(g, "t0", USER, "5", DAY + 8 * HOUR) == "frequency_cap"
    # the cookie is counted again after the merge (a held message delivered to it): replaying seq 7 does not
    # move it, it was applied; a later merge of the cookie (a new seq) does
    assert send(g, "t0", "anon:x", "6", DAY + 9 * HOUR) == "fired"
    g.decide_batch([merge_link(7)])
    assert g.client.get(f"{g.prefix}:{{{USER}}}:cap:d:{day}") == b"3"
    g.decide_batch([merge_link(8)])
    assert g.client.get(f"{g.prefix}:{{{USER}}}:cap:d:{day}") == b"4"
