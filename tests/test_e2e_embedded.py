"""The embedded default through the real CLI, as `make demo` runs it: simulator, embedded Redis, chDB, files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import redis

from connectors.redis_store import FeatureReader
from tests.helpers import clickhouse_rows

CONFIG = """
name: nudgeflow_e2e
source:
  kind: simulator
  simulator: {{users: 300, events: 6000, partitions: 2, seed: 7, bad_rate: 0.01}}
events:
  custom_types: [payment]
features: {{definitions: {features}}}
redis: {{url: "{redis_url}", key_prefix: {prefix}, ttl: 1h, embedded: true}}
clickhouse: {{chdb_path: ch}}
actions: {{kind: file, path: out/actions.jsonl}}
dlq: {{kind: file, path: out/dlq.jsonl}}
triggers: {triggers}
models: {models}
"""


def test_cli_run_on_the_embedded_default(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    triggers = Path(__file__).parents[1] / "config" / "triggers.yaml"
    cfg = tmp_path / "local.yaml"
    features = triggers.parent / "features.yaml"
    cfg.write_text(CONFIG.format(redis_url=redis_url, prefix=key_prefix, triggers=triggers, features=features,
                                 models=triggers.parent / "models.yaml"))
    proc = subprocess.run(
        [sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(cfg), "--workers", "2"],
        capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"events in (\d+)\s+accepted (\d+)\s+dead letters (\d+)\s+actions fired (\d+)", proc.stdout)
    assert m, proc.stdout
    events_in, accepted, dead, fired = map(int, m.groups())
    assert events_in == 6000 and accepted + dead == 6000  # every record is accounted for in ClickHouse
    assert 20 <= dead <= 150  # ~1 % bad records (a few duplicates among them)

    dlq = [orjson.loads(line) for line in (tmp_path / "out" / "dlq.jsonl").read_bytes().splitlines()]
    assert len(dlq) == dead
    assert {d["reason"] for d in dlq} >= {"malformed_json", "missing_field", "unknown_type", "oversized", "future_ts"}
    assert all(d["raw"] and d["position"].startswith("sim:") for d in dlq)

    actions = [orjson.loads(line) for line in (tmp_path / "out" / "actions.jsonl").read_bytes().splitlines()]
    assert len(actions) == fired > 0
    assert len({a["action_id"] for a in actions}) == len(actions)
    # the shipped scenarios (config/triggers.yaml) on 300 simulated shoppers
    assert {"cart_abandonment", "welcome_step_1", "post_purchase_cross_sell", "search_no_click"} <= {
        a["trigger_id"] for a in actions}

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = list(r.scan_iter(match=f"{key_prefix}:u:*", count=1000))
    assert 250 <= len(keys) <= 300
    sample = FeatureReader(redis_url, key_prefix).get(keys[0].split(":u:", 1)[1])
    assert sample["events_1h"] >= 1 and sample["_v"] == "1" and int(sample["_ts"]) > 0
    # every shopper's newest scores, published with the features: churn_risk scores every event type
    hashes = FeatureReader(redis_url, key_prefix).get_many(k.split(":u:", 1)[1] for k in keys).values()
    assert all(0.0 <= float(h["score_churn_risk"]) <= 1.0 for h in hashes)
    assert sum("score_purchase_propensity" in h for h in hashes) >= len(keys) // 2
    assert "funnel browse → cart → order by platform" in proc.stdout
    # the models' figures so far, the learner's and the served score's (a number, or nan before both outcomes)
    models = proc.stdout.split("online models so far")[1].split("features in Redis")[0]
    assert "served AUC" in models
    for name in ("purchase_propensity", "purchase_propensity_30m", "churn_risk"):
        assert re.search(rf"│ {name}\s+│\s+\d+ │(\s+(\d\.\d+|nan) │){{6}}\s+\d+ │", models), (name, models)
    rows = dict(re.findall(r"│ (\w+)\s+│\s+(\d+) │", proc.stdout.split("rows in ClickHouse")[1]))
    assert int(rows["events"]) == accepted and int(rows["dlq"]) == dead and int(rows["actions"]) == fired
    # shoppers gone quiet a day (features.yaml, idle) were looked at: churn_risk scored and sampled them while
    # away; a look is never a row of events
    looks = clickhouse_rows(cfg, "SELECT uniqExact(event_id), countIf(model != 'churn_risk'), "
                                 "(SELECT countIf(type = 'idle') FROM {db}.events FINAL) "
                                 "FROM {db}.predictions FINAL WHERE startsWith(event_id, 'idle:')")
    assert looks[0][0] > 20 and looks[0][1:] == [0, 0], looks


STDOUT_CONFIG = """
name: nudgeflow_stdout
source: {{kind: file, file: {{paths: [{events}]}}}}
features: {{definitions: {features}}}
redis: {{url: "{redis_url}", key_prefix: {prefix}}}
clickhouse: {{chdb_path: ch}}
actions: {{kind: stdout}}
dlq: {{kind: stdout}}
triggers: {triggers}
"""


def test_actions_and_dead_letters_as_json_lines_on_stdout(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """The stdout sinks (``kind: stdout``): each action and each dead letter is one JSON line among the run's
    output, with what a file sink writes."""
    now = 1_796_000_000_000
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(
        orjson.dumps({"event_id": f"e{i}", "user_id": u, "type": "browse", "ts": now + i, "props": {"item_id": "i1"}})
        + b"\n" for i, u in enumerate(["u1", "u2", "u1"])) + b'{"event_id": "broken"\n')
    triggers = tmp_path / "triggers.yaml"
    triggers.write_text("defaults: {cooldown: 1h, holdout: 0, consent: opt_out}\n"
                        "triggers:\n  - {id: hello, kind: event, on: [browse], channel: push}\n")
    cfg = tmp_path / "stdout.yaml"
    cfg.write_text(STDOUT_CONFIG.format(events=events, features=Path(__file__).parents[1] / "config" / "features.yaml",
                                        redis_url=redis_url, prefix=key_prefix, triggers=triggers))
    proc = subprocess.run([sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(cfg), "--no-summary"],
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [orjson.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    actions = [x for x in lines if "action_id" in x]
    dead = [x for x in lines if "reason" in x]
    assert sorted((a["trigger_id"], a["user_id"], a["occurrence"]) for a in actions) == [
        ("hello", "u1", "e0"), ("hello", "u2", "e1")]  # u1's second browse: within the cooldown
    assert [(d["reason"], d["raw"]) for d in dead] == [("malformed_json", '{"event_id": "broken"')]
    assert len(lines) == 3
