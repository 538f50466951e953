"""Hot reload: a running flow picks up an edited trigger file within seconds; an invalid edit is refused
and the triggers that were running keep running."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

from connectors.tansu import TansuBroker, create_topics, produce
from nudgeflow.configload import TriggerSource, load_deployment
from tests.helpers import stop

CONFIG_DIR = Path(__file__).parents[1] / "config"
BROWSE = """
frequency_cap: {per_day: null, per_week: null}
defaults: {cooldown: 0}
triggers:
  - {id: on_browse, kind: event, on: [browse], condition: "features.views_1h >= 1"}
"""
BROKEN = BROWSE + '  - {id: broken, kind: event, on: [browse], condition: "features.views_1h >>> 1"}\n'
BOTH = BROWSE + "  - {id: on_cart, kind: event, on: [add_to_cart], payload: {value: '${features.cart_value}'}}\n"
WIDER = BROWSE + "  - {id: rich, kind: event, on: [order], condition: \"features.revenue_30d > 100.0\"}\n"


def test_trigger_source_reloads_valid_edits_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "local.yaml"
    cfg.write_text(f"triggers: triggers.yaml\nfeatures: {{definitions: {CONFIG_DIR / 'features.yaml'}}}\n")
    path = tmp_path / "triggers.yaml"
    path.write_text(BROWSE)
    dep = load_deployment(cfg)
    src = TriggerSource(path, dep.triggers, dep.check_triggers, every=0)
    src.poll()
    assert src.version == 1
    path.write_text(BROKEN)
    with caplog.at_level(logging.ERROR):
        src.poll()
    assert src.version == 1 and [t.id for t in src.current.triggers] == ["on_browse"]
    assert "triggers.yaml:6: triggers.1.condition: CEL" in caplog.text  # file, line and field
    for version, text in enumerate((BOTH, WIDER), start=2):
        path.write_text(text)
        src.poll()
        assert src.version == version
    assert [t.id for t in src.current.triggers] == ["on_browse", "rich"]


def _event(eid: str, etype: str, **props: object) -> tuple[bytes, bytes]:
    return b"u1", orjson.dumps({"event_id": eid, "user_id": "u1", "type": etype, "ts": int(time.time() * 1000),
                                "props": props})


def _wait_for(path: Path, pred, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []
        if pred(lines):
            return lines
        time.sleep(0.3)
    raise AssertionError(f"timed out; {path} holds {lines}")


def test_a_running_flow_picks_up_an_edited_trigger_file(kafka: TansuBroker, redis_url: str, key_prefix: str,
                                                        tmp_path: Path) -> None:
    prefix = f"nftest-{uuid.uuid4().hex[:10]}"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=1)
    triggers = tmp_path / "triggers.yaml"
    triggers.write_text(BROWSE)
    cfg = tmp_path / "live.yaml"
    cfg.write_text(f"""
source: {{kind: kafka}}
kafka: {{brokers: ["{kafka.bootstrap}"], topic_prefix: {prefix}, tail: true}}
features: {{definitions: {CONFIG_DIR / 'features.yaml'}, idle_timeout: 1s}}
redis: {{url: "{redis_url}", key_prefix: {key_prefix}}}
clickhouse: {{chdb_path: ch}}
actions: {{kind: file, path: actions.jsonl}}
dlq: {{kind: file, path: dlq.jsonl}}
triggers: triggers.yaml
""")
    log = (tmp_path / "flow.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(cfg), "--no-summary"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    actions = tmp_path / "actions.jsonl"
    try:
        produce(kafka.bootstrap, f"{prefix}.events", [_event("b1", "browse")])
        _wait_for(actions, lambda a: [x["trigger_id"] for x in a] == ["on_browse"])

        triggers.write_text(BROKEN)  # refused: the running trigger stays
        time.sleep(2.5)
        produce(kafka.bootstrap, f"{prefix}.events", [_event("b2", "browse")])
        _wait_for(actions, lambda a: len(a) == 2)
        assert "trigger file rejected" in (tmp_path / "flow.log").read_text()

        triggers.write_text(BOTH)  # accepted within seconds, no restart
        time.sleep(2.5)
        produce(kafka.bootstrap, f"{prefix}.events", [_event("c1", "add_to_cart", item_id="i1", price=12.5)])
        got = _wait_for(actions, lambda a: len(a) == 3)
        assert [(x["trigger_id"], x["occurrence"]) for x in got] == [("on_browse", "b1"), ("on_browse", "b2"),
                                                                     ("on_cart", "c1")]
        assert got[2]["payload"] == {"value": 12.5}
        assert proc.poll() is None  # it never stopped
    finally:
        stop(proc, timeout=20)
        log.close()
