"""Scale-out: ``nudgeflow run --processes 2`` (Bytewax's cluster runtime) ends with the same features as one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from connectors.kafka import user_keyed
from connectors.redis_client import redis_client
from connectors.simulator import SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce
from tests.helpers import drain, features, write_config


def test_two_processes_give_the_features_of_one(kafka: TansuBroker, redis_url: str, key_prefix: str,
                                                topic_prefix: str, tmp_path: Path) -> None:
    prefix = topic_prefix + "cluster"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=4)  # Kafka partitions: the unit of parallelism
    # known shoppers only: a shopper's anonymous and known events lie in different partitions, read at
    # different speeds by one and two processes, so what a merge finds (and what is too late after it) would
    # differ by timing; identity across shards and batches is property-tested in test_identity_property.py
    sim = SimulatorConfig(users=300, events=12_000, partitions=2, seed=5, anonymous_share=0)
    records = list(user_keyed(iter_records(sim)))
    produce(kafka.bootstrap, f"{prefix}.events", records)
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    two = write_config(tmp_path / "two", kafka, prefix, redis_url, key_prefix + "2", "")
    drain(two, r, key_prefix + "2", len(records), "--flow", "features", "--processes", "2")
    one = write_config(tmp_path / "one", kafka, prefix, redis_url, key_prefix + "1", "")
    drain(one, r, key_prefix + "1", len(records), "--flow", "features")

    got, want = features(r, key_prefix + "2"), features(r, key_prefix + "1")
    assert len(want) == len({key for key, _ in records})  # every shopper, and every event counted once
    assert sum(int(h["events_30d"]) for h in got.values()) == len(records)
    assert got == want


def test_a_cluster_of_the_main_flow_needs_a_clickhouse_server(kafka: TansuBroker, redis_url: str, key_prefix: str,
                                                              tmp_path: Path) -> None:
    cfg = write_config(tmp_path, kafka, "nope", redis_url, key_prefix, "")
    proc = subprocess.run([sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(cfg), "--processes", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a ClickHouse server" in " ".join(proc.stderr.split())


def test_two_processes_merge_shoppers_across_processes(kafka: TansuBroker, any_redis_url: str, key_prefix: str,
                                                       topic_prefix: str, tmp_path: Path) -> None:
    """Multi-platform shoppers on two processes: merges hand state over between processes (through Redis: one
    server, then a Redis Cluster), and every event ends counted once, under the shopper it belongs to.

    The allowed lateness is long: a shopper's anonymous and known events lie in different partitions,
    which the processes read at different speeds, and nothing here may be refused as too late.
    """
    prefix = topic_prefix + "clusterid"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=4)
    sim = SimulatorConfig(users=300, events=12_000, partitions=2, seed=7, anonymous_share=0.6)
    records = list(user_keyed(iter_records(sim)))
    produce(kafka.bootstrap, f"{prefix}.events", records)
    r = redis_client(any_redis_url, decode_responses=True)
    cfg = write_config(tmp_path, kafka, prefix, any_redis_url, key_prefix, "", lateness="30d")
    drain(cfg, r, key_prefix, len(records), "--flow", "features", "--processes", "2")

    canon = r.hgetall(f"{key_prefix}:id:canon")
    assert len(canon) > 50  # shoppers were merged
    hashes = {k.split(":u:", 1)[1] for k in r.scan_iter(match=f"{key_prefix}:u:*", count=1000)}
    assert not hashes & canon.keys()  # no merged-away id keeps a hash of its own
    assert set(canon.values()) <= hashes
