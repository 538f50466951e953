"""The compose stack is valid for docker-compose and wired to config/docker.yaml (no Docker engine needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nudgeflow.configload import load_deployment

ROOT = Path(__file__).parents[1]


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed: `make tools` installs Debian's package (apt-get install docker-compose)"
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_compose_file_is_valid_with_and_without_the_demo_profile() -> None:
    for args in (("config", "-q"), ("--profile", "demo", "config", "-q")):
        proc = compose(*args)
        assert proc.returncode == 0, proc.stderr


def test_stack_services_and_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = compose("--profile", "demo", "config")
    assert proc.returncode == 0, proc.stderr
    stack = yaml.safe_load(proc.stdout)
    services = stack["services"]
    assert {"kafka", "redis", "clickhouse", "worker", "simulator"} <= set(services)
    worker = services["worker"]
    assert Path(worker["build"]["context"]).resolve() == ROOT and (ROOT / "Dockerfile").is_file()
    assert worker["command"][:3] == ["run", "--config", "config/docker.yaml"]
    env = worker["environment"]
    assert env["KAFKA_BROKERS"] == "kafka:9092"
    assert env["REDIS_URL"].endswith("@redis:6379/0") and ":change-me@" in env["REDIS_URL"]  # a password, from env
    assert env["CLICKHOUSE_DSN"].startswith("http://nudgeflow:") and env["CLICKHOUSE_DSN"].endswith("@clickhouse:8123")
    assert set(worker["depends_on"]) == {"kafka", "redis", "clickhouse"}
    users = (ROOT / "deploy/clickhouse/users.d/nudgeflow.xml").read_text()
    assert "<analyst>" in users and "<readonly>1</readonly>" in users
    # the worker's config loads with exactly the environment compose gives it
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dep = load_deployment(ROOT / "config" / "docker.yaml")
    assert dep.settings.source.kind == "kafka" and dep.settings.kafka.brokers == ["kafka:9092"]
    assert dep.settings.redis.url == env["REDIS_URL"] and dep.settings.clickhouse.dsn == env["CLICKHOUSE_DSN"]
    assert dep.settings.actions.kind == "kafka" and dep.settings.dlq.kind == "kafka"
