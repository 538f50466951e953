"""The benchmark harness's bookkeeping: which latency run the ``BENCH`` line reports, the peers' shared job."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

from benchmarks.peers import job
from benchmarks.run import checks, latest_latency


def _run(utc: str, p99: float, **source: object) -> str:
    lat = {"e2e_ms": {"p99": p99}, "rate": 3000.0, "source": {"batch_size": 1000, "add_config": {}, "via": "kafka"} | source}
    return json.dumps({"env": {"utc": utc, "rev": "abc1234"}, "latency": lat})


def test_the_bench_line_reports_the_newest_latency_run_through_kafka_with_default_settings(tmp_path: Path) -> None:
    log = tmp_path / "latency.jsonl"
    log.write_text("\n".join([
        _run("2026-12-06 10:00:00", 120.0),
        _run("2026-12-06 11:00:00", 90.0),
        _run("2026-12-06 12:00:00", 20.0, via="file", follow_ms=1.0),  # no broker: an experiment
        _run("2026-12-06 13:00:00", 30.0, add_config={"fetch.wait.max.ms": "5"}),  # other settings: an experiment
        json.dumps({"env": {"utc": "2026-12-06 14:00:00", "rev": "abc1234"}, "eval": {}}),  # no latency part
    ]) + "\n")
    p99, which = latest_latency(log)  # type: ignore[misc]
    assert p99 == 90.0 and "2026-12-06 11:00:00" in which
    assert latest_latency(tmp_path / "none.jsonl") is None


def test_the_peers_job_does_what_its_docstrings_show() -> None:
    # benchmarks/ is not a doctest path of the suite; the peers' job (features, trigger, parse) is what both peer
    # engines run, so its examples are checked here
    res = doctest.testmod(job)
    assert res.attempted >= 5 and res.failed == 0


def test_the_harness_warns_when_the_two_peers_disagree_on_the_same_job() -> None:
    same = {"kafka_actions": 120, "redis_users": 2000}
    assert checks({"quix": same, "faust": dict(same)}) == []
    assert checks({"quix": same, "faust": same | {"kafka_actions": 119}}) == ["peers: kafka_actions quix 120 != faust 119"]
