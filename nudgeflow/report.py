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
from nudgeflow.queries import QUERIES, cell, run_query

Table = tuple[list[str], list[tuple[Any, ...]]]
#: runs one saved query by name over the report's period: the report's only data access
Fetch = Callable[[str], Table]


@dataclass(frozen=True)
class Section:
    """One chart of the report: the saved query it reads and how its table becomes SVG."""

    title: str
    query: str
    draw: Callable[[str, Table], str]


def _col(table: Table, name: str) -> list[Any]:
    i = table[0].index(name)
    return [r[i] for r in table[1]]


def _numbers(table: Table, name: str) -> list[float]:
    return [float(v) for v in _col(table, name)]


def _pivot(rows: Sequence[tuple[Any, Any, Any]]) -> tuple[list[str], list[Series]]:
    """(category, series, value) rows as categories and one series per series name, missing cells 0."""
    cats = list(dict.fromkeys(str(c) for c, _, _ in rows))
    names = list(dict.fromkeys(str(n) for _, n, _ in rows))
    cells = {(str(c), str(n)): float(v) for c, n, v in rows}
    return cats, [Series(n, [cells.get((c, n), 0.0) for c in cats]) for n in names]


def _over_time(t: Table, x: str, key: str, value: str) -> tuple[list[Any], list[Series]]:
    """Rows (x, key, value) as a shared x axis and one series per key (NaN where a key has no point)."""
    xs = sorted(set(_col(t, x)))
    at = {(k, xv): float(v) for xv, k, v in zip(_col(t, x), _col(t, key), _col(t, value))}
    keys = list(dict.fromkeys(_col(t, key)))
    return xs, [Series(str(k), [at.get((k, xv), math.nan) for xv in xs]) for k in keys]


def draw_funnel(title: str, t: Table) -> str:
    return bars(title, [str(p) or "(none)" for p in _col(t, "platform")],
                [Series(s, _numbers(t, s)) for s in ("browsers", "carters", "buyers")], "users")


def draw_decisions(title: str, t: Table) -> str:
    """Stacked per trigger: ``fired`` and each holdout or guard reason."""
    rows = zip(_col(t, "trigger_id"), _col(t, "outcome"), _col(t, "reason"), _col(t, "decisions"))
    cats, series = _pivot([(trig, reason or outcome, n) for trig, outcome, reason, n in rows])
    return bars(title, cats, series, "decisions", stacked=True)


def draw_refusals(title: str, t: Table) -> str:
    """Stacked per reason: which trigger a guard (or the holdout) stopped, fired decisions left out."""
    rows = zip(_col(t, "trigger_id"), _col(t, "outcome"), _col(t, "reason"), _col(t, "decisions"))
    cats, series = _pivot([(reason, trig, n) for trig, outcome, reason, n in rows if outcome != "fired"])
    return bars(title, cats, series, "decisions", stacked=True)


def draw_uplift(title: str, t: Table) -> str:
    """Uplift in percentage points with its 95 % interval; triggers without a holdout (nan) are left out."""
    rows = [(trig, u, lo, hi) for trig, u, lo, hi in
            zip(_col(t, "trigger_id"), _col(t, "uplift"), _col(t, "ci_low"), _col(t, "ci_high")) if not math.isnan(u)]
    return bars(title, [r[0] for r in rows],
                [Series("uplift", [100 * r[1] for r in rows], [(100 * r[2], 100 * r[3]) for r in rows])],
                "conversion uplift, percentage points")


def draw_latency(title: str, t: Table) -> str:
    """Ingest → decision percentiles on a log axis: a date or absence trigger decides hours after its event."""
    qs = ("p50", "p90", "p99")
    return bars(title, [str(x) for x in _col(t, "trigger_id")],
                [Series(q, _numbers(t, f"ingest_{q}_ms")) for q in qs], "ms from ingest to decision (log)", log=True)


def _learner_and_served(t: Table, value: str) -> tuple[list[Any], list[Series]]:
    """Per model, the learner's ``value`` and the served score's (``served_<value>``) over days."""
    xs, learner = _over_time(t, "day", "model", value)
    _, served = _over_time(t, "day", "model", f"served_{value}")
    return xs, learner + [Series(f"{s.name}, served", s.values) for s in served]


def draw_auc(title: str, t: Table) -> str:
    xs, series = _learner_and_served(t, "auc")
    return lines(title, xs, series, "AUC", y_range=(0.0, 1.0))


def draw_calibration(title: str, t: Table) -> str:
    xs, series = _learner_and_served(t, "ece")
    return lines(title, xs, series, "expected calibration error")


def draw_dau(title: str, t: Table) -> str:
    return lines(title, _col(t, "day"), [Series(s, _numbers(t, s)) for s in ("dau", "new_users", "buyers")], "users")


SECTIONS: list[Section] = [
    Section("Funnel by platform: browse → cart → order", "funnel", draw_funnel),
    Section("Decisions by trigger: fired, held out and suppressed", "suppressions", draw_decisions),
    Section("Suppressions and holdouts by reason", "suppressions", draw_refusals),
    Section("Uplift per trigger against its holdout (95 % CI)", "uplift", draw_uplift),
    Section("Event → action latency percentiles by trigger", "latency", draw_latency),
    Section("Model AUC by day, learner and served score", "model_calibration", draw_auc),
    Section("Model calibration by day (ECE), learner and served score", "model_calibration", draw_calibration),
    Section("Daily active users", "dau", draw_dau),
]


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 760px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; }
.note { color: #666; margin: 2px 0 8px; } svg.chart { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; } td:first-child, th:first-child { text-align: left; }
summary { cursor: pointer; color: #555; }
"""


def data_table(t: Table, about: str, limit: int = 200) -> str:
    """The chart's rows as an HTML table (folded), so every figure can be read exactly, and how to read them."""
    head = "".join(f"<th>{escape(c)}</th>" for c in t[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(cell(v))}</td>" for v in r) + "</tr>" for r in t[1][:limit])
    more = f"<p class='note'>{len(t[1]) - limit} more rows not shown</p>" if len(t[1]) > limit else ""
    return (f"<details><summary>data ({len(t[1])} rows)</summary><p class='note'>{escape(about)}</p>"
            f"<table><tr>{head}</tr>{body}</table>{more}</details>")


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
        q = QUERIES[s.query]
        note = f"<p class='note'>saved query <code>{escape(s.query)}</code></p>"
        about = f"{q.title} {q.about}"
        parts.append(f"<section><h2>{escape(s.title)}</h2>{note}{s.draw(s.title, t)}{data_table(t, about)}</section>")
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    period = f"{_when(since_ms, 'the beginning')} → {_when(until_ms, 'now')}"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>nudgeflow report: {escape(name)}"
            f"</title><style>{CSS}</style></head><body><h1>nudgeflow report: {escape(name)}</h1>"
            f"<p class='note'>period {escape(period)} · made {made}</p>{''.join(parts)}</body></html>\n")


def write_report(client: Client, database: str, name: str, out: Path, since_ms: int | None = None,
                 until_ms: int | None = None) -> Path:
    """Run the saved queries against ``database`` and write the page to ``out``."""

    def fetch(query: str) -> Table:
        return run_query(client, database, query, since_ms, until_ms)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(fetch, name, since_ms, until_ms), encoding="utf-8")
    return out
