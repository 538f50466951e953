"""The consent store in Redis, on one server and on a Redis Cluster: consent statements become fields of a
per-shopper hash where they stand in the stream, the newest by event time wins (at equal times a refusal),
the guard script refuses what the store says was refused (also when another system wrote it), merges carry
it by the same rule, and keyed state and Redis agree whatever order the statements arrive in."""

from __future__ import annotations

import time
from collections.abc import Callable
import uuid
from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.consent_store import ConsentStore, consent_key
from connectors.redis_client import redis_client
from connectors.tansu import TansuBroker, produce, read_topic
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.events import Action, Consent, Merge
from nudgeflow.settings import Settings, TriggersFile
from operators.guards import Profile
from tests.helpers import MIN, ev, query

FILE = TriggersFile.model_validate({
    "defaults": {"cooldown": 0},
    "frequency_cap": {"per_day": None, "per_week": None},
    "triggers": [{"id": "t", "kind": "event", "on": ["browse"]},
                 {"id": "texts", "kind": "event", "on": ["browse"], "channel": "sms"}],
})


def action(user: str, occurrence: str, ts: int, trigger: str = "t", channel: str = "email") -> Action:
    return Action(f"{trigger}/{user}/{occurrence}", trigger, user, channel, occurrence, ts, ts, ts, {}, {})


def reasons(decided: list) -> list[tuple[str, str]]:
    return [(d.action.occurrence, d.reason) for d in decided]


def test_statements_are_stored_where_they_stand_in_the_stream(guards_of, any_redis_url: str) -> None:
    g = guards_of(FILE)
    # a candidate before the refusal in the user's stream is decided before it; the one after is refused
    got = g.decide_batch([action("u1", "1", 10), Consent("u1", "email", False, 20), action("u1", "2", 30),
                          Consent("u2", "sms", True, 5)])
    assert reasons(got) == [("1", ""), ("2", "no_consent")]
    raw = redis_client(any_redis_url, decode_responses=True)
    assert raw.hgetall(consent_key(g.prefix, "u1")) == {"email": "denied:20"}
    assert raw.hgetall(consent_key(g.prefix, "u2")) == {"sms": "granted:5"}
    # an older statement (a late event, a replay) changes nothing; a newer grant lifts the refusal
    g.decide_batch([Consent("u1", "email", True, 15), Consent("u1", "email", False, 20)])
    assert raw.hgetall(consent_key(g.prefix, "u1")) == {"email": "denied:20"}
    assert reasons(g.decide_batch([Consent("u1", "email", True, 40), action("u1", "3", 50)])) == [("3", "")]
    # at equal times the refusal wins, whichever arrives first
    g.decide_batch([Consent("u1", "email", False, 40), Consent("u1", "email", True, 40)])
    assert ConsentStore(any_redis_url, g.prefix).get("u1") == {"email": (False, 40)}


def test_a_refusal_written_by_another_system_is_honoured(guards_of, any_redis_url: str) -> None:
    g = guards_of(FILE)
    crm = ConsentStore(any_redis_url, g.prefix)
    assert crm.set("u3", "SMS", False, 1_000)
    assert not crm.set("u3", "sms", True, 999)  # older than what is there
    raw = redis_client(any_redis_url)
    raw.hset(consent_key(g.prefix, "u4"), "email", "denied")  # by hand, without a time
    got = g.decide_batch([action("u3", "1", 2_000, "texts", "sms"), action("u3", "2", 2_000),
                          action("u4", "3", 2_000), action("u4", "4", 2_000, "texts", "sms")])
    assert sorted(reasons(got)) == [("1", "no_consent"), ("2", ""), ("3", "no_consent"), ("4", "")]
    assert crm.get("u4") == {"email": (False, 0)}


def test_a_merge_keeps_the_newer_statement_per_channel_once(guards_of, any_redis_url: str) -> None:
    g = guards_of(FILE)
    crm = ConsentStore(any_redis_url, g.prefix)
    for user, channel, granted, ts in [("anon:x", "email", False, 20), ("anon:x", "sms", True, 5),
                                       ("anon:x", "push", True, 1), ("u1", "email", True, 10),
                                       ("u1", "sms", False, 5)]:
        crm.set(user, channel, granted, ts)
    g.decide_batch([Merge("anon:x", "u1", 1, 30, "release")])
    assert crm.get("u1") == {"email": (False, 20), "sms": (False, 5), "push": (True, 1)}
    assert crm.get("anon:x") == {}
    # a replay of the merge moves nothing again, even what the id was told since
    crm.set("anon:x", "email", True, 50)
    g.decide_batch([Merge("anon:x", "u1", 1, 30, "release")])
    assert crm.get("u1")["email"] == (False, 20) and crm.get("anon:x") == {"email": (True, 50)}


said_or_sent = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["email", "sms"]), st.sampled_from([True, False, None]),
              st.integers(0, 4)),  # granted, refused, or a candidate on the channel
    min_size=1, max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(said_or_sent, st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_keyed_state_and_redis_agree_whatever_the_order_and_the_merge(guards_of, any_redis_url, stream, cuts) -> None:
    """Statements and candidates of two ids in any order, cut into batches: Redis refuses exactly the candidates
    the ids' profiles refuse where they stand, and holds what the profiles hold; after merging ``a`` into ``b``
    both hold what one id that made every statement would."""
    g = guards_of(FILE)
    store = ConsentStore(any_redis_url, g.prefix)
    run = uuid.uuid4().hex[:8]  # ids of this example
    ids = {"a": f"anon:{run}", "b": f"u{run}"}
    profiles = {k: Profile() for k in ids}
    items: list[Action | Consent] = []
    refused: dict[str, str] = {}
    for n, (k, ch, granted, ts) in enumerate(stream):
        if granted is None:
            items.append(action(ids[k], str(n), ts, channel=ch))
            refused[str(n)] = "no_consent" if profiles[k].consent.get(ch) is False else ""
        else:
            items.append(Consent(ids[k], ch, granted, ts))
            profiles[k].state(ch, granted, ts)
    got: list = []
    i = 0
    for cut in cuts * len(items):
        if i >= len(items):
            break
        got += g.decide_batch(items[i:i + cut])
        i += cut
    assert dict(reasons(got)) == refused

    def held(p: Profile) -> dict[str, tuple[bool, int]]:
        return {ch: (p.consent[ch], p.said[ch]) for ch in p.consent}

    assert store.get(ids["a"]) == held(profiles["a"]) and store.get(ids["b"]) == held(profiles["b"])
    g.decide_batch([Merge(ids["a"], ids["b"], 1, 10, "release")])
    profiles["b"].take_consent(profiles["a"])
    one = Profile()
    for _, ch, granted, ts in reversed(stream):
        if granted is not None:
            one.state(ch, granted, ts)
    assert store.get(ids["b"]) == held(profiles["b"]) == held(one)


# -- end to end: Kafka, the main flow, Redis, chDB

TRIGGERS = """
defaults: {cooldown: 0, consent: opt_out}
frequency_cap: {per_day: null, per_week: null}
channels:
  sms: {consent: opt_in}           # every sms needs a grant
triggers:
  - {id: mail, kind: event, on: [browse], channel: email}
  - {id: text, kind: event, on: [search], channel: sms}
"""


@pytest.fixture
def flow_settings(journey_settings: Callable[[str, str], Settings]) -> Settings:
    return journey_settings("consent", TRIGGERS)


def test_consent_events_and_a_crm_refusal_decide_the_flows_actions(
    flow_settings: Settings, kafka: TansuBroker, any_redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    t0 = (int(time.time() * 1000) // 86_400_000 - 1) * 86_400_000 + 12 * 3_600_000  # noon UTC yesterday
    script = [
        ("u1", "consent", 0, {"channel": "email", "granted": False}), ("u1", "browse", 1, {}),   # refused by event
        ("u2", "browse", 1, {}),                                                               # refused by the CRM
        ("u3", "consent", 0, {"channel": "sms", "status": "opt_in"}), ("u3", "search", 1, {}),  # granted
        ("u4", "search", 1, {}),                                                               # sms is opt-in
        # out of order: the later grant arrives first, the older refusal does not undo it
        ("u5", "consent", 2, {"channel": "email", "granted": True}),
        ("u5", "consent", 1, {"channel": "email", "granted": False}), ("u5", "browse", 3, {}),
        ("u6", "browse", 10, {}),                                                              # moves time on
    ]
    records = [(u.encode(), ev(f"{u}-{i}", u, etype, t0 + minute * MIN, **props))
               for i, (u, etype, minute, props) in enumerate(script)]
    assert produce(kafka.bootstrap, flow_settings.kafka.input_topics[0], records) == len(records)
    ConsentStore(any_redis_url, key_prefix).set("u2", "email", False, t0 - MIN)  # the preference centre

    flow, rt = build(deployment(flow_settings, tmp_path))
    try:
        run_main(flow)
    finally:
        rt.close()

    rows = query(flow_settings, tmp_path, "SELECT trigger_id, user_id, outcome, reason FROM {db}.decisions FINAL")
    assert sorted(rows) == [
        ("mail", "u1", "suppressed", "no_consent"), ("mail", "u2", "suppressed", "no_consent"),
        ("mail", "u5", "fired", ""), ("mail", "u6", "fired", ""),
        ("text", "u3", "fired", ""), ("text", "u4", "suppressed", "no_consent"),
    ]
    actions = read_topic(kafka.bootstrap, f"{flow_settings.kafka.topic_prefix}.actions", timeout_s=30)
    assert sorted(orjson.loads(m.value())["user_id"] for m in actions) == ["u3", "u5", "u6"]
    store = ConsentStore(any_redis_url, key_prefix)
    assert store.get("u1") == {"email": (False, t0)}
    assert store.get("u3") == {"sms": (True, t0)}
    assert store.get("u5") == {"email": (True, t0 + 2 * MIN)}
