"""The peer engines' job, engine-free: what every peer (Quix Streams, Faust) computes per event, and its report.

Each peer module (``quix_job``, ``faust_job``) only wires this into its engine, so the peers run exactly the
same job and their figures compare with each other as well as with nudgeflow's stages. Standard library,
orjson and redis only: the peers run in their own virtualenvs, without Bytewax or nudgeflow.

The job, per user (keyed by the Kafka message key, which the harness sets to the user):

- *bare*: JSON parse (orjson) → a counter in the engine's state — the like-for-like of the ``bare`` stage.
- *full*: a *representative subset* of nudgeflow's features (23 of the 88 shipped): counts of all events, browse,
  add_to_cart and order over 1h/24h/7d (each window 120 sparse buckets with a running total, as
  ``operators/windows.py`` keeps them), order revenue over 7d, recency (previous event/browse/cart/order time
  and seconds since), the cart (items, value: add, remove and order keep it), in the engine's
  state. Every changed user's features go to Redis as nudgeflow's ``json`` layout writes them (``HSET
  <prefix>:u:<user> f <json> _ts _v`` + ``EXPIRE``), coalesced per user and written every 1,000 messages
  (nudgeflow writes per source batch of 1,000). One absence-like trigger, cart abandonment (an add_to_cart
  and no order within 30 min, cooldown 1 day), goes as JSON actions to ``<prefix>.actions``. Neither peer has
  per-key event-time timers, so the absence is noticed at the user's next event after the 30 min.

Records without a key (the simulator's bad records with no user id) are counted and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import redis

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
#: messages between two Redis writes of the changed users (a Quix checkpoint, a Faust flush)
FLUSH_EVERY = 1000


class Run:
    """What a job saw, and how to stop its engine once it has seen every record (``stop``, set by the peer)."""

    def __init__(self, events: int):
        self.events = events
        self.n = 0
        self.users: set[bytes] = set()
        self.actions = 0
        self.stop: Callable[[], None] = lambda: None
        #: the engine's state after the run in bytes (its store on disk, or what its changelog carries)
        self.state_bytes: Callable[[], int] = lambda: 0
        #: perf_counter of the first and the last record
        self.first = 0.0
        self.last = 0.0

    def seen(self, value: bytes) -> bytes:
        self.last = time.perf_counter()
        if not self.n:
            self.first = self.last
        self.n += 1
        if self.n == self.events:
            self.stop()
        return value


def window_add(st: dict[str, Any], name: str, ts: int, amount: float) -> float:
    """Add to a bucketed window (``st[name]`` = [total, {bucket start: amount}]), drop expired buckets; the total.

    >>> st = {}; window_add(st, "views_1h", 0, 1), window_add(st, "views_1h", 60_000, 1)
    (1, 2)
    >>> window_add(st, "views_1h", HOUR_MS + 1, 1)  # exact to a bucket (30 s) at the old edge: 0 is still in
    3
    >>> window_add(st, "views_1h", HOUR_MS + 30_000, 1)  # now its bucket has left the hour
    3
    """
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


def features(st: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """Update one user's state with an event; the user's features after it.

    >>> st = {}; f = features(st, {"ts": 0, "type": "add_to_cart", "props": {"item_id": 7, "price": 2.5, "quantity": 2}})
    >>> f["carts_24h"], f["cart_items"], f["cart_value"], f["since_last_event_s"], len(f)
    (1, 1, 5.0, -1, 23)
    >>> f = features(st, {"ts": 90_000, "type": "order", "props": {"amount": 5.0}})
    >>> f["orders_7d"], f["revenue_7d"], f["cart_items"], f["since_last_cart_s"]
    (1, 5.0, 0, 90)
    """
    ts, etype, props = ev["ts"], ev.get("type"), ev.get("props") or {}
    out: dict[str, Any] = {}
    for name, etypes in COUNTED.items():
        for w in WINDOWS:
            key = f"{name}_{w}"
            if etypes is None or etype == etypes:
                out[key] = window_add(st, key, ts, 1)
            else:
                out[key] = st[key][0] if key in st else 0
    amount = float(props.get("amount") or 0) if etype == "order" else 0.0
    out["revenue_7d"] = window_add(st, "revenue_7d", ts, amount) if amount else st.get("revenue_7d", [0.0])[0]
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


def trigger(st: dict[str, Any], ev: dict[str, Any], user: str, feats: dict[str, Any]) -> dict[str, Any] | None:
    """Cart abandonment, noticed at the user's next event: an add_to_cart, no order for 30 min, not in cooldown.

    >>> st, at = {}, lambda ts, t: trigger(st, {"ts": ts, "type": t}, "u1", {"cart_value": 5.0, "cart_items": 1})
    >>> at(0, "add_to_cart"), at(60_000, "browse")  # a minute later: not yet
    (None, None)
    >>> a = at(ABANDON_AFTER_MS, "browse"); (a["trigger"], a["occurrence"])
    ('cart_abandonment', 0)
    >>> at(ABANDON_AFTER_MS + 1, "add_to_cart"), at(3 * ABANDON_AFTER_MS, "browse")  # in the day's cooldown
    (None, None)
    """
    ts, etype = ev["ts"], ev.get("type")
    pending = st.get("cart_since")
    action = None
    if pending is not None and ts - pending >= ABANDON_AFTER_MS and ts - st.get("fired", -COOLDOWN_MS) >= COOLDOWN_MS:
        st["fired"] = ts
        st["cart_since"] = None
        action = {
            "trigger": "cart_abandonment", "user_id": user, "occurrence": pending, "event_ts": ts,
            "decided_ms": int(time.time() * 1000), "channel": "email",
            "payload": {"cart_value": feats["cart_value"], "items": feats["cart_items"]},
        }  # fmt: skip
    if etype == "add_to_cart" and st.get("cart_since") is None:
        st["cart_since"] = ts
    elif etype == "order":
        st["cart_since"] = None
    return action


def step(st: dict[str, Any], ev: dict[str, Any], user: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The whole per-event job on one user's state: the features after the event and an action, if one fired."""
    feats = features(st, ev)
    return feats, trigger(st, ev, user, feats)


def parse(value: bytes) -> dict[str, Any] | None:
    """orjson, as the Bytewax stages parse; records that are not JSON objects with an integer ``ts`` are dropped.

    >>> parse(b'{"ts": 1, "type": "browse"}'), parse(b'{"ts": "1"}'), parse(b'not json')
    ({'ts': 1, 'type': 'browse'}, None, None)
    """
    try:
        ev = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return ev if isinstance(ev, dict) and isinstance(ev.get("ts"), int) else None


def write_features(client: redis.Redis, prefix: str, items: Iterable[tuple[str, int, dict[str, Any]]]) -> None:
    """Each user's newest features of ``items`` (user, event time, features): one ``HSET`` + ``EXPIRE`` per user,
    in one pipeline."""
    newest: dict[str, tuple[int, dict[str, Any]]] = {}
    for user, ts, feats in items:
        prev = newest.get(user)
        if prev is None or ts >= prev[0]:
            newest[user] = (ts, feats)
    pipe = client.pipeline(transaction=False)
    for user, (ts, feats) in newest.items():
        key = f"{prefix}:u:{user}"
        pipe.hset(key, mapping={"f": orjson.dumps(feats), "_ts": ts, "_v": FEATURE_SET_VERSION})
        pipe.expire(key, TTL_S)
    pipe.execute()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def redis_report(url: str, prefix: str) -> dict[str, Any]:
    """Users the job wrote to Redis and the bytes of 200 of them; the keys are deleted after."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:u:*", count=1000))
        sizes = [client.memory_usage(k) or 0 for k in keys[:200]]
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    return {"redis_users": len(keys), "redis_bytes_per_user": sum(sizes) / len(sizes) if sizes else 0.0}


def main(
    argv: list[str] | None, prog: str, doc: str, jobs: list[str],
    start: Callable[[str, argparse.Namespace, Run], Callable[[], None]],
) -> int:
    """A peer's process (``prog``; ``doc``, its help): parse the stage arguments; ``start`` builds the job and
    returns what runs it until the run's ``stop``; time that as :func:`benchmarks.measure.measure` times
    nudgeflow's stages, and print the JSON line ``benchmarks.run`` reads. The harness removes the workdir."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("job", choices=jobs)
    stage_arguments(p)
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    run = Run(a.events)
    t = time.perf_counter()
    go = start(a.job, a, run)
    build_s = time.perf_counter() - t
    res, w0 = measure(a.events, go)
    res = {"stage": a.job, **res, "build_s": build_s, "first_record_s": run.first - w0, "last_record_s": run.last - w0}
    state = run.state_bytes()
    res["state_bytes"] = state
    if not a.job.endswith("_bare"):
        res |= redis_report(a.redis_url, a.prefix)
        res["kafka_actions"] = run.actions
        res["state_users"] = len(run.users)
        if run.users:
            res["state_bytes_per_user"] = state / len(run.users)
            res["state_mb_per_100k_users"] = state / len(run.users) * 100_000 / 1e6
    res["consumed"] = run.n
    res["ok"] = run.n == a.events
    res["pid"] = os.getpid()
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] else 1
