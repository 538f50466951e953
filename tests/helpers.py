"""What several end-to-end tests share: a small trigger file, wire events, and running the CLI on Kafka."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
from redis.cluster import RedisCluster
from prometheus_client.parser import text_string_to_metric_families
from river import linear_model

from connectors.clickhouse import connect
from connectors.redis_client import Client, redis_client
from connectors.redis_store import FeatureReader
from connectors.tansu import TansuBroker, create_topics, produce, read_topic
from flows.common import clickhouse_dsn
from nudgeflow.configload import load_deployment
from nudgeflow.settings import Settings

MIN = 60_000

#: a cart reminder: add_to_cart and no order within 30 minutes (a trigger-file list item)
CART_ABANDONMENT = """
  - id: cart_abandonment
    kind: absence
    after: [add_to_cart]
    unless: [order]
    within: 30m
    channel: email"""

#: a cart reminder (absence) and an order over 100 (event + condition)
CART_AND_BIG_SPENDER = f"""
triggers:{CART_ABANDONMENT}
    payload: {{template: cart_reminder}}
  - id: big_spender
    kind: event
    on: [order]
    condition: "event.props.amount >= 100.0"
    channel: push
"""


def free_port() -> int:
    """A loopback port nothing listens on (until something binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_endpoint() -> str:
    """A ClickHouse address nothing answers on: connecting is refused, as when the server is down."""
    return f"http://127.0.0.1:{free_port()}"


def ev(eid: str, user: str, etype: str, ts: int, **props: object) -> bytes:
    """One event on the wire, from the web."""
    return orjson.dumps({"event_id": eid, "user_id": user, "type": etype, "ts": ts, "platform": "web", "props": props})


CONFIG_DIR = Path(__file__).parents[1] / "config"
CONFIG = """
name: nudgeflow_e2e
source: {{kind: kafka}}
kafka: {{brokers: ["{bootstrap}"], topic_prefix: "{prefix}", tail: "${{NF_TAIL:-true}}"}}
features: {{definitions: {config_dir}/features.yaml, allowed_lateness: {lateness}}}
redis: {{url: "{redis_url}", key_prefix: "{key_prefix}"}}
clickhouse: {{chdb_path: ch}}
actions: {actions}
dlq: {dlq}
triggers: {config_dir}/triggers.yaml
models: {config_dir}/models.yaml
shards: 16
{extra}
"""


def write_config(path: Path, kafka: TansuBroker, prefix: str, redis_url: str, key_prefix: str, extra: str,
                 lateness: str = "5m", sinks: str = "file", config_dir: Path = CONFIG_DIR) -> Path:
    """The e2e config in ``path``, with ``extra`` YAML sections (recovery, metrics …) appended; actions and dead
    letters go to ``sinks``: ``file`` (``out/actions.jsonl``, ``out/dlq.jsonl``) or ``kafka`` (``<prefix>.actions``,
    ``<prefix>.dlq``). ``config_dir`` holds the features, triggers and models files (the shipped ones)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = path / "nf.yaml"
    out = {name: "{kind: kafka}" if sinks == "kafka" else f"{{kind: file, path: out/{name}.jsonl}}"
           for name in ("actions", "dlq")}
    cfg.write_text(CONFIG.format(bootstrap=kafka.bootstrap, prefix=prefix, config_dir=config_dir, redis_url=redis_url,
                                 key_prefix=key_prefix, lateness=lateness, extra=extra, **out))
    return cfg


def nudgeflow(*args: str, tail: bool, wait: bool = True, log: TextIO | None = None) -> subprocess.Popen[str]:
    """The CLI in a subprocess; its output is piped, or written to ``log`` for a run long enough to fill a pipe."""
    env = {**os.environ, "NF_TAIL": "true" if tail else "false"}
    proc = subprocess.Popen([sys.executable, "-m", "nudgeflow.cli", *args], env=env, text=True,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return proc


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """``/metrics`` as {(sample name, labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def events_parsed(m: Samples) -> float:
    """Events parsed, all types: equal to the events sent once the flow has caught up."""
    return sum(v for (name, _), v in m.items() if name == "nudgeflow_events_total")


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def url_of(r: Client) -> str:
    """The URL a client was made for (a Redis Cluster's through the node it asks first)."""
    if isinstance(r, RedisCluster):
        node = r.get_default_node()
        return f"redis+cluster://{node.host}:{node.port}"
    return "redis://{host}:{port}/{db}".format(**r.connection_pool.connection_kwargs)


def delete_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (on a cluster, on every node)."""
    client = redis_client(url)
    try:
        pipe = client.pipeline(transaction=False)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            pipe.delete(key)
        pipe.execute()
    finally:
        client.close()


def features(r: Client, prefix: str) -> dict[str, dict[str, Any]]:
    users = sorted(k.split(":u:", 1)[1] for k in r.scan_iter(match=f"{prefix}:u:*", count=1000))
    url = url_of(r)
    # scores are left out: models publish snapshots on a wall-clock cadence, so scores depend on timing
    return {u: {k: v for k, v in h.items() if not k.startswith("score_")}
            for u, h in FeatureReader(url, prefix).get_many(users).items()}


def total_events(r: Client, prefix: str) -> int:
    return sum(int(h.get("events_30d", 0)) for h in features(r, prefix).values())


def trickle(kafka: TansuBroker, topic: str, records: list[tuple[bytes, bytes]], start: int, r: Client, prefix: str,
            chunk: int = 200, pause_s: float = 0.1) -> int:
    """Produce ``records[start:]`` a chunk at a time until the flow has counted some of them (its published
    events move); returns how many records are sent by then. A kill right after lands mid-stream however
    fast the flow is: the rest is still unsent (a fixed sleep before the kill let a fast run finish)."""
    counted, sent = total_events(r, prefix), start
    while sent < len(records) and total_events(r, prefix) == counted:
        produce(kafka.bootstrap, topic, records[sent:sent + chunk])
        sent += chunk
        time.sleep(pause_s)
    return sent


def stop(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Stop a flow the way ops do, with SIGINT (Bytewax shuts down cleanly); kill it if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def drain(config: Path, r: Client, prefix: str, events: int, *options: str, attempts: int = 3,
          timeout: float = 100.0) -> None:
    """Run the flow as a service (``tail: true``) until Redis holds every event, then stop it.

    A bounded run (``tail: false``) stops at the partition ends the broker reports, and tansu's
    in-memory engine sometimes reports an end behind what it holds, again on every run; reading until
    the features count every event depends on nothing but the data. A run that has not got there within
    ``timeout`` is stopped and started again, as an operator would: with recovery it resumes where it
    stopped; without, it reads from the beginning (Redis writes are idempotent). The exact totals and
    features are asserted by the caller all the same.
    """
    logs = []
    for _ in range(attempts):
        with tempfile.TemporaryFile("w+") as log:
            proc = nudgeflow("run", "--config", str(config), "--no-summary", *options, tail=True, wait=False, log=log)
            deadline = time.monotonic() + timeout
            try:
                while total_events(r, prefix) != events and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.3)
            finally:
                stop(proc)
            log.seek(0)
            logs.append(log.read()[-2000:])
        if total_events(r, prefix) == events:
            return
    raise AssertionError(f"{total_events(r, prefix)} of {events} events after {attempts} runs of {config}; "
                         f"{_diagnosis(config)}; last log:\n{logs[-1]}")


def _diagnosis(config: Path) -> str:
    """What tells a flow's loss from the broker's: the records a plain consumer gets from the input topics, and the
    flow's dead letters by reason (a file sink)."""
    s = load_deployment(config).settings
    bootstrap = ",".join(s.kafka.brokers)
    read = {t: len(read_topic(bootstrap, t, timeout_s=60)) for t in s.kafka.input_topics}
    dlq = config.parent / "out" / "dlq.jsonl"
    reasons = Counter(orjson.loads(line)["reason"] for line in dlq.read_bytes().splitlines()) if dlq.exists() else {}
    return f"a plain consumer reads {read}; dead letters {dict(reasons)}"


def query(s: Settings, base: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows of one ClickHouse query on the flow's database (``{db}`` in ``sql``)."""
    ch = connect(clickhouse_dsn(s, base))
    try:
        return ch.query(sql.format(db=s.clickhouse.database)).result_rows
    finally:
        ch.close()


def kafka_settings(kafka: TansuBroker, prefix: str, redis_url: str, key_prefix: str, chdb_path: Path, database: str,
                   triggers: Path, partitions: int = 3, **sections: dict[str, Any]) -> Settings:
    """The main flow on the test broker: a bounded replay of ``<prefix>.events`` (``partitions`` of them),
    actions and dead letters to Kafka, the test's Redis and chDB; ``sections`` add to or replace settings."""
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=partitions)
    create_topics(kafka.bootstrap, [f"{prefix}.actions", f"{prefix}.dlq"], partitions=1)
    base: dict[str, Any] = {
        "source": {"kind": "kafka"},
        "kafka": {"brokers": [kafka.bootstrap], "topic_prefix": prefix, "tail": False},
        "redis": {"url": redis_url, "key_prefix": key_prefix, "ttl": "1d"},
        "clickhouse": {"chdb_path": str(chdb_path), "database": database},
        "actions": {"kind": "kafka"},
        "dlq": {"kind": "kafka"},
        "triggers": str(triggers),
        "features": {"definitions": str(CONFIG_DIR / "features.yaml"), "allowed_lateness": "5m"},
    }
    for name, section in sections.items():
        base[name] = {**base.get(name, {}), **section}
    return Settings.model_validate(base)


#: every stored row (no FINAL) and the distinct event ids among them: both the input's count when each event is
#: in ClickHouse once
STORED_EVENTS = "SELECT count(), uniqExact(event_id) FROM {db}.events"


def clickhouse_rows(config: Path, sql: str) -> list[list[Any]]:
    """The rows of a query (``{db}`` in ``sql``) on a run's ClickHouse, read in a child process: chDB opens one
    folder per process, and this one may hold the session's."""
    code = ("import sys, orjson; from nudgeflow.settings import load_settings; from tests.helpers import query; "
            "print(orjson.dumps(query(*load_settings(sys.argv[1]), sys.argv[2])).decode())")
    proc = subprocess.run([sys.executable, "-c", code, str(config), sql], capture_output=True, text=True,
                          timeout=120, cwd=CONFIG_DIR.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return orjson.loads(proc.stdout)


class Exploding(linear_model.LogisticRegression):
    """A River model that fails to score or learn an input it cannot handle (here: more than 100 views);
    importable, so a snapshot of it pickles."""

    def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
        if x["views_1h"] > 100:
            raise OverflowError("cannot score")
        return super().predict_proba_one(x)

    def learn_one(self, x: dict[str, float], y: bool, **kwargs: Any) -> None:
        if x["views_1h"] > 100:
            raise OverflowError("cannot learn")
        super().learn_one(x, y, **kwargs)
