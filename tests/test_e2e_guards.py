"""A scripted shopper journey on real Kafka, Redis and chDB: exactly the expected actions, and a decision
row for every matched trigger with each suppression reason; a replay of the same input delivers nothing twice.
On one Redis server and on a Redis Cluster: the same decisions."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main

from connectors.clickhouse import connect
from connectors.tansu import TansuBroker, produce, read_topic
from flows.common import clickhouse_dsn
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.settings import Settings
from tests.helpers import MIN, ev

CONFIG_DIR = Path(__file__).parents[1] / "config"
TRIGGERS = """
defaults: {cooldown: 0, consent: opt_out}
frequency_cap: {per_day: 2, per_week: null}
channels:
  sms: {rate: 0.001, burst: 1}     # one message, then (almost) no refill
triggers:
  - {id: t_browse, kind: event, on: [browse], channel: push, priority: 3, guards: {cooldown: 1h}}
  - {id: t_click, kind: event, on: [click], channel: email, priority: 2, guards: {daily_budget: 1}}
  - {id: t_order, kind: event, on: [order], channel: email, priority: 1}
  - {id: t_fav, kind: event, on: [favourite], channel: email, guards: {consent: opt_in}}
  - id: t_search
    kind: event
    on: [search]
    channel: sms
    guards: {quiet_hours: {start: "21:00", end: "08:00", mode: drop}}
  - {id: t_cart, kind: absence, after: [add_to_cart], unless: [order], within: 30m, guards: {holdout: 100}}
"""


@pytest.fixture
def settings(journey_settings: Callable[[str, str], Settings]) -> Settings:
    return journey_settings("journey", TRIGGERS)


def journey(t0: int) -> list[tuple[bytes, bytes]]:
    """One shopper (or two) per guard; ``t0`` is noon UTC."""
    script = [
        ("u1", "browse", 0, {}), ("u1", "browse", 10, {}),                        # cooldown
        ("u2", "browse", 0, {}), ("u2", "click", 1, {}),                          # fired, fired,
        ("u2", "order", 2, {"amount": 20.0}),                                     # then the day's cap
        ("u3", "click", 3, {}),                                                   # the click budget is spent
        ("u4", "favourite", 0, {}),                                               # opt-in, no grant
        ("u5", "consent", -1, {"channel": "email", "granted": True}), ("u5", "favourite", 0, {}),
        ("u6", "identify", -1, {"timezone": "UTC"}), ("u6", "search", 11 * 60, {}),  # 23:00: quiet hours
        ("u7", "search", 60, {}), ("u8", "search", 61, {}),                        # one sms token
        ("u9", "add_to_cart", 0, {"item_id": "i1", "price": 9.5}),                # held out (100 %)
        ("u10", "browse", 12 * 60, {}),                                           # moves event time on
    ]
    return [(u.encode(), ev(f"{u}-{i}", u, etype, t0 + minute * MIN, **props))
            for i, (u, etype, minute, props) in enumerate(script)]


EXPECTED = {
    ("t_browse", "u1", "u1-0"): ("fired", ""), ("t_browse", "u1", "u1-1"): ("suppressed", "cooldown"),
    ("t_browse", "u2", "u2-2"): ("fired", ""), ("t_click", "u2", "u2-3"): ("fired", ""),
    ("t_order", "u2", "u2-4"): ("suppressed", "frequency_cap"),
    ("t_click", "u3", "u3-5"): ("suppressed", "budget"),
    ("t_fav", "u4", "u4-6"): ("suppressed", "no_consent"), ("t_fav", "u5", "u5-8"): ("fired", ""),
    ("t_search", "u6", "u6-10"): ("suppressed", "quiet_hours"),
    ("t_search", "u7", "u7-11"): ("fired", ""), ("t_search", "u8", "u8-12"): ("suppressed", "rate_limited"),
    ("t_cart", "u9", "u9-13"): ("holdout", "holdout"),
    ("t_browse", "u10", "u10-14"): ("fired", ""),
}


def decisions(s: Settings, base: Path) -> dict[tuple[str, str, str], set[tuple[str, str]]]:
    ch = connect(clickhouse_dsn(s, base))
    try:
        rows = ch.query(f"SELECT trigger_id, user_id, occurrence, outcome, reason, latency_event_ms "
                        f"FROM {s.clickhouse.database}.decisions FINAL").result_rows
    finally:
        ch.close()
    assert all(r[5] >= 0 for r in rows)  # decided after the event happened
    out: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
    for trig, user, occ, outcome, reason, _ in rows:
        out.setdefault((trig, user, occ), set()).add((outcome, reason))
    return out


def run(s: Settings, base: Path) -> None:
    flow, rt = build(deployment(s, base))
    try:
        run_main(flow)
    finally:
        rt.close()


def test_a_scripted_journey_gives_exactly_the_expected_actions_and_decisions(
    settings: Settings, kafka: TansuBroker, tmp_path: Path
) -> None:
    day = 86_400_000
    t0 = (int(time.time() * 1000) // day - 2) * day + 12 * 3_600_000  # noon UTC two days ago
    records = journey(t0)
    assert produce(kafka.bootstrap, settings.kafka.input_topics[0], records) == len(records)

    run(settings, tmp_path)
    assert decisions(settings, tmp_path) == {k: {v} for k, v in EXPECTED.items()}
    fired = sorted(k for k, (outcome, _) in EXPECTED.items() if outcome == "fired")
    actions_topic = f"{settings.kafka.topic_prefix}.actions"
    got = [orjson.loads(m.value()) for m in read_topic(kafka.bootstrap, actions_topic, timeout_s=30)]
    assert sorted((a["trigger_id"], a["user_id"], a["occurrence"]) for a in got) == fired

    # the same input again (a restart without recovery state): nothing is delivered twice
    run(settings, tmp_path)
    assert len(read_topic(kafka.bootstrap, actions_topic, timeout_s=30)) == len(fired)
    again = decisions(settings, tmp_path)
    for key in fired:
        assert again[key] == {("fired", ""), ("suppressed", "duplicate")}
    assert {k: v for k, v in again.items() if k not in fired} == {k: {v} for k, v in EXPECTED.items() if k not in fired}


QUIET = """
defaults: {cooldown: 0, consent: opt_out}
triggers:
  - id: t_miss
    kind: event
    on: [idle]
    condition: "event.props.look == 1 && features.orders_30d >= 1"
    channel: email
  - {id: t_back, kind: event, on: [browse], condition: "features.since_last_event_s >= 86400", channel: push}
"""


def test_a_shopper_gone_quiet_is_reached_while_away_and_their_look_is_no_event(
    journey_settings: Callable[[str, str], Settings], kafka: TansuBroker, tmp_path: Path
) -> None:
    """The shipped features look at shoppers after 1, 3 and 7 quiet days: u1 orders, goes quiet for two days
    and gets the one-day look's message (``on: [idle]``) while away; u2 is back within the day and gets no
    look; the looks are no rows of ``events``, and u1's return is a return after two days, not after a look."""
    s = journey_settings("quiet", QUIET)
    day = 86_400_000
    t0 = (int(time.time() * 1000) // day - 4) * day + 12 * 3_600_000
    script = [("u1", "order", 0, {"amount": 30.0}), ("u2", "browse", 1, {}), ("u2", "browse", 20 * 60, {}),
              ("u3", "browse", 36 * 60, {}), ("u1", "browse", 48 * 60, {})]
    records = [(u.encode(), ev(f"{u}-{i}", u, etype, t0 + minute * MIN, **props))
               for i, (u, etype, minute, props) in enumerate(script)]
    assert produce(kafka.bootstrap, s.kafka.input_topics[0], records) == len(records)
    run(s, tmp_path)
    assert decisions(s, tmp_path) == {
        ("t_miss", "u1", f"idle:u1:{t0 + day}"): {("fired", "")},
        ("t_back", "u1", "u1-4"): {("fired", "")},
    }
    got = [orjson.loads(m.value()) for m in read_topic(kafka.bootstrap, f"{s.kafka.topic_prefix}.actions", timeout_s=30)]
    assert sorted((a["trigger_id"], a["occurrence"], a["event_ts"]) for a in got) == [
        ("t_back", "u1-4", t0 + 48 * 60 * MIN), ("t_miss", f"idle:u1:{t0 + day}", t0 + day)]
    ch = connect(clickhouse_dsn(s, tmp_path))
    try:
        rows = ch.query(f"SELECT count(), countIf(type = 'idle') FROM {s.clickhouse.database}.events FINAL").result_rows
    finally:
        ch.close()
    assert rows == [(5, 0)]
