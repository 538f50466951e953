"""A real Redis Cluster (three primaries started by ``connectors.embedded``): the main flow ends on it exactly
as on one server, and the guards survive nodes that lost their scripts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bytewax.testing import run_main

from connectors.guard_store import RedisGuards
from connectors.model_store import RedisModelStore
from connectors.redis_client import redis_client
from connectors.redis_store import FeatureReader
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.events import Action, Consent
from nudgeflow.settings import Settings, TriggersFile
from tests.helpers import delete_keys, query

CONFIG_DIR = Path(__file__).parents[1] / "config"
DAY_MS = 86_400_000
TRIGGERS = """
defaults: {cooldown: 2h, consent: opt_out, holdout: 0}
control_group: 0
frequency_cap: {per_day: 2, per_week: 6}
channels:
  sms: {rate: 0.001, burst: 40, consent: opt_in}
triggers:
  - {id: browse, kind: event, on: [browse], channel: push, priority: 1}
  - {id: cart, kind: absence, after: [add_to_cart], unless: [order], within: 30m, channel: email, priority: 3}
  - {id: thanks, kind: event, on: [order], channel: email, priority: 2, guards: {daily_budget: 10}}
  - {id: search, kind: event, on: [search], channel: sms, guards: {cooldown: 1d}}
"""


def test_the_cluster_is_three_primaries_sharing_every_slot(redis_cluster_url: str) -> None:
    r = redis_client(redis_cluster_url)
    ranges = sorted((s[0], s[1]) for s in r.cluster_slots(target_nodes=r.get_random_node()).keys())
    assert len(r.get_primaries()) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))


def run(url: str, prefix: str, chdb_path: Path, database: str, base: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The main flow over simulated shoppers (two fifths anonymous, most of whom log in): what it left in Redis
    and in ClickHouse, with the key names that differ between the two set aside; and the model snapshots."""
    (base / "triggers.yaml").write_text(TRIGGERS)
    # events over ~3.5 days, ending ~2.5 days ago: the churn head (a 3-day horizon) learns the examples of
    # the first half day, at their deadlines
    start = (int(time.time() * 1000) // DAY_MS - 6) * DAY_MS
    s = Settings.model_validate({
        "source": {"kind": "simulator", "simulator": {
            "users": 150, "events": 5000, "seed": 11, "start_ms": start, "span_s": 5 * 86400,
            "anonymous_share": 0.4}},
        "redis": {"url": url, "key_prefix": prefix, "ttl": "1d"},
        "clickhouse": {"chdb_path": str(chdb_path), "database": database},
        "actions": {"kind": "file", "path": "actions.jsonl"}, "dlq": {"kind": "file", "path": "dlq.jsonl"},
        "triggers": str(base / "triggers.yaml"), "models": str(CONFIG_DIR / "models.yaml"),
        # event time never follows the wall clock here (a loaded machine may pause the flow): runs compare
        "features": {"definitions": str(CONFIG_DIR / "features.yaml"), "allowed_lateness": "1h", "idle_timeout": "1h"},
        "shards": 8,
    })
    flow, rt = build(deployment(s, base))
    try:
        run_main(flow)
    finally:
        rt.close()
    r = redis_client(url, decode_responses=True)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    users = sorted(k.split(":u:", 1)[1] for k in keys if k.startswith(f"{prefix}:u:"))
    canon = r.hgetall(f"{prefix}:id:canon")
    merged = set(canon.values())
    decisions = query(s, base, "SELECT trigger_id, user_id, occurrence, outcome, reason FROM {db}.decisions FINAL")
    store = RedisModelStore(url, prefix)
    models = {name: store.fetch(name) for name in (k.split(":model:")[1] for k in keys if ":model:" in k)}
    return {
        # scores are left out: models publish snapshots on a wall-clock cadence; so are the session counts
        # of merged shoppers, which depend on when the hand-over lands (FeatureEngine.absorb), on one server too
        "features": {u: {k: v for k, v in h.items()
                         if not k.startswith("score_") and not (u in merged and k.startswith("session"))}
                     for u, h in FeatureReader(url, prefix).get_many(users).items()},
        "decisions": sorted(decisions),
        # a counter at 0 is no count: on a cluster a cap reserved in the user's slot and undone when the shared
        # budget refused stays behind at 0 (the scripts are split by slot), where one server never wrote it
        "counters": {k.removeprefix(prefix): v for k in keys if ":cap:" in k or ":cd:" in k if (v := r.get(k)) != "0"},
        "budgets": {k.split(":budget:")[1]: r.get(k) for k in keys if ":budget:" in k},
        "sent": sum(":idem:" in k for k in keys),
        "consent": {k.removeprefix(prefix): r.hgetall(k) for k in keys if ":consent:" in k},
        "graph": (canon, r.get(f"{prefix}:id:seq"), r.xlen(f"{prefix}:id:history")),
        "handoffs": sorted(k.removeprefix(prefix) for k in keys if ":handoff:" in k),
    }, models


def test_the_main_flow_ends_on_a_cluster_as_on_one_server(redis_url: str, redis_cluster_url: str, key_prefix: str,
                                                         chdb_path: Path, ch_database: str, tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one, one_models = run(redis_url, key_prefix, chdb_path, ch_database + "_one", tmp_path / "one")
    try:
        many, many_models = run(redis_cluster_url, key_prefix, chdb_path, ch_database + "_many", tmp_path / "many")
    finally:
        delete_keys(redis_cluster_url, key_prefix)
    outcomes = {(o, r) for _, _, _, o, r in one["decisions"]}
    # the run exercised what it compares: every guard refused something, shoppers merged, models learned
    assert {("fired", ""), ("suppressed", "frequency_cap"), ("suppressed", "cooldown"), ("suppressed", "budget"),
            ("suppressed", "no_consent")} <= outcomes
    assert len(one["graph"][0]) > 10 and one["consent"] and one["handoffs"]
    for part in one:
        assert many[part] == one[part], part
    # every model published a snapshot that loads; how many examples it learned differs by a few between two
    # runs on one server too (767 and 768 of the same input), so that is compared within 2 %
    assert many_models.keys() == one_models.keys() == {"purchase_propensity", "purchase_propensity_30m", "churn_risk"}
    for name, snap in many_models.items():
        assert snap.load() is not None and abs(snap.examples - one_models[name].examples) <= 0.02 * snap.examples


def test_nodes_that_lost_their_scripts_get_them_again_and_nothing_runs_out_of_order(any_redis_url: str,
                                                                                   key_prefix: str) -> None:
    g = RedisGuards(TriggersFile.model_validate({"defaults": {"cooldown": 0}, "triggers": [
        {"id": "t", "kind": "event", "on": ["browse"]}]}), any_redis_url, key_prefix)
    redis_client(any_redis_url).script_flush()  # every node forgets every script (a restart, a failover)
    said = [Consent(f"u{i}", "email", False, 20) for i in range(12)]
    before = [Action(f"t/u{i}/1", "t", f"u{i}", "email", "1", 10, 10, 10, {}, {}) for i in range(12)]
    after = [Action(f"t/u{i}/2", "t", f"u{i}", "email", "2", 30, 30, 30, {}, {}) for i in range(12)]
    got = g.decide_batch([x for trio in zip(before, said, after) for x in trio])
    delete_keys(any_redis_url, key_prefix)
    assert sorted((d.action.occurrence, d.reason) for d in got) == [("1", "")] * 12 + [("2", "no_consent")] * 12
