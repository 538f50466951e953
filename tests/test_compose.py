"""The compose stack is valid for docker-compose, wired to config/docker.yaml and its Grafana provisioned
(no Docker engine needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from connectors.clickhouse import connect, migrate
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


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_cluster_profile_runs_one_cluster_of_two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--profile cluster``: two workers that are the two processes of one Bytewax cluster, each with its own
    volume (its share of the recovery store) and metrics port; without the profile, only the single worker."""
    proc = compose("--profile", "cluster", "config")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    workers = [services[f"worker-{i}"] for i in range(2)]
    # (docker-compose 1.29's `config` lists every service whatever the profile: the profiles are checked)
    assert "profiles" not in services["worker"] and all(w["profiles"] == ["cluster"] for w in workers)
    addresses = {option(w["command"], "--addresses") for w in workers}
    assert len(addresses) == 1  # the same cluster
    members = addresses.pop().split(";")
    assert [m.split(":")[0] for m in members] == ["worker-0", "worker-1"]  # each address is a worker's service
    assert [option(w["command"], "--process-id") for w in workers] == ["0", "1"]
    assert all(w["command"][:3] == ["run", "--config", "config/docker.yaml"] and "--init-recovery" in w["command"]
               for w in workers)
    assert workers[0]["environment"] == workers[1]["environment"] == services["worker"]["environment"]
    volumes = [{v.split(":")[0] for v in w["volumes"]} for w in (*workers, services["worker"])]
    assert volumes[0] and volumes[1] and not volumes[0] & volumes[1] and not (volumes[0] | volumes[1]) & volumes[2]
    assert len({p["published"] for w in workers for p in w["ports"]}) == 2
    # the store the workers share out has a partition for each of them
    for k, v in workers[0]["environment"].items():
        monkeypatch.setenv(k, v)
    recovery = load_deployment(ROOT / "config" / "docker.yaml").settings.recovery
    assert recovery is not None and recovery.partitions >= len(members)


def test_grafana_is_provisioned_with_the_read_only_analyst(chdb_path: Path, ch_database: str) -> None:
    proc = compose("config")
    assert proc.returncode == 0, proc.stderr
    grafana = yaml.safe_load(proc.stdout)["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    assert set(grafana["depends_on"]) == {"clickhouse"}
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"] if v.startswith("/")}
    for target in ("/etc/grafana/provisioning/datasources", "/etc/grafana/provisioning/dashboards",
                   "/etc/grafana/dashboards"):
        assert mounts[target].is_dir() and mounts[target].is_relative_to(ROOT / "deploy" / "grafana"), target
    files = {p.name: p for d in mounts.values() for p in d.iterdir()}

    (ds,) = yaml.safe_load(files["clickhouse.yaml"].read_text())["datasources"]
    assert ds["type"] == "grafana-clickhouse-datasource"
    assert ds["jsonData"]["host"] == "clickhouse" and ds["jsonData"]["username"] == "analyst"
    assert ds["secureJsonData"]["password"] == "$ANALYST_PASSWORD" and "ANALYST_PASSWORD" in grafana["environment"]
    (provider,) = yaml.safe_load(files["nudgeflow.yaml"].read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"

    dashboard = json.loads(files["nudgeflow.json"].read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for what in ("Events/min by type", "Fires", "Suppressions", "latency percentiles", "Dead letters", "AUC"):
        assert what in titles
    # every panel's SQL runs on the real schema (chDB), with Grafana's macros as the plugin expands them
    client = connect(f"chdb://{chdb_path}")
    try:
        migrate(client, ch_database)
        for p in dashboard["panels"]:
            (target,) = p["targets"]
            assert target["datasource"]["uid"] == ds["uid"]
            sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 1 HOUR", target["rawSql"])
            sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfMinute(\1)", sql)
            columns = client.query(f"DESCRIBE ({sql.replace('nudgeflow.', f'{ch_database}.')})").result_rows
            assert columns[0][0] == "time", p["title"]
    finally:
        client.close()
