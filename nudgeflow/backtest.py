"""Backtesting triggers: the production flow replayed over history, without sending anything.

A backtest builds the real main job (:func:`flows.main.build`) from the
deployment with three things swapped: the triggers (a candidate file, checked
like ``nudgeflow validate`` checks it), the source (a JSONL file, or the
deployment's ClickHouse ``events`` table exported to one) and every place the
run writes to, which become throwaway ones: a fresh embedded Redis (guard
counters and idempotency keys never touch production), a chDB folder, and
actions and dead letters as files. So the figures come from exactly the
trigger code, features, models and guards that run live. Models are kept and
start cold: they learn on the history as they would live.

The figures are read back from the run's own ``decisions`` table.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from connectors.clickhouse import connect
from flows.common import clickhouse_dsn
from nudgeflow.configload import Deployment, deployment
from nudgeflow.events import Event
from nudgeflow.settings import SinkConfig, SourceConfig, parse_duration
from nudgeflow.summary import table

#: ``--events`` value that replays the deployment's ClickHouse ``events`` table
CLICKHOUSE = "clickhouse"

#: a partition is never "idle" in a replay: event time must come from the history alone, never from
#: how long the replay takes (a silent partition would otherwise let the wall clock move timers)
REPLAY_IDLE_TIMEOUT_S = 100 * 365 * 86400.0

EXPORT_SQL = """
SELECT event_id, user_id, type, toUnixTimestamp64Milli(ts), session_id, platform, props
FROM {db}.events FINAL
WHERE {where}
ORDER BY ts, event_id
"""

DECISIONS_SQL = """
SELECT trigger_id, outcome, reason, count()
FROM {db}.decisions FINAL
GROUP BY trigger_id, outcome, reason
"""

REACHED_SQL = """
SELECT trigger_id, uniqExact(user_id) FROM {db}.decisions FINAL WHERE outcome = 'fired' GROUP BY trigger_id
UNION ALL
SELECT '', uniqExact(user_id) FROM {db}.decisions FINAL WHERE outcome = 'fired'
"""

EVENTS_SQL = "SELECT count(), toUnixTimestamp64Milli(min(ts)), toUnixTimestamp64Milli(max(ts)) FROM {db}.events FINAL"
DLQ_SQL = "SELECT count() FROM {db}.dlq FINAL"


def parse_time(value: str, now_ms: int) -> int:
    """Epoch ms from ``2026-11-01`` / an ISO-8601 time (naive is UTC), or a duration back from now (``7d``).

    >>> now = parse_time("2026-11-08", 0)
    >>> parse_time("7d", now) == parse_time("2026-11-01T00:00:00+00:00", 0) == parse_time("2026-11-01T01:00+01:00", 0)
    True
    >>> parse_time("last week", now)
    Traceback (most recent call last):
    ...
    ValueError: expected a date, an ISO-8601 time or a duration like 7d, got 'last week'
    """
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        try:
            return now_ms - int(parse_duration(value) * 1000)
        except ValueError:
            raise ValueError(f"expected a date, an ISO-8601 time or a duration like 7d, got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def export_events(dep: Deployment, out: Path, since_ms: int | None = None, until_ms: int | None = None) -> None:
    """Write the deployment's ClickHouse events in ``[since, until)`` to ``out`` as wire JSON lines, by event time.

    The rows hold the normalised events, which the parser accepts unchanged, so replaying them gives the
    features the live run computed.
    """
    s = dep.settings
    where = [f"ts >= fromUnixTimestamp64Milli(toInt64({since_ms}))"] if since_ms is not None else []
    where += [f"ts < fromUnixTimestamp64Milli(toInt64({until_ms}))"] if until_ms is not None else []
    sql = EXPORT_SQL.format(db=s.clickhouse.database, where=" AND ".join(where) or "1")
    client = connect(clickhouse_dsn(s, dep.base))
    try:
        with out.open("wb") as f, client.query_row_block_stream(sql) as stream:
            for block in stream:
                for event_id, user_id, etype, ts, session_id, platform, props in block:
                    ev = Event(event_id, user_id, etype, ts, session_id or None, platform or None, orjson.loads(props))
                    f.write(orjson.dumps(ev.to_dict()) + b"\n")
    finally:
        client.close()  # chDB opens one folder per process: the replay opens its own next


def backtest_deployment(dep: Deployment, triggers: Path, events: Path, workdir: Path) -> Deployment:
    """The deployment with ``triggers``, the ``events`` file as its only source and throwaway outputs in ``workdir``.

    Raises :class:`~nudgeflow.yamlconf.ConfigError` (file:line: field: what) when the triggers are wrong.
    """
    s = dep.settings
    settings = s.model_copy(update={
        "source": SourceConfig(kind="file", file={"paths": [str(events.resolve())]}),
        "features": s.features.model_copy(update={"idle_timeout": REPLAY_IDLE_TIMEOUT_S}),
        "redis": s.redis.model_copy(update={"url": "", "embedded": True}),
        "clickhouse": s.clickhouse.model_copy(update={"dsn": None, "chdb_path": str(workdir / "chdb")}),
        "actions": SinkConfig(kind="file", path=str(workdir / "actions.jsonl")),
        "dlq": SinkConfig(kind="file", path=str(workdir / "dlq.jsonl")),
        "triggers": str(triggers.resolve()),
        "recovery": None,
    })
    return deployment(settings, dep.base)


def backtest(
    dep: Deployment, triggers: Path, events: Path | str, *, since: int | None = None, until: int | None = None,
    out: Path | None = None, workers: int = 1,
) -> dict[str, Any]:
    """Replay history through the main flow with ``triggers`` and return the figures (see :func:`results`).

    ``events`` is a JSONL file or :data:`CLICKHOUSE`; ``since``/``until`` (epoch ms) select the ClickHouse
    events. ``out`` keeps what the run wrote (a new or empty folder); without it a temporary folder is removed.
    """
    from bytewax.run import cli_main

    from flows.main import build

    if events != CLICKHOUSE and (since is not None or until is not None):
        raise ValueError("--since/--until select ClickHouse events; a file is replayed whole")
    if out is not None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a backtest writes into a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="nudgeflow-backtest-") as tmp:
        workdir = (out or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        replay = workdir / "events.jsonl" if events == CLICKHOUSE else Path(events)
        bt = backtest_deployment(dep, triggers, replay, workdir)  # the triggers are checked before any work
        if events == CLICKHOUSE:
            export_events(dep, replay, since, until)
        flow, rt = build(bt)
        try:
            cli_main(flow, workers_per_process=workers)
        finally:
            rt.close()
            if rt.redis is not None:
                rt.redis.stop()
        return {**results(bt), "out": str(out) if out is not None else None}


def results(dep: Deployment) -> dict[str, Any]:
    """Per trigger of ``dep``: fired, holdout (would have fired), held (quiet hours), suppressed by reason and users
    reached; the same totals; the events replayed, dead letters and the event-time span."""
    s = dep.settings
    client = connect(clickhouse_dsn(s, dep.base))
    try:
        q = lambda sql: client.query(sql.format(db=s.clickhouse.database)).result_rows  # noqa: E731
        decisions, reached, ((events, first, last),), ((dead,),) = q(DECISIONS_SQL), q(REACHED_SQL), q(EVENTS_SQL), q(DLQ_SQL)
    finally:
        client.close()

    def empty() -> dict[str, Any]:
        return {"fired": 0, "holdout": 0, "held": 0, "suppressed": {}, "users_reached": 0}

    per = {t.id: empty() for t in dep.triggers.triggers}
    total = empty()
    for tid, outcome, reason, n in decisions:
        for fig in (per.setdefault(tid, empty()), total):
            if outcome == "suppressed":
                fig["suppressed"][reason] = fig["suppressed"].get(reason, 0) + n
            else:
                fig[outcome] = fig.get(outcome, 0) + n
    for tid, n in reached:
        (per.setdefault(tid, empty()) if tid else total)["users_reached"] = n
    return {
        "events": events,
        "dead_letters": dead,
        "span": {"from": _iso(first), "to": _iso(last)} if events else None,
        "triggers": per,
        "total": total,
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


def print_results(r: dict[str, Any], console: Console) -> None:
    """The figures as a table: one row per trigger, one column per suppression reason seen, and the totals."""
    span = f"{r['span']['from']} → {r['span']['to']}" if r["span"] else "no events"
    console.print(f"[bold]events replayed[/bold] {r['events']}  [bold]dead letters[/bold] {r['dead_letters']}  "
                  f"[bold]event time[/bold] {span}")
    reasons = sorted(r["total"]["suppressed"])
    rows = [*r["triggers"].items(), ("total", r["total"])]
    console.print(table(
        "backtest: decisions per trigger (nothing was sent)",
        ["trigger", "fired", "users reached", "holdout", "held", *(f"suppressed: {x}" for x in reasons)],
        [[tid, f["fired"], f["users_reached"], f["holdout"], f["held"], *(f["suppressed"].get(x, 0) for x in reasons)]
         for tid, f in rows],
    ))
    if r["out"]:
        console.print(f"actions, dead letters and the chDB folder of the run are in {r['out']}")
