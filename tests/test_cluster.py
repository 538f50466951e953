"""Scale-out: ``nudgeflow run --processes 2`` (Bytewax's cluster runtime) ends with the same features as one process;
so does a cluster of processes started one by one, each with a recovery store of its own, killed and resumed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import httpx
import redis

from connectors.embedded import free_port
from connectors.kafka import user_keyed
from connectors.redis_client import redis_client
from connectors.simulator import SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce
from nudgeflow.cluster import loopback_addresses
from tests.helpers import drain, features, nudgeflow, scrape, stop, total_events, trickle, value, write_config


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


def test_a_cluster_with_a_recovery_store_per_process_resumes_after_both_are_killed(
    kafka: TansuBroker, redis_url: str, key_prefix: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Two processes started one by one (``--process-id``/``--addresses``, as on two machines or in the compose
    ``cluster`` profile), each creating its share of the recovery store in a folder of its own, killed with
    SIGKILL mid-stream and started again (on other ports): the features of one uninterrupted process."""
    prefix = topic_prefix + "clusterrec"
    topic = f"{prefix}.events"
    create_topics(kafka.bootstrap, [topic], partitions=4)
    # known shoppers only, as in test_recovery.py
    records = list(user_keyed(iter_records(SimulatorConfig(users=400, events=16_000, partitions=2, seed=13,
                                                           anonymous_share=0))))
    half = len(records) // 2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    rec = "recovery: {dir: store, partitions: 4, snapshot_interval: 300ms}"
    configs = [write_config(tmp_path / f"p{i}", kafka, prefix, redis_url, key_prefix + "c", rec) for i in range(2)]

    def start(log: TextIO) -> list[subprocess.Popen[str]]:
        addresses = ";".join(loopback_addresses(2))
        return [nudgeflow("run", "--config", str(cfg), "--flow", "features", "--no-summary", "--init-recovery",
                          "--process-id", str(i), "--addresses", addresses, tail=True, wait=False, log=log)
                for i, cfg in enumerate(configs)]

    def until(events: int, procs: list[subprocess.Popen[str]], log: TextIO) -> None:
        deadline = time.monotonic() + 120
        while total_events(r, key_prefix + "c") < events and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                log.seek(0)
                raise AssertionError(log.read()[-3000:])
            time.sleep(0.2)
        assert total_events(r, key_prefix + "c") == events

    produce(kafka.bootstrap, topic, records[:half])
    with (tmp_path / "first.log").open("w+") as log:
        procs = start(log)
        try:  # the processes are killed whatever happens: a failed check must not leave them running
            until(half, procs, log)
            sent = trickle(kafka, topic, records, half, r, key_prefix + "c")
        finally:
            for p in procs:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
    assert half < total_events(r, key_prefix + "c") <= sent < len(records), "the kill should land mid-stream"
    produce(kafka.bootstrap, topic, records[sent:])
    # each process created its share of the partitions, and only that
    assert [sorted(f.name for f in (cfg.parent / "store").glob("part-*.sqlite3")) for cfg in configs] == [
        ["part-0.sqlite3", "part-2.sqlite3"], ["part-1.sqlite3", "part-3.sqlite3"]]

    with (tmp_path / "again.log").open("w+") as log:
        procs = start(log)  # resume from the last snapshot both stores agree on
        try:
            until(len(records), procs, log)
        finally:
            for p in procs:
                stop(p)

    one = write_config(tmp_path / "one", kafka, prefix, redis_url, key_prefix + "1", "")
    drain(one, r, key_prefix + "1", len(records), "--flow", "features")
    got, want = features(r, key_prefix + "c"), features(r, key_prefix + "1")
    assert len(want) == len({key for key, _ in records}) and got == want


def test_a_store_per_process_needs_a_partition_per_process(kafka: TansuBroker, redis_url: str, key_prefix: str,
                                                           tmp_path: Path) -> None:
    cfg = write_config(tmp_path, kafka, "nope", redis_url, key_prefix, "recovery: {dir: store, partitions: 1}")
    init = [sys.executable, "-m", "nudgeflow.cli", "recovery", "init", "--config", str(cfg)]
    proc = subprocess.run([*init, "--process-id", "0", "--addresses", "a:1;b:1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "needs at least 2, one per process" in " ".join(proc.stderr.split())
    proc = subprocess.run([*init, "--process-id", "2", "--addresses", "a:1;b:1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--process-id 2 is not one of the 2 --addresses" in " ".join(proc.stderr.split())
    assert not (tmp_path / "store").exists()


def two_free_ports() -> int:
    """A port ``p`` with ``p + 1`` free too."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_each_process_of_a_local_cluster_serves_its_own_metrics(kafka: TansuBroker, redis_url: str, key_prefix: str,
                                                                topic_prefix: str, tmp_path: Path) -> None:
    prefix = topic_prefix + "clustermet"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=4)
    records = list(user_keyed(iter_records(SimulatorConfig(users=100, events=4_000, partitions=2, seed=3,
                                                           anonymous_share=0))))
    produce(kafka.bootstrap, f"{prefix}.events", records)
    port = two_free_ports()
    cfg = write_config(tmp_path, kafka, prefix, redis_url, key_prefix, f"metrics: {{port: {port}, host: 127.0.0.1}}")
    with (tmp_path / "flow.log").open("w+") as log:
        flow = nudgeflow("run", "--config", str(cfg), "--flow", "features", "--no-summary", "--processes", "2",
                         tail=True, wait=False, log=log)
        try:
            deadline = time.monotonic() + 120
            read: list[float] = []
            while sum(read) < len(records) and time.monotonic() < deadline:
                assert flow.poll() is None, log.read()[-3000:]
                time.sleep(0.3)
                try:
                    read = [value(scrape(port + i), "nudgeflow_batch_size_sum", step="parse") or 0.0 for i in range(2)]
                except httpx.HTTPError:  # not serving yet: still starting
                    continue
        finally:
            stop(flow)
    # each process counts the records of the partitions it reads (two of the four), and together every record
    # once (some are refused as events, e.g. a simulated event time too far ahead of the clock: `future_ts`)
    assert sum(read) == len(records) and min(read) > 0, read
