"""The benchmark harness's bookkeeping: which latency run the ``BENCH`` line reports, the revision a row names,
the peers' shared job, the ClickHouse benchmark's discarding client."""

from __future__ import annotations

import doctest
import json
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks import instructions, run
from benchmarks.clickhouse import DiscardingClient, append_row
from benchmarks.peers import job
from benchmarks.run import checks, git_revision, latest_latency
from connectors.clickhouse import ClickHouseWriter
from nudgeflow.settings import ClickHouseConfig


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


def test_a_row_is_dirty_for_changes_but_not_for_the_records_of_earlier_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "benchmarks").mkdir()
    for name in ("RESULTS.md", "results.jsonl", "run.py"):
        (tmp_path / "benchmarks" / name).write_text("x\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(run, "REPO", tmp_path)
    clean = git_revision()
    assert clean and not clean.endswith("+dirty")
    for name in ("RESULTS.md", "results.jsonl"):  # what a benchmark run appends
        (tmp_path / "benchmarks" / name).write_text("x\ny\n")
    assert git_revision() == clean
    (tmp_path / "benchmarks" / "run.py").write_text("changed\n")
    assert git_revision() == clean + "+dirty"


def test_the_peers_job_does_what_its_docstrings_show() -> None:
    # benchmarks/ is not a doctest path of the suite; the peers' job (features, trigger, parse) is what both peer
    # engines run, so its examples are checked here
    res = doctest.testmod(job)
    assert res.attempted >= 5 and res.failed == 0


def test_the_peerjob_stage_runs_the_peers_job_as_nudgeflow_config() -> None:
    """``peerjob`` is compared with the peers as the same job: its config must keep every feature the peers compute
    (plus only those nudgeflow always keeps), their one trigger, and no models."""
    from benchmarks.stage import PEER_JOB
    from nudgeflow.configload import load_features, load_models, load_triggers
    from nudgeflow.settings import EventsConfig
    from operators.features import FeaturePlan

    events = EventsConfig()
    names = FeaturePlan(load_features(PEER_JOB / "features.yaml", events)).names
    peers = job.features({}, {"ts": 0, "type": "browse"})
    assert set(names) - set(peers) == {"first_seen_ts", "user_age_s", "last_platform", "cart_quantity"}
    assert set(peers) <= set(names) and len(peers) == 23
    tf = load_triggers(PEER_JOB / "triggers.yaml", events, names, [])
    assert [(t.id, t.kind, t.after, t.unless, t.within) for t in tf.triggers] == [
        ("cart_abandonment", "absence", ["add_to_cart"], ["order"], job.ABANDON_AFTER_MS / 1000)]
    assert tf.defaults.cooldown == job.COOLDOWN_MS / 1000
    assert load_models(PEER_JOB / "models.yaml", events, names).models == []


def test_a_row_appended_after_a_note_or_another_table_gets_its_header_again(tmp_path: Path) -> None:
    """RESULTS.md takes notes and profiles between runs: a row appended after them, without its header, was loose
    text (two rows of 2026-12-07 were). Every benchmark appends through ``table_head``."""
    res = doctest.testmod(run)  # table_head's own examples
    assert res.attempted >= 2 and res.failed == 0
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    append_row(md, "## T", "\nWhat T is.\n", ["utc", "x"], ["10:00", "1"])
    append_row(md, "## T", "\nWhat T is.\n", ["utc", "x"], ["11:00", "2"])
    md.write_text(md.read_text() + "\nNote: x rose.\n")
    append_row(md, "## T", "\nWhat T is.\n", ["utc", "x"], ["12:00", "3"])
    append_row(md, "## T", "\nWhat T is.\n", ["utc", "x", "y"], ["13:00", "4", "5"])
    assert md.read_text() == (
        "# Results\n\n## T\n\nWhat T is.\n\n| utc | x |\n| --- | --- |\n| 10:00 | 1 |\n| 11:00 | 2 |\n"
        "\nNote: x rose.\n\n| utc | x |\n| --- | --- |\n| 12:00 | 3 |\n"
        "\n| utc | x | y |\n| --- | --- | --- |\n| 13:00 | 4 | 5 |\n"
    )


def test_the_row_says_how_many_records_the_scale_stages_read() -> None:
    """The scale stages read their own topic, SCALE_FACTOR times the run's records and shoppers: a cluster's
    connection time, inside the measured wall, swamped ``scale2`` at the run's 200k records."""
    figures = {"eps": 1000.0, "us_cpu_per_event": 20.0, "wall_s": 1.0, "max_rss_mb": 300.0}
    env = {"utc": "2026-12-07 14:00:00", "rev": "abc", "machine": "x86_64", "cpu": "cpu", "nproc": 2, "python": "3.11",
           "load1": 0.5}
    base = {"env": env, "events": 200_000, "users": 20_000, "partitions": 3, "produce": {"eps": 1.0}, "ratios": {}}
    scaled = 200_000 * run.SCALE_FACTOR
    stages = {"features": figures | {"events": 200_000}, "features_x1": figures | {"events": scaled},
              "features_x2": figures | {"events": scaled}}
    cols, cells = run.results_row(base | {"stages": stages})
    assert cells[cols.index("events")] == (
        f"200,000 (20,000 users, 3 part.); scale stages {scaled:,} ({20_000 * run.SCALE_FACTOR:,} users, 4 part.)")
    cols, cells = run.results_row(base | {"stages": {"features": stages["features"]}})
    assert cells[cols.index("events")] == "200,000 (20,000 users, 3 part.)"


def test_a_clusters_figures_count_every_record_once_whichever_stage_ran() -> None:
    """A process of our flows counts what it accepted (its dead letters are the shared DLQ topic's, counted
    once); a process of the bare counter counts what it read. The wall is the slower process's."""
    figures = {"wall_s": 2.0, "cpu_s": 1.5, "user_s": 1.0, "sys_s": 0.5, "max_rss_mb": 300.0}
    ours = [figures | {"accepted": 590, "kafka_dlq": 10, "consumed": 600},
            figures | {"accepted": 400, "kafka_dlq": 10, "consumed": 410, "wall_s": 4.0}]
    merged = run.merge("features_x2", ours, 1000)
    assert (merged["consumed"], merged["ok"], merged["wall_s"], merged["eps"]) == (1000, True, 4.0, 250.0)
    bare = [figures | {"consumed": 550}, figures | {"consumed": 450}]
    assert (run.merge("bare_x2", bare, 1000)["ok"], run.merge("bare_x2", bare, 1001)["ok"]) == (True, False)


def test_the_harness_warns_when_the_two_peers_disagree_on_the_same_job() -> None:
    same = {"kafka_actions": 120, "redis_users": 2000}
    assert checks({"quix": same, "faust": dict(same)}) == []
    assert checks({"quix": same, "faust": same | {"kafka_actions": 119}}) == ["peers: kafka_actions quix 120 != faust 119"]
    # nudgeflow on the peers' job: the same shoppers in Redis; more actions (its timers fire without a next event)
    ours = {"redis_users": 2000, "kafka_actions": 200, "ch_actions": 200, "kafka_dlq": 3, "ch_dlq": 3}
    assert checks({"quix": same, "faust": same, "peerjob": ours}) == []
    assert checks({"quix": same, "peerjob": ours | {"redis_users": 1999, "ch_actions": 199}}) == [
        "peerjob: actions in Kafka 200 != in ClickHouse 199", "peerjob: Redis users 1999 != quix's 2000"]


def test_a_harness_section_is_written_once_and_its_header_again_after_another_table(tmp_path: Path) -> None:
    one = lambda v: run.append_section_row(tmp_path, "## A", "\n## A\n\nAbout A.\n", ["a"], [v], "a.jsonl", {"a": v})  # noqa: E731
    one("1"), one("2")
    run.append_section_row(tmp_path, "## B", "\n## B\n", ["b"], ["x"], "b.jsonl", {"b": "x"})
    one("3")
    assert (tmp_path / "RESULTS.md").read_text() == (
        "\n## A\n\nAbout A.\n\n| a |\n| --- |\n| 1 |\n| 2 |\n\n## B\n\n| b |\n| --- |\n| x |\n\n| a |\n| --- |\n| 3 |\n")
    assert [json.loads(x)["a"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == ["1", "2", "3"]


def test_the_clickhouse_benchmarks_discarding_client_takes_every_row_the_writer_hands_it() -> None:
    """The ``discard`` run of ``benchmarks.clickhouse`` is the flow without ClickHouse's cost: its client must take
    the writer's inserts as a real one does, or the writer retries forever and the run measures nothing."""
    writer = ClickHouseWriter(ClickHouseConfig(batch_rows=10, flush_interval=0.01), client_factory=DiscardingClient)
    for i in range(5):
        writer.put("events", ["event_id"], [[f"e{i}-{j}"] for j in range(10)])
    deadline = time.monotonic() + 10  # the writer's thread inserts by size and age (a failing insert is retried)
    while writer.inserted < 50 and not writer.failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.failures == 0 and writer.inserted == 50 and writer.buffered == 0
    writer.close()


def test_a_profile_sums_samples_by_our_functions_and_a_gil_profile_says_what_it_scales_by(tmp_path: Path) -> None:
    raw = tmp_path / "full.txt"
    raw.write_text("\n".join([
        "<module> (x.py:1);measure (benchmarks/measure.py:9);apply (operators/features.py:5);loads (pickle.py:3) 30",
        "<module> (x.py:1);measure (benchmarks/measure.py:9);apply (operators/features.py:5) 10",
        "<module> (x.py:1);measure (benchmarks/measure.py:9);score (operators/models.py:7) 60",
        "<module> (x.py:1);build (flows/main.py:2) 500",  # before the timed region: not the flow at work
        "<module> (x.py:1);measure (benchmarks/measure.py:9);wait (threading.py:1) 99",  # waiting costs nothing
        "<module> (x.py:1);measure (benchmarks/measure.py:9);run (benchmarks/stage.py:4);shim (bytewax/op.py:3) 10",
    ]))
    prof = run.profile(raw, 110.0)
    assert prof["samples"] == 110
    assert [(r["function"], round(r["self_us"], 9), round(r["incl_us"], 9), r["top_leaf"]) for r in prof["top"]] == [
        ("score", 60.0, 60.0, "(itself)"), ("apply", 40.0, 40.0, "loads"), ("run", 10.0, 10.0, "shim")]
    # by step: the callback under the harness's frames holds all below it; Bytewax's own frames are between steps
    assert [(r["callback"], round(r["us"], 9)) for r in prof["steps"]] == [
        ("score", 60.0), ("apply", 40.0), ("(Bytewax between steps)", 10.0)]
    assert sum(r["share"] for r in prof["steps"]) == pytest.approx(1.0)
    env = {"utc": "2026-12-07 18:00:00", "rev": "abc1234", "cpu": "cpu", "nproc": 2}
    cpu = run.profile_markdown({"env": env, "events": 1000, "users": 10}, prof | {"stage": "full"})
    gil = run.profile_markdown({"env": env, "events": 1000, "users": 10}, prof | {"stage": "full", "gil": True})
    assert "--gil" not in cpu and "µs CPU per event" in cpu
    assert "--profile-gil" in gil and "py-spy record -f raw -r 250 --gil" in gil and "µs of wall time per event" in gil
    assert "| `score` | operators/models.py | 54.5 | 60.0 |" in gil and "| `(Bytewax between steps)` |  | 9.1 | 10.0 |" in gil


def test_the_harness_examples_hold() -> None:
    # benchmarks/ is not a doctest path of the suite: the user key, the median of rounds, the table header, a
    # profile's step, how instruction counts are read and summed by step
    res = doctest.testmod(run)
    assert res.attempted >= 6 and res.failed == 0
    res = doctest.testmod(instructions)
    assert res.attempted >= 3 and res.failed == 0


def test_the_instruction_chain_marks_each_step_of_a_batch_once_and_runs_the_flows_steps() -> None:
    """``benchmarks.instructions`` sums callgrind's dumps by their order: it holds only if the chain marks exactly once
    before each step of each batch; and the chain must do the flow's work (events enriched, models learned and
    published, triggers evaluated), or its counts say nothing."""
    from connectors.simulator import iter_records

    chain = instructions.Chain(instructions.CONFIG)
    records = [(f"sim:0:{i}", r) for i, r in enumerate(iter_records(run.simulator_config(300, 6_000, 7)))]
    for i in range(0, 4_000, instructions.BATCH):
        chain.feed(records[i:i + instructions.BATCH])
    assert "purchase_propensity" in chain.published  # learned, and published to the scorer's store
    marks: list[int] = []
    enriched = sum(chain.feed(records[i:i + instructions.BATCH], lambda: marks.append(1)) for i in (4_000, 5_000))
    assert len(marks) == 2 * len(instructions.STEPS) and enriched > 2_000 and chain.fired > 0
    assert chain.scorer.version("purchase_propensity") > 0  # scoring with a learned snapshot, not the prior
    dumps = [10**9, *range(1, 11), 0]  # start-up, the ten marked steps, the final mark's own
    assert instructions.per_step(dumps, batches=2) == {"parse": 7, "features": 9, "score": 11, "labels": 13,
                                                        "triggers": 15}
    with pytest.raises(ValueError, match="another call"):
        instructions.per_step(dumps[:-3], batches=2)


def test_with_rounds_each_stage_is_its_median_run_and_the_row_says_so() -> None:
    """One run's figures move by 10-30 % here from one minute to the next; ``--rounds N`` keeps each stage's
    median run whole (its CPU, wall and state are that run's, not medians of each), and the row names it."""
    runs = [{"eps": e, "wall_s": w, "us_cpu_per_event": 20.0, "max_rss_mb": 300.0} for e, w in
            ((44_000.0, 4.5), (39_000.0, 5.1), (45_000.0, 4.4), (41_000.0, 4.9))]
    mid = run.median_run(runs)
    assert (mid["eps"], mid["wall_s"], mid["eps_rounds"]) == (41_000.0, 4.9, [44_000.0, 39_000.0, 45_000.0, 41_000.0])
    assert run.median_run(runs[:1]) == runs[0]
    env = {"utc": "2026-12-07 18:00:00", "rev": "abc", "machine": "x86_64", "cpu": "cpu", "nproc": 2, "python": "3.11",
           "load1": 0.5}
    base = {"env": env, "events": 200_000, "users": 20_000, "partitions": 3, "produce": {"eps": 1.0}, "ratios": {},
            "stages": {"features": mid}}
    cols, cells = run.results_row(base | {"rounds": 4})
    assert cells[cols.index("events")] == "200,000 (20,000 users, 3 part.); each stage the median of 4 rounds"
    cols, cells = run.results_row(base)
    assert cells[cols.index("events")] == "200,000 (20,000 users, 3 part.)"
