"""The one place Redis clients are made: a single server or a Redis Cluster, chosen by the URL.

``redis://`` (or ``rediss://``) is one server, ``redis+cluster://host:port`` (``rediss+cluster://``) a
Redis Cluster reached through any of its nodes: redis-py's ``RedisCluster`` finds the others and routes
each command to the node holding its key's hash slot. Every connector takes its client from
:func:`redis_client`, so the choice is configuration only.

What differs under a cluster is kept here too: a Lua script may only touch keys of one slot (callers
hash-tag them, ``{user}``), and a multi-key read is split by slot (:func:`mget`). Scripts sent in
pipelines go as plain ``EVALSHA`` and are loaded on every node when one answers NOSCRIPT
(:class:`Scripts`), on a cluster and a single server alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import redis
from hiredis import pack_command
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError

from connectors.redis_retry import until_redis_answers

log = logging.getLogger(__name__)

Client: TypeAlias = "redis.Redis | RedisCluster"
Pipeline: TypeAlias = "redis.client.Pipeline | redis.cluster.ClusterPipeline"

CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster.

    >>> is_cluster("redis+cluster://10.0.0.5:7000"), is_cluster("redis://127.0.0.1:6379/0")
    (True, False)
    """
    return url.startswith(tuple(CLUSTER_SCHEMES))


def _cluster(url: str, **kwargs: Any) -> RedisCluster:
    for scheme, plain in CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            url = plain + url[len(scheme):]
    try:
        return RedisCluster.from_url(url, **kwargs)
    except RedisClusterException as e:  # no node answered: the same as a lost connection
        raise redis.ConnectionError(str(e)) from e


def redis_client(url: str, wait: bool = True, **kwargs: Any) -> Client:
    """A client for ``url`` (``kwargs`` go to redis-py: ``decode_responses``, timeouts …).

    A single server's client connects on first use; a cluster's asks a node for the slot map at once,
    and (``wait``) waits for the cluster to answer as every Redis write does (:mod:`connectors.redis_retry`).
    """
    if not is_cluster(url):
        return redis.Redis.from_url(url, **kwargs)
    if not wait:
        return _cluster(url, **kwargs)
    return until_redis_answers("connecting to the Redis Cluster", lambda: _cluster(url, **kwargs))


def mget(client: Client, keys: Sequence[str]) -> list[Any]:
    """``MGET`` of keys in any slots: one command on a single server, one per node under a cluster."""
    if isinstance(client, RedisCluster):
        return client.mget_nonatomic(keys)
    return client.mget(keys)


Call: TypeAlias = tuple[Script, Sequence[str], Sequence[Any]]
"""A script call: the script, its keys (one slot under a cluster) and its arguments."""


class Scripts:
    """The Lua scripts one connector runs, and running them in pipelines.

    Every script is loaded on every node (one server, or each node of a cluster) at once whenever a node
    answers NOSCRIPT (the first call, or it restarted, a replica took over, a node joined): a node then
    has all of them or none, and a pipeline's calls on a node without them all fail, none runs, and
    they are sent again in their order. Calls go as plain ``EVALSHA``: a redis-py pipeline given
    ``Script`` objects asks ``SCRIPT EXISTS`` before every execution, a second round trip per batch
    (the guards' one per source batch), and a cluster pipeline refuses them anyway.
    """

    def __init__(self, client: Client, *sources: str):
        self.client = client
        self.registered = [client.register_script(source) for source in sources]
        #: whether a call ran yet: a node without the scripts after that lost them (worth a log line)
        self.ran = False

    def load(self) -> None:
        for script in self.registered:
            self.client.script_load(script.script)

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Run script calls in one pipeline, in order (per node, under a cluster), and return their results."""
        out = self._send(calls)
        missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
        if missing:
            if self.ran:
                log.info("a Redis node lost its scripts: loading them again")
            self.load()
            for i, r in zip(missing, self._send([calls[i] for i in missing])):
                out[i] = r
        self.ran = True
        errors = [r for r in out if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return out

    def _send(self, calls: Sequence[Call]) -> list[Any]:
        return send_commands(self.client, [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls])


def flat(mapping: Mapping[Any, Any]) -> list[Any]:
    """``{f: v, …}`` as the arguments ``[f, v, …]`` of ``HSET`` or ``XADD``.

    >>> flat({"a": 1, "b": "x"})
    ['a', 1, 'b', 'x']
    """
    return [x for kv in mapping.items() for x in kv]


def send_commands(client: Client, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Commands in one round trip, their replies in order, an error reply in its place as an exception:
    :func:`send_packed` on a single server, a redis-py pipeline under a cluster (which routes each command
    to its key's node, and applies redis-py's response callbacks). Callers read errors, not values."""
    if isinstance(client, RedisCluster):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)
    return send_packed(client, commands)


def send_packed(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Commands to one server in one write and one round trip, their replies in order as the server gives
    them (no redis-py response callbacks: ``SET`` answers ``b"OK"``), an error reply in its place as an
    exception, as ``pipeline().execute(raise_on_error=False)`` gives it.

    What a redis-py pipeline does, without its cost per argument: it encodes each argument in Python
    (~1.5 µs each; a guard candidate has 17) before hiredis packs them, and builds and resets a pipeline
    object per call; hiredis packs ``str``, ``bytes``, ``int`` and ``float`` itself, to the same bytes. No
    ``bool``: Redis has none (redis-py refuses it; callers send ``int``). A connection that fails mid-way is
    dropped, not returned to the pool with replies unread.

    >>> pack_command(("SET", "k", 1.5)).split()
    [b'*3', b'$3', b'SET', b'$1', b'k', b'$3', b'1.5']
    """
    packed = b"".join(map(pack_command, commands))
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed])
        out: list[Any] = []
        for _ in commands:
            try:
                out.append(conn.read_response())
            except ResponseError as e:
                out.append(e)
        return out
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
