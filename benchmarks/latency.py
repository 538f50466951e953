"""Event→action latency at a steady rate, and trigger evaluation cost per event: ``python -m benchmarks.latency``.

Two measurements (issue 5), both recorded in ``RESULTS.md`` and ``latency.jsonl``:

1. **Latency.** A tansu broker, the real main flow (``flows.main.build`` on a
   deployment like ``benchmarks.stage``'s ``full`` stage, but with a tailing
   Kafka source) in a child process, a producer sending live simulated shoppers
   (event time = the wall clock) at a steady offered rate, and a consumer of
   the actions topic. A probe trigger fires on every ``add_to_cart``; its
   action carries the event id as ``occurrence``, so each action is matched to
   the moment its event was handed to the producer. The rate defaults to half
   the flow's maximum throughput, measured first by the harness's ``full``
   stage on a backlog (or read from ``results.jsonl``). ``--via file`` runs the
   same flow and the same pacing with no broker in the path: the producer
   appends to a JSONL file the flow follows (``source.file.tail``) and the flow
   writes its actions to a file the reader follows, so the figure is the
   flow's own latency on cores it does not share with a broker.
2. **Trigger cost.** 50 realistic triggers (event triggers with CEL conditions
   over features, scores and props; absence triggers) and the real
   ``TriggerLogic`` fed pre-computed enriched events in-process; CPU µs per
   event with 0, 10 and 50 of them loaded.

See ``benchmarks/README.md``; the last line is ``BENCH_LATENCY k=v ...``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from benchmarks.run import (
    REPO,
    _proc_cpu_s,
    append_section_row,
    bench_redis,
    environment,
    keyed_records,
    run_stage,
    simulator_config,
    user_key,
)
from benchmarks.stage import TRIGGERS, StageContext
from connectors.kafka import SOURCE_DEFAULTS
from connectors.simulator import ShopperSimulator, SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce
from nudgeflow.configload import Deployment, load_deployment, load_triggers
from nudgeflow.events import Consent
from nudgeflow.settings import KafkaConfig, SinkConfig, SourceConfig, TriggersFile
from nudgeflow.yamlconf import load_yaml

HERE = Path(__file__).resolve().parent
CONFIG = REPO / "config" / "local.yaml"
PARTITIONS = 3
USERS = 20_000
#: records of the as-fast-as-possible ``full`` run that measures the maximum rate
MAX_RUN_EVENTS = 100_000
WARMUP_S = 5.0
#: after the producer stops: give up waiting for the last actions after this long without a new one
DRAIN_IDLE_S = 3.0
DRAIN_MAX_S = 20.0
#: the pacer may send this much of a second's worth of events at once (sleep granularity)
BURST_S = 0.005
#: the benchmark's own clients. The producer batches for up to 5 ms by default (librdkafka's default; with 0,
#: tansu got one tiny batch per event, used 0.7 cores and the flow's consumer fell seconds behind;
#: ``--linger-ms``); the reader fetches at once, so the figure is the flow's latency rather than the reader's
LINGER_MS = 5.0
READER_CONFIG = {"fetch.wait.max.ms": "5", "fetch.min.bytes": "1"}
#: ``--via file``: how often the flow and the reader look at the end of the files they follow
FILE_POLL_S = 0.001

PROBE = "latency_probe"
PROBE_TYPE = "add_to_cart"
_PROBE_MARK = b'"type":"%s"' % PROBE_TYPE.encode()
#: the probe fires on every add_to_cart (a cart holds at least the item just added); a channel the simulator
#: never sends consent events for, and no cooldown, so no in-state guard refuses a probe
PROBE_TRIGGER: dict[str, Any] = {
    "id": PROBE, "kind": "event", "on": [PROBE_TYPE], "condition": "features.cart_items >= 1",
    "channel": "bench", "guards": {"cooldown": 0}, "payload": {"template": "latency_probe"},
}
#: frequency caps count every trigger's messages per user: off, so the shipped triggers never starve the probe
NO_CAPS = {"per_day": None, "per_week": None}

EVAL_COUNTS = (0, 10, 50)
EVAL_EVENTS = 50_000
EVAL_USERS = 5_000
EVAL_BATCH = 1000
EVAL_REPEATS = 3
PERCENTILES = (50, 95, 99)


# -- trigger files


def realistic_triggers(n: int) -> list[dict[str, Any]]:
    """``n`` triggers as marketers would write them, every fourth an absence trigger, so any prefix is a mix.

    Event triggers cycle through conditions over features, model scores (the priors while no model has
    learned: ``purchase_propensity`` 0.05, ``churn_risk`` 0.3) and event props, on seven event types.
    """
    event = [
        (["browse"], "features.views_1h >= {k}", (5, 10, 20)),
        (["browse"], "event.props.price >= {k}.0 && features.cart_items == 0", (100, 200, 400)),
        (["browse"], 'event.props.category == "{k}" && features.categories_viewed_24h >= 3', ("electronics", "fashion", "home")),
        (["browse"], "score.purchase_propensity >= 0.05 && features.cart_value > {k}.0", (50, 150, 300)),
        (["add_to_cart"], "features.cart_value >= {k}.0", (100, 250, 500)),
        (["add_to_cart"], "features.carts_24h >= {k} && features.orders_30d == 0", (2, 3, 5)),
        (["add_to_cart"], 'event.props.category in ["electronics", "jewelry"] && event.props.price > {k}.0', (50, 150, 300)),
        (["search"], "event.props.results <= {k}", (0, 3, 10)),
        (["search"], "features.searches_1h >= {k}", (3, 5, 8)),
        (["order"], "event.props.amount >= {k}.0", (100, 250, 500)),
        (["order"], "features.orders_30d == {k}", (1, 2, 3)),
        (["remove_from_cart"], "features.cart_removals_24h >= {k} && features.cart_items > 0", (1, 2, 3)),
        (["favourite"], "features.favourites_7d >= {k}", (2, 4, 6)),
        (["click"], 'event.props.target.startsWith("{k}") && features.sessions_7d >= 2', ("promo", "banner", "push")),
        (["browse", "click"], "score.churn_risk >= 0.3 && features.since_last_event_s > {k}", (3600, 86400, 259200)),
        (["browse"], "features.session_pages >= {k} && features.session_duration_s > 600", (8, 12, 20)),
        (["add_to_cart"], 'event.platform == "{k}" && features.cart_items >= 3', ("app", "web", "mini_program")),
    ]
    absence = [
        (["add_to_cart"], ["order"], ("30m", "2h", "24h")),
        (["browse"], ["add_to_cart"], ("1h", "6h", "24h")),
        (["search"], ["browse"], ("10m", "30m", "1h")),
        (["favourite"], ["add_to_cart", "order"], ("24h", "3d", "7d")),
        (["remove_from_cart"], ["add_to_cart"], ("1h", "12h", "48h")),
    ]
    out: list[dict[str, Any]] = []
    e = a = 0
    while len(out) < n:
        if len(out) % 4 == 3:
            after, unless, withins = absence[a % len(absence)]
            out.append({"id": f"absence_{a}", "kind": "absence", "after": after, "unless": unless,
                        "within": withins[a // len(absence) % len(withins)]})
            a += 1
        else:
            on, cond, params = event[e % len(event)]
            out.append({"id": f"event_{e}", "kind": "event", "on": on,
                        "condition": cond.format(k=params[e // len(event) % len(params)])})
            e += 1
    return out


def trigger_file(data: dict[str, Any], path: Path, dep: Deployment) -> TriggersFile:
    """Write a trigger file and load it the way a deployment does, so every name and condition is checked."""
    from operators.features import FeaturePlan

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_triggers(path, dep.settings.events, FeaturePlan(dep.features).names, [m.name for m in dep.models.models])


def probe_file_data() -> dict[str, Any]:
    """The shipped triggers (with their default guards) plus the probe; frequency caps and the global control
    group (users who get no message at all) off, so every probe can fire."""
    shipped, _lines = load_yaml(TRIGGERS)  # the project's loader: YAML 1.1 would read the key `on` as True
    return shipped | {"frequency_cap": NO_CAPS, "control_group": 0, "triggers": [*shipped["triggers"], PROBE_TRIGGER]}


# -- the flow, in a child process


@dataclass
class LiveContext(StageContext):
    """A stage context whose source keeps reading at the end of the topic, with extra librdkafka settings."""

    add_config: dict[str, str] = field(default_factory=dict)
    #: "kafka", or "file": the events followed in ``events.jsonl``, the actions written to ``actions.jsonl``
    via: str = "kafka"
    #: ``via: file``: how often the flow's source looks for new lines at the end of the file (``source.file.tail``)
    follow_s: float = FILE_POLL_S

    def kafka_config(self) -> KafkaConfig:
        return super().kafka_config().model_copy(update={"tail": True, "add_config": self.add_config})

    def file_settings(self) -> dict[str, Any]:
        """The source and sinks of ``via: file`` (settings fields)."""
        return {
            "source": SourceConfig.model_validate({"kind": "file", "file": {"paths": [str(self.events_file)], "tail": self.follow_s}}),
            "actions": SinkConfig(kind="file", path=str(self.actions_file)),
            "dlq": SinkConfig(kind="file", path=str(self.workdir / "dlq.jsonl")),
        }

    @property
    def events_file(self) -> Path:
        return self.workdir / "events.jsonl"

    @property
    def actions_file(self) -> Path:
        return self.workdir / "actions.jsonl"


def serve(ctx: LiveContext) -> None:
    """Build the main flow on the probe trigger file and run it until killed (the child's whole life)."""
    from bytewax.testing import run_main

    from benchmarks.stage import _deployment
    from flows.common import tune_collector
    from flows.main import build

    dep = _deployment(ctx, "bench_latency")
    path = ctx.workdir / "triggers.yaml"
    dep.triggers = trigger_file(probe_file_data(), path, dep)
    dep.settings = dep.settings.model_copy(update={"triggers": str(path), **(ctx.file_settings() if ctx.via == "file" else {})})
    flow, _rt = build(dep)
    tune_collector()
    print("READY", flush=True)
    run_main(flow)


def start_flow(ctx: LiveContext) -> subprocess.Popen[bytes]:
    """The child process running :func:`serve`; returns once the flow is built (its source then connects)."""
    spec = {"bootstrap": ctx.bootstrap, "topic": ctx.topic, "workdir": str(ctx.workdir), "redis_url": ctx.redis_url,
            "prefix": ctx.prefix, "batch_size": ctx.batch_size, "add_config": ctx.add_config, "via": ctx.via, "follow_s": ctx.follow_s}
    log_path = ctx.workdir / "flow.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.latency", "--serve", json.dumps(spec)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until READY, or EOF if the child died
    if line.strip() != b"READY":
        proc.wait(timeout=10)
        raise RuntimeError(f"the flow did not start (rc={proc.returncode}):\n{log_path.read_text()[-4000:]}")
    return proc


def stop_flow(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (Bytewax stops at the next activation), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- producing at a steady rate and reading the actions


class TokenBucket:
    """Steady pacing: tokens accrue at ``rate`` a second up to ``burst``; :meth:`take` waits for one and
    spends every whole token there is, so sleep granularity never lowers the rate and a stall never
    turns into a catch-up burst larger than ``burst``."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = 1.0
        self.at = time.monotonic()

    def take(self) -> int:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1.0:
                n = int(self.tokens)
                self.tokens -= n
                return n
            time.sleep((1.0 - self.tokens) / self.rate)


@dataclass
class Sent:
    """What the producer did: send times (ns) of the probe events by event id, and how many events it sent."""

    probes: dict[str, int] = field(default_factory=dict)
    total: int = 0
    #: events sent from the end of the warm-up on
    in_window: int = 0
    #: time.time_ns() of the first send, of the end of the warm-up and of the last send
    start_ns: int = 0
    window_ns: int = 0
    end_ns: int = 0


class KafkaSender:
    """Sends to a topic, keyed by user; waits while librdkafka's queue is full (the broker is not keeping up)."""

    def __init__(self, bootstrap: str, topic: str, linger_ms: float):
        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": str(linger_ms)})

    def send(self, rec: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, rec, user_key(rec))
                return
            except BufferError:
                self.producer.poll(0.01)

    def poll(self) -> None:
        self.producer.poll(0)

    def close(self) -> None:
        left = self.producer.flush(30)
        if left:
            raise RuntimeError(f"{left} events not delivered to {self.topic}")


class FileSender:
    """Appends lines to the file the flow follows, written out after each burst (``poll``)."""

    def __init__(self, path: Path):
        self.f = path.open("ab")

    def send(self, rec: bytes) -> None:
        self.f.write(rec + b"\n")

    def poll(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def produce_steady(
    sender: KafkaSender | FileSender, cfg: SimulatorConfig, warmup_s: float, seconds: float, on_window: Callable[[], None],
) -> Sent:
    """Live simulated shoppers (event time = the wall clock) at ``cfg.rate`` for warm-up + ``seconds``;
    ``on_window`` is called once when the warm-up ends."""
    assert cfg.rate is not None
    sim = ShopperSimulator(cfg)
    bucket = TokenBucket(cfg.rate, cfg.rate * BURST_S)
    sent = Sent(start_ns=time.time_ns())
    sent.window_ns = sent.start_ns + int(warmup_s * 1e9)
    stop_ns = sent.window_ns + int(seconds * 1e9)
    probes, next_record, send, now_ns = sent.probes, sim.next_record, sender.send, time.time_ns
    window_from: int | None = None
    t = sent.start_ns
    while t < stop_ns:
        for _ in range(bucket.take()):
            rec = next_record()
            assert rec is not None  # live and unbounded
            t = now_ns()
            send(rec)
            if _PROBE_MARK in rec:
                probes[orjson.loads(rec)["event_id"]] = t
        sender.poll()
        if window_from is None and t >= sent.window_ns:
            window_from = sim.index
            on_window()
    sent.end_ns = t
    sent.total = sim.index
    sent.in_window = sim.index - (window_from or sim.index)
    sender.close()
    return sent


class ActionReader(threading.Thread):
    """Reads the actions as they come; keeps (read ns, ingest ms, decided ms) of each probe action by occurrence
    (= the event id), and counts the others by trigger. :class:`KafkaActions` and :class:`FileActions` read."""

    def __init__(self) -> None:
        super().__init__(name="action-reader", daemon=True)
        self.probes: dict[str, tuple[int, int, int]] = {}
        self.others: Counter[str] = Counter()
        self.last_ns = 0
        self.stop = threading.Event()

    def saw(self, value: bytes) -> None:
        t = time.time_ns()
        a = orjson.loads(value)
        if a["trigger_id"] == PROBE:
            self.probes[a["occurrence"]] = (t, a["ingest_ms"], a["decided_ms"])
            self.last_ns = t
        else:
            self.others[a["trigger_id"]] += 1

    def drain(self, expected: set[str]) -> None:
        """Wait until every expected probe has its action, or until none came for ``DRAIN_IDLE_S``."""
        deadline = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < deadline and not expected <= self.probes.keys():
            if time.time_ns() - self.last_ns > DRAIN_IDLE_S * 1e9:
                break
            time.sleep(0.1)
        self.stop.set()
        self.join(timeout=10)


class KafkaActions(ActionReader):
    """The actions topic, from the beginning."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__()
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"nf-latency-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "enable.partition.eof": False, **READER_CONFIG,
        })
        meta = self.consumer.list_topics(topic, timeout=15).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.consumer.poll(0.05)
                if msg is not None and not msg.error():
                    self.saw(msg.value())
        finally:
            self.consumer.close()


class FileActions(ActionReader):
    """The actions file, followed as the flow writes it (every ``FILE_POLL_S`` at its end)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def run(self) -> None:
        while not self.path.exists() and not self.stop.is_set():
            time.sleep(FILE_POLL_S)
        if self.stop.is_set():
            return
        with self.path.open("rb") as f:
            while not self.stop.is_set():
                at = f.tell()
                line = f.readline()
                if line.endswith(b"\n"):
                    self.saw(line)
                else:  # nothing new, or a line still being written
                    f.seek(at)
                    time.sleep(FILE_POLL_S)


# -- figures


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    """
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] if xs else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of values in ms."""
    xs = sorted(xs)
    out = {f"p{p}": percentile(xs, p) for p in PERCENTILES}
    out["max"] = xs[-1] if xs else float("nan")
    out["mean"] = sum(xs) / len(xs) if xs else float("nan")
    return out


def latency_figures(sent: Sent, reader: ActionReader) -> dict[str, Any]:
    """Latency of the probes sent in the steady window: end to end, and split at the flow's own stamps
    (``ingest_ms``: parsed, ``decided_ms``: the trigger fired)."""
    window = {e: t for e, t in sent.probes.items() if t >= sent.window_ns}
    matched = [(t, reader.probes[e]) for e, t in window.items() if e in reader.probes]
    matched.sort()
    e2e = [(c - t) / 1e6 for t, (c, _, _) in matched]
    quarter = max(1, len(e2e) // 4)
    window_s = (sent.end_ns - sent.window_ns) / 1e9
    return {
        "window_s": window_s,
        "probes_sent": len(window),
        "matched": len(matched),
        "unmatched": len(window) - len(matched),
        "e2e_ms": summary(e2e),
        # ms stamps: about ±1 ms each
        "kafka_in_ms": summary([i - t / 1e6 for t, (_, i, _) in matched]),
        "flow_ms": summary([float(d - i) for _, (_, i, d) in matched]),
        "out_ms": summary([c / 1e6 - d for _, (c, _, d) in matched]),
        # the steady window's last quarter against its first: a flow that falls behind shows a growing median
        "p50_first_quarter_ms": summary(e2e[:quarter])["p50"],
        "p50_last_quarter_ms": summary(e2e[-quarter:])["p50"],
        "events_sent": sent.total,
        "offered_eps": sent.in_window / window_s if window_s > 0 else 0.0,
        "probe_share": len(sent.probes) / sent.total if sent.total else 0.0,
    }


# -- the maximum rate


def latest_full_eps(path: Path = HERE / "results.jsonl") -> tuple[float, str]:
    """The ``full`` stage's events/s of the newest run in ``results.jsonl`` that has one."""
    for line in reversed(path.read_text().splitlines()):
        run = json.loads(line)
        full = run.get("stages", {}).get("full")
        if full:
            return full["eps"], f"results.jsonl full stage of {run['env']['utc']} ({run['events']:,} events)"
    raise SystemExit(f"no run with a full stage in {path}: run `make bench` or leave out --max-rate-from-run")


def measure_full_eps(broker: TansuBroker, redis_url: str, prefix: str, seed: int) -> tuple[float, str]:
    """The harness's ``full`` stage (the main job with the shipped triggers) over a backlog, as fast as it goes."""
    topic = f"{prefix}.max"
    create_topics(broker.bootstrap, [topic], partitions=PARTITIONS)
    n = produce(broker.bootstrap, topic, keyed_records(simulator_config(USERS, MAX_RUN_EVENTS, seed)), timeout_s=120)
    r = run_stage("full", broker, topic, n, redis_url, prefix)
    return r["eps"], f"measured: full stage over a {n:,}-event backlog ({r['wall_s']:.1f} s incl. start-up and flush)"


# -- latency run


def run_latency(a: argparse.Namespace, broker: TansuBroker, redis_url: str, prefix: str, rate: float) -> dict[str, Any]:
    """Start the flow, offer ``rate`` events/s for warm-up + ``a.seconds``, match actions to events."""
    import redis

    from benchmarks.stage import _delete_keys

    workdir = Path(tempfile.mkdtemp(prefix="nfbench-latency-"))
    topic = f"{prefix}.events"
    create_topics(broker.bootstrap, [topic, f"{prefix}.actions", f"{prefix}.dlq"], partitions=PARTITIONS)
    ctx = LiveContext(broker.bootstrap, topic, 0, workdir, redis_url, prefix, a.batch_size, a.add_config, a.via,
                      a.follow_ms / 1000)
    by_file = a.via == "file"
    if by_file:
        ctx.events_file.touch()
    t0 = time.perf_counter()
    proc = start_flow(ctx)
    try:
        build_s = time.perf_counter() - t0
        reader = FileActions(ctx.actions_file) if by_file else KafkaActions(broker.bootstrap, f"{prefix}.actions")
        reader.start()
        pids = {"flow": proc.pid, "bench": os.getpid()}
        if broker.process and not by_file:
            pids["broker"] = broker.process.pid
        cpu0: dict[str, float | None] = {}
        cfg = SimulatorConfig(users=USERS, events=None, seed=a.seed, rate=rate)
        sender = FileSender(ctx.events_file) if by_file else KafkaSender(broker.bootstrap, topic, a.linger_ms)
        sent = produce_steady(
            sender, cfg, WARMUP_S, a.seconds, lambda: cpu0.update({k: _proc_cpu_s(p) for k, p in pids.items()}),
        )
        window_s = (sent.end_ns - sent.window_ns) / 1e9
        # cores each process kept busy during the steady window (bench: this process, the producer and the reader)
        cores = {k: (c1 - c0) / window_s for k, p in pids.items()
                 if (c0 := cpu0.get(k)) is not None and (c1 := _proc_cpu_s(p)) is not None}
        reader.drain({e for e, t in sent.probes.items() if t >= sent.window_ns})
        if proc.poll() is not None:
            raise RuntimeError(f"the flow died (rc={proc.returncode}):\n{(workdir / 'flow.log').read_text()[-4000:]}")
    finally:
        stop_flow(proc)
        _delete_keys(redis.Redis.from_url(redis_url), f"{prefix}:*")
        shutil.rmtree(workdir, ignore_errors=True)
    return latency_figures(sent, reader) | {
        "rate": rate, "warmup_s": WARMUP_S, "build_s": build_s, "cores": cores, "other_actions": dict(reader.others),
        "source": {"batch_size": a.batch_size, "add_config": a.add_config, "consumer": SOURCE_DEFAULTS | a.add_config,
                   "via": a.via, **({"follow_ms": a.follow_ms} if by_file else {})},
        "producer_linger_ms": a.linger_ms,
    }


# -- trigger evaluation cost


def enriched_batches(dep: Deployment, events: int, users: int, seed: int) -> tuple[list[dict[str, list[Any]]], list[int]]:
    """Simulator events through the real parser, feature engine and scorer (the models' priors: nothing is
    learned here), grouped as the trigger step receives them: per source batch, per shard. Also each
    batch's newest event time, the clock of a live stream."""
    from flows.main import needed_features
    from nudgeflow.events import Event
    from operators.features import Enriched, FeatureEngine, ShardState
    from operators.models import Scorer
    from operators.parse import Parser
    from operators.shards import shard_names, shard_of

    s = dep.settings
    parser = Parser(s.events)
    features = FeatureEngine(dep.features, s.features, s.events, needed=needed_features(dep))
    states: dict[str, ShardState] = {}
    names = shard_names(s.shards)
    clock = [0]
    scorer = Scorer(dep.models, lambda _have: [], now_ms=lambda: clock[0])
    raws = [(f"sim:0:{i}", r) for i, r in enumerate(iter_records(simulator_config(users, events, seed)))]
    batches: list[dict[str, list[Any]]] = []
    clocks: list[int] = []
    for i in range(0, len(raws), EVAL_BATCH):
        enriched: list[tuple[str, Any]] = []
        for ev in parser.parse_batch(raws[i:i + EVAL_BATCH]):
            if type(ev) is not Event:  # a refused record
                continue
            key = shard_of(ev.user_id, names)
            st = states.get(key) or states.setdefault(key, features.new_state())
            out = features.apply(st, ev)
            if type(out) is Enriched:
                enriched.append((key, out))
                clock[0] = max(clock[0], out.event.ts)
        for st in states.values():  # what FeatureLogic does per batch (Redis side): keeps the state as in the flow
            features.flush(st)
        by_shard: dict[str, list[Any]] = {}
        for key, en in scorer.score_batch(enriched):
            by_shard.setdefault(key, []).append(en)
        batches.append(by_shard)
        clocks.append(clock[0])
    return batches, clocks


def eval_cost(dep: Deployment, tf: TriggersFile, events: int, users: int, seed: int) -> dict[str, Any]:
    """CPU µs per enriched event of the real ``TriggerLogic`` (engine + in-state guards) with the first
    0, 10 and 50 triggers of ``tf``, best of ``EVAL_REPEATS``; enrichment is done beforehand, untimed."""
    from flows.common import GC_THRESHOLDS
    from operators.guards import StateGuards
    from operators.triggers import TriggerEngine, TriggerLogic

    gc.set_threshold(*GC_THRESHOLDS)  # as the flow's process runs
    batches, clocks = enriched_batches(dep, events, users, seed)
    n_events = sum(len(v) for b in batches for v in b.values())
    s = dep.settings
    us: dict[str, float] = {}
    candidates: Counter[str] = Counter()
    now = [0]  # the newest event time of the batch: the clock of a live stream
    for n in EVAL_COUNTS:
        subset = tf.model_copy(update={"triggers": tf.triggers[:n]})
        best = math.inf
        for _ in range(EVAL_REPEATS):
            engine = TriggerEngine(
                subset.triggers, int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000),
                now_ms=lambda: now[0], guards=StateGuards(subset, s.events.default_timezone),
            )
            logics: dict[str, TriggerLogic] = {}
            outs: list[Any] = []
            c0 = time.process_time()
            for batch, clock in zip(batches, clocks):
                now[0] = clock
                for key, values in batch.items():
                    lg = logics.get(key) or logics.setdefault(key, TriggerLogic(engine, None))
                    outs.extend(lg.on_batch(values)[0])
            best = min(best, time.process_time() - c0)
        us[str(n)] = best / n_events * 1e6
        if n == max(EVAL_COUNTS):
            candidates = Counter(getattr(o, "action", o).trigger_id for o in outs if type(o) is not Consent)
    top = max(EVAL_COUNTS)
    return {
        "events": n_events, "users": users, "us_per_event": us,
        "us_per_trigger": (us[str(top)] - us["0"]) / top,
        "candidates": dict(candidates), "never_fired": [t.id for t in tf.triggers if t.id not in candidates],
    }


# -- recording


HEADING = "## Latency and trigger cost (benchmarks/latency.py)"
SECTION = f"""
{HEADING}

Rows of `python -m benchmarks.latency` (`make bench-latency`), one per run; every run is also one object
in `latency.jsonl` (with the split of the latency, CPU per process and the actions of other triggers).
**rate** the offered events/s (and where it comes from: half the `full` stage's events/s, measured
over a backlog just before, or read from `results.jsonl`, or `--rate`); **source** the flow's
Kafka source settings (batch size, extra librdkafka settings); **offered** events/s the producer
really sent in the steady window (after a {WARMUP_S:.0f} s warm-up); **probes** `add_to_cart` events
sent in the window and **matched** those whose probe action was read back; **p50 … max** event→action
latency in ms: from handing the event to the producer to reading its action from the actions topic,
same clock. **flow cores** CPU of the flow's process over the window (2 = both cores). **eval µs/ev**
CPU µs per enriched event of the trigger step (engine + in-state guards) with 0, 10 and 50 realistic
triggers loaded, in-process; **µs/trigger** the marginal cost of one more trigger. Target (issue 5):
p99 ≤ 50 ms at half the maximum rate.
"""
COLUMNS = [
    "utc", "rev", "machine", "cpu", "nproc", "load1", "rate ev/s", "rate from", "source", "offered ev/s", "probes",
    "matched", "p50 ms", "p95 ms", "p99 ms", "max ms", "flow cores", "eval events", "eval µs/ev 0", "eval µs/ev 10",
    "eval µs/ev 50", "µs/trigger",
]


def _source_label(src: dict[str, Any]) -> str:
    if src.get("via") == "file":
        return f"file, no broker (followed every {src.get('follow_ms', FILE_POLL_S * 1000):g} ms)"
    return f"batch {src['batch_size']}" + "".join(f", {k}={v}" for k, v in src["add_config"].items())


def row(res: dict[str, Any]) -> list[str]:
    """The markdown cells of one run (blank where a part did not run)."""
    env, lat, ev = res["env"], res.get("latency"), res.get("eval")
    cells = [env["utc"], f"`{env['rev']}`", env["machine"], env["cpu"], str(env["nproc"]), f"{env['load1']:.2f}"]
    if lat:
        e = lat["e2e_ms"]
        cells += [f"{lat['rate']:,.0f}", res["rate_from"], _source_label(lat["source"]), f"{lat['offered_eps']:,.0f}",
                  f"{lat['probes_sent']:,}", f"{lat['matched']:,}", *(f"{e[k]:.1f}" for k in ("p50", "p95", "p99", "max")),
                  f"{lat['cores'].get('flow', float('nan')):.2f}"]
    else:
        cells += [""] * 11
    if ev:
        cells += [f"{ev['events']:,}", *(f"{ev['us_per_event'][str(n)]:.2f}" for n in EVAL_COUNTS), f"{ev['us_per_trigger']:.3f}"]
    else:
        cells += [""] * 5
    return cells


def record(res: dict[str, Any], out_dir: Path) -> None:
    """Append the run at the end of RESULTS.md (the section once) and to latency.jsonl."""
    append_section_row(out_dir, HEADING, SECTION, COLUMNS, row(res), "latency.jsonl", res)


# -- main


def _key_value(s: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    return k, v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=None, help="offered events/s (default: half the measured maximum)")
    rate.add_argument("--max-rate-from-run", action="store_true",
                      help="half the full stage's events/s of the newest run in results.jsonl, instead of measuring it")
    p.add_argument("--seconds", type=float, default=20.0, help="steady window, after a warm-up (default 20)")
    p.add_argument("--batch-size", type=int, default=KafkaConfig().batch_size, help="the flow's Kafka source batch size")
    p.add_argument("--add-config", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="librdkafka setting for the flow's Kafka clients (kafka.add_config), repeatable")
    p.add_argument("--linger-ms", type=float, default=LINGER_MS,
                   help=f"the benchmark producer's linger.ms (default {LINGER_MS:g}): on tansu, the broker's CPU per fetch "
                        "grows with the record batches a partition holds")
    p.add_argument("--via", choices=("kafka", "file"), default="kafka",
                   help="kafka (default): events and actions through the broker; file: through followed files, no "
                        "broker in the path (the maximum rate is still measured through Kafka)")
    p.add_argument("--follow-ms", type=float, default=FILE_POLL_S * 1000,
                   help=f"--via file: how often the flow looks for new lines at the end of the events file "
                        f"(source.file.tail; default {FILE_POLL_S * 1000:g} ms). Longer gives the flow fewer, larger "
                        f"batches: less CPU per event, up to that much more latency")
    p.add_argument("--only", choices=("latency", "eval"), default=None, help="run one of the two measurements")
    p.add_argument("--eval-events", type=int, default=EVAL_EVENTS, help=f"events for the trigger cost (default {EVAL_EVENTS:,})")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md / latency.jsonl")
    p.add_argument("--out-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the child: run the flow (JSON context)
    a = p.parse_args(argv)
    a.add_config = dict(a.add_config)
    return a


def latency_part(a: argparse.Namespace, res: dict[str, Any]) -> None:
    """Broker and Redis up, the rate decided, the latency run; fills ``res``."""
    redis_url, redis_server = bench_redis()
    prefix = f"nfbench-lat-{uuid.uuid4().hex[:8]}"
    try:
        with TansuBroker() as broker:
            if a.rate is not None:
                rate, res["rate_from"] = a.rate, "--rate"
            else:
                full_eps, how = latest_full_eps() if a.max_rate_from_run else measure_full_eps(broker, redis_url, prefix, a.seed)
                rate = full_eps / 2
                res["max_eps"], res["max_from"] = full_eps, how
                res["rate_from"] = "max/2, " + ("results.jsonl" if a.max_rate_from_run else "measured")
                print(f"maximum {full_eps:,.0f} events/s ({how}): offering {rate:,.0f} events/s", flush=True)
            # the reader thread stamps arrivals: let it take the GIL from the producer within 0.5 ms
            sys.setswitchinterval(0.0005)
            res["latency"] = run_latency(a, broker, redis_url, prefix, rate)
    finally:
        if redis_server is not None:
            redis_server.stop()


def report(res: dict[str, Any]) -> str:
    lines = []
    lat, ev = res.get("latency"), res.get("eval")
    if lat:
        lines.append(f"latency at {lat['rate']:,.0f} events/s offered ({res['rate_from']}; sent {lat['offered_eps']:,.0f}/s "
                     f"in a {lat['window_s']:.1f} s window after {lat['warmup_s']:.0f} s warm-up), source {_source_label(lat['source'])}"
                     + ("" if lat["source"].get("via") == "file" else f", producer linger {lat['producer_linger_ms']:g} ms") + ":")
        lines.append(f"  {'ms':<24} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'mean':>8}")
        for k, name in (("e2e_ms", "event → action"), ("kafka_in_ms", "  sent → parsed"),
                        ("flow_ms", "  parsed → fired"), ("out_ms", "  fired → read")):
            f = lat[k]
            lines.append(f"  {name:<24} " + " ".join(f"{f[q]:>8.1f}" for q in ("p50", "p95", "p99", "max", "mean")))
        lines.append(f"  probes {lat['probes_sent']:,} sent, {lat['matched']:,} matched ({lat['probe_share']:.1%} of events); "
                     f"median {lat['p50_first_quarter_ms']:.1f} ms in the window's first quarter, "
                     f"{lat['p50_last_quarter_ms']:.1f} ms in its last")
        lines.append("  CPU cores busy in the window: " + ", ".join(f"{k} {v:.2f}" for k, v in lat["cores"].items())
                     + f"; other actions {lat['other_actions']}")
        p99 = lat["e2e_ms"]["p99"]
        lines.append(f"  p99 {p99:.1f} ms (target <= 50 ms): {'met' if p99 <= 50 else 'NOT met'}")
    if ev:
        lines.append(f"trigger step CPU per event ({ev['events']:,} enriched events, best of {EVAL_REPEATS}): "
                     + ", ".join(f"{n} triggers {ev['us_per_event'][str(n)]:.2f} µs" for n in EVAL_COUNTS)
                     + f"; {ev['us_per_trigger']:.3f} µs per extra trigger")
        if ev["never_fired"]:
            lines.append(f"  triggers that never fired on this stream: {', '.join(ev['never_fired'])}")
    return "\n".join(lines)


def bench_line(res: dict[str, Any]) -> str:
    parts = []
    lat, ev = res.get("latency"), res.get("eval")
    if lat:
        parts += [f"p50_ms={lat['e2e_ms']['p50']:.1f}", f"p99_ms={lat['e2e_ms']['p99']:.1f}", f"rate={lat['rate']:.0f}"]
    if ev:
        parts += [f"eval_us_50={ev['us_per_event']['50']:.2f}", f"eval_us_0={ev['us_per_event']['0']:.2f}"]
    return "BENCH_LATENCY " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.serve is not None:
        spec = json.loads(a.serve)
        serve(LiveContext(spec["bootstrap"], spec["topic"], 0, Path(spec["workdir"]), spec["redis_url"], spec["prefix"],
                          spec["batch_size"], spec["add_config"], spec["via"], spec["follow_s"]))
        return 0
    env = environment()
    print(f"nudgeflow latency bench: rev {env['rev']}, {env['cpu']} x{env['nproc']}, load {env['load1']}", flush=True)
    res: dict[str, Any] = {"env": env, "seed": a.seed, "users": USERS}
    if a.only != "eval":
        latency_part(a, res)
    if a.only != "latency":
        dep = load_deployment(CONFIG)
        with tempfile.TemporaryDirectory(prefix="nfbench-eval-") as tmp:
            tf = trigger_file({"triggers": realistic_triggers(max(EVAL_COUNTS))}, Path(tmp) / "triggers.yaml", dep)
        dep.triggers = tf
        res["eval"] = eval_cost(dep, tf, a.eval_events, EVAL_USERS, a.seed)
    print()
    print(report(res))
    if not a.no_record:
        record(res, a.out_dir)
        print(f"recorded in {a.out_dir / 'RESULTS.md'} and {a.out_dir / 'latency.jsonl'}")
    print(bench_line(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
