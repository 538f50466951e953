"""Saved analyst queries: ``<name>.sql`` files in this package, run by name against chDB or a server.

Each file starts with a comment header: its first line says what the query answers (the title),
the next lines how to read it, and ``-- @param <name> <default>: <help>`` lines declare its
duration parameters (bound in seconds as ``{<name>:UInt32}``). Every query reads ``{db}`` (the
deployment's database, an identifier from the config, substituted as text) and the period
``{since:DateTime64(3, 'UTC')}`` / ``{until:DateTime64(3, 'UTC')}``. Values are bound server-side
by clickhouse-connect (``parameters=``), never formatted into the SQL, so the files also run as
they are in ``clickhouse-client --param_since=… --param_until=…``.

>>> sorted(QUERIES)[:3]
['attribution', 'cross_platform', 'dau']
>>> QUERIES["uplift"].params[0].name, QUERIES["uplift"].params[0].default
('window', '7d')
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from importlib import resources
from typing import Any

from clickhouse_connect.driver.client import Client

from nudgeflow.settings import parse_duration

#: the start of time for a query without ``since``
EPOCH_MS = 0
_PARAM = re.compile(r"--\s*@param\s+(\w+)\s+(\S+):\s*(.*)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Param:
    """A duration parameter a query declares in its header."""

    name: str
    default: str
    help: str


@dataclass(frozen=True, slots=True)
class SavedQuery:
    """One ``.sql`` file: its name, what its header says, and the SQL."""

    name: str
    title: str
    about: str
    params: tuple[Param, ...]
    sql: str


def _load(name: str, text: str) -> SavedQuery:
    header = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    params = tuple(Param(*m.groups()) for m in map(_PARAM.match, header) if m)
    prose = [h.removeprefix("--").strip() for h in header if not _PARAM.match(h)]
    return SavedQuery(name, prose[0] if prose else name, " ".join(prose[1:]), params, text)


def _load_all() -> dict[str, SavedQuery]:
    files = sorted(f for f in resources.files(__name__).iterdir() if f.name.endswith(".sql"))
    return {f.name[:-4]: _load(f.name[:-4], f.read_text(encoding="utf-8")) for f in files}


#: every saved query by name (the files of this package)
QUERIES: dict[str, SavedQuery] = _load_all()


def _utc(ms: int) -> str:
    """The literal a ``DateTime64(3, 'UTC')`` parameter parses: the type, not the server, sets the zone."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def bind(name: str, db: str, since: int | None = None, until: int | None = None,
         **params: str | float) -> tuple[str, dict[str, Any]]:
    """The SQL of query ``name`` for database ``db`` and its server-side parameters.

    ``since``/``until`` are epoch ms (default: all history up to now); ``params`` override the header's
    defaults, as durations (``"3d"`` or seconds).
    """
    q = QUERIES.get(name)
    if q is None:
        raise ValueError(f"unknown query {name!r}; saved queries: {', '.join(QUERIES)}")
    if not _IDENTIFIER.fullmatch(db):
        raise ValueError(f"database name {db!r} is not an identifier")
    declared = {p.name: p.default for p in q.params}
    unknown = set(params) - set(declared)
    if unknown:
        raise ValueError(f"query {name} has no parameter {', '.join(sorted(unknown))}; "
                         f"it takes: {', '.join(declared) or 'none'}")
    values: dict[str, Any] = {
        "since": _utc(EPOCH_MS if since is None else since),
        "until": _utc(int(time.time() * 1000) if until is None else until),
    }
    for key, default in declared.items():
        values[key] = int(parse_duration(params.get(key, default)))
    return q.sql.replace("{db}", db), values


def run_query(client: Client, db: str, name: str, since: int | None = None, until: int | None = None,
              **params: str | float) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run saved query ``name`` over ``[since, until)`` (epoch ms); returns its column names and rows."""
    sql, values = bind(name, db, since, until, **params)
    result = client.query(sql, parameters=values)
    columns = list(result.column_names)
    if not columns:  # chDB answers an empty result without a header: ask for the columns, tables keep them
        columns = [r[0] for r in client.query(f"DESCRIBE TABLE ({sql})", parameters=values).result_rows]
    return columns, [tuple(r) for r in result.result_rows]


def cell(value: Any) -> str:
    """How a value prints in a table: shares to 4 decimals, larger figures to 2, nan as a dash."""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}" if abs(value) <= 1 else f"{value:.2f}"
    return str(value)


def jsonable(value: Any) -> Any:
    """A value JSON can hold: dates as ISO text, nan and infinities as null."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_records(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows as JSON-ready objects keyed by column (``nudgeflow query --json``)."""
    return [{c: jsonable(v) for c, v in zip(columns, row)} for row in rows]
