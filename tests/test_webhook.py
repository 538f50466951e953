"""The webhook sink against a real HTTP server on loopback: signatures, retries, dead letters, the allowlist,
and the main flow delivering its actions to it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.testing import run_main

from connectors.clickhouse import connect
from connectors.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSender, verify
from flows.common import clickhouse_dsn
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.events import Action
from nudgeflow.settings import Settings, WebhookConfig
from nudgeflow.yamlconf import ConfigError, load_model
from tests.helpers import CART_AND_BIG_SPENDER, MIN, ev

SECRET = "test-secret-0123456789abcdef"
CONFIG_DIR = Path(__file__).parents[1] / "config"

Reply = int | tuple[int, dict[str, str]]


@dataclass
class Received:
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0

    @property
    def action(self) -> dict[str, Any]:
        return orjson.loads(self.body)


class Endpoint:
    """A real HTTP/1.1 server on a free loopback port; ``answer`` decides each reply."""

    def __init__(self) -> None:
        self.answer: Callable[[Received], Reply] = lambda r: 200
        self.received: list[Received] = []
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the sender uses it

            def do_POST(self) -> None:
                req = Received({k.lower(): v for k, v in self.headers.items()},
                               self.rfile.read(int(self.headers["Content-Length"])))
                reply = endpoint.answer(req)
                req.status, headers = reply if isinstance(reply, tuple) else (reply, {})
                with endpoint._lock:
                    endpoint.received.append(req)
                self.send_response(req.status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/actions"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def delivered(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    try:
        yield ep
    finally:
        ep.close()


def in_order(*statuses: Reply) -> Callable[[Received], Reply]:
    """Answer with these, one per request, then 200."""
    it = iter(statuses)
    return lambda r: next(it, 200)


def config(url: str, **overrides: Any) -> WebhookConfig:
    base = {"allowlist": ["127.0.0.1"], "url": url, "secret": SECRET, "retries": 2, "backoff": "10ms",
            "max_backoff": "50ms", "timeout": "2s"}
    return WebhookConfig.model_validate(base | overrides)


def action(n: int = 1, user: str = "u1") -> Action:
    now = int(time.time() * 1000)
    return Action(f"cart_abandonment:{user}:e{n}", "cart_abandonment", user, "email", f"e{n}", now - 5000, now - 4000,
                  now, {"cart_value": 30.0}, {"template": "cart_reminder"})


def test_a_delivery_is_signed_with_a_timestamp_and_keyed_for_dedup(endpoint: Endpoint) -> None:
    a = action()
    assert WebhookSender(config(endpoint.url)).deliver_batch([a]) == []
    [req] = endpoint.received
    assert req.body == orjson.dumps(a.to_dict()) and req.status == 200
    h = req.headers
    assert h["content-type"] == "application/json" and h["idempotency-key"] == a.action_id
    assert abs(int(h[TIMESTAMP_HEADER.lower()]) - time.time()) < 5
    assert verify(SECRET.encode(), h[TIMESTAMP_HEADER.lower()], req.body, h[SIGNATURE_HEADER.lower()])
    assert not verify(b"another-secret-0123456789", h[TIMESTAMP_HEADER.lower()], req.body, h[SIGNATURE_HEADER.lower()])


def test_503_twice_then_200_is_delivered_once(endpoint: Endpoint) -> None:
    endpoint.answer = in_order(503, 503)
    a = action()
    assert WebhookSender(config(endpoint.url)).deliver_batch([a]) == []
    assert [r.status for r in endpoint.received] == [503, 503, 200]
    assert {r.headers["idempotency-key"] for r in endpoint.received} == {a.action_id}
    assert [r.action["action_id"] for r in endpoint.delivered()] == [a.action_id]
    # every attempt is signed afresh, so a retry after a long backoff is not refused as stale
    assert all(verify(SECRET.encode(), r.headers[TIMESTAMP_HEADER.lower()], r.body, r.headers[SIGNATURE_HEADER.lower()])
               for r in endpoint.received)


def test_an_endpoint_that_keeps_failing_gives_a_dead_letter_after_the_retries(endpoint: Endpoint) -> None:
    endpoint.answer = lambda r: 500
    a = action()
    [dead] = WebhookSender(config(endpoint.url, retries=2)).deliver_batch([a])
    assert len(endpoint.received) == 3
    assert (dead.reason, dead.detail, dead.position) == ("webhook_failed", "HTTP 500 after 3 attempts", f"webhook:{a.action_id}")
    assert dead.raw == orjson.dumps(a.to_dict()) and dead.ingest_ms == a.ingest_ms


def test_a_closed_port_gives_a_dead_letter(endpoint: Endpoint) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [dead] = WebhookSender(config(f"http://127.0.0.1:{port}/", retries=1)).deliver_batch([action()])
    assert dead.reason == "webhook_failed" and dead.detail.startswith("ConnectError") and dead.detail.endswith("after 2 attempts")


def test_a_client_error_is_not_retried(endpoint: Endpoint) -> None:
    endpoint.answer = lambda r: 400
    [dead] = WebhookSender(config(endpoint.url, retries=3)).deliver_batch([action()])
    assert len(endpoint.received) == 1 and dead.detail == "HTTP 400 after 1 attempt"


def test_retry_after_is_honoured_up_to_max_backoff(endpoint: Endpoint) -> None:
    endpoint.answer = in_order((429, {"Retry-After": "30"}))
    started = time.monotonic()
    assert WebhookSender(config(endpoint.url, max_backoff="300ms")).deliver_batch([action()]) == []
    assert 0.3 <= time.monotonic() - started < 3  # waited the cap, not 30 s, nor the 10 ms backoff
    assert [r.status for r in endpoint.received] == [429, 200]


def test_a_slow_endpoint_times_out_and_the_flow_goes_on(endpoint: Endpoint) -> None:
    endpoint.answer = lambda r: (time.sleep(1.0), 200)[1]
    started = time.monotonic()
    [dead] = WebhookSender(config(endpoint.url, timeout="100ms", retries=1)).deliver_batch([action()])
    assert dead.detail == "ReadTimeout: timed out after 2 attempts"
    assert time.monotonic() - started < 0.9  # two 100 ms timeouts, not the server's 1 s each


def test_one_refused_action_does_not_hold_back_its_batch(endpoint: Endpoint) -> None:
    endpoint.answer = lambda r: 422 if r.action["user_id"] == "u7" else 200
    batch = [action(n, user=f"u{n}") for n in range(20)]
    dead = WebhookSender(config(endpoint.url, concurrency=4)).deliver_batch(batch)
    assert [orjson.loads(d.raw)["user_id"] for d in dead] == ["u7"]
    assert sorted(r.action["action_id"] for r in endpoint.delivered()) == sorted(a.action_id for a in batch if a.user_id != "u7")


WEBHOOK_YAML = """name: x
actions:
  kind: webhook
  webhook:
    allowlist: [hooks.example.com]
    url: {url}
    secret: "${{NF_T_WEBHOOK_SECRET}}"
"""


@pytest.mark.parametrize(("url", "secret", "expected"), [
    ("https://evil.example.net/x", SECRET, ":6: actions.webhook.url: Value error, host 'evil.example.net' is not in the allowlist"),
    ("http://hooks.example.com/x", SECRET, ":6: actions.webhook.url: Value error, plain http is for a loopback host only"),
    ("https://hooks.example.com/x", "short-secret", ":7: actions.webhook.secret: Value error, expected a string of at least 16"),
])
def test_webhook_config_errors_name_file_line_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str,
                                                        secret: str, expected: str) -> None:
    monkeypatch.setenv("NF_T_WEBHOOK_SECRET", secret)
    path = tmp_path / "c.yaml"
    path.write_text(WEBHOOK_YAML.format(url=url))
    with pytest.raises(ConfigError) as e:
        load_model(Settings, path)
    msg = str(e.value)
    assert f"{path}{expected}" in msg and secret not in msg, msg


def test_an_allowed_webhook_loads_and_dead_letters_cannot_go_to_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NF_T_WEBHOOK_SECRET", SECRET)
    path = tmp_path / "c.yaml"
    path.write_text(WEBHOOK_YAML.format(url="https://Hooks.Example.com/x"))
    hook = load_model(Settings, path).actions.webhook
    assert hook is not None and hook.secret.get_secret_value() == SECRET and SECRET not in repr(hook)
    path.write_text(WEBHOOK_YAML.format(url="https://hooks.example.com/x").replace("actions:", "dlq:"))
    with pytest.raises(ConfigError, match=r":3: dlq: Value error, dead letters go to a file, Kafka or stdout") as e:
        load_model(Settings, path)
    assert SECRET not in str(e.value)






def test_the_main_flow_delivers_its_actions_to_a_webhook(endpoint: Endpoint, tmp_path: Path, redis_url: str,
                                                         key_prefix: str, chdb_path: Path, ch_database: str) -> None:
    t0 = int(time.time() * 1000) - 3 * 3600_000
    events = [
        # u1 adds to cart and never orders -> a cart reminder once event time passes t0 + 32 min
        ev("a1", "u1", "browse", t0, item_id="i1", category="shoes", price=30.0),
        ev("a2", "u1", "add_to_cart", t0 + 2 * MIN, item_id="i1", category="shoes", price=30.0),
        # u2 and u3 spend big -> big_spender each; the endpoint refuses u3's with a 400
        ev("b1", "u2", "order", t0 + 10 * MIN, order_id="o1", amount=150.0),
        ev("c1", "u3", "order", t0 + 20 * MIN, order_id="o2", amount=200.0),
        b'{"event_id": "x1", "user_id": ',
        ev("a3", "u1", "browse", t0 + 45 * MIN, item_id="i2", category="bags", price=80.0),
    ]
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(events) + b"\n")
    (tmp_path / "triggers.yaml").write_text(CART_AND_BIG_SPENDER)
    endpoint.answer = lambda r: 400 if r.action["user_id"] == "u3" else 200
    settings = Settings.model_validate({
        "source": {"kind": "file", "file": {"paths": ["events.jsonl"]}},
        "events": {"max_future": "5m"},
        "redis": {"url": redis_url, "key_prefix": key_prefix, "ttl": "1d"},
        "clickhouse": {"chdb_path": str(chdb_path), "database": ch_database},
        "actions": {"kind": "webhook", "webhook": {"allowlist": ["127.0.0.1"], "url": endpoint.url, "secret": SECRET,
                                                   "retries": 2, "backoff": "10ms"}},
        "dlq": {"kind": "file", "path": "dlq.jsonl"},
        "triggers": "triggers.yaml",
        "features": {"definitions": str(CONFIG_DIR / "features.yaml"), "allowed_lateness": "5m"},
    })

    flow, rt = build(deployment(settings, tmp_path))
    try:
        run_main(flow)
    finally:
        rt.close()

    got = sorted((r.action["trigger_id"], r.action["user_id"], r.status) for r in endpoint.received)
    assert got == [("big_spender", "u2", 200), ("big_spender", "u3", 400), ("cart_abandonment", "u1", 200)]
    assert all(verify(SECRET.encode(), r.headers[TIMESTAMP_HEADER.lower()], r.body, r.headers[SIGNATURE_HEADER.lower()])
               for r in endpoint.received)
    refused = next(r for r in endpoint.received if r.status == 400)

    # the undelivered action reaches the flow's DLQ file and ClickHouse's dlq table with the parser's refusals
    dlq = {d["reason"]: d for d in map(orjson.loads, (tmp_path / "dlq.jsonl").read_bytes().splitlines())}
    assert set(dlq) == {"malformed_json", "webhook_failed"}
    assert dlq["webhook_failed"]["raw"].encode() == refused.body and dlq["webhook_failed"]["detail"] == "HTTP 400 after 1 attempt"
    ch = connect(clickhouse_dsn(settings, tmp_path))
    try:
        db = settings.clickhouse.database
        reasons = dict(ch.query(f"SELECT reason, count() FROM {db}.dlq FINAL GROUP BY reason").result_rows)
        assert reasons == {"malformed_json": 1, "webhook_failed": 1}
        assert ch.query(f"SELECT count() FROM {db}.actions FINAL").result_rows == [(3,)]
    finally:
        ch.close()
