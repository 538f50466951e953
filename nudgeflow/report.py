"""``nudgeflow report``: one self-contained HTML page of charts drawn from the saved analyst queries.

The page embeds its charts as SVG (:mod:`nudgeflow.charts`) and its data as
tables, with no script and no external asset: it opens offline, can be mailed
or archived, and shows what ClickHouse held when it was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from nudgeflow.charts import Series, bars, lines

Table = tuple[list[str], list[tuple[Any, ...]]]
#: runs one saved query by name for ``[since, until)`` (epoch ms, None = open): the report's only data access
Fetch = Callable[[str], Table]

Z95 = 1.959964


@dataclass(frozen=True)
class Section:
    """One chart of the report: the saved query it reads and how its table becomes SVG."""

    title: str
    query: str
    draw: Callable[[str, Table], str]
    note: str = ""


def _col(table: Table, name: str) -> list[Any]:
    i = table[0].index(name)
    return [r[i] for r in table[1]]


def _pivot(table: Table, row: str, column: str, value: str) -> tuple[list[str], list[Series]]:
    """Long rows (row, column, value) as categories and one series per column value, missing cells 0."""
    cats = list(dict.fromkeys(str(x) for x in _col(table, row)))
    names = list(dict.fromkeys(str(x) for x in _col(table, column)))
    cells = {(str(r), str(c)): float(v) for r, c, v in zip(_col(table, row), _col(table, column), _col(table, value))}
    return cats, [Series(n, [cells.get((c, n), 0.0) for c in cats]) for n in names]


def uplift(treated: int, treated_hits: int, control: int, control_hits: int) -> tuple[float, float, float]:
    """Conversion-rate difference treated − control and its 95 % Wald interval, in percentage points.

    >>> [round(x, 2) for x in uplift(1000, 300, 1000, 250)]
    [5.0, 1.05, 8.95]
    >>> uplift(10, 3, 0, 0)[0]
    nan
    """
    if treated == 0 or control == 0:
        return math.nan, math.nan, math.nan
    p1, p0 = treated_hits / treated, control_hits / control
    half = Z95 * math.sqrt(p1 * (1 - p1) / treated + p0 * (1 - p0) / control)
    d = p1 - p0
    return 100 * d, 100 * (d - half), 100 * (d + half)


def draw_funnel(title: str, t: Table) -> str:
    stages = ["browsers", "carters", "buyers"]
    return bars(title, [str(p) or "(none)" for p in _col(t, "platform")],
                [Series(s, [float(v) for v in _col(t, s)]) for s in stages], "users")


def draw_decisions(title: str, t: Table) -> str:
    """Stacked per trigger: ``fired`` and each guard or holdout reason (the outcome where there is no reason)."""
    labelled = (["trigger_id", "label", "decisions"],
                [(trig, reason or outcome, n) for trig, outcome, reason, n in
                 zip(_col(t, "trigger_id"), _col(t, "outcome"), _col(t, "reason"), _col(t, "decisions"))])
    cats, series = _pivot(labelled, "trigger_id", "label", "decisions")
    return bars(title, cats, series, "decisions", stacked=True)


def draw_suppressions(title: str, t: Table) -> str:
    kept = (t[0], [r for r in t[1] if r[t[0].index("outcome")] != "fired"])
    cats, series = _pivot(kept, "reason", "outcome", "decisions")
    return bars(title, cats, series, "decisions", stacked=True)


UPLIFT_COUNTS = ["treated", "treated_converted", "control", "control_converted"]


def draw_uplift(title: str, t: Table) -> str:
    names = t[0]
    rows = [(r[names.index("trigger_id")], uplift(*(int(r[names.index(c)]) for c in UPLIFT_COUNTS))) for r in t[1]]
    rows = [(trig, u) for trig, u in rows if not math.isnan(u[0])]
    return bars(title, [trig for trig, _ in rows],
                [Series("uplift", [u[0] for _, u in rows], [(u[1], u[2]) for _, u in rows])],
                "conversion uplift, percentage points")


def draw_latency(title: str, t: Table) -> str:
    quantiles = [c for c in t[0] if c.startswith("p")]
    return bars(title, [str(x) for x in _col(t, "trigger_id")],
                [Series(q, [float(v) for v in _col(t, q)]) for q in quantiles], "ms, ingest → decision (log)",
                log=True)


def _over_time(t: Table, x: str, key: str, value: str) -> tuple[list[datetime], list[Series]]:
    """Rows (x, key, value) as a shared x axis and one series per key (NaN where a key has no point)."""
    xs = sorted(set(_col(t, x)))
    keys = list(dict.fromkeys(_col(t, key)))
    at = {(k, xv): float(v) for xv, k, v in zip(_col(t, x), _col(t, key), _col(t, value))}
    return xs, [Series(str(k), [at.get((k, xv), math.nan) for xv in xs]) for k in keys]


def draw_auc(title: str, t: Table) -> str:
    xs, series = _over_time(t, "window_start", "model", "auc")
    return lines(title, xs, series, "AUC (cumulative)", y_range=(0.0, 1.0))


def draw_ece(title: str, t: Table) -> str:
    xs, series = _over_time(t, "window_start", "model", "ece")
    return lines(title, xs, series, "expected calibration error")


def draw_dau(title: str, t: Table) -> str:
    return lines(title, _col(t, "day"), [Series("daily active users", [float(v) for v in _col(t, "users")])], "users")


SECTIONS: list[Section] = [
    Section("Funnel by platform: browse → cart → order", "funnel_by_platform", draw_funnel,
            "distinct users with at least one such event"),
    Section("Decisions by trigger: fired, holdout and suppressed (by reason)", "decisions_by_trigger", draw_decisions),
    Section("Suppressions and holdouts by reason", "decisions_by_trigger", draw_suppressions,
            "every matched trigger that did not fire, by the guard that stopped it"),
    Section("Uplift per trigger (fired vs holdout, 95 % CI)", "uplift_by_trigger", draw_uplift,
            "share of users who ordered within 7 days of the decision; triggers without a holdout are left out"),
    Section("Ingest → decision latency percentiles by trigger", "latency_by_trigger", draw_latency,
            "from the flow parsing the event to the trigger deciding, fired actions only; a date or absence "
            "trigger decides on a clock, long after the event it names"),
    Section("Model AUC over time (progressive validation)", "model_metrics", draw_auc),
    Section("Model calibration over time (ECE)", "model_metrics", draw_ece),
    Section("Daily active users", "daily_active_users", draw_dau, "distinct users with an event that day (UTC)"),
]


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 760px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; }
.note { color: #666; margin: 2px 0 8px; } svg.chart { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; } td:first-child, th:first-child { text-align: left; }
summary { cursor: pointer; color: #555; }
"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)


def data_table(t: Table, limit: int = 200) -> str:
    """The chart's rows as an HTML table, so every figure can be read exactly."""
    head = "".join(f"<th>{escape(c)}</th>" for c in t[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in r) + "</tr>" for r in t[1][:limit])
    more = f"<p class='note'>{len(t[1]) - limit} more rows not shown</p>" if len(t[1]) > limit else ""
    return f"<details><summary>data ({len(t[1])} rows)</summary><table><tr>{head}</tr>{body}</table>{more}</details>"


def _when(ms: int | None, open_end: str) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms is not None else open_end


def render(fetch: Fetch, name: str, since_ms: int | None, until_ms: int | None,
           sections: Sequence[Section] = SECTIONS) -> str:
    """The whole HTML page; each saved query runs once however many sections read it."""
    tables: dict[str, Table] = {}
    parts = []
    for s in sections:
        if s.query not in tables:
            tables[s.query] = fetch(s.query)
        t = tables[s.query]
        note = f"<p class='note'>{escape(s.note)} (query <code>{escape(s.query)}</code>)</p>"
        parts.append(f"<section><h2>{escape(s.title)}</h2>{note}{s.draw(s.title, t)}{data_table(t)}</section>")
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    period = f"{_when(since_ms, 'the beginning')} → {_when(until_ms, 'now')}"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>nudgeflow report: {escape(name)}"
            f"</title><style>{CSS}</style></head><body><h1>nudgeflow report: {escape(name)}</h1>"
            f"<p class='note'>period {escape(period)} · made {made}</p>{''.join(parts)}</body></html>\n")


# -- interim: the saved queries (nudgeflow.queries) are being written; until their runner is there the
# -- report reads the tables with these, under the names it will ask the runner for

_INTERIM_SQL = {
    "funnel_by_platform": """
        SELECT platform, uniqExactIf(user_id, type = 'browse') AS browsers,
               uniqExactIf(user_id, type = 'add_to_cart') AS carters, uniqExactIf(user_id, type = 'order') AS buyers
        FROM {db}.events FINAL WHERE {ts} GROUP BY platform ORDER BY browsers DESC""",
    "decisions_by_trigger": """
        SELECT trigger_id, outcome, reason, count() AS decisions FROM {db}.decisions FINAL
        WHERE {event_ts} AND outcome != 'duplicate' GROUP BY trigger_id, outcome, reason ORDER BY trigger_id, outcome, reason""",
    "uplift_by_trigger": """
        SELECT trigger_id, countIf(outcome = 'fired') AS treated, countIf(outcome = 'fired' AND converted) AS treated_converted,
               countIf(outcome = 'holdout') AS control, countIf(outcome = 'holdout' AND converted) AS control_converted
        FROM (SELECT d.trigger_id AS trigger_id, d.user_id, d.outcome AS outcome,
                     countIf(o.ts > d.at AND o.ts <= d.at + INTERVAL 7 DAY) > 0 AS converted
              FROM (SELECT trigger_id, user_id, outcome, min(event_ts) AS at FROM {db}.decisions FINAL
                    WHERE {event_ts} AND outcome IN ('fired', 'holdout') GROUP BY trigger_id, user_id, outcome) AS d
              LEFT JOIN (SELECT user_id, ts FROM {db}.events FINAL WHERE type = 'order') AS o ON o.user_id = d.user_id
              GROUP BY d.trigger_id, d.user_id, d.outcome)
        GROUP BY trigger_id ORDER BY trigger_id""",
    "latency_by_trigger": """
        SELECT trigger_id, quantile(0.5)(latency_ingest_ms) AS p50, quantile(0.9)(latency_ingest_ms) AS p90,
               quantile(0.99)(latency_ingest_ms) AS p99 FROM {db}.decisions FINAL
        WHERE {event_ts} AND outcome = 'fired' GROUP BY trigger_id ORDER BY trigger_id""",
    "model_metrics": """
        SELECT model, window_start, examples, auc, ece FROM {db}.model_metrics FINAL
        WHERE {window_start} AND span = 'cumulative' ORDER BY model, window_start""",
    "daily_active_users": """
        SELECT toDate(ts) AS day, uniqExact(user_id) AS users FROM {db}.events FINAL WHERE {ts}
        GROUP BY day ORDER BY day""",
}


def _period(column: str, since_ms: int | None, until_ms: int | None) -> str:
    where = [f"{column} >= fromUnixTimestamp64Milli(toInt64({since_ms}))"] if since_ms is not None else []
    where += [f"{column} < fromUnixTimestamp64Milli(toInt64({until_ms}))"] if until_ms is not None else []
    return " AND ".join(where) or "1"


def _interim_query(client: Client, db: str, name: str, since_ms: int | None, until_ms: int | None) -> Table:
    cols = {c: _period(c, since_ms, until_ms) for c in ("ts", "event_ts", "window_start")}
    res = client.query(_INTERIM_SQL[name].format(db=db, **cols))
    return list(res.column_names), [tuple(r) for r in res.result_rows]


def write_report(client: Client, database: str, name: str, out: Path, since_ms: int | None = None,
                 until_ms: int | None = None) -> Path:
    """Run the saved queries against ``database`` and write the page to ``out``."""
    run_query = _interim_query

    def fetch(query: str) -> Table:
        return run_query(client, database, query, since_ms, until_ms)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(fetch, name, since_ms, until_ms), encoding="utf-8")
    return out
