"""End to end on real services: tansu Kafka in, the main flow, Redis features, Kafka actions and DLQ, chDB rows."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import redis
from bytewax.testing import run_main

from connectors.clickhouse import connect
from connectors.redis_store import FeatureReader
from connectors.tansu import TansuBroker, produce, read_topic
from flows.common import clickhouse_dsn
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.settings import Settings
from tests.helpers import CART_AND_BIG_SPENDER, MIN, ev, kafka_settings

CONFIG_DIR = Path(__file__).parents[1] / "config"




@pytest.fixture
def settings(kafka: TansuBroker, redis_url: str, key_prefix: str, topic_prefix: str, chdb_path: Path,
             ch_database: str, tmp_path: Path) -> Settings:
    (tmp_path / "triggers.yaml").write_text(CART_AND_BIG_SPENDER)
    return kafka_settings(
        kafka, topic_prefix + "shop", redis_url, key_prefix, chdb_path, ch_database, tmp_path / "triggers.yaml",
        events={"max_future": "5m", "currency_rates": {"USD": 1.0, "EUR": 2.0}}, clickhouse={"batch_rows": 7},
    )


def test_kafka_to_redis_actions_dlq_and_clickhouse(settings: Settings, kafka: TansuBroker, redis_url: str,
                                                   key_prefix: str, tmp_path: Path) -> None:
    t0 = int(time.time() * 1000) - 3 * 3600_000
    good = [
        # u1: two views, a cart add, no order, then a browse 45 min later -> one cart reminder
        (b"u1", ev("a1", "u1", "browse", t0, item_id="i1", category="shoes", price=30.0)),
        (b"u1", ev("a2", "u1", "browse", t0 + 1 * MIN, item_id="i2", category="shoes", price=30.0)),
        (b"u1", ev("a3", "u1", "add_to_cart", t0 + 2 * MIN, item_id="i2", category="shoes", price=30.0)),
        (b"u1", ev("a4", "u1", "browse", t0 + 45 * MIN, item_id="i3", category="bags", price=80.0)),
        # u2: adds and orders within 30 min (in EUR, normalised to USD at 2.0) -> no reminder, one big_spender
        (b"u2", ev("b1", "u2", "add_to_cart", t0 + 1 * MIN, item_id="i9", category="tv", price=60.0, currency="EUR")),
        (b"u2", ev("b2", "u2", "order", t0 + 10 * MIN, order_id="o1", amount=60.0, currency="EUR",
                   items=[{"item_id": "i9", "price": 60.0, "quantity": 1}])),
        (b"u2", ev("b3", "u2", "browse", t0 + 50 * MIN, item_id="i1", category="shoes", price=30.0)),
        # u3: the order arrives before the cart add but happened after it -> still no reminder
        (b"u3", ev("c2", "u3", "order", t0 + 6 * MIN, order_id="o2", amount=20.0, currency="USD")),
        (b"u3", ev("c1", "u3", "add_to_cart", t0 + 5 * MIN, item_id="i4", category="toys", price=20.0)),
        (b"u3", ev("c3", "u3", "browse", t0 + 60 * MIN, item_id="i4", category="toys", price=20.0)),
    ]
    duplicate = ev("a2", "u1", "browse", t0 + 1 * MIN, item_id="i2", category="shoes", price=30.0)
    too_late = ev("c0", "u3", "browse", t0 + 40 * MIN)  # 20 min behind u3's newest event, lateness is 5 min
    bad = {
        b'{"event_id": "x1", "user_id": ': "malformed_json",
        orjson.dumps({"event_id": "x2", "type": "browse", "ts": t0}): "missing_field",
        orjson.dumps({"event_id": "x3", "user_id": 7, "type": "browse", "ts": t0}): "invalid_field",
        orjson.dumps({"event_id": "x4", "user_id": "u9", "type": "teleport", "ts": t0}): "unknown_type",
        orjson.dumps({"event_id": "x5", "user_id": "u9", "type": "browse", "ts": t0, "props": {"pad": "x" * 70_000}}): "oversized",
        orjson.dumps({"event_id": "x6", "user_id": "u9", "type": "browse", "ts": t0 + 10 * 86400_000}): "future_ts",
        duplicate: "duplicate",
        too_late: "too_late",
    }
    records = good + [(b"u1", duplicate), (b"u3", too_late)] + [(b"u9", raw) for raw in bad if raw not in (duplicate, too_late)]
    topic = settings.kafka.input_topics[0]
    assert produce(kafka.bootstrap, topic, records) == len(records)

    flow, rt = build(deployment(settings, tmp_path))
    try:
        run_main(flow)
    finally:
        rt.close()

    # Redis: one hash per user with the window count, the valid-at time and a TTL
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    users = FeatureReader(redis_url, key_prefix).get_many(["u1", "u2"])
    u1 = users["u1"]
    assert u1["events_1h"] == 4  # the duplicate of a2 is not counted
    assert u1["_ts"] == str(t0 + 45 * MIN) and u1["first_seen_ts"] == t0
    assert users["u2"]["events_1h"] == 3
    assert 0 < r.ttl(f"{key_prefix}:u:u1") <= 86400
    assert not r.exists(f"{key_prefix}:u:u9")

    # actions: exactly the cart reminder for u1 and the big spender for u2 (60 EUR = 120 USD)
    prefix = settings.kafka.topic_prefix
    actions = [orjson.loads(m.value()) for m in read_topic(kafka.bootstrap, f"{prefix}.actions")]
    assert sorted((a["trigger_id"], a["user_id"]) for a in actions) == [("big_spender", "u2"), ("cart_abandonment", "u1")]
    cart = next(a for a in actions if a["trigger_id"] == "cart_abandonment")
    assert cart["occurrence"] == "a3" and cart["event_ts"] == t0 + 32 * MIN and cart["payload"] == {"template": "cart_reminder"}

    # DLQ: the original bytes as value, the reason in a header
    dead = read_topic(kafka.bootstrap, f"{prefix}.dlq")
    got = {m.value(): dict(m.headers())["reason"].decode() for m in dead}
    assert got == bad
    assert all(dict(m.headers())["position"].decode().startswith(topic + ":") for m in dead)

    # ClickHouse: every accepted event once, the dead letters and the actions
    ch = connect(clickhouse_dsn(settings, tmp_path))
    try:
        db = settings.clickhouse.database
        assert ch.query(f"SELECT count() FROM {db}.events FINAL").result_rows == [(len(good),)]
        assert ch.query(f"SELECT amount FROM {db}.events FINAL WHERE event_id = 'b2'").result_rows == [(120.0,)]
        reasons = dict(ch.query(f"SELECT reason, count() FROM {db}.dlq FINAL GROUP BY reason").result_rows)
        assert reasons == {reason: 1 for reason in bad.values()}
        assert ch.query(f"SELECT count() FROM {db}.actions FINAL").result_rows == [(2,)]
    finally:
        ch.close()
