"""Saved analyst queries: each one checked against an independent computation in Python over the same rows.

The real main flow fills a chDB store (a subprocess: chDB opens one folder per process), then a second run
feeds action feedback that names the first run's actions. A fresh process (this file run as a script)
runs every saved query and dumps the raw rows; the test recomputes every figure from those rows in
plain Python. The uplift query is also checked on a campaign simulated with a known true effect.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import subprocess
import sys
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from connectors.clickhouse import connect, migrate
from nudgeflow.queries import QUERIES, bind, run_query

CONFIG = Path(__file__).parents[1] / "config"
DAY = 86_400_000
FEEDBACK = ("delivered", "opened", "clicked", "unsubscribed")
BEHAVIOUR = ("browse", "search", "click", "favourite", "add_to_cart", "remove_from_cart", "order")
Z95 = 1.959964  # the 97.5 % normal quantile to 7 digits, as the query writes it

FLOW_CONFIG = """
name: nudgeflow_queries
source: {source}
features: {{definitions: {config}/features.yaml}}
redis: {{url: "{redis_url}", key_prefix: {prefix}, ttl: 1h, embedded: true}}
clickhouse: {{chdb_path: ch, database: analyst}}
actions: {{kind: file, path: out/actions{run}.jsonl}}
dlq: {{kind: file, path: out/dlq{run}.jsonl}}
triggers: {config}/triggers.yaml
models: {config}/models.yaml
"""
SIMULATOR = "{kind: simulator, simulator: {users: 250, events: 4000, partitions: 2, seed: 11, span_s: 2419200}}"  # 4 weeks

Row = tuple[Any, ...]
Data = dict[str, list[Row]]


# -- the store, filled by the real flow and read back in a fresh process


def _run_flow(tmp: Path, redis_url: str, prefix: str, source: str, run: int) -> None:
    cfg = tmp / f"run{run}.yaml"
    cfg.write_text(FLOW_CONFIG.format(source=source, config=CONFIG, redis_url=redis_url, prefix=prefix, run=run))
    proc = subprocess.run([sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(cfg), "--no-summary"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _feedback(actions: Path, out: Path) -> int:
    """Delivered / opened / clicked / unsubscribed events for the actions, drawn from a hash of each id."""
    n = 0
    with out.open("wb") as f:
        for line in actions.read_bytes().splitlines():
            a = orjson.loads(line)
            u = int(hashlib.sha256(a["action_id"].encode()).hexdigest()[:8], 16) / 2**32
            kinds = [k for k, share in zip(FEEDBACK, (0.9, 0.5, 0.2, 0.05)) if u < share]
            for i, kind in enumerate(kinds):
                f.write(orjson.dumps({"event_id": f"fb-{kind}-{a['action_id']}", "user_id": a["user_id"], "type": kind,
                                      "ts": a["event_ts"] + (i + 1) * 60_000, "platform": "app",
                                      "props": {"action_id": a["action_id"]}}) + b"\n")
                n += 1
    return n


def _dump(dsn: str, db: str, out: str) -> None:
    """Run every saved query over a period inside the data and dump the raw rows they read (script mode)."""
    client = connect(dsn)
    try:
        lo, hi = client.query(f"SELECT toUnixTimestamp64Milli(min(ts)), toUnixTimestamp64Milli(max(ts)) "
                              f"FROM {db}.events FINAL WHERE type NOT IN {FEEDBACK}").result_rows[0]
        since, until = lo + (hi - lo) // 4, hi - (hi - lo) // 8
        raw = {
            "events": f"SELECT event_id, user_id, type, toUnixTimestamp64Milli(ts), platform, amount, props "
                      f"FROM {db}.events FINAL",
            "decisions": f"SELECT trigger_id, user_id, outcome, reason, toUnixTimestamp64Milli(event_ts), "
                         f"latency_event_ms, latency_ingest_ms FROM {db}.decisions FINAL",
            "actions": f"SELECT action_id, trigger_id, user_id, toUnixTimestamp64Milli(event_ts) FROM {db}.actions FINAL",
            "predictions": f"SELECT model, toUnixTimestamp64Milli(ts), learner_score, label, score, model_version "
                           f"FROM {db}.predictions FINAL",
            "identity_links": f"SELECT toUnixTimestamp64Milli(ts), seq, src, dst, canonical, kind, outcome, moved "
                              f"FROM {db}.identity_links FINAL",
            "model_metrics": f"SELECT model, toUnixTimestamp64Milli(window_start), span, examples, positives, auc "
                             f"FROM {db}.model_metrics FINAL",
        }
        data = {k: [tuple(r) for r in client.query(sql).result_rows] for k, sql in raw.items()}
        queries = {name: run_query(client, db, name, since, until) for name in QUERIES}
    finally:
        client.close()
    Path(out).write_bytes(pickle.dumps({"since": since, "until": until, "data": data, "queries": queries}))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict[str, Any]]:
    """A chDB store from two real runs (shoppers, then feedback on their actions), read back in a subprocess."""
    tmp = tmp_path_factory.mktemp("queries")
    prefix = f"nftestq{random.randrange(16**8):08x}"
    def dump(name: str) -> dict[str, Any]:
        out = tmp / name
        proc = subprocess.run([sys.executable, __file__, f"chdb://{tmp / 'ch'}", "analyst", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return pickle.loads(out.read_bytes())

    _run_flow(tmp, redis_url, prefix, SIMULATOR, 1)
    first = dump("first.pkl")
    assert _feedback(tmp / "out" / "actions1.jsonl", tmp / "feedback.jsonl") > 20
    _run_flow(tmp, redis_url, prefix, f"{{kind: file, file: {{paths: [{tmp / 'feedback.jsonl'}]}}}}", 2)
    yield {**dump("dump.pkl"), "first_run": first["data"], "config": tmp / "run1.yaml"}
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()


# -- the independent computations: one function per saved query, rows keyed like the query's GROUP BY


def _day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).date()


def _monday(ms: int) -> date:
    d = _day(ms)
    return date.fromordinal(d.toordinal() - d.weekday())


def _shopper(rows: Iterable[Row]) -> list[Row]:
    return [e for e in rows if e[2] not in FEEDBACK]


def funnel(d: Data, since: int, until: int, window_s: int = 7 * 86400) -> dict[Any, Row]:
    """ClickHouse windowFunnel by hand: the deepest browse → cart → order chain inside the window of its browse."""
    by: dict[tuple[str, str], list[Row]] = defaultdict(list)
    revenue: Counter[str] = Counter()
    for e in d["events"]:
        if since <= e[3] < until and e[2] in ("browse", "add_to_cart", "order"):
            by[e[4], e[1]].append(e)
            if e[2] == "order":
                revenue[e[4]] += e[5]
    steps: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for (platform, _), evs in by.items():
        evs.sort(key=lambda e: e[3])
        best = 0
        for i, start in enumerate(evs):
            if start[2] != "browse":
                continue
            level, want = 1, ["add_to_cart", "order"]
            for e in evs[i + 1:]:
                if e[3] > start[3] + window_s * 1000 or not want:
                    break
                if e[2] == want[0]:
                    level += 1
                    want.pop(0)
            best = max(best, level)
        for k in range(best):
            steps[platform][k] += 1
    return {p: (b, c, o, _div(c, b), _div(o, c), revenue[p]) for p, (b, c, o) in steps.items()}


def _div(a: float, b: float) -> float:
    """ClickHouse's float division: 0/0 is nan (never an error)."""
    return a / b if b else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a))


def dau(d: Data, since: int, until: int) -> dict[Any, Row]:
    first: dict[str, int] = {}
    for e in _shopper(d["events"]):
        first[e[1]] = min(first.get(e[1], e[3]), e[3])
    users, new, buyers = defaultdict(set), defaultdict(set), defaultdict(set)
    events, revenue = Counter(), Counter()
    for e in _shopper(d["events"]):
        if since <= e[3] < until:
            day = _day(e[3])
            users[day].add(e[1])
            events[day] += 1
            if _day(first[e[1]]) == day:
                new[day].add(e[1])
            if e[2] == "order":
                buyers[day].add(e[1])
                revenue[day] += e[5]
    return {day: (len(u), len(new[day]), len(buyers[day]), events[day], revenue[day]) for day, u in users.items()}


def retention(d: Data, since: int, until: int) -> dict[Any, Row]:
    first: dict[str, int] = {}
    for e in _shopper(d["events"]):
        first[e[1]] = min(first.get(e[1], e[3]), e[3])
    cohort = {u: _monday(t) for u, t in first.items() if since <= t < until}
    size = Counter(cohort.values())
    active: dict[tuple[date, int], set[str]] = defaultdict(set)
    for e in _shopper(d["events"]):
        if since <= e[3] < until and e[1] in cohort:
            c = cohort[e[1]]
            active[c, (_monday(e[3]) - c).days // 7].add(e[1])
    return {(c, size[c], k): (len(u), len(u) / size[c]) for (c, k), u in active.items()}


def _rank(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


def latency(d: Data, since: int, until: int) -> dict[Any, Row]:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in d["decisions"]:
        if r[2] == "fired" and since <= r[4] < until:
            by[r[0]].append(r)
    out = {}
    for t, rows in by.items():
        ev, ing = [r[5] for r in rows], [r[6] for r in rows]
        out[t] = (len(rows), *(_rank(ev, q) for q in (0.5, 0.9, 0.99)), max(ev),
                  *(_rank(ing, q) for q in (0.5, 0.9, 0.99)), max(ing))
    return out


def _orders(d: Data) -> dict[str, list[Row]]:
    by: dict[str, list[Row]] = defaultdict(list)
    for e in d["events"]:
        if e[2] == "order":
            by[e[1]].append(e)
    return by


def uplift(d: Data, since: int, until: int, window_s: int = 7 * 86400) -> dict[Any, Row]:
    """First fired/holdout decision per (trigger, user); converted = an order in (at, at + window]."""
    first: dict[tuple[str, str], tuple[int, str]] = {}
    for t, u, outcome, _, ts, *_ in d["decisions"]:
        if outcome in ("fired", "holdout") and since <= ts < until:
            first[t, u] = min(first.get((t, u), (ts, outcome)), (ts, outcome))
    orders = _orders(d)
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"fired": [], "holdout": []})
    for (t, u), (at, grp) in first.items():
        groups[t][grp].append(any(at < o[3] <= at + window_s * 1000 for o in orders[u]))
    return {t: _uplift_row(g["fired"], g["holdout"]) for t, g in groups.items()}


def _uplift_row(treated: list[bool], holdout: list[bool]) -> Row:
    n1, c1, n0, c0 = len(treated), sum(treated), len(holdout), sum(holdout)
    p1, p0 = _div(c1, n1), _div(c0, n0)
    margin = Z95 * math.sqrt(_div(p1 * (1 - p1), n1) + _div(p0 * (1 - p0), n0))
    return n1, c1, n0, c0, p1, p0, p1 - p0, margin, p1 - p0 - margin, p1 - p0 + margin


def attribution(d: Data, since: int, until: int, window_s: int = 86400) -> dict[Any, Row]:
    """Last touch: each order in the period to the latest action before it, within the window."""
    sent: dict[str, list[str]] = defaultdict(list)
    touches: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for _, t, u, ts in d["actions"]:
        touches[u].append((ts, t))
        if since <= ts < until:
            sent[t].append(u)
    credited: dict[str, list[float]] = defaultdict(list)
    for e in d["events"]:
        if e[2] == "order" and since <= e[3] < until:
            before = [tt for tt in touches[e[1]] if tt[0] < e[3] <= tt[0] + window_s * 1000]
            if before:
                credited[max(before)[1]].append(e[5])
    return {t: (len(sent[t]), len(set(sent[t])), len(credited[t]), sum(credited[t]),
                _div(sum(credited[t]), len(sent[t]))) for t in set(sent) | set(credited)}


def feedback(d: Data, since: int, until: int) -> dict[Any, Row]:
    got: dict[str, set[str]] = defaultdict(set)
    for e in d["events"]:
        if e[2] in FEEDBACK:
            got[orjson.loads(e[6])["action_id"]].add(e[2])
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * 5)
    for aid, t, _, ts in d["actions"]:
        if since <= ts < until:
            c = counts[t]
            c[0] += 1
            for i, kind in enumerate(FEEDBACK):
                c[i + 1] += kind in got[aid]
    return {t: (s, dl, o, c, u, _div(dl, s), _div(o, dl), _div(c, dl), _div(c, o), _div(u, dl))
            for t, (s, dl, o, c, u) in counts.items()}


def rfm_segments(d: Data, since: int, until: int, horizon_s: int = 90 * 86400) -> dict[Any, Row]:
    """The rfm scoring of operators/features.py with the shipped thresholds, as of `until`."""
    by: dict[str, list[Row]] = defaultdict(list)
    for e in _shopper(d["events"]):
        if e[3] < until:
            by[e[1]].append(e)
    segs: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    for evs in by.values():
        if max(e[3] for e in evs) < since:
            continue
        orders = [e for e in evs if e[2] == "order"]
        recent = [e for e in orders if e[3] > until - horizon_s * 1000]
        days = (until - max(e[3] for e in orders)) / DAY if orders else -1
        r = 5 - sum(days > t for t in (7, 14, 30, 60)) if orders else 1
        f = 1 + sum(len(recent) >= t for t in (1, 2, 4, 8))
        m_value = sum(e[5] for e in recent)
        m = 1 + sum(m_value >= t for t in (50, 150, 400, 1000))
        segs[r, f, m].append(m_value)
    total = sum(len(v) for v in segs.values())
    return {(f"{r}{f}{m}", r, f, m): (len(v), len(v) / total, sum(v)) for (r, f, m), v in segs.items()}


def _stage(times: list[int], orders: int, at: int) -> str:
    if not times:
        return "unseen"
    if orders == 0 and min(times) >= at - 7 * DAY:
        return "new"
    gap = at - max(times)
    return next((s for s, days in (("active", 14), ("at_risk", 30), ("dormant", 90)) if gap <= days * DAY), "churned")


def lifecycle_transitions(d: Data, since: int, until: int) -> dict[Any, Row]:
    by: dict[str, list[Row]] = defaultdict(list)
    for e in _shopper(d["events"]):
        if e[3] < until:
            by[e[1]].append(e)
    moves: Counter[tuple[str, str]] = Counter()
    for evs in by.values():
        before = [e for e in evs if e[3] < since]
        moves[(_stage([e[3] for e in before], sum(e[2] == "order" for e in before), since),
               _stage([e[3] for e in evs], sum(e[2] == "order" for e in evs), until))] += 1
    return {k: (n,) for k, n in moves.items()}


def _auc(scores: list[float], labels: list[int]) -> float:
    """Mann-Whitney: P(a positive outscores a negative), ties half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = sorted(s for s, y in zip(scores, labels) if not y)
    if not pos or not neg:
        return math.nan
    wins = sum(bisect_left(neg, p) + (bisect_right(neg, p) - bisect_left(neg, p)) / 2 for p in pos)
    return wins / (len(pos) * len(neg))


def _ece(xs: list[tuple[float, int]]) -> float:
    """Expected calibration error over 10 equal-width score bins."""
    bins: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for s, y in xs:
        bins[min(math.floor(s * 10), 9)].append((s, y))
    gaps = (abs(sum(s for s, _ in b) / len(b) - sum(y for _, y in b) / len(b)) * len(b) for b in bins.values())
    return sum(gaps) / len(xs)


def model_calibration(d: Data, since: int, until: int) -> dict[Any, Row]:
    by: dict[tuple[str, date], list[tuple[float, int, float, int]]] = defaultdict(list)
    for model, ts, learner_score, label, served, version in d["predictions"]:
        if since <= ts < until:
            by[model, _day(ts)].append((learner_score, label, served, version))
    out = {}
    for key, xs in by.items():
        n = len(xs)
        learner = [(s, y) for s, y, _, _ in xs]
        served = [(v, y) for _, y, v, _ in xs]
        labels = [y for _, y, _, _ in xs]
        out[key] = (n, sum(labels), sum(s for s, _ in learner) / n, sum(labels) / n, _ece(learner),
                    sum((s - y) ** 2 for s, y in learner) / n, _auc([s for s, _ in learner], labels),
                    sum(v for v, _ in served) / n, _ece(served), _auc([v for v, _ in served], labels),
                    sum(1 for *_, version in xs if version) / n)
    return out


def suppressions(d: Data, since: int, until: int) -> dict[Any, Row]:
    by: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for t, u, outcome, reason, ts, *_ in d["decisions"]:
        if outcome != "duplicate" and since <= ts < until:
            by[t, outcome, reason].append(u)
    return {k: (len(v), len(set(v))) for k, v in by.items()}


def canonical_ids(links: Iterable[Row]) -> dict[str, str]:
    """Who every id merged so far is now: the canonical of the highest-seq merge naming it."""
    best: dict[str, tuple[int, str]] = {}
    for _, seq, src, dst, canonical, _, outcome, moved in links:
        if outcome == "merged":
            for i in (src, dst, *moved):
                if seq > best.get(i, (-1, ""))[0]:
                    best[i] = (seq, canonical)
    return {i: c for i, (_, c) in best.items()}


def cross_platform(d: Data, since: int, until: int, window_s: int = 7 * 86400) -> dict[Any, Row]:
    """Each order's journey, its canonical shopper's behaviour in the window up to it, and links per day."""
    canon = canonical_ids(d["identity_links"])
    seen: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    orders = []
    for event_id, user, etype, ts, platform, *_ in d["events"]:
        if etype in BEHAVIOUR and ts < until:
            who = canon.get(user, user)
            seen[who].append((ts, event_id, platform))
            if etype == "order" and ts >= since:
                orders.append((who, ts, platform))
    days: dict[date, list[Any]] = defaultdict(lambda: [0, 0, set(), set(), Counter()])
    for who, ts, platform in orders:
        journey = [j for j in seen[who] if ts - window_s * 1000 <= j[0] <= ts and j[2]]
        day = days[_day(ts)]
        day[0] += 1
        day[2].add(who)
        if len({j[2] for j in journey}) > 1:
            day[1] += 1
            day[3].add(who)
        first = min(journey)[2] if journey else ""
        if first and platform and first != platform:
            day[4][f"{first} → {platform}"] += 1
    links: dict[date, Counter[str]] = defaultdict(Counter)
    for ts, _, _, _, _, kind, outcome, _ in d["identity_links"]:
        if since <= ts < until:
            links[_day(ts)][f"{kind}/{outcome}"] += 1
    out = {}
    for day in days.keys() | links.keys():  # a day with links only has no orders
        n, cross, buyers, cross_buyers, paths = days[day]
        out[day] = (n, cross, _div(cross, n), len(buyers), len(cross_buyers), dict(paths), dict(links[day]))
    return out


#: every saved query's independent computation, and how many of its leading columns are the key
CHECKS: dict[str, tuple[Callable[[Data, int, int], dict[Any, Row]], int]] = {
    "funnel": (funnel, 1), "dau": (dau, 1), "retention": (retention, 3), "latency": (latency, 1),
    "uplift": (uplift, 1), "attribution": (attribution, 1), "feedback": (feedback, 1),
    "rfm_segments": (rfm_segments, 4), "lifecycle_transitions": (lifecycle_transitions, 2),
    "model_calibration": (model_calibration, 2), "suppressions": (suppressions, 3),
    "cross_platform": (cross_platform, 1),
}


def _keyed(rows: Sequence[Row], key: int) -> dict[Any, Row]:
    return {(r[0] if key == 1 else tuple(r[:key])): tuple(r[key:]) for r in rows}


def _same(got: dict[Any, Row], want: dict[Any, Row]) -> None:
    """Figures to a relative 1e-9, maps (counts by a name) exactly: approx takes no nested structures."""
    assert got.keys() == want.keys()
    for k in want:
        maps = [i for i, v in enumerate(want[k]) if isinstance(v, dict)]
        assert len(got[k]) == len(want[k]) and [got[k][i] for i in maps] == [want[k][i] for i in maps], k
        figures = [i for i in range(len(want[k])) if i not in maps]
        assert [got[k][i] for i in figures] == pytest.approx([want[k][i] for i in figures], rel=1e-9, abs=1e-9,
                                                             nan_ok=True), k


# -- the tests


def test_every_saved_query_is_checked_and_documents_itself() -> None:
    assert set(CHECKS) == set(QUERIES)
    for q in QUERIES.values():
        assert q.title and q.about and "{db}." in q.sql and "{since:DateTime64(3, 'UTC')}" in q.sql


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_a_saved_query_matches_python_over_the_events_of_a_real_run(store: dict[str, Any], name: str) -> None:
    columns, rows = store["queries"][name]
    compute, key = CHECKS[name]
    want = compute(store["data"], store["since"], store["until"])
    assert want, f"{name}: the run left nothing to check"  # every query has figures on this store
    assert len(columns) == key + len(next(iter(want.values())))
    _same(_keyed(rows, key), want)


def test_the_run_exercises_holdouts_feedback_and_models(store: dict[str, Any]) -> None:
    q = store["queries"]
    uplift_rows = {r[0]: r for r in q["uplift"][1]}
    assert uplift_rows["cart_abandonment"][3] > 0  # held-out users: the trigger's 10 % and the 5 % control
    assert sum(r[3] for r in q["feedback"][1]) > 0 and sum(r[4] for r in q["feedback"][1]) > 0  # opens, clicks
    assert {r[0] for r in q["model_calibration"][1]} >= {"purchase_propensity"}
    assert any(r[0] != "unseen" for r in q["lifecycle_transitions"][1])  # since lies inside the history
    assert sum(r[2] for r in q["cross_platform"][1]) > 0  # shoppers switch platforms within a journey


def test_model_metrics_count_every_prediction_once_for_both_scores(store: dict[str, Any]) -> None:
    """In one run, every learned example is in exactly one window row of model_metrics, for the learner's
    score and for the served one, and the newest cumulative rows count them all with the AUC of its
    predictions (on the 1/1000 bins of a score the histograms keep). One run: a learner restarted without
    recovery starts its windows afresh, and its rows replace those of the same hours."""
    data = store["first_run"]
    preds: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    for model, _, learner_score, label, served, _ in data["predictions"]:
        preds[model].append((learner_score, label, served))
    rows: dict[str, dict[str, list[tuple[int, int, int, float]]]] = defaultdict(lambda: defaultdict(list))
    for model, window_start, span, n, pos, auc in data["model_metrics"]:
        rows[model][span].append((window_start, n, pos, auc))
    assert rows.keys() == preds.keys()
    for model, xs in preds.items():
        n, pos = len(xs), sum(y for _, y, _ in xs)
        spans = rows[model]
        for span in ("window", "served_window"):
            assert (sum(r[1] for r in spans[span]), sum(r[2] for r in spans[span])) == (n, pos), (model, span)
        for span, score in (("cumulative", 0), ("served_cumulative", 2)):
            _, total, total_pos, auc = max(spans[span])
            assert (total, total_pos) == (n, pos), (model, span)
            binned = [min(int(x[score] * 1000), 999) for x in xs]  # BinnedAUC's 1/1000 bins, ties half
            assert auc == pytest.approx(_auc(binned, [y for _, y, _ in xs]), abs=1e-9), (model, span)


def test_the_cli_prints_a_saved_query_as_json_and_as_a_table(store: dict[str, Any]) -> None:
    cmd = [sys.executable, "-m", "nudgeflow.cli", "query"]
    cfg = ["--config", str(store["config"])]
    proc = subprocess.run(cmd + ["dau", *cfg, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    want = dau(store["data"], 0, 2**62)  # defaults: all history up to now
    assert [(date.fromisoformat(r["day"]), r["dau"], r["events"]) for r in got["rows"]] == sorted(
        (day, v[0], v[3]) for day, v in want.items())
    table = subprocess.run(cmd + ["uplift", *cfg, "-p", "window=1d"], capture_output=True, text=True, timeout=120,
                           env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    assert table.returncode == 0, table.stderr[-3000:]
    assert "uplift: Conversion and uplift per trigger" in table.stdout and "cart_abandonment" in table.stdout
    bad = subprocess.run(cmd + ["uplift", *cfg, "-p", "horizon=1d"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no parameter horizon" in bad.stderr
    listing = subprocess.run(cmd + ["--list"], capture_output=True, text=True, timeout=120,
                             env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    assert all(name in listing.stdout for name in QUERIES)


def _campaign(client: Any, db: str, trigger: str, users: int, base: float, effect: float, seed: int) -> None:
    """Half the users held out; an order within the window with p = base (+ effect if treated), plus decoys.

    Decoys that must not count: an order before the decision, and one after the 7-day window.
    """
    rng = random.Random(seed)
    t0 = int(datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() * 1000)
    decisions, events = [], []
    for i in range(users):
        user, at = f"{trigger}-u{i}", t0 + rng.randrange(7 * DAY)
        treated = i % 2 == 0
        decisions.append([f"{trigger}-d{i}", trigger, user, "fired" if treated else "holdout",
                          "" if treated else "holdout", at, at, at])
        orders = [at - rng.randrange(1, DAY)] if rng.random() < 0.2 else []
        if rng.random() < base + (effect if treated else 0.0):
            orders.append(at + rng.randrange(1, 7 * DAY))
        if rng.random() < 0.1:
            orders.append(at + 7 * DAY + rng.randrange(1, DAY))
        events += [[f"{user}-o{k}", user, "order", ts, ts, "web", 20.0, "{}"] for k, ts in enumerate(orders)]
    # the columns the queries read; the others take their defaults, whatever later migrations add
    client.insert(f"{db}.decisions", decisions, column_names=[
        "decision_id", "trigger_id", "user_id", "outcome", "reason", "event_ts", "ingest_ts", "decided_ts"])
    client.insert(f"{db}.events", events, column_names=[
        "event_id", "user_id", "type", "ts", "ingest_ts", "platform", "amount", "props"])


def test_uplift_finds_a_known_campaign_effect_inside_its_confidence_interval(chdb_path: Path, ch_database: str) -> None:
    client = connect(f"chdb://{chdb_path}")
    try:
        migrate(client, ch_database)
        _campaign(client, ch_database, "campaign", 20_000, base=0.10, effect=0.05, seed=1)
        _campaign(client, ch_database, "placebo", 20_000, base=0.10, effect=0.0, seed=2)
        columns, rows = run_query(client, ch_database, "uplift")
        data = {"decisions": [tuple(r) for r in client.query(
                    f"SELECT trigger_id, user_id, outcome, reason, toUnixTimestamp64Milli(event_ts), 0, 0 "
                    f"FROM {ch_database}.decisions FINAL").result_rows],
                "events": [tuple(r) for r in client.query(
                    f"SELECT event_id, user_id, type, toUnixTimestamp64Milli(ts), platform, amount, props "
                    f"FROM {ch_database}.events FINAL").result_rows]}
    finally:
        client.close()
    got = {r[0]: dict(zip(columns, r)) for r in rows}
    _same(_keyed(rows, 1), uplift(data, 0, 2**62))
    campaign, placebo = got["campaign"], got["placebo"]
    assert campaign["treated"] == campaign["holdout"] == 10_000
    assert campaign["ci_low"] <= 0.05 <= campaign["ci_high"] and campaign["ci_low"] > 0  # the effect, and a real one
    assert campaign["margin"] < 0.01  # ± under a point on 10,000 users a side
    assert abs(campaign["holdout_rate"] - 0.10) < 0.01
    assert placebo["ci_low"] <= 0.0 <= placebo["ci_high"]


def test_bind_keeps_values_out_of_the_sql_and_refuses_bad_names() -> None:
    sql, values = bind("uplift", "analytics", since=0, until=DAY, window="3d")
    assert "analytics.decisions" in sql and "1970" not in sql
    assert values == {"since": "1970-01-01 00:00:00.000", "until": "1970-01-02 00:00:00.000", "window": 259200}
    with pytest.raises(ValueError, match="unknown query"):
        bind("nope", "analytics")
    with pytest.raises(ValueError, match="not an identifier"):
        bind("dau", "analytics; DROP TABLE x")
    with pytest.raises(ValueError, match="no parameter"):
        bind("dau", "analytics", window="1d")


if __name__ == "__main__":  # a fresh process for chDB's one-folder rule: dump <dsn> <database> <out.pkl>
    _dump(*sys.argv[1:4])
