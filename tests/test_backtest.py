"""Backtesting triggers: the real main flow over a scripted history, sending nothing, counted from its decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson
import redis

from nudgeflow.backtest import CLICKHOUSE, backtest, parse_time
from nudgeflow.configload import load_deployment
from tests.helpers import CART_ABANDONMENT

CONFIG = Path(__file__).parents[1] / "config"
T0 = int(datetime(2026, 1, 5, 10, tzinfo=timezone.utc).timestamp() * 1000)
MIN = 60_000

TRIGGERS = f"""
defaults: {{cooldown: 1h, consent: opt_out}}
triggers:{CART_ABANDONMENT}
  - id: keen_searcher
    kind: event
    on: [search]
    condition: "features.searches_1h >= 2"
    channel: push
  - id: never_fires
    kind: event
    on: [favourite]
    channel: push
"""

CART = {"item_id": "i1", "price": 10.0, "quantity": 1}
HISTORY: list[tuple[str, str, int, dict]] = [
    ("u4", "consent", -1, {"channel": "email", "status": "opt_out"}),
    ("u1", "add_to_cart", 0, CART),  # no order: fires at +30m
    ("u2", "add_to_cart", 0, CART),
    ("u2", "order", 10, {"amount": 10.0}),  # answered in time: nothing
    ("u3", "add_to_cart", 0, CART),  # fires at +30m …
    ("u3", "add_to_cart", 50, CART),  # … and again at +80m, inside the 1h cooldown: suppressed
    ("u4", "add_to_cart", 0, CART),  # opted out of email: suppressed no_consent
    ("u5", "search", 0, {"query": "shoes"}),
    ("u5", "search", 1, {"query": "shoes"}),  # second search in the hour: fires
    ("u5", "search", 2, {"query": "boots"}),  # third: cooldown
    ("u6", "search", 0, {"query": "hats"}),  # one search: nothing
] + [(u, "browse", 180, {"item_id": "i9"}) for u in ("u1", "u2", "u3", "u4", "u5", "u6")]  # event time moves on

EXPECTED = {
    "cart_abandonment": {"fired": 2, "holdout": 0, "held": 0, "suppressed": {"cooldown": 1, "no_consent": 1},
                         "users_reached": 2},
    "keen_searcher": {"fired": 1, "holdout": 0, "held": 0, "suppressed": {"cooldown": 1}, "users_reached": 1},
    "never_fires": {"fired": 0, "holdout": 0, "held": 0, "suppressed": {}, "users_reached": 0},
}
EXPECTED_TOTAL = {"fired": 3, "holdout": 0, "held": 0, "suppressed": {"cooldown": 2, "no_consent": 1}, "users_reached": 3}

#: the production side: a real Redis and Kafka sinks nobody listens to; a backtest must use neither
PRODUCTION = """
name: prod
source: {{kind: file, file: {{paths: [{events}]}}}}
features: {{definitions: {features}}}
redis: {{url: "{redis_url}", key_prefix: {prefix}}}
kafka: {{brokers: ["127.0.0.1:9"]}}
clickhouse: {{chdb_path: prod-ch}}
actions: {{kind: kafka}}
dlq: {{kind: kafka}}
triggers: {triggers}
"""


def write_history(path: Path) -> Path:
    rows = sorted(HISTORY, key=lambda r: r[2])
    path.write_bytes(b"".join(
        orjson.dumps({"event_id": f"e{i}", "user_id": u, "type": t, "ts": T0 + m * MIN, "props": p}) + b"\n"
        for i, (u, t, m, p) in enumerate(rows)
    ))
    return path


def setup(tmp_path: Path, redis_url: str, key_prefix: str) -> tuple[Path, Path, Path]:
    """The history, the triggers to try and a production config pointing at the real Redis."""
    events = write_history(tmp_path / "history.jsonl")
    triggers = tmp_path / "candidate.yaml"
    triggers.write_text(TRIGGERS)
    live_triggers = tmp_path / "live-triggers.yaml"  # what runs live: replaced by the candidate in a backtest
    live_triggers.write_text("triggers:\n  - {id: live_only, kind: event, on: [browse], channel: push}\n")
    cfg = tmp_path / "prod.yaml"
    cfg.write_text(PRODUCTION.format(events=events, features=CONFIG / "features.yaml", redis_url=redis_url,
                                     prefix=key_prefix, triggers=live_triggers))
    return events, triggers, cfg


def test_a_backtest_counts_fires_suppressions_and_users_and_sends_nothing(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    events, triggers, cfg = setup(tmp_path, redis_url, key_prefix)
    out = tmp_path / "bt"
    r = backtest(load_deployment(cfg), triggers, events, out=out)

    assert r["triggers"] == EXPECTED and r["total"] == EXPECTED_TOTAL
    assert r["events"] == len(HISTORY) and r["dead_letters"] == 0
    assert r["span"] == {"from": "2026-01-05T09:59:00+00:00", "to": "2026-01-05T13:00:00+00:00"}
    actions = [orjson.loads(line) for line in (out / "actions.jsonl").read_bytes().splitlines()]
    assert sorted((a["trigger_id"], a["user_id"]) for a in actions) == [
        ("cart_abandonment", "u1"), ("cart_abandonment", "u3"), ("keen_searcher", "u5")]
    # production untouched: no guard counter or feature in its Redis, no chDB folder of its own
    assert list(redis.Redis.from_url(redis_url).scan_iter(match=f"{key_prefix}*")) == []
    assert not (tmp_path / "prod-ch").exists()


def test_a_backtest_over_clickhouse_history_matches_the_file_and_since_filters(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    events, triggers, cfg = setup(tmp_path, redis_url, key_prefix)
    live = tmp_path / "live.yaml"  # the live run: fills prod-ch's events table
    live.write_text(cfg.read_text().replace(f'url: "{redis_url}"', 'url: "", embedded: true')
                    .replace("actions: {kind: kafka}", "actions: {kind: file, path: live/actions.jsonl}")
                    .replace("dlq: {kind: kafka}", "dlq: {kind: file, path: live/dlq.jsonl}"))
    proc = subprocess.run([sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(live), "--no-summary"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    dep = load_deployment(cfg)
    from_file = backtest(dep, triggers, events)
    from_clickhouse = backtest(dep, triggers, CLICKHOUSE)
    assert from_clickhouse == from_file
    assert from_clickhouse["triggers"] == EXPECTED

    # from 10:01:30 on: u5's third search (alone in its hour) and u3's second cart, now outside any cooldown
    since = backtest(dep, triggers, CLICKHOUSE, since=parse_time("2026-01-05T10:01:30", 0))
    assert since["events"] == 9
    assert since["triggers"]["cart_abandonment"] == {**EXPECTED["never_fires"], "fired": 1, "users_reached": 1}
    assert since["triggers"]["keen_searcher"] == EXPECTED["never_fires"]
    until = backtest(dep, triggers, CLICKHOUSE, until=parse_time("2026-01-05T10:01:30", 0))
    assert until["events"] == len(HISTORY) - 9


def test_the_cli_prints_the_figures_as_json_and_refuses_a_bad_trigger_file(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    events, triggers, cfg = setup(tmp_path, redis_url, key_prefix)
    cmd = [sys.executable, "-m", "nudgeflow.cli", "backtest", "--config", str(cfg), "--events", str(events)]
    wide = {**os.environ, "COLUMNS": "300"}  # rich wraps at the terminal's width
    proc = subprocess.run(cmd + ["--triggers", str(triggers), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["triggers"] == EXPECTED and r["total"] == EXPECTED_TOTAL and r["events"] == len(HISTORY)

    table = subprocess.run(cmd + ["--triggers", str(triggers)], capture_output=True, text=True, timeout=300, env=wide)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "events replayed 17" in table.stdout and "suppressed: cooldown" in table.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("triggers:\n  - id: oops\n    kind: absence\n    after: [teleport]\n    unless: [order]\n    within: 1h\n")
    proc = subprocess.run(cmd + ["--triggers", str(bad)], capture_output=True, text=True, timeout=300, env=wide)
    assert proc.returncode == 2
    assert f"{bad}:4: triggers.0.after.0: unknown event type 'teleport'" in proc.stderr
