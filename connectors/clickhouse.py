"""ClickHouse: one client API for the embedded chDB engine and a server, migrations, a batching sink.

``chdb:///path`` gives ClickHouse's engine in-process (tests, the embedded
default); ``http(s)://user:password@host:8123`` a server. Both go through
clickhouse-connect, so the same SQL and the same insert path serve both.

Writes never happen on the per-event path: sinks hand rows to a
:class:`ClickHouseWriter`, whose thread inserts a table's buffer when it holds
``batch_rows`` rows or is ``flush_interval`` old. When ClickHouse cannot take
rows, the writer retries with backoff and the buffer grows to
``max_buffer_rows``; past that ``put`` blocks, which holds the flow back
instead of dropping data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import clickhouse_connect
import orjson
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from clickhouse_connect.driver.client import Client

from nudgeflow.events import Action, DeadLetter, Decision, Event
from operators.models import MetricRow, PredictionRow
from nudgeflow.settings import ClickHouseConfig

log = logging.getLogger(__name__)

Row = Sequence[Any]


def connect(dsn: str) -> Client:
    """A clickhouse-connect client for a ``chdb:///path`` or ``http(s)://`` DSN."""
    return clickhouse_connect.get_client(dsn=dsn)


def migrate(client: Client, database: str) -> list[str]:
    """Apply the packaged migrations not yet recorded; returns the names applied.

    Migrations are ``connectors/migrations/NNN_name.sql``, applied in order
    and recorded in ``<db>.schema_migrations``; each statement is idempotent
    (``IF NOT EXISTS``) so a crash between a statement and its record is safe.
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
    return applied


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


# -- rows: one function per table, the column order is the table's

EVENT_COLUMNS = ["event_id", "user_id", "type", "ts", "ingest_ts", "session_id", "platform", "amount", "props", "position"]


def event_row(ev: Event) -> Row:
    amount = ev.props.get("amount", 0.0) if ev.type == "order" else 0.0
    return [
        ev.event_id, ev.user_id, ev.type, ev.ts, ev.ingest_ms, ev.session_id or "", ev.platform or "",
        float(amount), orjson.dumps(ev.props).decode(), ev.position,
    ]


ACTION_COLUMNS = ["action_id", "trigger_id", "user_id", "channel", "occurrence", "event_ts", "ingest_ts", "decided_ts", "payload"]


def action_row(a: Action) -> Row:
    return [
        a.action_id, a.trigger_id, a.user_id, a.channel, a.occurrence, a.event_ts, a.ingest_ms, a.decided_ms,
        orjson.dumps(a.payload).decode(),
    ]


DLQ_COLUMNS = ["reason", "detail", "position", "ingest_ts", "raw"]


def dlq_row(d: DeadLetter) -> Row:
    return [d.reason, d.detail, d.position, d.ingest_ms, d.raw]


class ClickHouseWriter:
    """Buffers rows per table and inserts them from one thread, by size and by age."""

    def __init__(self, cfg: ClickHouseConfig, client_factory: Callable[[], Client] | None = None):
        self.cfg = cfg
        self._factory = client_factory or (lambda: connect(cfg.dsn))
        self._client: Client | None = None
        self._buffers: dict[str, tuple[list[str], list[Row]]] = {}
        self._first_at: dict[str, float] = {}
        self._rows = 0
        self._cv = threading.Condition()
        self._closed = False
        self.inserted = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="clickhouse-writer", daemon=True)
        self._thread.start()

    def put(self, table: str, columns: list[str], rows: list[Row]) -> None:
        """Queue rows for ``table``; blocks while the buffer is full (backpressure)."""
        if not rows:
            return
        with self._cv:
            while self._rows >= self.cfg.max_buffer_rows and not self._closed:
                self._cv.wait(0.1)
            buf = self._buffers.get(table)
            if buf is None:
                buf = self._buffers[table] = (columns, [])
            if not buf[1]:
                self._first_at[table] = time.monotonic()
            buf[1].extend(rows)
            self._rows += len(rows)
            if len(buf[1]) >= self.cfg.batch_rows:
                self._cv.notify_all()

    def flush(self) -> None:
        """Insert everything buffered now (waits until done)."""
        while True:
            with self._cv:
                tables = [t for t, (_, rows) in self._buffers.items() if rows]
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
        if self._client is not None:
            self._client.close()
            self._client = None

    def _due(self) -> list[str]:
        now = time.monotonic()
        return [
            t for t, (_, rows) in self._buffers.items()
            if rows and (len(rows) >= self.cfg.batch_rows or now - self._first_at[t] >= self.cfg.flush_interval)
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
            columns, rows = self._buffers[table]
            if not rows:
                return
            self._buffers[table] = (columns, [])
        delay = 0.2
        while True:
            try:
                if self._client is None:
                    self._client = self._factory()
                self._client.insert(f"{self.cfg.database}.{table}", rows, column_names=columns)
                break
            except Exception as e:  # keep the rows and retry: nothing is dropped
                self.failures += 1
                self._client = None
                log.warning("clickhouse insert into %s failed (%s rows), retrying in %.1fs: %s", table, len(rows), delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        with self._cv:
            self._rows -= len(rows)
            self.inserted += len(rows)
            self._cv.notify_all()


class _WriterPartition(StatelessSinkPartition[Any]):
    def __init__(self, sink: ClickHouseSink):
        self.sink = sink

    def write_batch(self, items: list[Any]) -> None:
        to_row = self.sink.to_row
        self.sink.writer.put(self.sink.table, self.sink.columns, [to_row(x) for x in items])

    def close(self) -> None:
        self.sink.writer.flush()


class ClickHouseSink(DynamicSink[Any]):
    """A Bytewax sink into one table through a shared :class:`ClickHouseWriter`."""

    def __init__(self, writer: ClickHouseWriter, table: str, columns: list[str], to_row: Callable[[Any], Row]):
        self.writer = writer
        self.table = table
        self.columns = columns
        self.to_row = to_row

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WriterPartition:
        return _WriterPartition(self)


PREDICTION_COLUMNS = ["model", "user_id", "event_id", "ts", "resolved_ts", "score", "learner_score", "model_version", "label"]


def prediction_row(p: PredictionRow) -> Row:
    r = p.example
    return [r.model, r.user_id, r.event_id, r.ts, r.resolved_ts, r.score, p.learner_score, r.version, int(r.label)]


METRIC_COLUMNS = ["model", "window_start", "span", "model_version", "examples", "positives", "auc", "logloss", "brier",
                  "ece", "calibration"]


def metric_row(m: MetricRow) -> Row:
    v = m.values
    return [m.model, m.window_start, m.window, m.version, v["examples"], v["positives"], v["auc"], v["logloss"],
            v["brier"], v["ece"], orjson.dumps(v["calibration"]).decode()]


DECISION_COLUMNS = ["decision_id", "trigger_id", "user_id", "channel", "variant", "outcome", "reason", "priority",
                    "occurrence", "event_ts", "ingest_ts", "decided_ts", "latency_event_ms", "latency_ingest_ms"]


def decision_row(d: Decision) -> Row:
    a = d.action
    return [a.action_id, a.trigger_id, a.user_id, a.channel, a.variant, d.outcome, d.reason, a.priority, a.occurrence,
            a.event_ts, a.ingest_ms, a.decided_ms, a.decided_ms - a.event_ts, a.decided_ms - a.ingest_ms]
