"""Metrics, health and logs: the real main flow on tansu Kafka scraped over HTTP, readiness, JSON log lines."""

from __future__ import annotations

import gc
import io
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from bytewax.testing import run_main

from connectors.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row, migrate
from connectors.metrics import FlowMetrics
from connectors.tansu import TansuBroker, produce
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.events import Event
from nudgeflow.logs import JsonFormatter, SecretMask, configure, secrets_of, tag_worker
from nudgeflow.settings import ClickHouseConfig, Settings
from tests.helpers import CART_AND_BIG_SPENDER, MIN, dead_endpoint, ev, free_port, kafka_settings, scrape, value

CONFIG_DIR = Path(__file__).parents[1] / "config"


def test_main_flow_metrics_and_health(kafka: TansuBroker, redis_url: str, key_prefix: str, topic_prefix: str,
                                      chdb_path: Path, ch_database: str, tmp_path: Path) -> None:
    (tmp_path / "triggers.yaml").write_text(CART_AND_BIG_SPENDER)
    prefix = topic_prefix + "shop"
    port = free_port()
    settings = kafka_settings(kafka, prefix, redis_url, key_prefix, chdb_path, ch_database, tmp_path / "triggers.yaml",
                              partitions=2, metrics={"port": port, "host": "127.0.0.1", "kafka_lag_interval": "100ms"})
    t0 = int(time.time() * 1000) - 3 * 3600_000
    good = [
        (b"u1", ev("a1", "u1", "browse", t0)),
        (b"u1", ev("a2", "u1", "add_to_cart", t0 + 1 * MIN, item_id="i2", price=30.0)),
        (b"u1", ev("a3", "u1", "browse", t0 + 45 * MIN)),  # -> cart_abandonment fires for u1
        (b"u2", ev("b1", "u2", "order", t0 + 5 * MIN, order_id="o1", amount=150.0)),  # -> big_spender fires
        (b"u2", ev("b2", "u2", "order", t0 + 9 * MIN, order_id="o2", amount=120.0)),  # -> suppressed: cooldown
        (b"u2", ev("b3", "u2", "search", t0 + 60 * MIN, query="shoes")),
        (b"u1", ev("a1", "u1", "browse", t0)),  # parsed, then refused as a duplicate
    ]
    bad = [
        (b"u9", b'{"event_id": "x1", "user_id": '),
        (b"u9", orjson.dumps({"event_id": "x2", "type": "browse", "ts": t0})),
        (b"u9", orjson.dumps({"event_id": "x3", "user_id": "u9", "type": "teleport", "ts": t0})),
        (b"u9", orjson.dumps({"event_id": "x4", "user_id": "u9", "type": "browse", "ts": t0 + 10 * 86400_000})),
    ]
    produce(kafka.bootstrap, settings.kafka.input_topics[0], good + bad)

    flow, rt = build(deployment(settings, tmp_path))
    try:
        run_main(flow)
        m = scrape(port)
        health, ready = httpx.get(f"http://127.0.0.1:{port}/healthz"), httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert rt.writer is not None
        inserted = rt.writer.inserted
    finally:
        rt.close()

    types = Counter(orjson.loads(raw)["type"] for _, raw in good)
    assert {t: value(m, "nudgeflow_events_total", type=t) for t in types} == dict(types)
    assert value(m, "nudgeflow_events_total", type="teleport") is None  # refused: a dead letter, not an event
    assert {r: value(m, "nudgeflow_dead_letters_total", reason=r)
            for r in ("malformed_json", "missing_field", "unknown_type", "future_ts", "duplicate")} == dict.fromkeys(
        ("malformed_json", "missing_field", "unknown_type", "future_ts", "duplicate"), 1.0)
    decided = {
        (dict(k)["trigger"], dict(k)["outcome"], dict(k)["reason"]): v
        for (name, k), v in m.items() if name == "nudgeflow_decisions_total"
    }
    assert decided == {("cart_abandonment", "fired", ""): 1, ("big_spender", "fired", ""): 1,
                       ("big_spender", "suppressed", "cooldown"): 1}
    for trigger in ("cart_abandonment", "big_spender"):
        for since in ("event", "ingest"):
            assert value(m, "nudgeflow_action_latency_seconds_count", trigger=trigger, since=since) == 1
    # the cart reminder is decided 30 min of event time after the cart add: far beyond the last bucket
    assert value(m, "nudgeflow_action_latency_seconds_bucket", trigger="cart_abandonment", since="event", le="3600.0") == 0
    assert value(m, "nudgeflow_action_latency_seconds_bucket", trigger="big_spender", since="ingest", le="60.0") == 1
    assert value(m, "nudgeflow_batch_size_sum", step="parse") == len(good) + len(bad)
    assert value(m, "nudgeflow_batch_size_sum", step="decisions") == 3
    assert value(m, "nudgeflow_clickhouse_rows_inserted_total") == inserted > 0
    # u1 and u2 (u9 sent nothing valid), each its shard's newest: held as objects, not compacted
    assert (value(m, "nudgeflow_feature_users", state="active"), value(m, "nudgeflow_feature_users", state="compacted")) \
        == (2, 0)
    assert value(m, "nudgeflow_idle_looks_total") == 0  # nobody quiet a day yet (counted in test_features)
    assert value(m, "nudgeflow_sink_errors_total", sink="clickhouse") == 0
    assert value(m, "nudgeflow_sink_errors_total", sink="redis_guards") == 0
    lag = value(m, "nudgeflow_event_lag_seconds")
    assert lag is not None and 2 * 3600 - 60 < lag < 2 * 3600 + 600  # the newest event is 2 h old
    # Bytewax's own gauge, from librdkafka's statistics: every partition was read to its end
    lags = [v for (name, k), v in m.items() if name == "bytewax_kafka_consumer_lag" and ("topic", prefix + ".events") in k]
    assert lags and set(lags) == {0.0}
    assert health.status_code == 200 and ready.status_code == 200 and ready.text == "ok\n"
    with pytest.raises(httpx.TransportError):  # closing the runtime stops the endpoint
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_readiness_follows_redis_and_the_clickhouse_backlog(redis_url: str, chdb_path: Path, ch_database: str) -> None:
    up = threading.Event()
    live = f"chdb://{chdb_path}"
    client = connect(live)
    migrate(client, ch_database)
    cfg = ClickHouseConfig(database=ch_database, max_buffer_rows=1, flush_interval=0.01)
    writer = ClickHouseWriter(cfg, client_factory=lambda: connect(live if up.is_set() else dead_endpoint()))
    ok, down = FlowMetrics(redis_url, writer), FlowMetrics(f"redis://127.0.0.1:{free_port()}/0")
    ok.watch("clickhouse", writer)
    try:
        ok.serve("127.0.0.1", 0)
        down.serve("127.0.0.1", 0)
        assert ok.server is not None and down.server is not None
        ok_url, down_url = f"http://127.0.0.1:{ok.server.server_port}", f"http://127.0.0.1:{down.server.server_port}"
        assert httpx.get(f"{ok_url}/readyz").status_code == 200
        r = httpx.get(f"{down_url}/readyz")
        assert r.status_code == 503 and r.text.startswith("redis: ConnectionError")
        assert httpx.get(f"{down_url}/healthz").status_code == 200  # alive, just not ready

        # the buffer is full and cannot drain (ClickHouse refuses connections): the flow would be held back
        writer.put("events", EVENT_COLUMNS, [event_row(Event("e1", "u1", "browse", 1_700_000_000_000))])
        deadline = time.monotonic() + 5
        while writer.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.get(f"{ok_url}/readyz")
        assert r.status_code == 503 and "clickhouse: 1 rows waiting" in r.text
        assert value(scrape(ok.server.server_port), "nudgeflow_sink_errors_total", sink="clickhouse") >= 1
        up.set()  # the writer's retry gets through within its backoff
        while writer.buffered and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        assert httpx.get(f"{ok_url}/readyz").status_code == 200
        assert client.query(f"SELECT event_id FROM {ch_database}.events").result_rows == [("e1",)]
    finally:
        up.set()
        writer.close()
        ok.close()
        down.close()
        client.command(f"DROP DATABASE IF EXISTS {ch_database}")
        client.close()


SECRET = "whsec-0123456789abcdef"


def test_collector_pauses_are_measured_by_generation_until_closed(redis_url: str) -> None:
    m = FlowMetrics(redis_url)
    try:
        gc.collect(0)
        gc.collect()
        count = lambda gen: m.registry.get_sample_value("nudgeflow_gc_pause_seconds_count", {"generation": gen})  # noqa: E731
        assert count("0") >= 1 and count("2") >= 1
        assert 0 < m.registry.get_sample_value("nudgeflow_gc_pause_seconds_sum", {"generation": "2"}) < 10
    finally:
        m.close()
    seen = count("2")
    gc.collect()
    assert count("2") == seen  # a closed flow's metrics no longer hook the collector


def test_json_logs_carry_context_and_mask_secrets() -> None:
    settings = Settings.model_validate({
        "name": "shop",
        "clickhouse": {"dsn": "http://nudgeflow:ch-Pa55word@clickhouse:8123"},
        "kafka": {"add_config": {"sasl.password": "kafka-pw-42"}},
        "actions": {"kind": "webhook", "webhook": {"url": "https://hooks.example.com/a", "secret": SECRET,
                                                   "allowlist": ["hooks.example.com"]}},
    })
    assert set(secrets_of(settings)) >= {SECRET, "ch-Pa55word", "kafka-pw-42"}
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(settings.name))
    handler.addFilter(SecretMask(secrets_of(settings)))
    logger = logging.getLogger("nudgeflow.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("webhook: action %s not delivered", "a1b2", extra={"trigger": "cart_abandonment"})
        logger.error("signing with %s failed; token=abc123 and http://u:kafka-pw-42@h", SECRET)

        def in_worker() -> None:
            tag_worker(3)
            try:
                raise RuntimeError("connect to http://nudgeflow:ch-Pa55word@clickhouse:8123 failed")
            except RuntimeError:
                logger.exception("insert failed", extra={"password": "hunter22"})

        t = threading.Thread(target=in_worker)
        t.start()
        t.join()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert {"time", "level", "logger", "message", "flow", "process", "thread"} <= line.keys()
        assert line["flow"] == "shop" and line["logger"] == "nudgeflow.test_logs"
    assert lines[0]["trigger"] == "cart_abandonment" and lines[0]["level"] == "WARNING"
    assert lines[1]["message"] == "signing with *** failed; token=*** and http://u:***@h"
    assert lines[2]["worker"] == 3 and lines[2]["password"] == "***"
    assert "RuntimeError" in lines[2]["exception"] and "ch-Pa55word" not in lines[2]["exception"]
    assert all(s not in out.getvalue() for s in (SECRET, "ch-Pa55word", "kafka-pw-42", "abc123", "hunter22"))


def test_configure_installs_one_handler_in_the_chosen_format() -> None:
    root = logging.getLogger()
    level = root.level
    try:
        configure(Settings.model_validate({"logging": {"format": "json", "level": "WARNING"}}))
        configure(Settings.model_validate({"logging": {"format": "json", "level": "WARNING"}}))
        ours = [h for h in root.handlers if h.get_name() == "nudgeflow"]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter) and root.level == logging.WARNING
    finally:
        for h in [h for h in root.handlers if h.get_name() == "nudgeflow"]:
            root.removeHandler(h)
        root.setLevel(level)


def test_the_models_versions_input_faults_and_errors_are_metrics(redis_url: str) -> None:
    """What scoring did, per model: the snapshot version serving (0 while the prior answers), inputs that were
    missing or not numbers, and models that raised (the prior answered instead); and per model, the examples
    its learner could not learn."""
    from nudgeflow.settings import ModelsFile
    from operators.features import Enriched
    from operators.models import Learner, LearnerLogic, Resolved, Scorer, Snapshot, build_model
    from tests.helpers import Exploding

    models = ModelsFile.model_validate({"models": [
        {"name": name, "label": {"events": ["order"], "within": "1h"}, "features": ["views_1h"], "min_examples": 10}
        for name in ("buy", "cold", "odd")
    ]})
    snaps = [Snapshot.of("buy", 3, 50, build_model(models.models[0]), positives=20),
             Snapshot.of("cold", 1, 5, build_model(models.models[1]), positives=2)]  # not warm: the prior serves
    scorer = Scorer(models, lambda have: [s for s in snaps if have[s.name] < s.version])
    m = FlowMetrics(redis_url)
    m.scorer = scorer
    try:
        scorer.score_batch([("0", Enriched(Event(f"e{i}", "u", "browse", 0), feats))
                            for i, feats in enumerate([{"views_1h": 2}, {}, {"views_1h": "many"}])])
        snaps.append(Snapshot.of("odd", 7, 50, Exploding(), positives=20))
        scorer.refresh(10**13)
        scorer.score_batch([("0", Enriched(Event("e9", "u", "browse", 0), {"views_1h": 500}))])
        sample = m.registry.get_sample_value
        assert {n: sample("nudgeflow_model_version", {"model": n}) for n in ("buy", "cold", "odd")} == {
            "buy": 3, "cold": 0, "odd": 7}
        assert sample("nudgeflow_model_input_faults_total") == 2  # two events' inputs, each counted once
        assert sample("nudgeflow_model_errors_total") == 1
        assert sample("nudgeflow_model_learn_errors_total", {"model": "odd"}) is None  # no learner here yet
        logic = LearnerLogic(models, None, lambda name: None)
        m.learner_logics.append(logic)
        logic.learner = Learner(models.models[2], models, model=Exploding())
        logic.on_batch([Resolved("odd", "u", f"e{v}", 0, 0, {"views_1h": v}, 0.5, 0, True) for v in (1.0, 500.0)])
        assert sample("nudgeflow_model_learn_errors_total", {"model": "odd"}) == 1
    finally:
        m.close()
