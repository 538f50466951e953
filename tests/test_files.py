"""The JSONL source: replaying files, and following them as they grow (``source.file.tail``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import orjson
import pytest
import redis

from connectors.files import JsonlSource, jsonl_sink
from tests.helpers import CONFIG_DIR, ev, nudgeflow, stop, total_events

MIN = 60_000


def test_a_replay_reads_a_last_line_without_newline_and_ends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"a\n\nb")
    part = JsonlSource([path]).build_part("in", str(path), None)
    assert part.next_batch() == [(f"{path}:1", b"a"), (f"{path}:3", b"b")]
    with pytest.raises(StopIteration):
        part.next_batch()


def test_the_file_sink_shows_each_batch_at_once_and_resumes_at_its_snapshot(tmp_path: Path) -> None:
    """Lines are readable as soon as their batch is written (a follower sees them); a resume truncates what
    followed the snapshot, which the replay writes again."""
    path = tmp_path / "out" / "actions.jsonl"
    sink = jsonl_sink(path)
    part = sink.build_part("actions", str(path), None)
    part.write_batch(['{"a":1}', '{"a":2}'])
    assert path.read_text() == '{"a":1}\n{"a":2}\n'
    offset = part.snapshot()
    part.write_batch(['{"a":3}'])
    assert path.read_text().splitlines()[-1] == '{"a":3}'
    part.close()
    again = sink.build_part("actions", str(path), offset)
    assert path.read_text() == '{"a":1}\n{"a":2}\n'
    again.write_batch(['{"a":3}', '{"a":4}'])
    again.close()
    assert path.read_text().splitlines() == ['{"a":1}', '{"a":2}', '{"a":3}', '{"a":4}']
    with pytest.raises(ValueError, match="writes"):
        sink.build_part("actions", str(tmp_path / "other.jsonl"), None)


def test_a_followed_file_gives_whole_lines_as_they_are_written_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"a\nb")
    part = JsonlSource([path], tail=0.01).build_part("in", str(path), None)
    assert part.next_batch() == [(f"{path}:1", b"a")]
    assert part.next_batch() == [] and part.next_awake() is not None  # "b" is still being written
    with path.open("ab") as f:
        f.write(b"c\n\nd\n")
    assert part.next_batch() == [(f"{path}:2", b"bc"), (f"{path}:4", b"d")]
    assert part.next_awake() is None  # lines came: read on at once
    assert part.next_batch() == [] and part.next_awake() is not None  # at the end: look again later
    resumed = JsonlSource([path], tail=0.01).build_part("in", str(path), part.snapshot())
    with path.open("ab") as f:
        f.write(b"e\n")
    assert resumed.next_batch() == [(f"{path}:5", b"e")]


FOLLOW_CONFIG = """
name: nudgeflow_follow
source: {{kind: file, file: {{paths: [{events}], tail: 10ms}}}}
features: {{definitions: {config_dir}/features.yaml}}
redis: {{url: "{redis_url}", key_prefix: "{key_prefix}"}}
clickhouse: {{chdb_path: ch}}
actions: {{kind: file, path: out/actions.jsonl}}
dlq: {{kind: file, path: out/dlq.jsonl}}
triggers: {config_dir}/triggers.yaml
models: {config_dir}/models.yaml
"""


def test_the_flow_follows_a_file_as_it_grows(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """The main job as a service on a growing file: events appended while it runs (one line written in two
    parts) all reach the features in Redis, and the flow keeps running until stopped."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"")
    cfg = tmp_path / "follow.yaml"
    cfg.write_text(FOLLOW_CONFIG.format(events=events, config_dir=CONFIG_DIR, redis_url=redis_url,
                                        key_prefix=key_prefix))
    t0 = int(time.time() * 1000) - 10 * MIN
    lines = [ev(f"e{i}", f"u{i % 3}", "browse", t0 + i * 1000, item_id=f"i{i}", category="shoes") for i in range(12)]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with tempfile.TemporaryFile("w+") as log:
        proc = nudgeflow("run", "--config", str(cfg), "--no-summary", tail=True, wait=False, log=log)
        try:
            with events.open("ab") as f:
                for i, line in enumerate(lines):
                    if i == 6:  # half a line, a pause, the rest: the source must wait for its newline
                        f.write(line[:20])
                        f.flush()
                        time.sleep(0.5)
                        f.write(line[20:] + b"\n")
                    else:
                        f.write(line + b"\n")
                    f.flush()
                    time.sleep(0.05)
            deadline = time.monotonic() + 60
            while total_events(r, key_prefix) < len(lines) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, "a followed file must not end the flow"
        finally:
            stop(proc)
        log.seek(0)
        output = log.read()
    assert total_events(r, key_prefix) == len(lines), output[-2000:]
    dead = (tmp_path / "out" / "dlq.jsonl")
    assert not dead.exists() or [orjson.loads(x)["reason"] for x in dead.read_bytes().splitlines()] == []
