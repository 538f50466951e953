"""Prometheus metrics and the health endpoints of a running flow, counted per batch, never per event.

``metrics.port`` serves, from one small threaded HTTP server per process:

- ``/metrics``: the flow's metrics (below) and the process-wide registry: Bytewax's
  ``bytewax_kafka_consumer_lag{step_id,topic,partition}`` (high watermark minus the next offset to read,
  from librdkafka's statistics, which :func:`connectors.kafka.source` turns on for it) and
  prometheus-client's ``process_*``/``python_*`` figures;
- ``/healthz``: 200 while the process serves at all (liveness);
- ``/readyz``: 200 when Redis answers and the ClickHouse writer is not holding the flow back (its buffer
  below ``max_buffer_rows``), else 503 with what is wrong (readiness).

Counting never happens per event: the parse step is wrapped so each batch adds its counts by type with
one ``inc`` per type, dead letters and decisions are counted by sinks (one call per batch, nothing
downstream waits on them), and what connectors already count (ClickHouse rows and failures, Redis
retries, the scorer's faults and versions) is read when Prometheus scrapes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from connectors.redis_client import Client, redis_client
from connectors.webhook import REASON as WEBHOOK_FAILED
from nudgeflow.events import Action, DeadLetter, Decision, Event
from nudgeflow.logs import tag_worker

if TYPE_CHECKING:
    from connectors.clickhouse import ClickHouseWriter
    from operators.features import FeatureLogic
    from operators.models import LearnerLogic, Scorer

log = logging.getLogger(__name__)

#: seconds; event-time latency of a replay of history lands in +Inf
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: seconds; a young collection of the flow's heap takes milliseconds, a full one hundreds of them
GC_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

_TYPE, _TS = attrgetter("type"), attrgetter("ts")


class Failing(Protocol):
    """A connector that counts its failed attempts (each is retried: nothing is lost, the flow waits)."""

    failures: int


class BatchHistogram:
    """A labelled histogram fed a whole batch of values under one lock: prometheus-client's ``observe``
    takes one value (and one lock) per call, which on the per-decision path is what we avoid."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]):
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe_many(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        counts, total = [0] * (len(self.buckets) + 1), 0.0
        for v in values:
            counts[bisect_left(self.buckets, v)] += 1  # le: the first bound at or above v
            total += v
        with self._lock:
            have, acc = self._series.setdefault(labels, ([0] * len(counts), [0.0]))
            for i, n in enumerate(counts):
                have[i] += n
            acc[0] += total

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        with self._lock:
            series = [(k, list(c), s[0]) for k, (c, s) in self._series.items()]
        for labels, counts, total in series:
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, self.buckets), "+Inf"), counts):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, total)
        yield family


class _Meter(DynamicSink[Any]):
    """A sink that only counts: a branch of the stream, so the flow never waits on it."""

    def __init__(self, count: Callable[[list[Any]], None]):
        self.count = count

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MeterPartition:
        tag_worker(worker_index)  # built on the worker's own thread: its log lines carry the index
        return _MeterPartition(self.count)


class _MeterPartition(StatelessSinkPartition[Any]):
    def __init__(self, count: Callable[[list[Any]], None]):
        self.count = count

    def write_batch(self, items: list[Any]) -> None:
        self.count(items)


class FlowMetrics:
    """The metrics of one built flow, in a registry of its own (two flows built in one process, as in
    tests, never add up), served with the process-wide registry by :meth:`serve`."""

    def __init__(self, redis_url: str, writer: ClickHouseWriter | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("nudgeflow_events", "Events parsed, by type (before dedup and lateness)", ["type"], registry=r)
        self.dead_letters = Counter("nudgeflow_dead_letters", "Refused records, by reason", ["reason"], registry=r)
        self.decisions = Counter("nudgeflow_decisions", "Candidate actions decided, by trigger, outcome and reason",
                                 ["trigger", "outcome", "reason"], registry=r)
        self.batch_size = Histogram("nudgeflow_batch_size", "Items per batch, by step", ["step"], registry=r,
                                    buckets=BATCH_BUCKETS)
        self.latency = BatchHistogram(
            "nudgeflow_action_latency_seconds",
            "Fired actions: decision time minus event time (since=event) or minus ingest time (since=ingest)",
            ("trigger", "since"), LATENCY_BUCKETS,
        )
        # every worker of the process stops while Python's collector runs: its pauses are part of the
        # flow's latency (python_gc_* counts collections, not how long they took)
        self.gc_pause = Histogram("nudgeflow_gc_pause_seconds", "Pauses of Python's garbage collector, by generation",
                                  ["generation"], registry=r, buckets=GC_BUCKETS)
        self._gc_started = 0.0
        gc.callbacks.append(self._gc_timed)
        r.register(self.latency)
        r.register(self)  # the readings below, taken at scrape time
        r.register(REGISTRY)  # Bytewax's Kafka consumer lag, process and GC figures
        self.redis_url = redis_url
        self.writer = writer
        #: connectors whose ``failures`` are read as ``sink_errors_total{sink=<name>}``
        self.failing: dict[str, list[Failing]] = {}
        self.scorer: Scorer | None = None
        #: this process's learners (one per model it learns), for their errors
        self.learner_logics: list[LearnerLogic] = []
        #: this process's feature-step logics, whose state sizes are read as ``feature_users{state}``
        self.feature_logics: list[FeatureLogic] = []
        #: the newest event time parsed (ms); workers race on it, which can only leave it briefly older
        self.newest_ts = 0
        self._webhook_failures = 0
        self._lock = threading.Lock()
        self._redis: Client | None = None
        self.server: WSGIServer | None = None

    # -- counting, once per batch

    def counting(self, parse: Callable[[list[Any]], list[Event | DeadLetter]]) -> Callable[[list[Any]], list[Event | DeadLetter]]:
        """``parse`` (a ``flat_map_batch`` function) also counting its batches and events by type."""
        observe, events = self.batch_size.labels("parse").observe, self.events

        def counted(batch: list[Any]) -> list[Event | DeadLetter]:
            out = parse(batch)
            observe(len(batch))
            accepted = [e for e in out if type(e) is Event]
            if accepted:
                for t, n in Tally(map(_TYPE, accepted)).items():
                    events.labels(t).inc(n)
                newest = max(map(_TS, accepted))
                if newest > self.newest_ts:
                    self.newest_ts = newest
            return out

        return counted

    def dead_letter_sink(self) -> DynamicSink[DeadLetter]:
        return _Meter(self._count_dead)

    def decision_sink(self) -> DynamicSink[Decision]:
        return _Meter(self._count_decisions)

    def _count_dead(self, items: list[DeadLetter]) -> None:
        for reason, n in Tally(d.reason for d in items).items():
            self.dead_letters.labels(reason).inc(n)
            if reason == WEBHOOK_FAILED:
                with self._lock:
                    self._webhook_failures += n

    def _count_decisions(self, items: list[Decision]) -> None:
        self.batch_size.labels("decisions").observe(len(items))
        for (trigger, outcome, reason), n in Tally((d.action.trigger_id, d.outcome, d.reason) for d in items).items():
            self.decisions.labels(trigger, outcome, reason).inc(n)
        fired: dict[str, list[Action]] = {}
        for d in items:
            if d.outcome == "fired":
                fired.setdefault(d.action.trigger_id, []).append(d.action)
        for trigger, actions in fired.items():
            self.latency.observe_many((trigger, "event"), ((a.decided_ms - a.event_ts) / 1000 for a in actions))
            self.latency.observe_many((trigger, "ingest"), ((a.decided_ms - a.ingest_ms) / 1000 for a in actions))

    # -- readings, at scrape time

    def watch(self, sink: str, connector: Failing) -> None:
        """Report ``connector.failures`` as ``sink_errors_total{sink=...}`` (summed over connectors of a name)."""
        self.failing.setdefault(sink, []).append(connector)

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily("nudgeflow_sink_errors", "Failed attempts to write out (retried or dead-lettered)",
                                     labels=["sink"])
        for sink, connectors in self.failing.items():
            errors.add_metric([sink], sum(c.failures for c in connectors))
        errors.add_metric(["webhook"], self._webhook_failures)
        yield errors
        if self.newest_ts:
            yield GaugeMetricFamily("nudgeflow_event_lag_seconds", "Now minus the newest event time parsed",
                                    value=time.time() - self.newest_ts / 1000)
        if self.writer is not None:
            yield CounterMetricFamily("nudgeflow_clickhouse_rows_inserted", "Rows stored in ClickHouse",
                                      value=self.writer.inserted)
            yield GaugeMetricFamily("nudgeflow_clickhouse_buffered_rows", "Rows taken but not yet stored",
                                    value=self.writer.buffered)
        if self.feature_logics:
            states = [lg.state for lg in list(self.feature_logics)]
            users, compacted = sum(len(st.users) for st in states), sum(st.compacted for st in states)
            held = GaugeMetricFamily("nudgeflow_feature_users", "Shoppers held in the feature step's state: "
                                     "compacted (idle past features.compact_after, as of each shard's last "
                                     "sweep) or active (held as objects)", labels=["state"])
            held.add_metric(["active"], users - compacted)
            held.add_metric(["compacted"], compacted)
            yield held
            yield CounterMetricFamily("nudgeflow_idle_looks", "Looks taken at quiet shoppers (features.idle): idle "
                                      "events to the models and triggers", value=sum(st.looked for st in states))
        if self.scorer is not None:
            versions = GaugeMetricFamily("nudgeflow_model_version", "Model snapshot version scoring (0: the prior)",
                                         labels=["model"])
            for m in self.scorer.cfg.models:
                versions.add_metric([m.name], self.scorer.serving(m.name))
            yield versions
            yield CounterMetricFamily("nudgeflow_model_input_faults", "Model inputs missing or not numeric (scored as 0)",
                                      value=self.scorer.faults)
            yield CounterMetricFamily("nudgeflow_model_errors", "Scoring errors (the prior was used)",
                                      value=self.scorer.errors)
        learners = [lg.learner for lg in list(self.learner_logics) if lg.learner is not None]
        if learners:
            learn = CounterMetricFamily("nudgeflow_model_learn_errors", "Examples a model raised on while learning "
                                        "(skipped, not learned)", labels=["model"])
            for ln in learners:
                learn.add_metric([ln.d.name], ln.errors)
            yield learn

    # -- endpoints

    def problems(self) -> list[str]:
        """Why the flow is not ready; empty when it is."""
        out = []
        try:
            if self._redis is None:
                self._redis = redis_client(self.redis_url, wait=False, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._redis.ping()
        except redis.RedisError as e:
            out.append(f"redis: {type(e).__name__}")
        if self.writer is not None and self.writer.buffered >= self.writer.cfg.max_buffer_rows:
            out.append(f"clickhouse: {self.writer.buffered} rows waiting, the flow is held back")
        return out

    def serve(self, host: str, port: int) -> None:
        """Start the endpoints on a daemon thread (requests are answered on threads of their own)."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                problems: list[str] = []
            elif path == "/readyz":
                problems = self.problems()
            else:
                return metrics(environ, start_response)
            start_response("503 Service Unavailable" if problems else "200 OK", [("Content-Type", "text/plain")])
            return [("\n".join(problems) or "ok").encode() + b"\n"]

        self.server = make_server(host, port, app, _ThreadingServer, _QuietHandler)
        threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz and /readyz", host, self.server.server_port)

    def _gc_timed(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)

    def close(self) -> None:
        if self._gc_timed in gc.callbacks:
            gc.callbacks.remove(self._gc_timed)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self._redis is not None:
            self._redis.close()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds would drown the flow's own logs."""
