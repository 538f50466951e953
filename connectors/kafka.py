"""Kafka in and out, configured from :class:`KafkaConfig`, tuned for event→action latency.

Input partitions are Kafka partitions (the unit of parallelism, offsets in
Bytewax's recovery snapshots), read through one consumer per worker
(:class:`Source`). Outputs are flow steps (:class:`KafkaOut`) that produce
without waiting per batch and flush when Bytewax ends an epoch. Neither stops
the flow on Kafka errors: a consumer error becomes a dead letter
``kafka_error``, a message Kafka would not take one ``kafka_failed``. Dead
letters keep the original bytes as the message value and carry reason, detail
and position in headers, the convention Kafka Connect uses.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import orjson
from bytewax.connectors.kafka import BYTEWAX_CONSUMER_LAG_GAUGE, KafkaSinkMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import Gauge

from nudgeflow.events import ID_FIELDS, Action, DeadLetter
from nudgeflow.settings import KafkaConfig
from operators.parse import Raw, wall_ms
from operators.shards import shard_of

log = logging.getLogger(__name__)

_OFFSETS = {"beginning": -2, "end": -1}  # librdkafka's OFFSET_BEGINNING / OFFSET_END


#: librdkafka settings of the source's consumer unless ``kafka.add_config`` sets them. Kafka answers a fetch
#: as soon as ``fetch.min.bytes`` (1) are there; tansu always waits about half of ``fetch.wait.max.ms``
#: (``benchmarks/README.md``, latency), so librdkafka's 500 ms put a quarter of a second between a shopper's
#: event and the flow. Prefetching stops at ``queued.min.messages`` per partition (librdkafka's 100,000
#: held about 30 MB of events per partition for no gain over a few source batches) and resumes after
#: ``fetch.queue.backoff.ms`` (1 s by default: reading a backlog then stalled most of the time).
SOURCE_DEFAULTS = {"fetch.wait.max.ms": "20", "queued.min.messages": "10000", "fetch.queue.backoff.ms": "10"}

TopicPart = tuple[str, int]


class _SharedConsumer:
    """One consumer for every partition a worker reads. Bytewax's ``KafkaSource`` opens one per partition,
    each sending its own fetches, and waits up to 1 ms in every partition's poll, data waiting on another
    partition or not. Here a worker sends one fetch per broker for all its partitions and a poll never
    waits (Bytewax itself pauses 1 ms after an empty batch). Messages of the other partitions wait in
    memory for their partition's turn, a batch at most."""

    def __init__(self, config: dict[str, Any], batch_size: int):
        self.consumer = Consumer(config)
        self.batch_size = batch_size
        self.buffers: dict[TopicPart, deque[Message]] = {}
        #: partitions at their end (``tail: false``): later messages of theirs are dropped, unread
        self.ended: set[TopicPart] = set()

    def assign(self, tp: TopicPart, offset: int) -> None:
        self.buffers[tp] = deque()
        self.consumer.incremental_assign([TopicPartition(tp[0], tp[1], offset)])

    def unassign(self, tp: TopicPart) -> bool:
        """Stop reading a partition; True when it was the last (the consumer is closed then)."""
        del self.buffers[tp]
        if not self.buffers:
            self.consumer.close()
            return True
        self.consumer.incremental_unassign([TopicPartition(tp[0], tp[1])])
        return False

    def take(self, tp: TopicPart) -> list[Message]:
        """Up to a batch of one partition's messages, fetched from librdkafka's queue (never waiting) when
        none are buffered. An error of no partition (all brokers down) goes to the partition that asked."""
        buf = self.buffers[tp]
        if not buf and sum(map(len, self.buffers.values())) < self.batch_size:
            for m in self.consumer.consume(self.batch_size, 0):
                at = (m.topic(), m.partition())
                err = m.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    self.ended.add(at)
                elif at not in self.ended:
                    self.buffers.get(at, buf).append(m)
        return [buf.popleft() for _ in range(min(len(buf), self.batch_size))]


class _Partition(StatefulSourcePartition[Raw | DeadLetter, int]):
    """A Kafka partition read through its worker's shared consumer, handing over each record as
    ``(topic:partition:offset, value)``, the parser's input, rather than Bytewax's ``KafkaSourceMessage``
    (building it, eight accessor calls, cost more per event than parsing the JSON). Consumer errors become
    dead letters ``kafka_error`` with the message's bytes. The snapshot is the next offset to read.
    ``lag``: its consumer-lag gauge, when statistics are on."""

    def __init__(self, shared: _SharedConsumer, tp: TopicPart, offset: int, release: Callable[[], None],
                 lag: Gauge | None):
        self.shared, self.tp, self.offset, self.release, self.lag = shared, tp, offset, release, lag
        shared.assign(tp, offset)

    def next_batch(self) -> list[Raw | DeadLetter]:
        msgs = self.shared.take(self.tp)
        if not msgs and self.tp in self.shared.ended:
            if self.lag is not None:  # read to its end, maybe before any statistics came
                self.lag.set(0)
            raise StopIteration()
        out: list[Raw | DeadLetter] = []
        last = -1
        for m in msgs:
            err = m.error()
            pos = f"{m.topic()}:{m.partition()}:{m.offset()}"
            if err is None:
                last = m.offset()
                out.append((pos, m.value()))
            else:
                last = max(last, m.offset() or -1)
                out.append(DeadLetter("kafka_error", str(err)[:200], m.value() or b"", pos, wall_ms()))
        if last >= 0:
            self.offset = last + 1  # resume after it
        return out

    def snapshot(self) -> int:
        return self.offset

    def close(self) -> None:
        self.release()


class Source(FixedPartitionedSource[Raw | DeadLetter, int]):
    """Kafka partitions as Bytewax input partitions (recovery keeps each one's offset), read through one
    consumer per worker (:class:`_SharedConsumer`). With ``statistics.interval.ms`` set, librdkafka's
    statistics set Bytewax's ``bytewax_kafka_consumer_lag`` gauge per partition."""

    def __init__(self, brokers: list[str], topics: list[str], tail: bool, starting_offset: int,
                 config: dict[str, str], batch_size: int):
        self.brokers, self.topics, self.tail = brokers, topics, tail
        self.starting_offset, self.config, self.batch_size = starting_offset, config, batch_size
        self._lock = threading.Lock()
        #: per step and worker thread (Bytewax builds and polls a worker's partitions on its thread)
        self._shared: dict[tuple[str, int], tuple[_SharedConsumer, dict[TopicPart, _Partition]]] = {}

    def list_parts(self) -> list[str]:
        admin = AdminClient({"bootstrap.servers": ",".join(self.brokers)} | self.config)
        parts: list[str] = []
        for topic in self.topics:
            meta = admin.list_topics(topic).topics[topic]
            if meta.error is not None:
                raise RuntimeError(f"cannot list the partitions of Kafka topic {topic!r}: {meta.error.str()}")
            parts += [f"{i}-{topic}" for i in meta.partitions]
        return parts

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Partition:
        idx, topic = for_part.split("-", 1)
        tp = (topic, int(idx))
        key = (step_id, threading.get_ident())
        with self._lock:
            if key not in self._shared:
                parts: dict[TopicPart, _Partition] = {}
                config: dict[str, Any] = {
                    # offsets live in Bytewax's recovery store, not in a consumer group
                    "group.id": "BYTEWAX_IGNORED", "enable.auto.commit": "false",
                    "bootstrap.servers": ",".join(self.brokers), "enable.partition.eof": str(not self.tail),
                } | SOURCE_DEFAULTS | self.config
                if "statistics.interval.ms" in config:
                    config["stats_cb"] = partial(_report_lag, parts)
                self._shared[key] = (_SharedConsumer(config, self.batch_size), parts)
            shared, parts = self._shared[key]
            offset = self.starting_offset if resume_state is None else resume_state
            lag = BYTEWAX_CONSUMER_LAG_GAUGE.labels(step_id=step_id, topic=topic, partition=idx) \
                if "statistics.interval.ms" in self.config else None
            parts[tp] = _Partition(shared, tp, offset, partial(self._release, key, tp), lag)
            return parts[tp]

    def _release(self, key: tuple[str, int], tp: TopicPart) -> None:
        with self._lock:
            shared, parts = self._shared[key]
            del parts[tp]
            if shared.unassign(tp):
                del self._shared[key]


def _report_lag(parts: dict[TopicPart, _Partition], stats: str) -> None:
    """librdkafka statistics to Bytewax's lag gauge: the partition's last offset less the next one to read."""
    topics = orjson.loads(stats).get("topics", {})
    for (topic, idx), part in list(parts.items()):
        p = topics.get(topic, {}).get("partitions", {}).get(str(idx))
        if p is not None and part.offset >= 0 and part.lag is not None:
            part.lag.set(p["ls_offset"] - part.offset)


def source(cfg: KafkaConfig, stats_interval: float = 0.0) -> Source:
    """Raw records ``(position, value)`` (and ``kafka_error`` dead letters) from the configured topics.

    ``stats_interval`` (seconds, 0: off): librdkafka statistics for the ``bytewax_kafka_consumer_lag``
    gauge per partition (``connectors/metrics.py`` serves it)."""
    stats = {"statistics.interval.ms": str(int(stats_interval * 1000))} if stats_interval else {}
    return Source(cfg.brokers, cfg.input_topics, cfg.tail, _OFFSETS[cfg.starting_offset],
                  stats | dict(cfg.add_config), cfg.batch_size)


#: librdkafka settings of the sinks' producer unless ``kafka.add_config`` sets them: a flow batch's messages
#: are produced together and go out as one request anyway, so waiting 5 ms (the default) for more only adds
#: to every action's latency
SINK_DEFAULTS = {"linger.ms": "1"}
#: how soon a step with messages in flight looks again for failed deliveries when no new batch comes
RECHECK = timedelta(milliseconds=100)
FAILED = "kafka_failed"

Out = KafkaSinkMessage[bytes | None, bytes]


class KafkaOut:
    """A Kafka topic as a flow step that never waits on the broker per batch, and never loses a message.

    Bytewax's ``KafkaSink`` flushed after every batch: the worker waited a produce round trip each time,
    and a failed delivery was dropped silently. Here messages are produced and the worker moves on; the
    producer is flushed when Bytewax snapshots the step at the end of each epoch, so an epoch is never
    recorded as done (recovery) with its messages unacknowledged, and at exit. A message Kafka did not
    take (``message.timeout.ms`` passed, or refused) comes out of the step as a dead letter
    ``kafka_failed`` with the message's bytes. Items are keyed by the message key's shard, the key the
    trigger step ran under, so no item changes worker; one producer per process serves every key."""

    def __init__(self, cfg: KafkaConfig, topic: str, shards: Sequence[str]):
        """``shards``: the shard names of the flow's keyed steps (:mod:`operators.shards`)."""
        self.config = {"bootstrap.servers": ",".join(cfg.brokers)} | SINK_DEFAULTS | dict(cfg.add_config)
        self.topic, self.shards = topic, shards
        #: weak: the producer lives as long as the run's step logics (Bytewax drops them when a run ends)
        self._producer: weakref.ref[_Producer] = lambda: None  # type: ignore[assignment]
        self._lock = threading.Lock()

    def keyed(self, batch: list[Out]) -> list[tuple[str, Out]]:
        """Messages with their step key: the shard of the message key (the user), of ``b""`` without one."""
        shards = self.shards
        return [(shard_of(m.key or b"", shards), m) for m in batch]

    def producer(self) -> Producer:
        with self._lock:
            p = self._producer()
            if p is None:
                p = _Producer(self.config)
                self._producer = weakref.ref(p)
                atexit.register(_flush, self._producer)  # a stopped service sends what it still holds
            return p

    def logic(self, resume: list[DeadLetter] | None) -> _Produce:
        return _Produce(self.producer(), self.topic, resume or [])


class _Producer(Producer):
    """librdkafka's producer, weakly referable."""


def _flush(ref: weakref.ref[_Producer]) -> None:
    if (p := ref()) is not None:
        p.flush(10.0)


class _Produce(StatefulBatchLogic[Out, DeadLetter, list[DeadLetter]]):
    """One key's part of :class:`KafkaOut`; its state is the dead letters not yet emitted."""

    def __init__(self, producer: Producer, topic: str, failed: list[DeadLetter]):
        self.producer, self.topic, self.failed = producer, topic, failed

    def on_batch(self, values: list[Out]) -> tuple[list[DeadLetter], bool]:
        produce = self.producer.produce
        for m in values:
            while True:
                try:
                    produce(self.topic, m.value, m.key, headers=m.headers, on_delivery=self._delivered)
                    break
                except BufferError:  # librdkafka's queue is full: the broker is behind, wait for room
                    self.producer.poll(0.1)
                except KafkaException as e:  # refused before sending (too large, unknown topic …)
                    self.failed.append(DeadLetter(FAILED, str(e)[:200], m.value, f"kafka:{self.topic}", wall_ms()))
                    break
        self.producer.poll(0)  # delivery reports so far
        return self._emit()

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed.append(DeadLetter(FAILED, str(err)[:200], msg.value() or b"", f"kafka:{self.topic}", wall_ms()))

    def _emit(self) -> tuple[list[DeadLetter], bool]:
        if not self.failed:
            return [], False
        out, self.failed = self.failed, []
        log.error("kafka: %d messages to %s not delivered (%s)", len(out), self.topic, out[0].detail)
        return out, False

    def on_notify(self) -> tuple[list[DeadLetter], bool]:
        self.producer.poll(0)
        return self._emit()

    def on_eof(self) -> tuple[list[DeadLetter], bool]:
        self.producer.flush()
        return self._emit()

    def notify_at(self) -> datetime | None:
        return datetime.now(timezone.utc) + RECHECK if self.failed or len(self.producer) else None

    def snapshot(self) -> list[DeadLetter]:
        """Called by Bytewax at the end of each epoch this key produced in, before recovery records the
        epoch: everything produced so far is acknowledged or failed when it returns."""
        self.producer.flush()
        return list(self.failed)


def dlq_message(d: DeadLetter) -> KafkaSinkMessage[bytes | None, bytes]:
    headers = [
        ("reason", d.reason.encode()),
        ("detail", d.detail.encode()),
        ("position", d.position.encode()),
        ("ingest_ms", str(d.ingest_ms).encode()),
    ]
    return KafkaSinkMessage(key=None, value=d.raw or b"", headers=headers)


def action_message(a: Action) -> KafkaSinkMessage[bytes, bytes]:
    """Keyed by user so one shopper's actions stay in order on one partition."""
    return KafkaSinkMessage(key=a.user_id.encode(), value=orjson.dumps(a.to_dict()))


_KEY_FIELDS = ("user_id", *ID_FIELDS)


def user_keyed(records: Iterable[bytes]) -> Iterator[tuple[bytes | None, bytes]]:
    """Key records by their ``user_id`` (else the anonymous id they carry) so one shopper's events stay in
    order on one partition (the identity step joins a shopper's anonymous and known partitions).

    A record whose ids cannot be read goes unkeyed; the flow will refuse it with a reason.

    >>> list(user_keyed([b'{"user_id":"u1"}', b'{"device_id":"d1"}', b"{broken"]))
    [(b'u1', b'{"user_id":"u1"}'), (b'd1', b'{"device_id":"d1"}'), (None, b'{broken')]
    """
    for raw in records:
        try:
            d = orjson.loads(raw)
            uid = next((v for f in _KEY_FIELDS if isinstance(v := d.get(f), str)), None)
        except (orjson.JSONDecodeError, AttributeError):
            uid = None
        yield (uid.encode() if uid is not None else None, raw)
