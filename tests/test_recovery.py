"""Bytewax recovery: a worker killed with SIGKILL mid-stream resumes and ends with the features of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from connectors.kafka import user_keyed
from connectors.redis_store import FeatureReader
from connectors.simulator import SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce

CONFIG_DIR = Path(__file__).parents[1] / "config"
CONFIG = """
name: nudgeflow_recovery
source: {{kind: kafka}}
kafka: {{brokers: ["{bootstrap}"], topic_prefix: "{prefix}", tail: "${{NF_TAIL:-true}}"}}
features: {{definitions: {config_dir}/features.yaml, allowed_lateness: 5m}}
redis: {{url: "{redis_url}", key_prefix: "{key_prefix}"}}
clickhouse: {{chdb_path: ch}}
actions: {{kind: file, path: out/actions.jsonl}}
dlq: {{kind: file, path: out/dlq.jsonl}}
triggers: {config_dir}/triggers.yaml
models: {config_dir}/models.yaml
shards: 16
{recovery}
"""


def write_config(path: Path, kafka: TansuBroker, prefix: str, redis_url: str, key_prefix: str, recovery: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = path / "nf.yaml"
    cfg.write_text(CONFIG.format(bootstrap=kafka.bootstrap, prefix=prefix, config_dir=CONFIG_DIR, redis_url=redis_url,
                                 key_prefix=key_prefix, recovery=recovery))
    return cfg


def nudgeflow(*args: str, tail: bool, wait: bool = True) -> subprocess.Popen[str]:
    env = {**os.environ, "NF_TAIL": "true" if tail else "false"}
    proc = subprocess.Popen([sys.executable, "-m", "nudgeflow.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return proc


def features(r: redis.Redis, prefix: str) -> dict[str, dict[str, Any]]:
    users = sorted(k.split(":u:", 1)[1] for k in r.scan_iter(match=f"{prefix}:u:*", count=1000))
    url = "redis://{host}:{port}/{db}".format(**r.connection_pool.connection_kwargs)
    # scores are left out: models publish snapshots on a wall-clock cadence, so scores depend on timing
    return {u: {k: v for k, v in h.items() if not k.startswith("score_")}
            for u, h in FeatureReader(url, prefix).get_many(users).items()}


def total_events(r: redis.Redis, prefix: str) -> int:
    return sum(int(h.get("events_30d", 0)) for h in features(r, prefix).values())


def drain(config: Path, r: redis.Redis, prefix: str, events: int) -> None:
    """Run a bounded replay (``tail: false``) until every event is in.

    A bounded run stops at the partition ends the broker reports, and tansu's in-memory engine
    sometimes reports a high watermark behind what it holds, ending a replay early. Running again
    is what an operator would do: without recovery it replays from the beginning (Redis writes are
    idempotent), with recovery it resumes. The exact totals are asserted afterwards all the same.
    """
    for _ in range(3):
        nudgeflow("run", "--config", str(config), "--no-summary", tail=False)
        if total_events(r, prefix) == events:
            return


def test_sigkill_mid_stream_then_restart_gives_the_uninterrupted_features(
    kafka: TansuBroker, redis_url: str, key_prefix: str, topic_prefix: str, tmp_path: Path
) -> None:
    prefix = topic_prefix + "rec"
    topic = f"{prefix}.events"
    create_topics(kafka.bootstrap, [topic], partitions=3)
    records = list(user_keyed(iter_records(SimulatorConfig(users=400, events=24_000, partitions=3, seed=11))))
    half = len(records) // 2
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    # the run under test: recovery on, killed with SIGKILL while it works on the second half
    rec = write_config(tmp_path / "rec", kafka, prefix, redis_url, key_prefix + "r",
                       "recovery: {dir: store, snapshot_interval: 300ms}")
    nudgeflow("recovery", "init", "--config", str(rec), tail=True)
    produce(kafka.bootstrap, topic, records[:half])
    worker = nudgeflow("run", "--config", str(rec), "--no-summary", tail=True, wait=False)
    deadline = time.time() + 120
    while total_events(r, key_prefix + "r") < half and time.time() < deadline:
        assert worker.poll() is None, worker.communicate()[0][-3000:]
        time.sleep(0.2)
    assert total_events(r, key_prefix + "r") == half
    produce(kafka.bootstrap, topic, records[half:])
    time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    mid = total_events(r, key_prefix + "r")
    assert half <= mid < len(records), "the kill should land mid-stream"

    drain(rec, r, key_prefix + "r", len(records))  # resumes from the last snapshot

    # the reference: the same events, one uninterrupted run, no recovery
    drain(write_config(tmp_path / "ref", kafka, prefix, redis_url, key_prefix + "u", ""), r, key_prefix + "u",
          len(records))

    got, want = features(r, key_prefix + "r"), features(r, key_prefix + "u")
    assert len(want) > 390 and total_events(r, key_prefix + "u") == len(records)
    assert got == want
