"""Files: JSONL replay as a source, JSON lines as a sink (actions and dead letters in embedded mode).

The line source (shared by JSONL and the CSV replay in :mod:`connectors.csvlog`)
reads each file as one partition and records the byte offset as its resume
state, so a replay under Bytewax recovery continues where it stopped.
Positions are ``path:line`` so any refused record can be found. With ``tail``
it keeps reading lines as they are appended (``tail -f``), looking again every
``tail`` seconds at the end of a file; a line is read once its newline is written.
"""

from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
from bytewax.connectors.files import FileSink
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import StatefulSinkPartition

from nudgeflow.events import Action, DeadLetter

Raw = tuple[str, bytes]
BATCH_LINES = 1000


class _LinePartition(StatefulSourcePartition[Raw, tuple[int, int]]):
    """One file, line by line; the state is ``(byte offset, line number)`` so a resume seeks, not rereads."""

    def __init__(self, path: Path, resume: tuple[int, int] | None, skip_header: bool = False, tail: float | None = None):
        self.path = path
        #: seconds between looks at the end of a followed file (None: the file ends the partition)
        self.tail = tail
        self.awake: datetime | None = None
        self.f = path.open("rb")
        self.offset, self.line = resume or (0, 0)
        self.f.seek(self.offset)
        if skip_header and self.offset == 0:
            self.offset = len(self.f.readline())
            self.line = 1
        self.name = str(path)

    def next_batch(self) -> list[Raw]:
        out: list[Raw] = []
        readline = self.f.readline
        self.awake = None
        for _ in range(BATCH_LINES):
            line = readline()
            if not line:
                break
            if self.tail is not None and not line.endswith(b"\n"):  # still being written: read it whole later
                self.f.seek(self.offset)
                line = b""
                break
            self.line += 1
            self.offset += len(line)
            line = line.rstrip(b"\r\n")
            if line:
                out.append((f"{self.name}:{self.line}", line))
        if not out and not line:
            if self.tail is None:
                raise StopIteration
            self.awake = datetime.now(timezone.utc) + timedelta(seconds=self.tail)
        return out

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> tuple[int, int]:
        return (self.offset, self.line)

    def close(self) -> None:
        self.f.close()


class LineSource(FixedPartitionedSource[Raw, tuple[int, int]]):
    """Files replayed line by line as ``(path:line, bytes)``, one partition per file, resumable by byte offset.

    Blank lines are skipped (their numbers still count); ``skip_header`` skips each file's first line;
    ``tail``: follow the files, looking for new lines this often (seconds) at their end, instead of stopping.
    """

    def __init__(self, paths: list[str | Path], skip_header: bool = False, tail: float | None = None):
        self.paths = [Path(p) for p in paths]
        self.skip_header = skip_header
        self.tail = tail
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"source files not found: {', '.join(missing)}")

    def list_parts(self) -> list[str]:
        return [str(p) for p in self.paths]

    def build_part(self, step_id: str, for_part: str, resume_state: tuple[int, int] | None) -> _LinePartition:
        return _LinePartition(Path(for_part), resume_state, self.skip_header, self.tail)


class JsonlSource(LineSource):
    """Replays JSON-lines files: each line is one record for the parser."""


class _JsonlPartition(StatefulSinkPartition[str, int]):
    """Lines appended and flushed each batch (a follower reads them at once), made durable once an epoch.

    Bytewax's own partition calls ``fsync`` after every batch: live, batches are a few lines, and the
    sync held the flow's only thread for most of a millisecond each time. Durability is owed where a resume
    could rely on it, the snapshot: the offset it returns is synced first, and a resume truncates to it, so
    lines written after it are written again by the replay, as before.
    """

    def __init__(self, path: Path, resume_state: int | None):
        self._f = open(path, "at")
        self._f.seek(resume_state or 0)
        self._f.truncate()

    def write_batch(self, values: list[str]) -> None:
        """Each value is one or more lines (joined by newlines), written with a newline after it."""
        self._f.write("".join(f"{v}\n" for v in values))
        self._f.flush()

    def snapshot(self) -> int:
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class JsonlSink(FileSink):
    """Bytewax's file sink (one writer, resumes by truncating to the snapshot offset), synced per epoch."""

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _JsonlPartition:
        if for_part != str(self._path):
            raise ValueError(f"the file sink writes {self._path}, not {for_part}")
        return _JsonlPartition(self._path, resume_state)


def jsonl_sink(path: str | Path) -> JsonlSink:
    """A JSON-lines file sink: one writer, flushed each batch, synced each epoch."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JsonlSink(Path(path))


def raw_field(raw: bytes) -> dict[str, str]:
    """Original bytes in JSON: as text when they are UTF-8, else base64.

    >>> raw_field(b'{"a":1}'), raw_field(b"\\xff")
    ({'raw': '{"a":1}', 'raw_encoding': 'utf-8'}, {'raw': '/w==', 'raw_encoding': 'base64'})
    """
    try:
        return {"raw": raw.decode("utf-8"), "raw_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"raw": base64.b64encode(raw).decode(), "raw_encoding": "base64"}


def dlq_line(d: DeadLetter) -> str:
    doc: dict[str, Any] = {"reason": d.reason, "detail": d.detail, "position": d.position, "ingest_ms": d.ingest_ms}
    doc.update(raw_field(d.raw or b""))
    return orjson.dumps(doc).decode()


def action_line(a: Action) -> str:
    return orjson.dumps(a.to_dict()).decode()
