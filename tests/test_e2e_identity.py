"""End to end on real services: one shopper across app and web, anonymous until login.

An anonymous app session (a device id) fills a cart; the shopper logs in on the web; no order follows.
Exactly one cart reminder fires, for the customer id, counted once against the frequency cap that
already counts a message the anonymous device got before the login. On one Redis server and on a Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main

from connectors.clickhouse import connect
from connectors.redis_client import redis_client
from connectors.redis_store import FeatureReader
from connectors.tansu import TansuBroker, produce, read_topic
from flows.common import clickhouse_dsn
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.settings import Settings
from tests.helpers import CART_ABANDONMENT, MIN

TRIGGERS = f"""
defaults: {{cooldown: 0, consent: opt_out, holdout: 0}}
control_group: 0
frequency_cap: {{per_day: 2}}
triggers:
  - id: app_welcome
    kind: event
    on: [browse]
    condition: 'event.props.item_id == "i0"'
    channel: push{CART_ABANDONMENT}
    payload: {{template: cart_reminder, items: "${{features.cart_items}}"}}
"""


def wire(eid: str, etype: str, ts: int, platform: str, ids: dict[str, str], **props: object) -> bytes:
    return orjson.dumps({"event_id": eid, "type": etype, "ts": ts, "platform": platform, **ids, "props": props})


@pytest.fixture
def settings(journey_settings: Callable[[str, str], Settings]) -> Settings:
    return journey_settings("id", TRIGGERS)


def test_anonymous_app_cart_then_web_login_gets_one_reminder(
    settings: Settings, kafka: TansuBroker, any_redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    day = int(time.time() // 86400 - 1) * 86400_000
    t0 = day + 10 * 3600_000  # yesterday 10:00 UTC: every message falls on one day of the cap
    app, web = {"device_id": "d1"}, {"anonymous_id": "c1"}
    records = [
        wire("e1", "browse", t0, "app", app, item_id="i0", category="shoes", price=30.0),  # welcome: to the device
        wire("e2", "add_to_cart", t0 + 1 * MIN, "app", app, item_id="i1", category="shoes", price=30.0),
        wire("e3", "browse", t0 + 3 * MIN, "web", web, item_id="i2", category="bags", price=80.0),
        # the login on the web names the web cookie and the app the shopper signed in from
        wire("e4", "identify", t0 + 4 * MIN, "web", {"user_id": "u1", "anonymous_id": "c1", "device_id": "d1"}),
        wire("e5", "browse", t0 + 5 * MIN, "web", {"user_id": "u1", "anonymous_id": "c1"}, item_id="i3", category="bags"),
        wire("e6", "browse", t0 + 50 * MIN, "web", {"user_id": "u1"}, item_id="i4", category="bags"),
        # a cycle and a self-alias: refused, the graph unchanged
        orjson.dumps({"event_id": "e7", "type": "alias", "ts": t0 + 51 * MIN, "user_id": "u1", "previous_id": "u1"}),
        wire("e8", "browse", t0 + 90 * MIN, "web", {"user_id": "u2"}, item_id="i4"),  # moves event time on
    ]
    topic = settings.kafka.input_topics[0]
    assert produce(kafka.bootstrap, topic, [(b"k", r) for r in records]) == len(records)

    flow, rt = build(deployment(settings, tmp_path))
    try:
        run_main(flow)
    finally:
        rt.close()

    prefix = settings.kafka.topic_prefix
    actions = [orjson.loads(m.value()) for m in read_topic(kafka.bootstrap, f"{prefix}.actions")]
    assert sorted((a["trigger_id"], a["user_id"]) for a in actions) == [
        ("app_welcome", "device:d1"), ("cart_abandonment", "u1")
    ]
    reminder = next(a for a in actions if a["trigger_id"] == "cart_abandonment")
    assert reminder["occurrence"] == "e2" and reminder["payload"]["items"] == 1

    # guards: the device's message moved to the customer: two on the day's cap, not three, none left on the device
    r = redis_client(any_redis_url, decode_responses=True)
    cap = f"{key_prefix}:{{u1}}:cap:d:{t0 // 86400_000}"
    assert r.get(cap) == "2"
    assert not r.exists(f"{key_prefix}:{{device:d1}}:cap:d:{t0 // 86400_000}")

    # features: one profile, read by any of its ids; the device's and cookie's own hashes are gone
    reader = FeatureReader(any_redis_url, key_prefix)
    u1 = reader.get("u1")
    assert u1["events_30d"] == 6 and u1["cart_items"] == 1 and u1["platforms_7d"] == 2
    assert u1["last_platform"] == "web" and u1["views_1h_app"] == 1
    assert reader.get("device:d1") == u1 and reader.get("anon:c1") == u1
    assert not r.exists(f"{key_prefix}:u:device:d1") and not r.exists(f"{key_prefix}:u:anon:c1")

    # DLQ: the self-alias, with its bytes
    dead = {dict(m.headers())["reason"].decode(): m.value() for m in read_topic(kafka.bootstrap, f"{prefix}.dlq")}
    assert dead == {"self_alias": records[6]}

    ch = connect(clickhouse_dsn(settings, tmp_path))
    try:
        db = settings.clickhouse.database
        rows = ch.query(f"SELECT event_id, user_id, origin_id FROM {db}.events FINAL ORDER BY event_id").result_rows
        assert rows[:6] == [
            ("e1", "device:d1", ""), ("e2", "device:d1", ""), ("e3", "anon:c1", ""), ("e4", "u1", ""),
            ("e5", "u1", ""), ("e6", "u1", ""),
        ]
        links = ch.query(f"SELECT src, canonical, kind, outcome FROM {db}.identity_links FINAL ORDER BY src").result_rows
        assert links == [("anon:c1", "u1", "identify", "merged"), ("device:d1", "u1", "identify", "merged")]
        decided = ch.query(
            f"SELECT user_id, origin_id, outcome FROM {db}.decisions FINAL WHERE trigger_id = 'cart_abandonment'"
        ).result_rows
        assert decided == [("u1", "device:d1", "fired")]
    finally:
        ch.close()
