"""Process logging: text for a terminal, or one JSON object per line for a log pipeline; secrets masked.

``logging.format: json`` writes ``time``, ``level``, ``logger``, ``message``, and the context: ``flow``,
``process`` (pid), ``thread``, ``worker`` (the Bytewax worker index, on a worker's thread) and whatever a
call passes with ``extra=`` (``trigger``). Either format goes through :class:`SecretMask`, which replaces
the deployment's secrets (webhook secrets, the PII salt, passwords in DSNs and ``kafka.add_config``)
and anything shaped like ``password=…`` or ``user:pass@`` by ``***``. Events and user attributes are
never logged: log lines name ids (actions are hashes) and counts.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from nudgeflow.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"
_SECRET_KEY = re.compile(r"password|passwd|pwd|secret|token|salt|api[_-]?key|credential", re.I)
_PATTERNS = (
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), rf"\g<1>{MASK}@"),
    (re.compile(r"\b([\w.-]*(?:password|passwd|pwd|secret|token|salt|api[_-]?key)\s*[=:]\s*[\"']?)[^\s\"',;&]+", re.I),
     rf"\g<1>{MASK}"),
)
#: a LogRecord's own attributes; any other is context a call passed with ``extra=``
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_local = threading.local()


def tag_worker(index: int) -> None:
    """Mark the calling thread as Bytewax worker ``index`` (sinks are built on their worker's thread)."""
    _local.worker = index


def secrets_of(value: Any) -> Iterator[str]:
    """Every secret a settings tree holds: ``SecretStr`` values, URL passwords, values of secret-named keys."""
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from secrets_of(getattr(value, name))
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str) and _SECRET_KEY.search(str(k)):
                yield v
            else:
                yield from secrets_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from secrets_of(v)
    elif isinstance(value, str) and "://" in value:
        try:
            password = urlsplit(value).password
        except ValueError:
            password = None
        if password:
            yield password


class SecretMask(logging.Filter):
    """Masks secrets in a record's message, exception and ``extra`` fields, before any handler formats it."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        # longest first, so a secret containing another is masked whole; short ones would mask ordinary words
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.mask(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        for k in vars(record).keys() - _RECORD_KEYS:
            v = getattr(record, k)
            setattr(record, k, MASK if _SECRET_KEY.search(k) else self.mask(v) if isinstance(v, str) else v)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the flow's name and the worker's context."""

    def __init__(self, flow: str):
        super().__init__()
        self.flow = flow

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "flow": self.flow,
            "process": record.process,
            "thread": record.threadName,
        }
        worker = getattr(_local, "worker", None)
        if worker is not None:
            doc["worker"] = worker
        doc.update((k, v) for k, v in vars(record).items() if k not in _RECORD_KEYS)
        if record.exc_info or record.exc_text:
            doc["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(doc, default=str).decode()


def configure(s: Settings) -> None:
    """Log the process as the deployment says: one root handler (a previous one of ours replaced)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(s.name) if s.logging.format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(SecretMask(secrets_of(s)))
    handler.set_name("nudgeflow")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "nudgeflow"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(s.logging.level)
