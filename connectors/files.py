"""Files: JSONL replay as a source, JSON lines as a sink (actions and dead letters in embedded mode).

The source reads each file as one partition and records the byte offset as
its resume state, so a replay under Bytewax recovery continues where it
stopped. Positions are ``path:line`` so any refused record can be found.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
from bytewax.connectors.files import FileSink
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from nudgeflow.events import Action, DeadLetter

Raw = tuple[str, bytes]
BATCH_LINES = 1000


class _JsonlPartition(StatefulSourcePartition[Raw, tuple[int, int]]):
    def __init__(self, path: Path, resume: tuple[int, int] | None):
        self.path = path
        self.f = path.open("rb")
        self.offset, self.line = resume or (0, 0)
        self.f.seek(self.offset)
        self.name = str(path)

    def next_batch(self) -> list[Raw]:
        out: list[Raw] = []
        readline = self.f.readline
        for _ in range(BATCH_LINES):
            line = readline()
            if not line:
                break
            self.line += 1
            self.offset += len(line)
            line = line.rstrip(b"\r\n")
            if line:
                out.append((f"{self.name}:{self.line}", line))
        if not out and not line:
            raise StopIteration
        return out

    def snapshot(self) -> tuple[int, int]:
        return (self.offset, self.line)

    def close(self) -> None:
        self.f.close()


class JsonlSource(FixedPartitionedSource[Raw, tuple[int, int]]):
    """Replays JSON-lines files, one partition per file, emitting ``(position, bytes)``."""

    def __init__(self, paths: list[str | Path]):
        self.paths = [Path(p) for p in paths]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"source files not found: {', '.join(missing)}")

    def list_parts(self) -> list[str]:
        return [str(p) for p in self.paths]

    def build_part(self, step_id: str, for_part: str, resume_state: tuple[int, int] | None) -> _JsonlPartition:
        return _JsonlPartition(Path(for_part), resume_state)


def jsonl_sink(path: str | Path) -> FileSink:
    """Bytewax's own file sink (one writer, resumes by truncating to the snapshot offset)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileSink(Path(path))


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
