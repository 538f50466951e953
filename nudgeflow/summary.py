"""What a run did, read back from where it wrote: ClickHouse and Redis.

Reading the results from the stores (not from counters in the flow) is the
point: the demo shows that the data really landed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from connectors.clickhouse import connect
from connectors.redis_store import FeatureReader
from flows.common import clickhouse_dsn

if TYPE_CHECKING:
    from flows.common import Runtime

FUNNEL_SQL = """
SELECT platform,
       uniqExactIf(user_id, type = 'browse')      AS browsers,
       uniqExactIf(user_id, type = 'add_to_cart') AS carters,
       uniqExactIf(user_id, type = 'order')       AS buyers,
       round(sumIf(amount, type = 'order'), 2)    AS revenue
FROM {db}.events FINAL
GROUP BY platform ORDER BY browsers DESC
"""


TABLES_SQL = """
SELECT table, sum(rows) FROM system.parts
WHERE database = '{db}' AND active AND table != 'schema_migrations'
GROUP BY table ORDER BY table
"""


MODELS_SQL = """
SELECT m.model, learned, learner_auc, learner_logloss, learner_ece, served_auc, served_ece, p.model_share, version
FROM
(
    SELECT model, argMaxIf(examples, window_start, span = 'cumulative') AS learned,
           round(argMaxIf(auc, window_start, span = 'cumulative'), 3) AS learner_auc,
           round(argMaxIf(logloss, window_start, span = 'cumulative'), 3) AS learner_logloss,
           round(argMaxIf(ece, window_start, span = 'cumulative'), 3) AS learner_ece,
           round(argMaxIf(auc, window_start, span = 'served_cumulative'), 3) AS served_auc,
           round(argMaxIf(ece, window_start, span = 'served_cumulative'), 3) AS served_ece,
           max(model_version) AS version
    FROM {db}.model_metrics FINAL WHERE span IN ('cumulative', 'served_cumulative')
    GROUP BY model
) AS m
LEFT JOIN
(   -- the share of examples a learned model scored: the prior answers until one is warm (version 0)
    SELECT model, round(avg(model_version > 0), 3) AS model_share FROM {db}.predictions FINAL GROUP BY model
) AS p ON p.model = m.model
ORDER BY m.model
"""


def collect(rt: Runtime) -> dict[str, Any]:
    """The run's figures as plain data (the test and the printer share it)."""
    db = rt.settings.clickhouse.database
    ch = connect(clickhouse_dsn(rt.settings, rt.base))
    try:
        q = lambda sql: ch.query(sql.format(db=db)).result_rows  # noqa: E731
        events = q("SELECT count() FROM {db}.events FINAL")[0][0]
        dlq = dict(q("SELECT reason, count() FROM {db}.dlq FINAL GROUP BY reason ORDER BY reason"))
        actions = dict(q("SELECT trigger_id, count() FROM {db}.actions FINAL GROUP BY trigger_id ORDER BY trigger_id"))
        funnel = q(FUNNEL_SQL)
        sample_user = q("SELECT user_id FROM {db}.events FINAL GROUP BY user_id ORDER BY count() DESC LIMIT 1")
        models = q(MODELS_SQL)
        tables = q(TABLES_SQL)
        decisions = q("SELECT outcome, reason, count() FROM {db}.decisions FINAL GROUP BY outcome, reason "
                      "ORDER BY outcome, count() DESC")
    finally:
        ch.close()
    sample = {}
    if sample_user:
        uid = sample_user[0][0]
        sample = {"user_id": uid, **FeatureReader(rt.redis_url, rt.settings.redis.key_prefix).get(uid)}
    return {
        "events_in": events + sum(dlq.values()),
        "events_accepted": events,
        "dlq": dlq,
        "actions": actions,
        "funnel": funnel,
        "models": models,
        "tables": tables,
        "decisions": decisions,
        "sample_features": sample,
    }


def print_summary(rt: Runtime, console: Console) -> None:
    f = collect(rt)
    console.print(
        f"\n[bold]events in[/bold] {f['events_in']}  [bold]accepted[/bold] {f['events_accepted']}  "
        f"[bold]dead letters[/bold] {sum(f['dlq'].values())}  [bold]actions fired[/bold] {sum(f['actions'].values())}"
    )
    console.print(table("dead letters by reason", ["reason", "count"], f["dlq"].items()))
    console.print(table("actions by trigger", ["trigger", "count"], f["actions"].items()))
    console.print(table("decisions: every matched trigger, fired or not, and why (ClickHouse decisions)",
                        ["outcome", "reason", "count"], f["decisions"]))
    console.print(table("rows in ClickHouse (before merges collapse replays)", ["table", "rows"], f["tables"]))
    console.print(table("analyst query: funnel browse → cart → order by platform (ClickHouse)",
                         ["platform", "browsers", "carters", "buyers", "revenue"], f["funnel"]))
    if f["models"]:
        console.print(table("online models so far (ClickHouse model_metrics): the learner's progressive validation, "
                            "and the score served at decision time (by a learned model for the share shown, "
                            "by the prior until it was warm)",
                             ["model", "examples", "AUC", "log loss", "ECE", "served AUC", "served ECE",
                              "model share", "version"],
                             f["models"]))
    console.print(f"features in Redis for the busiest user: {f['sample_features']}")


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    """A table whose first column is a name and the others numbers."""
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(str(x) for x in row))
    return t
