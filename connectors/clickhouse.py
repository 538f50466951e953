"""ClickHouse: one client API for the embedded chDB engine and a server, migrations, a batching sink.

``chdb:///path`` gives ClickHouse's engine in-process (tests, the embedded
default); ``http(s)://user:password@host:8123`` a server. Both go through
clickhouse-connect, so the same SQL and the same insert path serve both.

Writes never happen on the per-event path: sinks hand rows to a
:class:`ClickHouseWriter`, whose thread inserts a table's buffer when it holds
``batch_rows`` rows or is ``flush_interval`` old. When ClickHouse cannot take
rows, the writer retries with backoff and the buffer grows to
``max_buffer_rows``; past that ``put`` blocks, which holds the flow back
instead of dropping data. Every batch carries an insert deduplication token
derived from its rows, the same on every retry, so a batch ClickHouse stored
before its answer was lost is dropped instead of being counted twice by the
rollups' materialized views.

Fields configured as PII (``clickhouse.pii``) are hashed or dropped by the row
functions, before a row leaves the process.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import clickhouse_connect
import orjson
from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition, StatelessSinkPartition
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext

from connectors.migrations import TTL_COLUMNS
from connectors.redis_store import FEATURE_SET_VERSION
from connectors.stopping import STOPPING, StoppedWaiting
from nudgeflow.events import ID_FIELDS, Action, DeadLetter, Decision, Event, Link
from nudgeflow.settings import ClickHouseConfig, PiiConfig
from operators.models import MetricRow, PredictionRow
from operators.sampling import Sample

log = logging.getLogger(__name__)

Row = Sequence[Any]

#: the fields of a record that name a shopper: hashed alike when ``user_id`` is, so hashed ids still join
_ID_KEYS = ("user_id", "previous_id", *ID_FIELDS)


def connect(dsn: str) -> Client:
    """A clickhouse-connect client for a ``chdb:///path`` or ``http(s)://`` DSN."""
    return clickhouse_connect.get_client(dsn=dsn)


def migrate(client: Client, database: str, ttl: Mapping[str, float] | None = None) -> list[str]:
    """Apply the packaged migrations not yet recorded, then the tables' TTLs; returns the names applied.

    Migrations are ``connectors/migrations/NNN_name.sql``, applied in order
    and recorded in ``<db>.schema_migrations``; each statement is idempotent
    (``IF NOT EXISTS``) so a crash between a statement and its record is safe.
    ``ttl``: retention in seconds per table (see :func:`apply_ttl`).
    """
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {r[0] for r in client.query(f"SELECT version FROM {database}.schema_migrations").result_rows}
    applied = []
    files = sorted(p for p in resources.files("connectors.migrations").iterdir() if p.name.endswith(".sql"))
    for f in files:
        version = int(f.name.split("_", 1)[0])
        if version in done:
            continue
        sql = f.read_text(encoding="utf-8").replace("{db}", database)
        for stmt in _statements(sql):
            client.command(stmt)
        client.insert(f"{database}.schema_migrations", [[version, f.name]], column_names=["version", "name"])
        applied.append(f.name)
    apply_ttl(client, database, ttl or {})
    return applied


_TTL = re.compile(r" TTL (.+?)(?: SETTINGS |$)")


def apply_ttl(client: Client, database: str, ttl: Mapping[str, float]) -> list[str]:
    """Make every table's TTL the configured retention (none for a table not listed); returns the tables altered.

    A table is altered only when its TTL differs: a new TTL rewrites the table's parts, which a
    restart with the same configuration must not do.
    """
    engines = dict(client.query(
        f"SELECT name, engine_full FROM system.tables WHERE database = '{database}'"
    ).result_rows)
    altered = []
    for table, column in TTL_COLUMNS.items():
        found = _TTL.search(engines[table])
        current = found.group(1) if found else None
        seconds = ttl.get(table)
        wanted = None if seconds is None else f"toDateTime({column}) + toIntervalSecond({int(seconds)})"
        if current == wanted:
            continue
        client.command(f"ALTER TABLE {database}.{table} " + (f"MODIFY TTL {wanted}" if wanted else "REMOVE TTL"))
        altered.append(table)
    return altered


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


class Pii:
    """Hashes or drops the fields ``clickhouse.pii`` lists, in the row functions.

    Hashes are BLAKE2b keyed with the salt: the same value always gives the same hash, so analysts
    still join and count users on a hashed id, while nobody without the salt can test a guess. Hashing
    ``user_id`` hashes every shopper id: ``origin_id``, the ids of ``identity_links`` and the id fields of
    a dead letter (``anonymous_id``, ``device_id``, ``account_id``, ``previous_id``), so they all still join.
    """

    SECTIONS = ("props", "payload")

    def __init__(self, cfg: PiiConfig):
        self._key = hashlib.blake2b(cfg.salt.get_secret_value().encode(), digest_size=32).digest()
        self._hash_user = "user_id" in cfg.hash
        self._fields = {
            section: ({f.split(".", 1)[1] for f in cfg.hash if f.startswith(section + ".")},
                      {f.split(".", 1)[1] for f in cfg.drop if f.startswith(section + ".")})
            for section in self.SECTIONS
        }

    @classmethod
    def of(cls, cfg: PiiConfig | None) -> Pii | None:
        """``None`` when nothing is configured, so the row functions skip the work entirely."""
        return cls(cfg) if cfg is not None and (cfg.hash or cfg.drop) else None

    def digest(self, value: Any) -> str:
        data = value.encode() if isinstance(value, str) else orjson.dumps(value)
        return hashlib.blake2b(data, key=self._key, digest_size=16).hexdigest()

    def user(self, user_id: str) -> str:
        """A shopper id as stored: hashed when ``user_id`` is listed; "" (no id, as an empty origin_id) stays ""."""
        return self.digest(user_id) if self._hash_user and user_id else user_id

    def scrub(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (an event's props, an action's payload) without its dropped keys and with its hashed ones hashed."""
        hashed, dropped = self._fields[section]
        if hashed.isdisjoint(values) and dropped.isdisjoint(values):
            return values
        return {k: self.digest(v) if k in hashed else v for k, v in values.items() if k not in dropped}

    def raw(self, raw: bytes) -> bytes:
        """A dead letter's record scrubbed like an event or action when it is a JSON object; otherwise left
        out, since it cannot be scrubbed (the DLQ topic or file keeps the original)."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(doc, dict):
            return b""
        for key in _ID_KEYS:
            if isinstance(doc.get(key), str):
                doc[key] = self.user(doc[key])
        for section in self.SECTIONS:
            if isinstance(doc.get(section), dict):
                doc[section] = self.scrub(section, doc[section])
        return orjson.dumps(doc)


# -- rows: one function per table, the column order is the table's; ``pii`` scrubs what it lists

EVENT_COLUMNS = ["event_id", "user_id", "type", "ts", "ingest_ts", "session_id", "platform", "amount", "props", "position",
                 "origin_id"]


def event_row(ev: Event, pii: Pii | None = None) -> Row:
    amount = ev.props.get("amount", 0.0) if ev.type == "order" else 0.0
    user_id, origin_id, props = ev.user_id, ev.origin_id, ev.props
    if pii is not None:
        user_id, origin_id, props = pii.user(user_id), pii.user(origin_id), pii.scrub("props", props)
    return [
        ev.event_id, user_id, ev.type, ev.ts, ev.ingest_ms, ev.session_id or "", ev.platform or "",
        float(amount), orjson.dumps(props).decode(), ev.position, origin_id,
    ]


ACTION_COLUMNS = ["action_id", "trigger_id", "user_id", "channel", "variant", "status", "occurrence", "event_ts",
                  "ingest_ts", "decided_ts", "payload", "origin_id"]


def action_row(a: Action, pii: Pii | None = None) -> Row:
    """An action the flow emitted: status ``sent`` (feedback events say what happened next)."""
    user_id, origin_id, payload = a.user_id, a.origin_id, a.payload
    if pii is not None:
        user_id, origin_id, payload = pii.user(user_id), pii.user(origin_id), pii.scrub("payload", payload)
    return [
        a.action_id, a.trigger_id, user_id, a.channel, a.variant, "sent", a.occurrence, a.event_ts, a.ingest_ms,
        a.decided_ms, orjson.dumps(payload).decode(), origin_id,
    ]


DLQ_COLUMNS = ["reason", "detail", "position", "ingest_ts", "raw"]


def dlq_row(d: DeadLetter, pii: Pii | None = None) -> Row:
    return [d.reason, d.detail, d.position, d.ingest_ms, d.raw if pii is None else pii.raw(d.raw)]


SNAPSHOT_COLUMNS = ["user_id", "slot", "ts", "version", "features"]


def snapshot_row(sample: Sample, pii: Pii | None = None) -> Row:
    slot, uf = sample
    user_id = uf.user_id if pii is None else pii.user(uf.user_id)
    return [user_id, slot, uf.ts, FEATURE_SET_VERSION, orjson.dumps(uf.features).decode()]


def batch_token(table: str, batch: Sequence[Any]) -> str:
    """The insert deduplication token of a batch (its rows or its columns), from its content: a retry sends the
    same token, so ClickHouse drops a batch it already stored (and its materialized views never see it twice)."""
    digest = hashlib.blake2b(orjson.dumps(batch, default=str), digest_size=16).hexdigest()
    return f"{table}:{digest}"


class Inserts:
    """Batch inserts into one client's tables, each deduplicated on its token (synchronous: an asynchronous
    insert ignores tokens).

    One insert context per table, made once and reused with each batch's data and token: without one,
    clickhouse-connect asks ClickHouse for the table's column types on every insert (a ``DESCRIBE`` query,
    a round trip to a server). Columns, not rows: the context holds its last data until the next insert,
    so the writer empties its column lists once they are stored (a batch's rows kept alive until then were
    promoted into the cyclic collector's older generations, whose collections stopped the flow for up to
    260 ms)."""

    def __init__(self, client: Client, database: str):
        self.client = client
        self.database = database
        self._contexts: dict[tuple[str, tuple[str, ...]], InsertContext] = {}

    def insert(self, table: str, columns: list[str], data: Sequence[Sequence[Any]], token: str) -> None:
        """Insert one batch given as one sequence per column."""
        key = (table, tuple(columns))
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = self.client.create_insert_context(
                f"{self.database}.{table}", column_names=columns, column_oriented=True,
                settings={"insert_deduplicate": 1, "async_insert": 0},
            )
        ctx.settings["insert_deduplication_token"] = token
        self.client.insert(context=ctx, data=data)

    def close(self) -> None:
        self.client.close()


def insert_batch(client: Client, database: str, table: str, columns: list[str], rows: Sequence[Row], token: str) -> None:
    """One insert of rows (tests and one-off writes: the writer keeps its :class:`Inserts`)."""
    Inserts(client, database).insert(table, columns, list(zip(*rows)), token)


class _Columns:
    """A table's buffered rows as one list per column: a row waiting for its insert is no object of its
    own, so a second's rows add nothing to what the cyclic collector scans (as lists they made its young
    collections three times as frequent and its pauses twice as long)."""

    __slots__ = ("names", "data", "rows", "first_at")

    def __init__(self, names: list[str]):
        self.names = names
        self.data: list[list[Any]] = [[] for _ in names]
        self.rows = 0
        self.first_at = 0.0

    def add(self, rows: list[Row]) -> None:
        if not self.rows:
            self.first_at = time.monotonic()
        for column, values in zip(self.data, zip(*rows)):
            column.extend(values)
        self.rows += len(rows)

    def take(self) -> tuple[list[list[Any]], int]:
        data, rows = self.data, self.rows
        self.data, self.rows = [[] for _ in self.names], 0
        return data, rows


class ClickHouseWriter:
    """Buffers rows per table and inserts them from one thread, by size and by age."""

    def __init__(self, cfg: ClickHouseConfig, client_factory: Callable[[], Client] | None = None):
        self.cfg = cfg
        self._factory = client_factory or (lambda: connect(cfg.dsn))
        self._inserts: Inserts | None = None
        self._buffers: dict[str, _Columns] = {}
        self._rows = 0
        #: rows put and rows stored per table since the start (:meth:`store` waits for the one to reach the other)
        self._put: dict[str, int] = {}
        self._stored: dict[str, int] = {}
        #: tables :meth:`store` waits for: inserted now, whatever their size and age
        self._urgent: set[str] = set()
        self._cv = threading.Condition()
        self._closed = False
        self.inserted = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="clickhouse-writer", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        """Rows taken but not yet stored (in flight included): ``put`` blocks at ``max_buffer_rows``."""
        with self._cv:
            return self._rows

    def put(self, table: str, columns: list[str], rows: list[Row]) -> None:
        """Queue rows for ``table``; blocks while the buffer is full (backpressure)."""
        if not rows:
            return
        with self._cv:
            while self._rows >= self.cfg.max_buffer_rows and not self._closed:
                self._cv.wait(0.1)
            buf = self._buffers.get(table)
            if buf is None:
                buf = self._buffers[table] = _Columns(columns)
            buf.add(rows)
            self._rows += len(rows)
            self._put[table] = self._put.get(table, 0) + len(rows)
            if buf.rows >= self.cfg.batch_rows:
                self._cv.notify_all()

    def store(self, table: str) -> None:
        """Wait until every row put for ``table`` so far is stored. The writer thread inserts every table's
        rows now, one after another, so the epoch's other tables wait little after the first. While
        ClickHouse is away this waits as long as the writer retries: the caller is held back, nothing lost."""
        with self._cv:
            target = self._put.get(table, 0)
            if self._stored.get(table, 0) >= target:
                return
            self._urgent.update(t for t, buf in self._buffers.items() if buf.rows)
            self._cv.notify_all()
            while self._stored.get(table, 0) < target and not self._closed:
                if STOPPING.is_set():
                    log.error("rows of %s: stopped while waiting for ClickHouse to store them", table)
                    raise StoppedWaiting(f"rows of {table}: stopped while waiting for ClickHouse to store them")
                self._cv.wait(0.1)

    def flush(self) -> None:
        """Insert everything buffered now (waits until done)."""
        while True:
            with self._cv:
                tables = [t for t, buf in self._buffers.items() if buf.rows]
            if not tables:
                return
            for t in tables:
                self._insert(t)

    def close(self) -> None:
        """Flush, stop the thread and close the client (chDB allows one open data folder per process)."""
        self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        if self._inserts is not None:
            self._inserts.close()
            self._inserts = None

    def _due(self) -> list[str]:
        now = time.monotonic()
        return [
            t for t, buf in self._buffers.items()
            if buf.rows and (t in self._urgent or buf.rows >= self.cfg.batch_rows
                             or now - buf.first_at >= self.cfg.flush_interval)
        ]

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._closed:
                    return
                due = self._due()
                if not due:
                    self._cv.wait(min(0.1, self.cfg.flush_interval))
                    continue
            for t in due:
                self._insert(t)

    def _insert(self, table: str) -> None:
        with self._cv:
            buf = self._buffers[table]
            self._urgent.discard(table)
            if not buf.rows:
                return
            columns = buf.names
            data, rows = buf.take()
        token = batch_token(table, data)
        delay = 0.2
        while True:
            try:
                if self._inserts is None:
                    self._inserts = Inserts(self._factory(), self.cfg.database)
                self._inserts.insert(table, columns, data, token)
                for column in data:  # the table's insert context keeps ``data`` until its next insert
                    column.clear()
                break
            except Exception as e:  # keep the rows and retry with the same token: nothing is dropped or doubled
                self.failures += 1
                self._inserts = None
                log.warning("clickhouse insert into %s failed (%s rows), retrying in %.1fs: %s", table, rows, delay, e)
                if STOPPING.wait(delay):  # a stop during an outage: the rows stay unstored (recovery replays them)
                    log.error("clickhouse insert into %s: stopped with %d rows not stored: %s", table, rows, e)
                    with self._cv:
                        self._rows -= rows
                        self._cv.notify_all()
                    return
                delay = min(delay * 2, 10.0)
        with self._cv:
            self._rows -= rows
            self.inserted += rows
            self._stored[table] = self._stored.get(table, 0) + rows
            self._cv.notify_all()


class _TableOut:
    """A sink's table: rows made by ``to_row``, buffered in a shared :class:`ClickHouseWriter`."""

    def __init__(self, writer: ClickHouseWriter, table: str, columns: list[str], to_row: Callable[[Any], Row]):
        self.writer = writer
        self.table = table
        self.columns = columns
        self.to_row = to_row

    def write_batch(self, items: list[Any]) -> None:
        to_row = self.to_row
        self.writer.put(self.table, self.columns, [to_row(x) for x in items])

    def close(self) -> None:
        self.writer.flush()


class _Partition:
    """What both kinds of partition do: hand rows to the sink's table."""

    def __init__(self, out: _TableOut):
        self.out = out

    def write_batch(self, items: list[Any]) -> None:
        self.out.write_batch(items)

    def close(self) -> None:
        self.out.close()


class _WriterPartition(_Partition, StatelessSinkPartition[Any]):
    pass


class ClickHouseSink(_TableOut, DynamicSink[Any]):
    """A Bytewax sink into one table through a shared :class:`ClickHouseWriter`."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WriterPartition:
        return _WriterPartition(self)


class _EpochPartition(_Partition, StatefulSinkPartition[list[Any], None]):
    def write_batch(self, items: list[list[Any]]) -> None:
        self.out.write_batch(items[0] if len(items) == 1 else [x for batch in items for x in batch])

    def snapshot(self) -> None:
        self.out.writer.store(self.out.table)


class DurableClickHouseSink(_TableOut, FixedPartitionedSink[list[Any], None]):
    """:class:`ClickHouseSink` for a flow with recovery. Bytewax snapshots a partitioned sink at the end of
    each epoch, before it records the epoch, and this one's snapshot waits until the table's rows are
    stored. Without it an epoch could be recorded while its rows still waited in the writer; a process
    that died then lost them for good, as the replay starts after that epoch (``tests/test_recovery.py``).
    Items are ``(table, list of items)``, a list an upstream batch: the one partition is the table, so one
    worker writes it, and in a cluster the other processes' items cross to it, pickled, a list at a time
    rather than one by one."""

    def list_parts(self) -> list[str]:
        return [self.table]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _EpochPartition:
        return _EpochPartition(self)


PREDICTION_COLUMNS = ["model", "user_id", "event_id", "ts", "resolved_ts", "score", "learner_score", "model_version", "label"]


def prediction_row(p: PredictionRow, pii: Pii | None = None) -> Row:
    r = p.example
    user_id = r.user_id if pii is None else pii.user(r.user_id)
    return [r.model, user_id, r.event_id, r.ts, r.resolved_ts, r.score, p.learner_score, r.version, int(r.label)]


METRIC_COLUMNS = ["model", "window_start", "span", "model_version", "examples", "positives", "auc", "logloss", "brier",
                  "ece", "calibration"]


def metric_row(m: MetricRow) -> Row:
    v = m.values
    return [m.model, m.window_start, m.window, m.version, v["examples"], v["positives"], v["auc"], v["logloss"],
            v["brier"], v["ece"], orjson.dumps(v["calibration"]).decode()]


DECISION_COLUMNS = ["decision_id", "trigger_id", "user_id", "channel", "variant", "outcome", "reason", "priority",
                    "occurrence", "event_ts", "ingest_ts", "decided_ts", "latency_event_ms", "latency_ingest_ms",
                    "origin_id"]


def decision_row(d: Decision, pii: Pii | None = None) -> Row:
    a = d.action
    user_id, origin_id = (a.user_id, a.origin_id) if pii is None else (pii.user(a.user_id), pii.user(a.origin_id))
    return [a.action_id, a.trigger_id, user_id, a.channel, a.variant, d.outcome, d.reason, a.priority, a.occurrence,
            a.event_ts, a.ingest_ms, a.decided_ms, a.decided_ms - a.event_ts, a.decided_ms - a.ingest_ms, origin_id]


LINK_COLUMNS = ["ts", "seq", "src", "dst", "canonical", "kind", "outcome", "reason", "moved", "platform", "event_id",
                "position"]


def link_row(link: Link, pii: Pii | None = None) -> Row:
    """An identity link as judged, for ``identity_links``; its ids are hashed like user ids, so they join events.

    >>> link_row(Link(1_700_000_000_000, "anon:c1", "u1", "identify", "merged", canonical="u1", seq=3,
    ...               moved=("anon:c1",), platform="web", event_id="e9"))
    [1700000000000, 3, 'anon:c1', 'u1', 'u1', 'identify', 'merged', '', ['anon:c1'], 'web', 'e9', '']
    """
    src, dst, canonical, moved = link.src, link.dst, link.canonical, list(link.moved)
    if pii is not None:
        user = pii.user
        src, dst, canonical, moved = user(src), user(dst), user(canonical), [user(m) for m in moved]
    return [link.ts, link.seq, src, dst, canonical, link.kind, link.outcome, link.reason, moved, link.platform,
            link.event_id, link.position]
