"""Configuration: errors name file, line and field; env interpolation; the repo's configs load; the CLI says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from nudgeflow.configload import load_deployment, load_features, load_models, load_triggers
from nudgeflow.settings import SCHEMAS, EventsConfig, Settings
from nudgeflow.yamlconf import ConfigError, load_model, load_yaml

ROOT = Path(__file__).parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error(model: type, path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_model(model, path)
    return str(e.value)


def test_the_repo_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLICKHOUSE_DSN", "http://nudgeflow:from-env@clickhouse:8123")  # as docker-compose.yml sets it
    for name in ("local.yaml", "docker.yaml"):
        dep = load_deployment(ROOT / "config" / name)
        assert dep.triggers.triggers and dep.models.models and dep.features.counts


def test_the_shipped_json_schemas_are_current_and_the_repo_configs_pass_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``config/<name>.schema.json`` is what ``nudgeflow schema`` writes now (``make schema`` after a settings
    change), and every shipped config file names its schema and passes it as an editor would check it."""
    from nudgeflow.cli import json_schema

    monkeypatch.setenv("CLICKHOUSE_DSN", "http://nudgeflow:from-env@clickhouse:8123")  # as docker-compose.yml sets it
    for name, model in SCHEMAS.items():
        shipped = ROOT / "config" / f"{name}.schema.json"
        assert shipped.read_text() == json_schema(model), f"{shipped} is stale: run `make schema`"
    for path in sorted((ROOT / "config").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), f"{path.name} names no schema"
        schema = json.loads((ROOT / "config" / first.split("=", 1)[1]).read_text())
        data, _lines = load_yaml(path)
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(data)]
        assert errors == [], f"{path.name}: {errors}"


def test_an_editor_schema_takes_durations_with_units_and_refuses_others() -> None:
    schema = Draft202012Validator(json.loads(json_schema_of("settings")))
    lateness = lambda v: {"features": {"allowed_lateness": v}}  # noqa: E731
    assert schema.is_valid(lateness("30m")) and schema.is_valid(lateness(90)) and schema.is_valid(lateness("250ms"))
    assert not schema.is_valid(lateness("30 minutes")) and not schema.is_valid(lateness(-1))


def json_schema_of(name: str) -> str:
    from nudgeflow.cli import json_schema

    return json_schema(SCHEMAS[name])


@pytest.mark.parametrize(("text", "expected"), [
    ("name: x\nredis:\n  urll: redis://x\n", ":3: redis.urll: unknown field"),
    ("features:\n  allowed_lateness: 30 minutes\n", ":2: features.allowed_lateness: Value error, expected a duration"),
    ("shards: many\n", ":1: shards: Input should be a valid integer"),
    ("name: x\nsource:\n  kind: carrier_pigeon\n", ":3: source.kind: Input should be"),
    ("name: x\nname: y\n", ":2: name: duplicate key"),
    ("name: [x\n", "invalid YAML"),
    ("name: x\nredis:\n  url: redis+cluster://h:7000\n  embedded: true\n", ":3: redis: Value error, embedded starts"),
    ("events:\n  dedup_window: -300\n", ":2: events.dedup_window: Value error, a duration cannot be negative"),
    ("events:\n  max_age: true\n", ":2: events.max_age: Value error, expected a duration like 30m"),
    ("events:\n  currency_rates: {USD: 1.0, EUR: 0}\n", ":2: events.currency_rates: Value error, rates must be "
                                                         "positive: ['EUR']"),
    ("source:\n  kind: file\n  file: {paths: [a.jsonl], tail: 0s}\n", ":3: source.file.tail: Value error, tail is how"),
    ("actions: {kind: file}\n", ":1: actions: Value error, a file sink needs a path"),
    ("actions: {kind: webhook}\n", ":1: actions: Value error, a webhook sink needs a webhook section"),
])
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    msg = error(Settings, path)
    assert str(path) in msg and expected in msg, msg


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("features.yaml", "rfm:\n  frequency: [1, 4, 2, 8]\n", ": rfm: Value error, rfm.frequency thresholds must be ascending"),
    ("features.yaml", "lifecycle:\n  active_within: 30d\n  at_risk_within: 7d\n",
     ": lifecycle: Value error, lifecycle windows must satisfy active_within <= at_risk_within <= dormant_within"),
    ("triggers.yaml", "defaults:\n  quiet_hours: {start: 9pm}\ntriggers: []\n",
     ":2: defaults.quiet_hours.start: Value error, expected a time of day like 21:00 (got '9pm')"),
    ("triggers.yaml", "triggers:\n  - {id: c, kind: crossing, value: score.p, above: 0.5, reset_below: 0.7}\n",
     ":2: triggers.0.crossing: Value error, reset_below must not be above `above`"),
    ("triggers.yaml", "triggers:\n  - {id: d, kind: date, attribute: birthday, at: '25:00'}\n",
     ":2: triggers.0.at: Value error, expected a time of day like 10:00 (got '25:00')"),
    ("models.yaml", "models:\n" + "  - {name: a, label: {events: [order], within: 1h}, features: [views_1h]}\n" * 2,
     ": <root>: Value error, model name 'a' is used twice"),
])
def test_bad_features_triggers_and_models_files_are_refused_with_what_is_wrong(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = write(tmp_path, text, name)
    load = {"features.yaml": lambda: load_features(path, EventsConfig()),
            "triggers.yaml": lambda: load_triggers(path, EventsConfig(), [], ["p"]),
            "models.yaml": lambda: load_models(path, EventsConfig(), ["views_1h"])}[name]
    with pytest.raises(ConfigError) as e:
        load()
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_environment_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'redis:\n  url: "${NF_T_URL:-redis://default:6379/0}"\nshards: "${NF_T_SHARDS:-8}"\n')
    s = load_model(Settings, path)
    assert (s.redis.url, s.shards) == ("redis://default:6379/0", 8)
    monkeypatch.setenv("NF_T_URL", "redis://other:6379/1")
    monkeypatch.setenv("NF_T_SHARDS", "16")
    s = load_model(Settings, path)
    assert (s.redis.url, s.shards) == ("redis://other:6379/1", 16)  # a substituted number is a number
    msg = error(Settings, write(tmp_path, "redis:\n  url: ${NF_T_UNSET_VAR}\n", "d.yaml"))
    assert ":2:" in msg and "NF_T_UNSET_VAR is not set" in msg


@pytest.mark.parametrize(("text", "where"), [
    ("kafka:\n  add_config:\n    sasl.password: hunter2\n", ":4: kafka.add_config.sasl.password:"),
    ("redis:\n  url: redis://:hunter2@cache:6379/0\n", ":3: redis.url:"),
    ("clickhouse:\n  dsn: ${NF_T_DSN:-http://user:hunter2@ch:8123}\n", ":3: clickhouse.dsn:"),
    ("kafka:\n  add_config:\n    sasl.password: ${NF_T_PW:-hunter2}\n", ":4: kafka.add_config.sasl.password:"),
])
def test_plaintext_secrets_are_refused_with_their_line(tmp_path: Path, text: str, where: str) -> None:
    msg = error(Settings, write(tmp_path, "name: x\n" + text))
    assert where in msg and "${VAR}" in msg and "hunter2" not in msg, msg


def test_secrets_come_from_the_environment_or_a_mounted_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "kafka_password"
    secret.write_text("s3cr3t: with a colon\n")
    monkeypatch.setenv("NF_T_REDIS_PW", "0123")
    s = load_model(Settings, write(tmp_path, (
        f"kafka:\n  add_config:\n    sasl.password: ${{file:{secret}}}\n"
        "redis:\n  url: redis://:${NF_T_REDIS_PW}@cache:6379/0\n"
    )))
    assert s.kafka.add_config["sasl.password"] == "s3cr3t: with a colon"  # kept as written, not re-read as YAML
    assert s.redis.url == "redis://:0123@cache:6379/0"


TRIGGER = """triggers:
  - id: t1
    kind: event
    on: [browse]
    condition: "{condition}"
"""


def trigger_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_triggers(write(tmp_path, text, "triggers.yaml"), EventsConfig(), ["views_1h"], ["propensity"])
    return str(e.value)


def test_trigger_file_checks(tmp_path: Path) -> None:
    ok = load_triggers(write(tmp_path, TRIGGER.format(condition="features.views_1h > 2 && score.propensity > 0.5"),
                             "triggers.yaml"), EventsConfig(), ["views_1h"], ["propensity"])
    assert ok.triggers[0].on == ["browse"]  # `on:` is a key, not YAML 1.1's boolean
    msg = trigger_error(tmp_path, TRIGGER.format(condition="features.views_1h >"))
    assert "triggers.yaml:5: triggers.0.condition: CEL:" in msg and "^" in msg
    assert "unknown feature(s) ['nope']" in trigger_error(tmp_path, TRIGGER.format(condition="features.nope > 1"))
    assert "unknown score(s) ['other']" in trigger_error(tmp_path, TRIGGER.format(condition="score.other > 1.0"))
    assert "unknown name(s) ['foo']" in trigger_error(tmp_path, TRIGGER.format(condition="foo.x > 1"))
    msg = trigger_error(tmp_path, TRIGGER.format(condition="true").replace("[browse]", "[browse, teleport]"))
    assert ":4: triggers.0.on.1: unknown event type 'teleport'" in msg
    twice = TRIGGER.format(condition="true") + TRIGGER.format(condition="true").replace("triggers:\n", "")
    assert "used twice" in trigger_error(tmp_path, twice)
    bad_within = "triggers:\n  - id: c\n    kind: absence\n    after: [add_to_cart]\n    unless: [order]\n    within: soon\n"
    assert ":6: triggers.0.within: Value error, expected a duration" in trigger_error(tmp_path, bad_within)
    channels = "channels:\n  push: {consent: opt_in}\n  sms: {rate: 5}\ntriggers: []\n"
    assert ":3: channels.sms: Value error, a rate limit needs both rate and burst" in trigger_error(tmp_path, channels)


def test_feature_definitions_refuse_feedback_types(tmp_path: Path) -> None:
    """Features describe shopping; a delivery or an open of our message is feedback, which they never count."""
    text = "counts:\n  - {name: events, types: any, windows: [1h]}\n  - name: opens\n    types: [browse, opened]\n" \
           "    windows: [7d]\nrecency:\n  message: [delivered]\n"
    with pytest.raises(ConfigError) as e:
        load_features(write(tmp_path, text, "features.yaml"), EventsConfig())
    msg = str(e.value)
    assert "features.yaml:4: counts.1.types.1: 'opened' is feedback on our messages, not shopping" in msg
    assert "features.yaml:7: recency.message.0: 'delivered' is feedback" in msg

def test_looks_at_quiet_shoppers_are_checked_where_they_are_written(tmp_path: Path) -> None:
    """``idle`` spans come shortest first and before the shopper's state is forgotten; a look is no outcome
    for a label; no custom event type may take its name."""
    base = "counts:\n  - {name: events, types: any, windows: [1h, 7d]}\n"
    with pytest.raises(ConfigError) as e:
        load_features(write(tmp_path, base + "idle: [3d, 1d]\n", "features.yaml"), EventsConfig())
    assert "features.yaml:3: idle: Value error, idle spans must be positive and increasing" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_features(write(tmp_path, base + "rfm: null\nlifecycle: null\nidle:\n  - 1d\n  - 8d\n", "features.yaml"),
                      EventsConfig())
    assert "features.yaml:7: idle.1: a shopper quiet for 691200s is forgotten by then" in str(e.value)
    assert load_features(write(tmp_path, base + "idle: [1d, 3d]\n", "features.yaml"), EventsConfig()).idle == [86400, 259200]
    models = ("models:\n  - name: m\n    label: {events: [order, idle], within: 1d}\n    features: [events_1h]\n"
              "    score_on: [idle]\n")
    with pytest.raises(ConfigError) as e:
        load_models(write(tmp_path, models, "models.yaml"), EventsConfig(), ["events_1h"])
    assert str(e.value).count("idle") == 1 and "models.0.label.events.1: 'idle' is a look at a quiet shopper" in str(e.value)
    with pytest.raises(ValueError, match="built-in event types"):
        EventsConfig(custom_types=["payment", "idle"])


def test_validate_command(tmp_path: Path) -> None:
    run = lambda cfg: subprocess.run([sys.executable, "-m", "nudgeflow.cli", "validate", "--config", str(cfg)],  # noqa: E731
                                     capture_output=True, text=True, timeout=120, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})
    good = run(ROOT / "config" / "local.yaml")
    assert good.returncode == 0 and "triggers" in good.stdout
    bad = run(write(tmp_path, "features:\n  idle_timeout: never\n"))
    assert bad.returncode == 2 and "c.yaml:2: features.idle_timeout" in bad.stderr


yamlish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(["event", "absence", "30m", "browse"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["triggers", "id", "kind", "on", "after", "unless", "within", "condition", "channel", "x"]),
        kids, max_size=5),
    max_leaves=15,
)


@settings(max_examples=200, deadline=None)
@given(yamlish)
def test_fuzz_trigger_loader_only_ever_raises_config_errors(doc: object) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_triggers(path, EventsConfig(), ["views_1h"])
        except ConfigError as e:
            assert e.problems and all(msg for _, _, msg in e.problems)
