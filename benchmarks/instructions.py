"""Instructions per event of each step of the main flow, counted by valgrind: ``python -m benchmarks.instructions``.

Times on these machines move by 10-30 % from one minute to the next (``RESULTS.md``), so ``benchmarks.run``
cannot tell a change that saves 2 % of an event's work from noise. Valgrind's callgrind counts the
instructions a process executes: for the same code and input the count repeats to a fraction of a percent,
whatever else the machine is doing. It does not see cache misses, the kernel or waits, so it says whether a
change makes the hot path do less work; how fast the flow runs is still ``benchmarks.run``'s to say.

The flow's per-event Python runs in one process, without Bytewax, Redis or ClickHouse: the steps of
``flows.main`` (``STEPS``), one call per source batch and shard as Bytewax makes them, event time standing in
for the wall clock. Warm-up batches come first (the shoppers' state fills, the models learn and publish) and
are not counted. Before each step of each counted batch the chain calls ``os.getpgrp()``, which nothing else
on this path calls, and callgrind (``--dump-before=getpgrp``) writes what it counted since the last call: each
dump is one step of one batch, summed here by step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.run import REPO, append_section_row, environment, simulator_config
from connectors.simulator import SimulatorConfig

HERE = Path(__file__).resolve().parent
CONFIG = REPO / "config" / "local.yaml"
#: what each step covers (the flow's own steps, ``flows/main.py``)
STEPS = {
    "parse": "Parser.parse_batch: records to events and dead letters",
    "features": "shard grouping, FeatureEngine.apply_batch, and every PUBLISH_EVERY batches the publication (flush)",
    "score": "Scorer.score_batch: every model scoring each event's type",
    "labels": "LabelEngine: pending examples sampled, labelled and resolved; each model's Learner.learn",
    "triggers": "TriggerLogic.on_batch: conditions, timers, crossings and the in-state guards",
}
BATCH = 1000
#: the full stage's publication interval (1 s) at its ~10k events/s: a flush every ten batches of 1,000
PUBLISH_EVERY = 10
DEFAULT_EVENTS, DEFAULT_WARMUP, DEFAULT_USERS = 5_000, 15_000, 2_000
MARK = os.getpgrp
MARK_SYMBOL = "getpgrp"


class Chain:
    """The main flow's per-event steps in-process, one method a step, each taking what the one before gave."""

    def __init__(self, config: Path):
        from flows.common import shard_batches
        from flows.main import needed_features
        from nudgeflow.configload import load_deployment
        from operators.features import Enriched, FeatureEngine
        from operators.guards import StateGuards
        from operators.models import LabelEngine, Learner, Scorer
        from operators.parse import Parser
        from operators.shards import shard_names
        from operators.triggers import TriggerEngine, TriggerLogic

        # the steps' own code only, not imports, in the counted steps
        self._shard_batches, self._enriched, self._trigger_logic = shard_batches, Enriched, TriggerLogic
        dep = load_deployment(config)
        s, mf = dep.settings, dep.models
        lateness, idle = int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000)
        self.clock = 0  # the newest event time: the wall clock of a live stream
        self.parser = Parser(s.events)
        self.names = shard_names(s.shards)
        self.features = FeatureEngine(dep.features, s.features, s.events, needed=needed_features(dep))
        self.published: dict[str, Any] = {}
        self.scorer = Scorer(mf, self._newer, now_ms=lambda: self.clock)
        self.labels = LabelEngine(mf, lateness, idle)
        self.learners = {d.name: Learner(d, mf) for d in mf.models}
        self.triggers = TriggerEngine(dep.triggers, lateness, idle, now_ms=lambda: self.clock,
                                      guards=StateGuards(dep.triggers, s.events.default_timezone))
        self.state: dict[str, dict[str, Any]] = {"features": {}, "labels": {}, "triggers": {}}
        self.batches = 0
        self.fired = 0

    def _newer(self, have: dict[str, int]) -> list[Any]:
        return [snap for name, v in have.items() if (snap := self.published.get(name)) is not None and snap.version > v]

    def _of(self, step: str, key: str, new: Callable[[], Any]) -> Any:
        st = self.state[step].get(key)
        if st is None:
            st = self.state[step][key] = new()
        return st

    def parse(self, raws: list[tuple[str, bytes]]) -> list[Any]:
        return self.parser.parse_batch(raws)

    def enrich(self, parsed: list[Any]) -> list[tuple[str, Any]]:
        Enriched = self._enriched
        self.batches += 1
        publish = self.batches % PUBLISH_EVERY == 0
        out: list[tuple[str, Any]] = []
        for key, events in self._shard_batches([parsed], self.names):
            st = self._of("features", key, self.features.new_state)
            out += [(key, x) for x in self.features.apply_batch(st, events) if type(x) is Enriched]
            if publish:  # the Redis side is left out; the looks at quiet shoppers go on
                out += [(key, x) for x in self.features.flush(st) if type(x) is Enriched]
            self.clock = max(self.clock, st.max_ts)
        return out

    def score(self, enriched: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return self.scorer.score_batch(enriched) if self.learners else enriched  # as flows.main: no models, no step

    def label(self, scored: list[tuple[str, Any]]) -> None:
        if not self.learners:
            return
        eng, resolved = self.labels, []
        for key, en in scored:
            eng.on_event(self._of("labels", key, eng.new_state), en, self.clock)
        for st in self.state["labels"].values():
            if st.heap:
                resolved += eng.advance(st, eng.watermark(st, self.clock))
        for name, learner in self.learners.items():  # as LearnerLogic: a batch per model
            learner.learn([r for r in resolved if r.model == name])
            snap = learner.maybe_publish(self.clock)
            if snap is not None:
                self.published[name] = snap

    def trigger(self, scored: list[tuple[str, Any]]) -> None:
        by_shard: dict[str, list[Any]] = {}
        for key, en in scored:
            by_shard.setdefault(key, []).append(en)
        for key, values in by_shard.items():
            logic = self._of("triggers", key, self._new_trigger_logic)
            self.fired += len(logic.on_batch(values)[0])

    def _new_trigger_logic(self) -> Any:
        return self._trigger_logic(self.triggers, None, recover=False)

    def feed(self, raws: list[tuple[str, bytes]], mark: Callable[[], Any] | None = None) -> int:
        """One source batch through every step, ``mark`` called before each; the events it enriched."""
        m = mark or (lambda: None)
        m()
        parsed = self.parse(raws)
        m()
        enriched = self.enrich(parsed)
        m()
        scored = self.score(enriched)
        m()
        self.label(scored)
        m()
        self.trigger(scored)
        return len(enriched)


def child(a: argparse.Namespace) -> int:
    """Under valgrind: warm up, then feed the counted batches with marks; prints what the parent needs (JSON)."""
    from connectors.simulator import iter_records
    from flows.common import tune_collector

    chain = Chain(a.config)
    records = [(f"sim:0:{i}", r) for i, r in enumerate(iter_records(records_config(a.users, a.warmup + a.events, a.seed)))]
    tune_collector()  # as the flow's process once built: its thresholds, everything alive so far frozen
    for i in range(0, a.warmup, BATCH):
        chain.feed(records[i:i + BATCH])
    enriched, counted = 0, records[a.warmup:]
    for i in range(0, len(counted), BATCH):
        enriched += chain.feed(counted[i:i + BATCH], MARK)
    MARK()
    print(json.dumps({"records": len(counted), "enriched": enriched, "batches": -(-len(counted) // BATCH),
                      "fired": chain.fired, "models_published": sorted(chain.published)}))
    return 0


WEEK_MS, MONDAY_MS = 7 * 86_400_000, 4 * 86_400_000  # 1970-01-01 was a Thursday


def records_config(users: int, events: int, seed: int) -> SimulatorConfig:
    """``benchmarks.run``'s simulator settings, starting on a Monday: that start moves by a whole day from one
    day to the next, which moves the ISO weeks of the weekly frequency caps under the shoppers; moved by whole
    weeks, runs made on different days count the same work.

    >>> (records_config(10, 100, 1).start_ms - MONDAY_MS) % WEEK_MS
    0
    """
    cfg = simulator_config(users, events, seed)
    start = cfg.start_ms or 0
    return cfg.model_copy(update={"start_ms": start - (start - MONDAY_MS) % WEEK_MS})


_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)


def dump_total(path: Path) -> int:
    """The instructions a callgrind dump counted (its ``summary:`` line).

    >>> p = Path(tempfile.mkdtemp()) / "cg.out.3"; _ = p.write_bytes(b"events: Ir\\nsummary: 12345\\ntotals: 12345\\n")
    >>> dump_total(p)
    12345
    """
    m = _TOTAL.search(path.read_bytes())
    if m is None:
        raise ValueError(f"{path}: no summary line")
    return int(m.group(1))


def per_step(dumps: list[int], batches: int) -> dict[str, int]:
    """Instructions by step from the dumps in the order callgrind wrote them: the first is everything before
    the first mark (start-up, warm-up), then one per step per counted batch, then the last mark's own.

    >>> per_step([999, 10, 20, 30, 40, 50, 11, 21, 31, 41, 51, 7], batches=2)
    {'parse': 21, 'features': 41, 'score': 61, 'labels': 81, 'triggers': 101}
    """
    steps = list(STEPS)
    counted = dumps[1:1 + batches * len(steps)]
    if len(counted) != batches * len(steps):
        raise ValueError(f"{len(dumps)} dumps for {batches} batches of {len(steps)} steps: another call of "
                         f"{MARK_SYMBOL}() on the path?")
    return {step: sum(counted[i::len(steps)]) for i, step in enumerate(steps)}


def count(a: argparse.Namespace) -> dict[str, Any]:
    """Run the chain under callgrind and sum its dumps by step."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    work = Path(tempfile.mkdtemp(prefix="nfbench-callgrind-"))
    try:
        cmd = [valgrind, "--tool=callgrind", f"--dump-before={MARK_SYMBOL}", f"--callgrind-out-file={work}/cg.out",
               sys.executable, "-m", "benchmarks.instructions", "--child", "--events", str(a.events),
               "--warmup", str(a.warmup), "--users", str(a.users), "--seed", str(a.seed), "--config", str(a.config)]
        env = os.environ | {"PYTHONHASHSEED": "0"}  # the same dict layouts on every run
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"the chain failed under valgrind:\n{p.stderr[-3000:]}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        numbered = sorted(work.glob("cg.out.*"), key=lambda f: int(f.suffix[1:]))
        steps = per_step([dump_total(f) for f in numbered], info["batches"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_event = {k: v / info["records"] for k, v in steps.items()}
    return {**info, "users": a.users, "warmup": a.warmup, "seed": a.seed, "instructions": steps,
            "per_event": per_event, "total_per_event": sum(per_event.values())}


# -- reporting

HEADING = "## Instructions per event (benchmarks/instructions.py)"
SECTION = f"""
{HEADING}

Rows of `python -m benchmarks.instructions`: the main flow's per-event Python in one process, without
Bytewax, Redis or ClickHouse, under valgrind's callgrind, which counts instructions: the same figure on a
busy machine as on an idle one, so a change of a few percent shows. Each figure is instructions per
record over the counted records (after a warm-up), by step: **parse** records to events; **features**
sharding, the feature update and the read of what downstream steps need, and a publication every
{PUBLISH_EVERY} batches; **score** every model on each event; **labels** examples sampled, resolved and
learned; **triggers** the trigger step with its in-state guards. Cache misses are not counted: speed is
what `benchmarks.run` measures.
"""
COLUMNS = ["utc", "rev", "cpu", "records", "warm-up", "users", *(f"{s} Ir/ev" for s in STEPS), "total Ir/ev"]


def row(res: dict[str, Any]) -> list[str]:
    env = res["env"]
    return [env["utc"], f"`{env['rev']}`", env["cpu"], f"{res['records']:,}", f"{res['warmup']:,}", f"{res['users']:,}",
            *(f"{res['per_event'][s]:,.0f}" for s in STEPS), f"{res['total_per_event']:,.0f}"]


def record(res: dict[str, Any], out_dir: Path) -> None:
    """Append the run at the end of RESULTS.md (the section once) and to instructions.jsonl."""
    append_section_row(out_dir, HEADING, SECTION, COLUMNS, row(res), "instructions.jsonl", res)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help=f"records counted (default {DEFAULT_EVENTS:,})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"records fed before counting (default {DEFAULT_WARMUP:,}; a multiple of {BATCH})")
    p.add_argument("--users", type=int, default=DEFAULT_USERS, help=f"simulated shoppers (default {DEFAULT_USERS:,})")
    p.add_argument("--seed", type=int, default=42, help="simulator seed (default 42)")
    p.add_argument("--config", type=Path, default=CONFIG, help="deployment config (default config/local.yaml)")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md / instructions.jsonl")
    p.add_argument("--out-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.warmup % BATCH:
        p.error(f"--warmup must be a multiple of {BATCH}: the counted batches are then the flow's")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child(a)
    env = environment()
    print(f"nudgeflow instructions: {a.events:,} records counted after {a.warmup:,}, {a.users:,} users; "
          f"rev {env['rev']}, {env['cpu']} (callgrind: a few minutes)", flush=True)
    res = {"env": env, **count(a)}
    width = max(map(len, STEPS))
    for step, n in res["per_event"].items():
        print(f"  {step:<{width}} {n:>12,.0f} instructions/record")
    print(f"  {'total':<{width}} {res['total_per_event']:>12,.0f}   ({res['enriched']:,} enriched events, "
          f"{res['fired']:,} trigger outputs)")
    if not a.no_record:
        record(res, a.out_dir)
        print(f"recorded in {a.out_dir / 'RESULTS.md'} and {a.out_dir / 'instructions.jsonl'}")
    print("BENCH_INSTRUCTIONS " + " ".join(f"{k}={v:.0f}" for k, v in [*res["per_event"].items(),
                                                                       ("total", res["total_per_event"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
