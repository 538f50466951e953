"""CSV replay: public e-commerce logs (Taobao UserBehavior, REES46 …) through a column mapping.

So the models can be evaluated on real behaviour, a log is replayed as it
is, with no conversion step: a mapping (``config/datasets/*.yaml``, data, not
code) says which column is the user, which the type (with a value map such as
``pv`` → ``browse``), which the time and in what format, and which go to
``props``.

:class:`CsvSource` reads the files like the JSONL source (a partition per
file, resumable by byte offset, positions ``path:line``, the header skipped)
and emits each line as it is. :class:`CsvMapper` turns a line into the
engine's wire JSON for the ordinary :class:`~operators.parse.Parser`, then puts
the CSV line back as the record's ``raw``: every dead letter, from the mapping
(``malformed_row``, ``invalid_field``), the parser (``unknown_type`` for an
unmapped behaviour …) or later steps (``duplicate``, ``too_late``), carries the
line exactly as it is in the file. A log without event ids gets
``<event_id_prefix><file name>:<line>``, the same on every replay, so
deduplication and the idempotent ClickHouse rows stay stable.

>>> m = CsvMapper(CsvMapping(
...     columns=["user", "item", "act", "t"], user_id="user", type="act", ts="t", ts_format="epoch_s",
...     types={"pv": "browse", "buy": "order"}, props={"item_id": "item"}, order_item=OrderItem()))
>>> orjson.loads(m.wire("logs/a.csv:7", b"u1,i9,pv,1511544070"))
{'event_id': 'a.csv:7', 'user_id': 'u1', 'type': 'browse', 'ts': 1511544070000, 'props': {'item_id': 'i9'}}
>>> orjson.loads(m.wire("logs/a.csv:8", b"u1,i9,buy,1511544071"))["props"]
{'item_id': 'i9', 'items': [{'quantity': 1, 'item_id': 'i9'}]}
>>> from nudgeflow.settings import EventsConfig
>>> from operators.parse import Parser
>>> bad = m.parse_batch(Parser(EventsConfig()), [("logs/a.csv:9", b"u1,i9,pv")])[0]
>>> (bad.reason, bad.detail, bad.raw)
('malformed_row', 'expected 4 columns, got 3', b'u1,i9,pv')
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationInfo, WithJsonSchema, field_validator

from connectors.files import LineSource, Raw
from nudgeflow.events import DeadLetter, Event
from nudgeflow.yamlconf import ConfigError

if TYPE_CHECKING:  # nudgeflow.settings imports this module: no runtime import back
    from operators.parse import Parser

_STRICT = ConfigDict(extra="forbid")  # unknown keys are errors, as in nudgeflow.settings
#: 9999-12-31T23:59:59.999Z: the last instant a datetime (and a 64-bit JSON integer) holds comfortably
_MAX_MS = 253_402_300_799_999
_EPOCH_SCALE = {"epoch_s": 1000.0, "epoch_ms": 1.0}


class PropColumn(BaseModel):
    """A prop taken from a column (written as just the column name for text); an empty cell leaves it out."""

    model_config = _STRICT
    column: str
    type: Literal["str", "int", "float"] = "str"


class OrderItem(BaseModel):
    """A log row is one product: an ``order`` row becomes ``items: [{item_id, price, quantity: 1}]``.

    The parser needs an amount or items for an order; the price prop (when the log has one)
    becomes ``amount``, so a single-item order needs no code.
    """

    model_config = _STRICT
    #: the prop holding the product
    item_id: str = "item_id"
    #: the prop holding the price; unset when the log has none (the order is then worth 0)
    price: str | None = None


def _as_prop_column(value: Any) -> Any:
    return {"column": value} if isinstance(value, str) else value


class CsvMapping(BaseModel):
    """How the columns of a CSV log become events (``config/datasets/taobao.yaml``, ``rees46.yaml``)."""

    model_config = _STRICT
    # field order matters: the validators below check names against the fields declared before them
    #: every column in file order; with ``header`` the file's first line must say the same
    columns: list[str] = Field(min_length=1)
    header: bool = False
    delimiter: str = Field(",", min_length=1, max_length=1)
    quotechar: str = Field('"', min_length=1, max_length=1)
    user_id: str
    type: str
    #: log value -> event type; a value not listed passes as it is (and is refused as unknown_type
    #: unless it is a type the engine knows)
    types: dict[str, str] = {}
    ts: str
    #: ``epoch_s``, ``epoch_ms``, ``iso`` (ISO-8601) or a strptime pattern; a time without a zone is UTC
    ts_format: str = "epoch_ms"
    session_id: str | None = None
    #: the column of a unique event id; unset: ``<event_id_prefix><file name>:<line>``
    event_id: str | None = None
    event_id_prefix: str = ""
    #: the same platform for every event (``web``, ``app``, ``mini_program``), when the log has none
    platform: str | None = None
    #: prop name -> column (``item_id: product_id``) or ``{column: price, type: float}``
    props: dict[str, Annotated[PropColumn, BeforeValidator(_as_prop_column)]] = {}
    order_item: OrderItem | None = None

    @field_validator("columns")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("column names must be unique")
        return v

    @field_validator("user_id", "type", "ts", "session_id", "event_id")
    @classmethod
    def _known_column(cls, v: str | None, info: ValidationInfo) -> str | None:
        columns = info.data.get("columns")
        if v is not None and columns is not None and v not in columns:
            raise ValueError(f"unknown column {v!r}; the columns are {columns}")
        return v

    @field_validator("ts_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in _EPOCH_SCALE and v != "iso" and "%" not in v:
            raise ValueError("expected epoch_s, epoch_ms, iso or a strptime pattern like %Y-%m-%d %H:%M:%S")
        return v

    @field_validator("props")
    @classmethod
    def _prop_columns(cls, v: dict[str, PropColumn], info: ValidationInfo) -> dict[str, PropColumn]:
        columns = info.data.get("columns")
        for name, p in v.items():
            if columns is not None and p.column not in columns:
                raise ValueError(f"{name}: unknown column {p.column!r}; the columns are {columns}")
        return v

    @field_validator("order_item")
    @classmethod
    def _order_props(cls, v: OrderItem | None, info: ValidationInfo) -> OrderItem | None:
        props = info.data.get("props")
        if v is not None and props is not None:
            for name in (v.item_id, v.price):
                if name is not None and name not in props:
                    raise ValueError(f"{name!r} is not one of the props {sorted(props)}")
        return v


def _split_paths(value: Any) -> Any:
    """One string (an environment variable) may hold several paths, separated like ``$PATH``."""
    return [p for p in value.split(os.pathsep) if p] if isinstance(value, str) else value


class CsvSourceConfig(BaseModel):
    """``source.csv``: the files to replay, one partition each, and their mapping."""

    model_config = _STRICT
    #: relative to the config file; a string is split on ``:`` (``${NUDGEFLOW_REPLAY_PATHS}``)
    paths: Annotated[list[str], BeforeValidator(_split_paths), WithJsonSchema({"anyOf": [
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "string", "description": "paths separated by ':'"},
    ]})] = Field(min_length=1)
    #: a mapping file (relative to the config file, like ``datasets/taobao.yaml``) or the mapping inline
    mapping: Annotated[
        Annotated[str, Tag("file")] | Annotated[CsvMapping, Tag("inline")],
        Discriminator(lambda v: "file" if isinstance(v, str) else "inline"),
    ]


def _epoch_ms(scale: float, value: str) -> int:
    ms = round(float(value) * scale)  # NaN raises ValueError, infinities OverflowError
    if not -_MAX_MS <= ms <= _MAX_MS:
        raise ValueError("out of range")
    return ms


def _datetime_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return round(dt.timestamp() * 1000)


def _iso_ms(value: str) -> int:
    return _datetime_ms(datetime.fromisoformat(value))


def _strptime_ms(fmt: str, value: str) -> int:
    return _datetime_ms(datetime.strptime(value, fmt))


def _ts_parser(fmt: str) -> Callable[[str], int]:
    """Event time in epoch ms from a cell. strptime is slow, but logs repeat a second many times: cached."""
    if fmt in _EPOCH_SCALE:
        return partial(_epoch_ms, _EPOCH_SCALE[fmt])
    if fmt == "iso":
        return _iso_ms
    return lru_cache(maxsize=4096)(partial(_strptime_ms, fmt))


def _finite(value: str) -> float:
    f = float(value)
    if not math.isfinite(f):  # JSON has no infinities: orjson would write null
        raise ValueError(value)
    return f


_CONVERT: dict[str, Callable[[str], Any] | None] = {"str": None, "int": int, "float": _finite}


def _single_item_order(props: dict[str, Any], oi: OrderItem) -> None:
    """The row's product as the order's one item; its price (if any) as the amount."""
    item: dict[str, Any] = {"quantity": 1}
    if oi.item_id in props:
        item["item_id"] = props[oi.item_id]
    if oi.price is not None and oi.price in props:
        item["price"] = props[oi.price]
        props["amount"] = props.pop(oi.price)
    props["items"] = [item]


class _BadRow(Exception):
    """A line refused before it becomes JSON (``operators.parse.Refused`` cannot be imported here)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


class CsvMapper:
    """A mapping compiled to column indices, so a row costs a split, a dict and one ``orjson.dumps``."""

    def __init__(self, m: CsvMapping):
        index = {c: i for i, c in enumerate(m.columns)}
        self.width = len(m.columns)
        self.delimiter = m.delimiter
        self.quotechar = m.quotechar
        self.dialect = {"delimiter": m.delimiter, "quotechar": m.quotechar, "strict": True}
        self.user = index[m.user_id]
        self.type = index[m.type]
        self.types = m.types
        self.ts = index[m.ts]
        self.ts_format = m.ts_format
        self.ts_ms = _ts_parser(m.ts_format)
        self.session = index[m.session_id] if m.session_id else None
        self.event_id = index[m.event_id] if m.event_id else None
        self.event_id_prefix = m.event_id_prefix
        self.platform = m.platform
        self.props = [(name, index[p.column], _CONVERT[p.type]) for name, p in m.props.items()]
        self.order_item = m.order_item

    def fields(self, text: str) -> list[str]:
        """The cells of one line. A line without quotes is exactly its split (five times cheaper than the
        csv module, and the public logs have none); a quoted one goes through :mod:`csv`."""
        if self.quotechar not in text:
            return text.split(self.delimiter)
        return next(csv.reader((text,), **self.dialect))

    def wire(self, position: str, line: bytes) -> bytes:
        """The wire JSON of one line; raises :class:`_BadRow` for a line that cannot be mapped."""
        try:
            row = self.fields(line.decode())
        except UnicodeDecodeError:
            raise _BadRow("malformed_row", "not UTF-8") from None
        except csv.Error as e:
            raise _BadRow("malformed_row", f"CSV: {e}") from None
        if len(row) != self.width:
            raise _BadRow("malformed_row", f"expected {self.width} columns, got {len(row)}")
        etype = row[self.type]
        etype = self.types.get(etype, etype)
        try:
            ts = self.ts_ms(row[self.ts])
        except (ValueError, OverflowError):
            raise _BadRow("invalid_field", f"ts: {row[self.ts][:40]!r} is not {self.ts_format}") from None
        props: dict[str, Any] = {}
        for name, i, convert in self.props:
            value = row[i]
            if value:
                if convert is not None:
                    try:
                        value = convert(value)
                    except ValueError:
                        raise _BadRow("invalid_field", f"props.{name}: {value[:40]!r} is not a finite number") from None
                props[name] = value
        if etype == "order" and self.order_item is not None:
            _single_item_order(props, self.order_item)
        if self.event_id is None:
            event_id = self.event_id_prefix + position[position.rfind(os.sep) + 1:]
        else:
            event_id = row[self.event_id]
        doc: dict[str, Any] = {"event_id": event_id, "user_id": row[self.user], "type": etype, "ts": ts}
        if self.session is not None and row[self.session]:
            doc["session_id"] = row[self.session]
        if self.platform is not None:
            doc["platform"] = self.platform
        doc["props"] = props
        return orjson.dumps(doc)

    def parse_batch(self, parser: Parser, batch: list[Raw]) -> list[Event | DeadLetter]:
        """Map and parse a source batch (Bytewax ``flat_map_batch``); every answer keeps the CSV line as ``raw``."""
        now = parser.now_ms()
        parse = parser.parse
        out: list[Event | DeadLetter] = []
        for position, line in batch:
            try:
                rec = parse(position, self.wire(position, line), now)
            except _BadRow as b:
                rec = DeadLetter(b.reason, b.detail, line, position, now)
            except Exception as e:  # a mapping bug must not stop the flow either
                rec = DeadLetter("parser_error", f"{type(e).__name__}: {e}"[:200], line, position, now)
            else:
                rec.raw = line
            out.append(rec)
        return out


class CsvSource(LineSource):
    """CSV files as ``(path:line, line bytes)``; with a header, each file's header is checked, then skipped."""

    def __init__(self, paths: list[str | Path], mapping: CsvMapping):
        super().__init__(paths, skip_header=mapping.header)
        if mapping.header:
            mapper = CsvMapper(mapping)
            for path in self.paths:
                with path.open("rb") as f:
                    first = f.readline().removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")
                got = mapper.fields(first.decode(errors="replace"))
                if got != mapping.columns:
                    problem = f"expected the mapping's columns {mapping.columns}, got {got}"
                    raise ConfigError(path, [(1, "header", problem)])
