"""The peer engine: the benchmark's jobs written with Quix Streams, run in their own virtualenv.

``benchmarks.run`` starts it like a stage (same arguments, same JSON line, measured by
``benchmarks.measure``) with the Python of ``benchmarks/peers/.venv-quix``::

    benchmarks/peers/.venv-quix/bin/python -m benchmarks.peers.quix_job quix --bootstrap … --topic … --events N \\
        --workdir /tmp/x --redis-url redis://127.0.0.1:6379/0 --prefix t

Two jobs, each an ``Application`` reading the topic from the beginning (consumer group of its own,
``auto_offset_reset="earliest"``) and stopping itself once it has seen every record:

- ``quix_bare``: JSON parse (orjson) → a per-user counter in Quix's state store (RocksDB), keyed by the
  Kafka message key (the harness produces every record keyed by user) — the like-for-like of ``bare``.
- ``quix``: a *representative subset* of nudgeflow's features, not all 62: per user, counts of all events,
  browse, add_to_cart and order over 1h/24h/7d (each window 120 sparse buckets with a running total, as
  ``operators/windows.py`` keeps them), order revenue over 7d, recency (previous event/browse/cart/order time
  and seconds since), the cart (items, value: add, remove and order keep it) — 27 features; state in RocksDB.
  Every changed user's features go to Redis as nudgeflow's ``json`` layout writes them (``HSET
  <prefix>:u:<user> f <json> _ts _v`` + ``EXPIRE``), coalesced per user by a Quix ``BatchingSink``: Quix
  flushes sinks at each checkpoint, which is every 1,000 messages here (``commit_every``; nudgeflow writes per
  source batch of 1,000). One absence-like trigger, cart abandonment (an add_to_cart and no order within
  30 min, cooldown 1 day), goes as JSON actions to ``<prefix>.actions``. Quix has no per-key event-time
  timers, so the absence is noticed at the user's next event after the 30 min, not when they pass.

Changelog topics are off (``use_changelog_topics=False``): the Bytewax stages run without recovery.
Records without a key (the simulator's bad records with no user id) are counted and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis
from quixstreams import Application, State
from quixstreams.models import TopicConfig
from quixstreams.sinks import BatchingSink, SinkBatch

from benchmarks.measure import measure, stage_arguments

HOUR_MS = 3_600_000
#: window name → width in ms; each kept as BUCKETS sparse buckets
WINDOWS = {"1h": HOUR_MS, "24h": 24 * HOUR_MS, "7d": 7 * 24 * HOUR_MS}
BUCKETS = 120
#: feature name → the event types it counts (None: any)
COUNTED = {"events": None, "views": "browse", "carts": "add_to_cart", "orders": "order"}
RECENCY = {"event": None, "browse": "browse", "cart": "add_to_cart", "order": "order"}
ABANDON_AFTER_MS = 30 * 60_000
COOLDOWN_MS = 24 * HOUR_MS
FEATURE_SET_VERSION = 1
TTL_S = 3600
#: tansu holds a consumer group's first JoinGroup for about half of ``session.timeout.ms`` (librdkafka's default
#: 45 s: 23 s before the first record; 6 s: 3.3 s; 1 s: 0.2 s, measured): a short session, so the peer starts
#: up about as fast as the Bytewax stages, which assign partitions without a group
GROUP_CONFIG = {"session.timeout.ms": 1000, "heartbeat.interval.ms": 300, "max.poll.interval.ms": 10000}


class _Run:
    """What the job saw, and the app to stop once it has seen every record."""

    def __init__(self, events: int):
        self.events = events
        self.n = 0
        self.users: set[bytes] = set()
        self.actions = 0
        self.app: Application | None = None
        #: perf_counter of the first and the last record
        self.first = 0.0
        self.last = 0.0

    def seen(self, value: bytes) -> bytes:
        self.last = time.perf_counter()
        if not self.n:
            self.first = self.last
        self.n += 1
        if self.n == self.events and self.app is not None:
            self.app.stop()  # the loop ends after this message; the checkpoint (sinks, offsets, state) commits
        return value


def _window_add(st: dict[str, Any], name: str, ts: int, amount: float) -> float:
    """Add to a bucketed window (``st[name]`` = [total, {bucket start: amount}]), drop expired buckets; the total."""
    width = WINDOWS[name.rsplit("_", 1)[1]]
    step = width // BUCKETS
    total, buckets = st.setdefault(name, [0, {}])
    edge = ts - width
    for b in [b for b in buckets if int(b) + step <= edge]:
        total -= buckets.pop(b)
    b = str(ts - ts % step)  # the state is JSON: keys are strings
    buckets[b] = buckets.get(b, 0) + amount
    total += amount
    st[name][0] = total
    return total


def _features(st: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """Update one user's state with an event; the user's features after it."""
    ts, etype, props = ev["ts"], ev.get("type"), ev.get("props") or {}
    out: dict[str, Any] = {}
    for name, etypes in COUNTED.items():
        for w in WINDOWS:
            key = f"{name}_{w}"
            if etypes is None or etype == etypes:
                out[key] = _window_add(st, key, ts, 1)
            else:
                out[key] = st[key][0] if key in st else 0
    amount = float(props.get("amount") or 0) if etype == "order" else 0.0
    out["revenue_7d"] = _window_add(st, "revenue_7d", ts, amount) if amount else st.get("revenue_7d", [0.0])[0]
    for name, rtype in RECENCY.items():
        last = st.get(f"last_{name}")
        out[f"since_last_{name}_s"] = -1 if last is None else (ts - last) // 1000
        if rtype is None or etype == rtype:
            st[f"last_{name}"] = ts
        out[f"last_{name}_ts"] = st.get(f"last_{name}")
    cart = st.setdefault("cart", {})
    if etype == "add_to_cart" and props.get("item_id") is not None:
        cart[str(props["item_id"])] = float(props.get("price") or 0) * int(props.get("quantity") or 1)
    elif etype == "remove_from_cart":
        cart.pop(str(props.get("item_id")), None)
    elif etype == "order":
        cart.clear()
    out["cart_items"] = len(cart)
    out["cart_value"] = round(sum(cart.values()), 2)
    return out


def _trigger(st: dict[str, Any], ev: dict[str, Any], user: str, features: dict[str, Any]) -> dict[str, Any] | None:
    """Cart abandonment, noticed at the user's next event: an add_to_cart, no order for 30 min, not in cooldown."""
    ts, etype = ev["ts"], ev.get("type")
    pending = st.get("cart_since")
    action = None
    if pending is not None and ts - pending >= ABANDON_AFTER_MS and ts - st.get("fired", -COOLDOWN_MS) >= COOLDOWN_MS:
        st["fired"] = ts
        st["cart_since"] = None
        action = {
            "trigger": "cart_abandonment", "user_id": user, "occurrence": pending, "event_ts": ts,
            "decided_ms": int(time.time() * 1000), "channel": "email",
            "payload": {"cart_value": features["cart_value"], "items": features["cart_items"]},
        }  # fmt: skip
    if etype == "add_to_cart" and st.get("cart_since") is None:
        st["cart_since"] = ts
    elif etype == "order":
        st["cart_since"] = None
    return action


class RedisFeatures(BatchingSink):
    """Each changed user's newest features, one ``HSET`` + ``EXPIRE`` per user per checkpoint, in one pipeline."""

    def __init__(self, url: str, prefix: str):
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.client: redis.Redis | None = None

    def setup(self) -> None:
        self.client = redis.Redis.from_url(self.url)

    def write(self, batch: SinkBatch) -> None:
        newest: dict[str, tuple[int, dict[str, Any]]] = {}
        for item in batch:
            user, ts, features = item.value
            prev = newest.get(user)
            if prev is None or ts >= prev[0]:
                newest[user] = (ts, features)
        assert self.client is not None
        pipe = self.client.pipeline(transaction=False)
        for user, (ts, features) in newest.items():
            key = f"{self.prefix}:u:{user}"
            pipe.hset(key, mapping={"f": orjson.dumps(features), "_ts": ts, "_v": FEATURE_SET_VERSION})
            pipe.expire(key, TTL_S)
        pipe.execute()


def _parse(value: bytes) -> dict[str, Any] | None:
    """orjson, as the Bytewax stages parse; records that are not JSON objects with an integer ``ts`` are dropped."""
    try:
        ev = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return ev if isinstance(ev, dict) and isinstance(ev.get("ts"), int) else None


def build(job: str, a: argparse.Namespace, run: _Run) -> Application:
    """The Quix application of one job, reading the topic from its beginning."""
    app = Application(
        broker_address=a.bootstrap,
        consumer_group=f"{a.prefix}-{job}",
        auto_offset_reset="earliest",
        state_dir=str(a.workdir / "state"),
        use_changelog_topics=False,
        commit_every=1000,
        auto_create_topics=True,
        consumer_extra_config=GROUP_CONFIG,
    )
    src = app.dataframe(app.topic(a.topic, value_deserializer="bytes", key_deserializer="bytes"))
    src = src.apply(run.seen)
    src = src.filter(lambda _v, key, _ts, _h: key is not None, metadata=True)
    src = src.apply(_parse).filter(lambda ev: ev is not None)
    if job == "quix_bare":

        def count(_ev: dict[str, Any], state: State) -> int:
            n = state.get("n", 0) + 1
            state.set("n", n)
            return n

        src.apply(count, stateful=True)
        return app

    actions_topic = app.topic(
        f"{a.prefix}.actions", value_serializer="json", key_serializer="str",
        config=TopicConfig(num_partitions=3, replication_factor=1),
    )  # fmt: skip

    def update(ev: dict[str, Any], key: bytes, _ts: int, _headers: Any, state: State) -> dict[str, Any]:
        user = key.decode()
        run.users.add(key)
        st = state.get("s") or {}
        features = _features(st, ev)
        action = _trigger(st, ev, user, features)
        state.set("s", st)
        return {"user": user, "ts": ev["ts"], "features": features, "action": action}

    out = src.apply(update, stateful=True, metadata=True)
    acts = out.filter(lambda r: r["action"] is not None).apply(lambda r: r["action"])
    acts = acts.update(lambda _r: setattr(run, "actions", run.actions + 1))
    acts.to_topic(actions_topic, key=lambda r: r["user_id"])
    out.apply(lambda r: (r["user"], r["ts"], r["features"])).sink(RedisFeatures(a.redis_url, a.prefix))
    return app


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _redis_report(url: str, prefix: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:u:*", count=1000))
        sizes = [client.memory_usage(k) or 0 for k in keys[:200]]
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    return {"redis_users": len(keys), "redis_bytes_per_user": sum(sizes) / len(sizes) if sizes else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.quix_job", description=__doc__.splitlines()[0])
    p.add_argument("job", choices=["quix", "quix_bare"])
    stage_arguments(p)
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    run = _Run(a.events)
    t = time.perf_counter()
    app = build(a.job, a, run)
    run.app = app
    build_s = time.perf_counter() - t
    res, w0 = measure(a.events, app.run)
    res = {"stage": a.job, **res, "build_s": build_s, "first_record_s": run.first - w0, "last_record_s": run.last - w0}
    state_bytes = _dir_bytes(a.workdir / "state")
    res["state_disk_bytes"] = state_bytes
    if a.job == "quix":
        res |= _redis_report(a.redis_url, a.prefix)
        res["kafka_actions"] = run.actions
        res["state_users"] = len(run.users)
        if run.users:
            res["state_bytes_per_user"] = state_bytes / len(run.users)
            res["state_mb_per_100k_users"] = state_bytes / len(run.users) * 100_000 / 1e6
    res["consumed"] = run.n
    res["ok"] = run.n == a.events
    res["pid"] = os.getpid()
    shutil.rmtree(a.workdir / "state", ignore_errors=True)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
