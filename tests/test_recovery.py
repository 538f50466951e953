"""Bytewax recovery: a worker killed with SIGKILL mid-stream resumes and ends with the features of an uninterrupted
run, and with every event in ClickHouse."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import redis

from connectors.kafka import user_keyed
from connectors.simulator import SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce
from tests.helpers import STORED_EVENTS, clickhouse_rows, drain, features, nudgeflow, total_events, trickle, write_config


def test_sigkill_mid_stream_then_restart_gives_the_uninterrupted_features(
    kafka: TansuBroker, redis_url: str, key_prefix: str, topic_prefix: str, tmp_path: Path
) -> None:
    prefix = topic_prefix + "rec"
    topic = f"{prefix}.events"
    create_topics(kafka.bootstrap, [topic], partitions=3)
    # known shoppers only: anonymous and known events of one shopper lie in different partitions, so in a
    # replay what a merge finds depends on read timing (identity under interleavings: test_identity_property)
    records = list(user_keyed(iter_records(SimulatorConfig(users=400, events=24_000, partitions=3, seed=11, anonymous_share=0))))
    half = len(records) // 2
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    # the run under test: recovery on, killed with SIGKILL while it works on the second half
    rec = write_config(tmp_path / "rec", kafka, prefix, redis_url, key_prefix + "r",
                       "recovery: {dir: store, snapshot_interval: 300ms}")
    # rows wait in the ClickHouse writer far longer than an epoch: an epoch recorded before its rows were
    # stored would lose them to the kill (the replay starts after it)
    rec.write_text(rec.read_text().replace("clickhouse: {chdb_path: ch}",
                                           "clickhouse: {chdb_path: ch, flush_interval: 1h, batch_rows: 1000000}"))
    nudgeflow("recovery", "init", "--config", str(rec), tail=True)
    produce(kafka.bootstrap, topic, records[:half])
    worker = nudgeflow("run", "--config", str(rec), "--no-summary", tail=True, wait=False)
    deadline = time.time() + 120
    try:  # the worker is killed whatever happens: a failed check must not leave it running
        while total_events(r, key_prefix + "r") < half and time.time() < deadline:
            assert worker.poll() is None, worker.communicate()[0][-3000:]
            time.sleep(0.2)
        assert total_events(r, key_prefix + "r") == half
        sent = trickle(kafka, topic, records, half, r, key_prefix + "r")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    assert half < total_events(r, key_prefix + "r") <= sent < len(records), "the kill should land mid-stream"
    produce(kafka.bootstrap, topic, records[sent:])

    drain(rec, r, key_prefix + "r", len(records))  # resumes from the last snapshot

    # the reference: the same events, one uninterrupted run, no recovery
    drain(write_config(tmp_path / "ref", kafka, prefix, redis_url, key_prefix + "u", ""), r, key_prefix + "u",
          len(records))

    got, want = features(r, key_prefix + "r"), features(r, key_prefix + "u")
    assert len(want) > 390 and total_events(r, key_prefix + "u") == len(records)
    assert got == want
    (stored, distinct), = clickhouse_rows(rec, STORED_EVENTS)
    assert distinct == len(records) <= stored  # every event stored (a replayed one twice: FINAL collapses it)
