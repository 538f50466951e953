"""Kafka in and out through Bytewax's own connectors, configured from :class:`KafkaConfig`.

Input partitions are Kafka partitions (the unit of parallelism). Consumer
errors do not stop the flow: they become dead letters with reason
``kafka_error``. Dead letters keep the original bytes as the message value and
carry reason, detail and position in headers, the convention Kafka Connect uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson
from bytewax.connectors.kafka import KafkaError, KafkaSink, KafkaSinkMessage, KafkaSource, KafkaSourceMessage

from nudgeflow.events import ID_FIELDS, Action, DeadLetter
from nudgeflow.settings import KafkaConfig
from operators.parse import Raw, wall_ms

_OFFSETS = {"beginning": -2, "end": -1}  # librdkafka's OFFSET_BEGINNING / OFFSET_END


def source(cfg: KafkaConfig, stats_interval: float = 0.0) -> KafkaSource:
    """``stats_interval`` (seconds, 0: off): librdkafka statistics, from which Bytewax sets its
    ``bytewax_kafka_consumer_lag`` gauge per partition (``connectors/metrics.py`` serves it)."""
    stats = {"statistics.interval.ms": str(int(stats_interval * 1000))} if stats_interval else {}
    return KafkaSource(
        cfg.brokers,
        cfg.input_topics,
        tail=cfg.tail,
        starting_offset=_OFFSETS[cfg.starting_offset],
        add_config=stats | dict(cfg.add_config),
        batch_size=cfg.batch_size,
        raise_on_errors=False,
    )


def sink(cfg: KafkaConfig, topic: str) -> KafkaSink:
    return KafkaSink(cfg.brokers, topic, add_config=dict(cfg.add_config))


def raw_records(batch: Iterable[KafkaSourceMessage | KafkaError]) -> Iterator[Raw | DeadLetter]:
    """Kafka messages as ``(topic:partition:offset, value)``; consumer errors as dead letters."""
    for m in batch:
        if type(m) is KafkaSourceMessage:
            yield (f"{m.topic}:{m.partition}:{m.offset}", m.value)
        else:
            msg = m.msg
            yield DeadLetter("kafka_error", str(m.err)[:200], msg.value or b"", f"{msg.topic}:{msg.partition}:{msg.offset}", wall_ms())


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
