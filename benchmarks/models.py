"""Model quality on the simulator: ``python -m benchmarks.models`` (``make bench-models``).

Issue 4 asks whether the online models learn the simulator's hidden purchase
model (which depends on observable behaviour) well enough to act on. This
replays simulated events through the *real* operators in one process, in the
order the main flow applies them (``flows/main.py``, ``model_steps``)::

    simulator -> Parser -> FeatureEngine (state per shard) -> Scorer
              -> LabelEngine (state per shard, event-time watermark) -> Learner

No Kafka, Redis or ClickHouse: this measures model quality, not throughput.
The replay stands in for a live stream, so event time is the clock the
Scorer's refresh, the learners' publishing and the label watermark read.

Per model it reports, for a 100k-event stream and the full one (1M by default),
the learners' cumulative progressive-validation metrics (each example scored
before it is learned), the same for the score actually served at decision time
(the newest published snapshot, or the prior), and for a recency/frequency
points heuristic on exactly the same resolved examples. The run goes to
``RESULTS.md`` and ``models.jsonl``; the last line is ``BENCH_MODELS k=v ...``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.run import REPO, _md, environment, simulator_config, table_head
from connectors.simulator import iter_records
from nudgeflow.configload import Deployment, load_deployment
from nudgeflow.events import Event
from nudgeflow.settings import ModelDef
from operators.features import Enriched, FeatureEngine, ShardState
from operators.models import (
    LabelEngine,
    LabelState,
    Learner,
    Metrics,
    Resolved,
    Scorer,
    Snapshot,
)
from operators.parse import Parser
from operators.shards import shard_names, shard_of

HERE = Path(__file__).resolve().parent
CONFIG = REPO / "config" / "local.yaml"
DEFAULT_EVENTS = 1_000_000
DEFAULT_USERS = 50_000
CHECKPOINT = 100_000
#: records per replayed batch (a Bytewax source batch is 500 to 1000)
BATCH = 1000
#: the issue's targets for the main head
TARGET_AUC, TARGET_ECE = 0.80, 0.05
MAIN_MODEL = "purchase_propensity"
#: the figures reported per model, stream and scorer
FIGURES = ("examples", "positives", "auc", "logloss", "brier", "ece")

#: (feature, thresholds, higher is likelier): one point per threshold the value reaches (or, when
#: lower is likelier, stays at or under). A classic hand-made recency/frequency score, never fitted.
Points = list[tuple[str, tuple[float, ...], bool]]
PURCHASE_POINTS: Points = [
    ("carts_24h", (1, 2, 3, 5), True),
    ("views_1h", (1, 3, 6, 10), True),
    ("orders_30d", (1, 2, 3, 4), True),
    ("since_last_event_s", (60, 600, 3600, 86400), False),
]
CHURN_POINTS: Points = [
    ("since_last_event_s", (3600, 86400, 3 * 86400, 7 * 86400), True),
    ("events_7d", (1, 3, 10, 30), False),
]


class Heuristic:
    """A points score calibrated online by the running positive rate of each score (a Beta prior
    of ``strength`` examples at the model's prior), so its log loss and ECE mean something; like the
    learner, it predicts an example before learning its label."""

    def __init__(self, points: Points, prior: float, strength: float = 20.0):
        self.points = points
        self.prior = prior
        self.strength = strength
        top = sum(len(t) for _, t, _ in points)
        self.n = [0] * (top + 1)
        self.pos = [0] * (top + 1)
        #: (event time, n, pos): the table as it stood, at most one entry a minute of event time
        self.history: list[tuple[int, list[int], list[int]]] = []

    def score(self, x: dict[str, float]) -> int:
        s = 0
        for name, thresholds, up in self.points:
            v = x[name]
            s += bisect.bisect_right(thresholds, v) if up else len(thresholds) - bisect.bisect_left(thresholds, v)
        return s

    def predict(self, x: dict[str, float]) -> float:
        s = self.score(x)
        return (self.pos[s] + self.prior * self.strength) / (self.n[s] + self.strength)

    def learn(self, x: dict[str, float], y: bool) -> None:
        s = self.score(x)
        self.n[s] += 1
        self.pos[s] += int(y)

    def rank(self, x: dict[str, float]) -> float:
        """The points scaled to [0, 1]: the heuristic's ranking alone, which learns nothing from labels."""
        return self.score(x) / (len(self.n) - 1)

    def keep(self, at: int) -> None:
        """Note the table as of event time ``at`` (at most once a minute), for :meth:`served`."""
        if not self.history or at - self.history[-1][0] >= 60_000:
            self.history.append((at, self.n[:], self.pos[:]))

    def served(self, x: dict[str, float], at: int) -> float:
        """What the heuristic answered at event time ``at``, from the labels it had then (to a minute), as
        the served model score did: the fair baseline for it.

        >>> h = Heuristic([("n", (1,), True)], prior=0.5, strength=2)
        >>> h.keep(0); h.learn({"n": 1}, True); h.learn({"n": 0}, False); h.keep(60_000)
        >>> h.served({"n": 1}, 59_999), round(h.served({"n": 1}, 60_000), 3), round(h.predict({"n": 0}), 3)
        (0.5, 0.667, 0.333)
        """
        i = bisect.bisect_right(self.history, at, key=lambda h: h[0]) - 1
        if i < 0:
            return self.prior
        _, n, pos = self.history[i]
        s = self.score(x)
        return (pos[s] + self.prior * self.strength) / (n[s] + self.strength)


def heuristic_for(d: ModelDef) -> Heuristic:
    """The churn points for an ``absent`` label, else the purchase points; their features must be model inputs."""
    points = CHURN_POINTS if d.label.outcome == "absent" else PURCHASE_POINTS
    missing = [n for n, _, _ in points if n not in d.features]
    if missing:
        raise ValueError(f"model {d.name!r}: the heuristic baseline reads {missing}, which are not among its features")
    return Heuristic(points, d.prior)


def figures(m: Metrics) -> dict[str, Any]:
    row = m.row()
    return {k: row[k] for k in FIGURES}


@dataclass
class Scores:
    """Progressive metrics of one model's three scorers on the same resolved examples."""

    learner: Learner
    heuristic: Heuristic
    #: the score served when the example was sampled (published snapshot, or the prior)
    served: Metrics
    #: the same for examples sampled once a horizon has passed since the stream began: what is served when
    #: the learner has seen both outcomes, not while it waits for its first deadline
    served_late: Metrics
    baseline: Metrics
    #: the heuristic as it stood when each example of ``served_late`` was sampled
    baseline_late: Metrics
    #: the heuristic's points alone on the same examples
    points_late: Metrics
    #: the label horizon, ms
    within: int


class Replay:
    """The model steps of the main flow, in-process: one call per source batch, like Bytewax's."""

    def __init__(self, dep: Deployment):
        s, mf = dep.settings, dep.models
        self.parser = Parser(s.events)
        needed = set().union(*(m.features for m in mf.models))
        self.features = FeatureEngine(dep.features, s.features, s.events, needed=needed)
        self.shards = shard_names(s.shards)
        self.feature_states: dict[str, ShardState] = {}
        self.labels = LabelEngine(mf, int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000))
        self.label_states: dict[str, LabelState] = {}
        bins = mf.calibration_bins
        self.models = {
            d.name: Scores(
                learner=Learner(d, mf), heuristic=heuristic_for(d), served=Metrics(bins), served_late=Metrics(bins),
                baseline=Metrics(bins), baseline_late=Metrics(bins), points_late=Metrics(bins),
                within=int(d.label.within * 1000),
            )
            for d in mf.models
        }
        self.published: dict[str, Snapshot] = {}
        self.clock = 0  # newest event time: the wall clock of a live stream
        self.start: int | None = None  # the first event time
        self.scorer = Scorer(mf, self.fetch_newer, now_ms=lambda: self.clock)
        self.read = 0
        self.refused = 0
        #: CPU seconds in the Scorer: the per-event scoring cost of the hot path
        self.score_cpu_s = 0.0

    def fetch_newer(self, have: dict[str, int]) -> list[Snapshot]:
        """What the model store would answer: the newest published snapshots newer than those the scorer has."""
        return [s for name, v in have.items() if (s := self.published.get(name)) is not None and s.version > v]

    def feed(self, batch: list[tuple[str, bytes]]) -> None:
        """Parse, enrich, score, label and learn one source batch."""
        self.read += len(batch)
        enriched: list[tuple[str, Enriched]] = []
        by_shard: dict[str, list[Event]] = {}  # as the flow keys them: each shard's events in order, one call
        for ev in self.parser.parse_batch(batch):
            if type(ev) is not Event:
                self.refused += 1
                continue
            by_shard.setdefault(shard_of(ev.user_id, self.shards), []).append(ev)
            if ev.ts > self.clock:
                self.clock = ev.ts
            if self.start is None:
                self.start = ev.ts
        for key, events in by_shard.items():
            st = self.feature_states.get(key)
            if st is None:
                st = self.feature_states[key] = self.features.new_state()
            for out in self.features.apply_batch(st, events):
                if type(out) is Enriched:
                    enriched.append((key, out))
                else:
                    self.refused += 1
            # what FeatureLogic does per batch: the Redis side (dropped here) and the looks at quiet shoppers
            enriched += [(key, x) for x in self.features.flush(st) if type(x) is Enriched]
        c0 = time.process_time()
        self.scorer.score_batch(enriched)
        self.score_cpu_s += time.process_time() - c0
        resolved: list[Resolved] = []
        for key, en in enriched:
            st = self.label_states.get(key)
            if st is None:
                st = self.label_states[key] = self.labels.new_state()
            self.labels.on_event(st, en, self.clock)
        for st in self.label_states.values():  # LabelLogic's batch end and its once-a-second wake-up
            if st.heap:
                resolved.extend(self.labels.advance(st, self.labels.watermark(st, self.clock)))
        self.learn(resolved)

    def finish(self) -> None:
        """End of input: resolve every example whose deadline the newest event time passed."""
        resolved: list[Resolved] = []
        for st in self.label_states.values():
            resolved.extend(self.labels.advance(st, self.clock))
        self.learn(resolved)

    def learn(self, resolved: list[Resolved]) -> None:
        for name, m in self.models.items():  # as LearnerLogic: one batch per model's learner
            m.learner.learn([r for r in resolved if r.model == name])
        for r in resolved:
            m = self.models[r.model]
            m.served.update(r.label, r.score)
            h = m.heuristic.predict(r.x)
            m.baseline.update(r.label, h)
            if r.ts - (self.start or 0) >= m.within:
                m.served_late.update(r.label, r.score)
                m.baseline_late.update(r.label, m.heuristic.served(r.x, r.ts))
                m.points_late.update(r.label, m.heuristic.rank(r.x))
            m.heuristic.learn(r.x, r.label)
        for name, m in self.models.items():
            m.heuristic.keep(self.clock)
            snap = m.learner.maybe_publish(self.clock)
            if snap is not None:
                self.published[name] = snap

    def results(self) -> dict[str, dict[str, Any]]:
        """Cumulative figures so far per model: learner, served score and heuristic."""
        return {
            name: {
                **figures(m.learner.total),
                "calibration": m.learner.total.cal.bins(),
                "served": figures(m.served),
                "served_late": figures(m.served_late),
                "heuristic": figures(m.baseline),
                "heuristic_late": figures(m.baseline_late),
                "points_late": figures(m.points_late),
            }
            for name, m in self.models.items()
        }


def label(n: int) -> str:
    """A stream length's short name.

    >>> label(100_000), label(1_000_000), label(30_000), label(1234)
    ('100k', '1m', '30k', '1234')
    """
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def sizes(events: int, users: int) -> list[tuple[int, int]]:
    """(events, users) of each stream to replay: ``CHECKPOINT`` events first when the run is longer.

    Separate streams, not a cut of the long one: the simulator spreads any number of events over
    the same days, so the first 100k of 1M cover about 13 h of event time, before a single
    24-hour label could resolve negative. The short stream keeps the events per user.

    >>> sizes(1_000_000, 50_000), sizes(30_000, 3_000)
    ([(100000, 5000), (1000000, 50000)], [(30000, 3000)])
    """
    short = [(CHECKPOINT, max(1, users * CHECKPOINT // events))] if events > CHECKPOINT else []
    return short + [(events, users)]


def batches(events: int, users: int, seed: int, span_days: float | None = None) -> Iterator[list[tuple[str, bytes]]]:
    """(position, record) batches of one simulator partition (so the stream is in event-time order)."""
    batch: list[tuple[str, bytes]] = []
    for i, rec in enumerate(iter_records(simulator_config(users, events, seed, span_days))):
        batch.append((f"sim:0:{i}", rec))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def run(dep: Deployment, events: int, users: int, seed: int, span_days: float | None = None) -> dict[str, Any]:
    """Replay ``events`` simulated records through a deployment's operators; every model's figures at the end."""
    replay = Replay(dep)
    t0 = time.perf_counter()
    for batch in batches(events, users, seed, span_days):
        replay.feed(batch)
    replay.finish()
    return {
        "events": replay.read, "users": users, "refused": replay.refused, "wall_s": round(time.perf_counter() - t0, 2),
        "score_us_per_event": round(replay.score_cpu_s / max(1, replay.read) * 1e6, 2),
        "models": replay.results(),
    }  # fmt: skip


# -- reporting

COLUMNS = ["events", "users", "model", "examples", "positives", "AUC", "log loss", "ECE", "served AUC", "served ECE",
           "served AUC after H", "served ECE after H", "heur. AUC", "heur. log loss", "heur. ECE",
           "heur. AUC after H", "points AUC after H"]  # fmt: skip


def fig(v: float) -> str:
    """A figure to four places; ``n/a`` where it is undefined (an AUC of examples of one outcome only).

    >>> fig(0.83456), fig(float("nan"))
    ('0.8346', 'n/a')
    """
    return "n/a" if v != v else f"{v:.4f}"


def rows(res: dict[str, Any]) -> list[list[str]]:
    """One row of figures per (stream, model)."""
    out = []
    for r in res["runs"].values():
        for name, f in r["models"].items():
            h, sv, late, hl, pl = f["heuristic"], f["served"], f["served_late"], f["heuristic_late"], f["points_late"]
            out.append([
                f"{r['events']:,}", f"{r['users']:,}", name, f"{f['examples']:,}", f"{f['positives']:,}",
                *map(fig, (f["auc"], f["logloss"], f["ece"], sv["auc"], sv["ece"], late["auc"], late["ece"], h["auc"],
                           h["logloss"], h["ece"], hl["auc"], pl["auc"])),
            ])  # fmt: skip
    return out


def table(res: dict[str, Any]) -> str:
    body = [COLUMNS, *rows(res)]
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def bench_line(res: dict[str, Any]) -> str:
    """``BENCH_MODELS`` with every model's AUC, log loss and ECE and its heuristic's AUC per stream length;
    ``heuristic_auc_<n>`` and ``ece_<n>`` without a model name are the main model's."""
    parts = []
    for at, r in res["runs"].items():
        for name, f in r["models"].items():
            parts += [f"{name}_auc_{at}={f['auc']:.4f}", f"{name}_logloss_{at}={f['logloss']:.4f}",
                      f"{name}_ece_{at}={f['ece']:.4f}", f"{name}_heuristic_auc_{at}={f['heuristic']['auc']:.4f}"]
        main = r["models"].get(MAIN_MODEL)
        if main:
            parts += [f"heuristic_auc_{at}={main['heuristic']['auc']:.4f}", f"ece_{at}={main['ece']:.4f}"]
        parts.append(f"score_us_{at}={r['score_us_per_event']:.2f}")
    return "BENCH_MODELS " + " ".join(parts)


def verdict(res: dict[str, Any]) -> str:
    """Whether the main model meets the issue's targets on the longest stream."""
    at, r = list(res["runs"].items())[-1]
    f = r["models"].get(MAIN_MODEL)
    if f is None:
        return f"no model {MAIN_MODEL!r}"
    ok = f["auc"] >= TARGET_AUC and f["auc"] > f["heuristic"]["auc"] and f["ece"] <= TARGET_ECE
    late = f["served_late"]
    return (f"{MAIN_MODEL} at {at}: AUC {f['auc']:.4f} (target >= {TARGET_AUC}, heuristic {f['heuristic']['auc']:.4f}), "
            f"ECE {f['ece']:.4f} (target <= {TARGET_ECE}): {'met' if ok else 'NOT met'}; "
            f"served after a horizon: AUC {fig(late['auc'])} (heuristic {fig(f['heuristic_late']['auc'])}, its points "
            f"alone {fig(f['points_late']['auc'])}), "
            f"ECE {fig(late['ece'])}")


HEADING = "## Model quality (benchmarks/models.py)"
SECTION = f"""
{HEADING}

Rows of `python -m benchmarks.models` (`make bench-models`): the real operators replayed in-process
over simulated events (one partition, 0.1 % bad records) with `config/local.yaml` (its
`models.yaml` and `features.yaml`); one row per stream and model. Each run replays 100k events
(users in proportion) and the full stream (default 1M events, 50,000 users); every example whose
deadline passed by the last event is resolved. Every run is also one object in `models.jsonl`
(with Brier scores and reliability bins). Figures are cumulative progressive validation: **AUC**,
**log loss**, **ECE** of the learner (each example scored before it is learned); **served AUC** and
**ECE** of the score used at decision time (the newest published snapshot, or the prior), and the same
**after H**: for examples sampled once a label horizon has passed since the stream began (`n/a` where
none resolved both ways: churn's horizon is 3 days, the stream 5.4); **heur.** a
recency/frequency points score (purchase: `carts_24h`, `views_1h`, `orders_30d`,
`since_last_event_s`; churn: `since_last_event_s`, `events_7d`) calibrated online by the positive
rate per score, on exactly the same examples; **heur. AUC after H** is the heuristic on the served
score's examples as it stood when each was sampled (its table of that minute), **points AUC after H** its
points alone (no table: nothing learned from labels, ties count half). Scores given when a label
resolves flatter both the learner and the heuristic (an order resolves at once, its absence a horizon
later, and each is scored by the model of that moment), so the fair comparison is served against served.
**seed** carries the span of event time when it is not the simulator's week (`--span-days`). **wall s**
the whole run. Targets (issue 4):
`purchase_propensity` AUC >= 0.80 and above the heuristic, ECE <= 0.05.
"""
RUN_COLUMNS = ["utc", "rev", "cpu", "nproc", "seed", "wall s"]


def record(res: dict[str, Any], out_dir: Path) -> None:
    """Append the run's rows at the end of RESULTS.md (the section once; the table header again unless the
    file ends with our table) and the run to models.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "RESULTS.md"
    text = md.read_text() if md.exists() else ""
    cols = RUN_COLUMNS + COLUMNS
    add = ""
    if HEADING not in text:
        add += ("" if text.endswith("\n") or not text else "\n") + SECTION
    add += table_head(text + add, cols)
    env = res["env"]
    wall = sum(r["wall_s"] for r in res["runs"].values())
    seed = str(res["seed"]) + (f" ({res['span_days']:g} days)" if res.get("span_days") is not None else "")
    run_cells = [env["utc"], f"`{env['rev']}`", env["cpu"], str(env["nproc"]), seed, f"{wall:.1f}"]
    add += "".join(_md(run_cells + r) + "\n" for r in rows(res))
    with md.open("a") as f:
        f.write(add)
    with (out_dir / "models.jsonl").open("a") as f:
        f.write(json.dumps(res) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help=f"records to replay (default {DEFAULT_EVENTS:,})")
    p.add_argument("--users", type=int, default=DEFAULT_USERS, help=f"simulated shoppers (default {DEFAULT_USERS:,})")
    p.add_argument("--seed", type=int, default=42, help="simulator seed (default 42)")
    p.add_argument("--span-days", type=float, default=None,
                   help="days the simulated events span (default the simulator's week; a month lets churn's 3-day "
                        "horizon pass many times)")
    p.add_argument("--config", type=Path, default=CONFIG, help="deployment config (default config/local.yaml)")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md / models.jsonl")
    p.add_argument("--out-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    env = environment()
    span = f", over {a.span_days:g} days" if a.span_days is not None else ""
    print(f"nudgeflow model bench: {a.events:,} events, {a.users:,} users{span}, seed {a.seed}; "
          f"rev {env['rev']}, {env['cpu']} x{env['nproc']}, load {env['load1']}", flush=True)
    dep = load_deployment(a.config)
    runs: dict[str, dict[str, Any]] = {}
    for events, users in sizes(a.events, a.users):
        runs[label(events)] = r = run(dep, events, users, a.seed, a.span_days)
        print(f"  {events:>10,} events, {users:,} users: {r['wall_s']:.1f}s; scoring {r['score_us_per_event']:.1f} µs "
              f"CPU per event ({len(dep.models.models)} models)", flush=True)
    res = {"env": env, "seed": a.seed, "span_days": a.span_days, "config": os.path.relpath(a.config.resolve(), REPO),
           "runs": runs}
    print()
    print(table(res))
    print(verdict(res))
    if not a.no_record:
        record(res, a.out_dir)
        print(f"recorded in {a.out_dir / 'RESULTS.md'} and {a.out_dir / 'models.jsonl'}")
    print(bench_line(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
