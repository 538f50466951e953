"""Parse and normalise raw records into :class:`~nudgeflow.events.Event`, or refuse them.

Every record gets exactly one answer: an ``Event`` in the one shape later
steps rely on, or a ``DeadLetter`` that keeps the original bytes with a reason
code. Nothing raises, so one bad record can never stop a flow.

This runs once per input record, so it is written for speed: orjson, plain
type checks and no per-record allocation beyond the event itself. A pydantic
model here would cost several times the rest of the parse.

>>> p = Parser(EventsConfig(), now_ms=lambda: 1_700_000_000_000)
>>> e = p.parse("t:0:1", b'{"event_id":"e1","user_id":"u1","type":"browse","ts":1699999999000}', 0)
>>> (e.user_id, e.type, e.ts)
('u1', 'browse', 1699999999000)
>>> bad = p.parse("t:0:2", b'{"event_id":"e2"', 0)
>>> (bad.reason, bad.raw)
('malformed_json', b'{"event_id":"e2"')

**Ids.** ``user_id`` is a known customer id. Before login a record carries instead (or besides) an
``anonymous_id`` (web cookie), ``device_id`` (app) or ``account_id`` (mini-program): ``Event.user_id``
is then the known id if there is one, else the first of those, namespaced (``anon:…``, ``device:…``,
``account:…``, see :data:`~nudgeflow.events.ID_FIELDS`), and ``Event.aliases`` every other id the record
carried, which the identity step links to ``user_id``. An ``alias`` record links ``previous_id`` (a known
id, as is) to ``user_id``. A JSON ``null`` id is absent (Segment-style senders write ``"userId": null``).

>>> e = p.parse("t:0:3", b'{"event_id":"e3","user_id":"u1","anonymous_id":"c9","type":"browse","ts":0}', 0)
>>> (e.user_id, e.aliases)
('u1', ('anon:c9',))
>>> e = p.parse("t:0:4", b'{"event_id":"e4","device_id":"d7","type":"browse","ts":0}', 0)
>>> (e.user_id, e.aliases)
('device:d7', ())
"""

from __future__ import annotations

from functools import lru_cache
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from nudgeflow.events import BUILTIN_TYPES, ID_FIELDS, PLATFORM_ALIASES, DeadLetter, Event
from nudgeflow.settings import EventsConfig
from operators.clock import wall_ms
from operators.features import MAX_VALUE

Raw = tuple[str, bytes]
"""What every source emits: (position, payload)."""

_CART_TYPES = frozenset({"add_to_cart", "remove_from_cart"})


class Refused(Exception):
    """Internal: a record is refused with a reason code and a detail."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


def _ts_ms(value: Any) -> int:
    """Event time in epoch ms from epoch ms (number) or ISO-8601 (naive means UTC)."""
    if isinstance(value, bool):
        raise Refused("invalid_field", "ts: expected epoch milliseconds or an ISO-8601 string")
    if isinstance(value, (int, float)):  # finite: orjson refuses NaN and infinities as malformed JSON
        return int(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise Refused("invalid_field", f"ts: not ISO-8601: {value[:40]!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1000)
    raise Refused("invalid_field", f"ts: expected epoch milliseconds or an ISO-8601 string, got {type(value).__name__}")


def _number(props: dict[str, Any], key: str) -> float:
    v = props.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_VALUE:
        raise Refused("invalid_field", f"props.{key}: expected a number from 0 to {MAX_VALUE:g}")
    return float(v)


def _quantity(props: dict[str, Any]) -> int:
    q = props.get("quantity", 1)
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise Refused("invalid_field", "props.quantity: expected a positive integer")
    return q


class Parser:
    """Turns raw bytes into events under one :class:`EventsConfig`."""

    def __init__(self, cfg: EventsConfig, now_ms: Callable[[], int] = wall_ms):
        self.cfg = cfg
        self.types = BUILTIN_TYPES | frozenset(cfg.custom_types)
        self.now_ms = now_ms
        self.max_future_ms = int(cfg.max_future * 1000)
        self.max_age_ms = int(cfg.max_age * 1000) if cfg.max_age is not None else None
        self.rates = cfg.currency_rates
        self.base = cfg.base_currency.upper()
        self.max_id = cfg.max_id_length

    def parse(self, position: str, raw: bytes, ingest_ms: int) -> Event | DeadLetter:
        """One record in, one answer out; never raises."""
        try:
            return self._parse(position, raw, ingest_ms)
        except Refused as r:
            return DeadLetter(r.reason, r.detail, raw, position, ingest_ms)
        except Exception as e:  # a parser bug must not stop the flow either
            return DeadLetter("parser_error", f"{type(e).__name__}: {e}"[:200], raw, position, ingest_ms)

    def parse_batch(self, batch: Iterable[Raw | DeadLetter]) -> list[Event | DeadLetter]:
        """Parse a source batch with one clock read (Bytewax ``flat_map_batch``).

        A source may hand over dead letters of its own (a consumer error): they pass through.
        """
        now = self.now_ms()
        parse = self.parse
        return [parse(r[0], r[1], now) if type(r) is tuple else r for r in batch]

    def _parse(self, position: str, raw: bytes, ingest_ms: int) -> Event:
        if raw is None:
            raise Refused("empty", "record has no value")
        if len(raw) > self.cfg.max_bytes:
            raise Refused("oversized", f"{len(raw)} bytes > max_bytes {self.cfg.max_bytes}")
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise Refused("malformed_json", str(e)[:200]) from None
        if type(d) is not dict:
            raise Refused("not_an_object", f"expected a JSON object, got {type(d).__name__}")
        try:
            event_id = d["event_id"]
            etype = d["type"]
            ts_raw = d["ts"]
        except KeyError as e:
            raise Refused("missing_field", f"{e.args[0]} is required") from None
        if type(event_id) is not str or not event_id:
            raise Refused("invalid_field", "event_id: expected a non-empty string")
        user_id = d.get("user_id")
        if etype not in self.types:
            raise Refused("unknown_type", f"type {str(etype)[:40]!r} is neither built in nor in events.custom_types")
        ts = ts_raw if type(ts_raw) is int else _ts_ms(ts_raw)  # epoch ms, the common case, needs no call
        now = self.now_ms() if ingest_ms == 0 else ingest_ms
        if ts > now + self.max_future_ms:
            raise Refused("future_ts", f"ts is {(ts - now) / 1000:.0f}s ahead of the clock")
        if self.max_age_ms is not None and ts < now - self.max_age_ms:
            raise Refused("too_old", f"ts is {(now - ts) / 1000:.0f}s old")
        session_id = d.get("session_id")
        if session_id is not None and type(session_id) is not str:
            raise Refused("invalid_field", "session_id: expected a string")
        platform = d.get("platform")
        if platform is not None:
            if type(platform) is not str:
                raise Refused("invalid_field", "platform: expected a string")
            alias = PLATFORM_ALIASES.get(platform)  # already canonical, the common case
            platform = alias if alias is not None else PLATFORM_ALIASES.get(platform.lower(), platform.lower())
        props = d.get("props")
        # keys beyond the seven read here (counted without a lookup) may be ids: only then are they looked for
        extra = len(d) > 4 + (session_id is not None) + (platform is not None) + (props is not None)
        if props is None:
            props = {}
        elif type(props) is not dict:
            raise Refused("invalid_field", "props: expected an object")
        aliases: tuple[str, ...] = ()
        if extra or user_id is None or etype == "alias":
            user_id, aliases = self._ids(d, user_id, etype)
        elif type(user_id) is not str or not user_id or len(user_id) > self.max_id:
            self._id("user_id", user_id)  # refuses it
        normalise = _NORMALISERS.get(etype)
        if normalise is not None:
            normalise(self, props)
        return Event(event_id, user_id, etype, ts, session_id, platform, props, ingest_ms, position, raw, aliases)

    def _id(self, name: str, value: Any) -> str:
        """``value`` if it is a usable id: ids key state, Redis and ClickHouse rows, so their size is bounded."""
        if type(value) is not str or not value:
            raise Refused("invalid_field", f"{name}: expected a non-empty string")
        if len(value) > self.max_id:
            raise Refused("id_too_long", f"{name}: {len(value)} characters > events.max_id_length {self.max_id}")
        return value

    def _ids(self, d: dict[str, Any], user_id: Any, etype: str) -> tuple[str, tuple[str, ...]]:
        """(``Event.user_id``, ``Event.aliases``) of a record that may carry more than a known user id."""
        ids = [prefix + self._id(name, v) for name, prefix in ID_FIELDS.items() if (v := d.get(name)) is not None]
        if etype == "alias":
            previous = d.get("previous_id")
            if user_id is None or previous is None:
                raise Refused("missing_field", "alias needs user_id and previous_id")
            if self._id("previous_id", previous) == user_id:
                raise Refused("self_alias", f"previous_id is user_id {previous[:40]!r}")
            ids.insert(0, previous)
        elif user_id is None:
            if not ids:
                raise Refused("missing_field", f"user_id is required (or one of {', '.join(ID_FIELDS)})")
            if etype == "identify":
                raise Refused("missing_field", "identify needs user_id: it names who the other ids belong to")
            return ids[0], tuple(ids[1:])
        known = self._id("user_id", user_id)
        # an id given twice (a user_id spelt like a cookie, a previous_id that is the anonymous_id) links once
        return known, tuple(dict.fromkeys(i for i in ids if i != known))

    # -- per-type normalisation: every later step sees one unit and one currency

    def _money(self, props: dict[str, Any], key: str) -> None:
        """Convert ``props[key]`` from ``props.currency`` into the base currency, in place."""
        cur = props.get("currency", self.base)
        if type(cur) is not str:
            raise Refused("invalid_field", "props.currency: expected an ISO 4217 code")
        cur = cur.upper()
        rate = self.rates.get(cur, 1.0 if cur == self.base else None)
        if rate is None:
            raise Refused("invalid_field", f"props.currency: no rate for {cur[:8]!r} in events.currency_rates")
        amount = _number(props, key)
        if cur != self.base:
            props["original_currency"] = cur
            props[f"original_{key}"] = amount
        props["currency"] = self.base
        props[key] = round(amount * rate, 6)

    def _order(self, props: dict[str, Any]) -> None:
        if "amount_minor" in props:  # integer minor units (cents) are a common wire form
            props["amount"] = _number(props, "amount_minor") / 100.0
            del props["amount_minor"]
        items = props.get("items", [])
        if type(items) is not list or any(type(i) is not dict for i in items):
            raise Refused("invalid_field", "props.items: expected a list of objects")
        cur = props.get("currency", self.base)
        count = 0
        for item in items:
            item["quantity"] = _quantity(item)
            count += item["quantity"]
            item.setdefault("currency", cur)
            item.setdefault("price", 0.0)
            self._money(item, "price")
            del item["currency"]
        if "amount" not in props:
            if not items:
                raise Refused("missing_field", "order needs props.amount or props.items")
            props["amount"] = sum(i["price"] * i["quantity"] for i in items)
            props["currency"] = self.base
        else:
            self._money(props, "amount")
        props["item_count"] = count

    def _cart(self, props: dict[str, Any]) -> None:
        props["quantity"] = _quantity(props)
        props.setdefault("price", 0.0)
        self._money(props, "price")

    def _consent(self, props: dict[str, Any]) -> None:
        channel = props.get("channel")
        if type(channel) is not str or not channel:
            raise Refused("invalid_field", "props.channel: expected a channel name")
        granted = props.get("granted")
        if granted is None and "status" in props:
            granted = {"opt_in": True, "opt_out": False}.get(props["status"])
        if type(granted) is not bool:
            raise Refused("invalid_field", "props.granted: expected true or false (or status opt_in/opt_out)")
        props["channel"] = channel.lower()
        props["granted"] = granted

    def _identify(self, props: dict[str, Any]) -> None:
        tz = props.get("timezone")
        if tz is not None and not (type(tz) is str and _is_zone(tz)):
            raise Refused("invalid_field", f"props.timezone: unknown time zone {str(tz)[:40]!r}")


@lru_cache(maxsize=4096)
def _is_zone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone; cached, as ``ZoneInfo`` keeps only a few zones and reads the
    zone file again for the others."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


_NORMALISERS: dict[str, Callable[[Parser, dict[str, Any]], None]] = {
    "order": Parser._order,
    "add_to_cart": Parser._cart,
    "remove_from_cart": Parser._cart,
    "consent": Parser._consent,
    "identify": Parser._identify,
}
