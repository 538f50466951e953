"""ClickHouse sink benchmark: ``python -m benchmarks.clickhouse`` (``make bench-clickhouse``).

Two questions of issue 6: how many rows/s the real :class:`ClickHouseWriter` puts into chDB under its
batching policy (``batch_rows``, ``flush_interval``), and what share of the main flow's time the
ClickHouse sink takes. The second is measured by running the same flow on the same simulated events
twice in this process: once as shipped, once with a writer whose client discards inserts (buffering,
row building and the writer thread unchanged); the sink's share is the difference over the real run.
Both parts share one chDB folder, since chDB opens one folder per process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.run import HERE, _md, environment, log, simulator_config, table_head
from connectors.clickhouse import (
    EVENT_COLUMNS,
    ClickHouseWriter,
    connect,
    event_row,
    insert_batch,
    migrate,
)
from connectors.embedded import DEFAULT_REDIS_URL, ensure_redis, ping
from connectors.simulator import iter_records
from nudgeflow.events import Event
from nudgeflow.settings import ClickHouseConfig, EventsConfig
from operators.parse import Parser

CONFIG = HERE.parent / "config"
#: (batch_rows, flush_interval s) settings of the writer measured
POLICIES = [(100, 1.0), (1000, 1.0), (10_000, 1.0), (1000, 0.1)]
#: rows handed to the writer per put, like a Bytewax source batch
PUT_ROWS = 1000
#: rows per insert measured one insert at a time (what ``batch_rows`` makes of a flow's trickle of rows)
INSERT_SIZES = [1000, 5000, 10_000]
INSERT_ROWS = 60_000
INSERT_HEADING = "## ClickHouse insert size (benchmarks/clickhouse.py)"
INSERT_PREAMBLE = """
**rows/s n=…**: the first 60,000 simulated `events` rows inserted into a fresh chDB table (with its rollup)
by `insert_batch` in inserts of n rows, one after another on one thread, as the writer does when a flow's
rows trickle in and each insert is `batch_rows` (or one `flush_interval`) of them. In the writer rows of
the table above, puts come faster than inserts, so inserts grow whatever `batch_rows` says.
"""
HEADING = "## ClickHouse sink (benchmarks/clickhouse.py)"
PREAMBLE = """
Rows of `python -m benchmarks.clickhouse` (`make bench-clickhouse`), one per run; every run is also one
object in `clickhouse.jsonl`. **rows/s b=… f=…**: simulated `events` rows put through the real
`ClickHouseWriter` into chDB (1,000 rows per `put`, like a source batch) with `batch_rows` b and
`flush_interval` f s, from the first `put` to the end of the final flush. **flow ev/s**: the main flow
(simulator source, shipped features, models and triggers, embedded Redis, chDB) with the ClickHouse
sink as shipped and with a client that discards inserts; **sink share** = 1 − real/discard time, the
share of the flow's wall time that inserting into ClickHouse costs.
"""

FLOW_CONFIG = """
name: nfbench_clickhouse
source:
  kind: simulator
  simulator: {{users: {users}, events: {events}, partitions: 1, seed: {seed}, bad_rate: 0.001}}
features: {{definitions: {config}/features.yaml}}
redis: {{url: "{redis_url}", key_prefix: {prefix}, ttl: 1h, embedded: true}}
clickhouse: {{chdb_path: {chdb}, database: {database}}}
actions: {{kind: file, path: out/actions.jsonl}}
dlq: {{kind: file, path: out/dlq.jsonl}}
triggers: {config}/triggers.yaml
models: {config}/models.yaml
"""


class DiscardingClient:
    """A clickhouse-connect stand-in whose inserts go nowhere: the flow without ClickHouse's cost."""

    def create_insert_context(self, table: str, **options: Any) -> SimpleNamespace:
        return SimpleNamespace(settings={})

    def insert(self, table: str | None = None, data: Any = None, **options: Any) -> None:
        pass

    def close(self) -> None:
        pass


def event_rows(events: int, users: int, seed: int) -> list[list[Any]]:
    """The ``events`` rows of the simulator's accepted events, built before timing; one per event id (the
    simulator repeats a few on purpose, and a replacing table would fold them, spoiling the row check)."""
    parser = Parser(EventsConfig())
    records = iter_records(simulator_config(users, events, seed))
    parsed = parser.parse_batch([(f"sim:0:{i}", rec) for i, rec in enumerate(records)])
    unique = {e.event_id: e for e in parsed if isinstance(e, Event)}
    return [list(event_row(e)) for e in unique.values()]


def writer_rate(dsn: str, database: str, rows: list[list[Any]], batch_rows: int, flush_interval: float) -> dict[str, Any]:
    """rows/s through a fresh writer into a fresh ``events`` table, and the inserts it made."""
    client = connect(dsn)
    migrate(client, database)
    client.close()
    cfg = ClickHouseConfig(dsn=dsn, database=database, batch_rows=batch_rows, flush_interval=flush_interval)
    t0 = time.perf_counter()
    writer = ClickHouseWriter(cfg)
    for i in range(0, len(rows), PUT_ROWS):
        writer.put("events", EVENT_COLUMNS, rows[i:i + PUT_ROWS])
    writer.close()
    wall = time.perf_counter() - t0
    client = connect(dsn)
    stored = client.query(f"SELECT count() FROM {database}.events").result_rows[0][0]
    parts = client.query(f"SELECT count() FROM system.parts WHERE database = '{database}' AND table = 'events'"
                         ).result_rows[0][0]
    client.close()
    assert stored == len(rows), (stored, len(rows))
    return {"batch_rows": batch_rows, "flush_interval": flush_interval, "rows": len(rows), "wall_s": wall,
            "rows_per_s": len(rows) / wall, "parts": parts}


def insert_rate(dsn: str, database: str, rows: list[list[Any]], size: int) -> dict[str, Any]:
    """rows/s of inserts of ``size`` rows each into a fresh ``events`` table (a part per insert and rollup)."""
    client = connect(dsn)
    migrate(client, database)
    t0 = time.perf_counter()
    for i in range(0, len(rows), size):
        insert_batch(client, database, "events", EVENT_COLUMNS, rows[i:i + size], f"{database}:{i}")
    wall = time.perf_counter() - t0
    client.close()
    return {"insert_rows": size, "rows": len(rows), "wall_s": wall, "rows_per_s": len(rows) / wall}


def flow_time(cfg_path: Path, discard: bool) -> float:
    """Wall seconds of the main flow on the config's bounded simulator, final flush included."""
    from bytewax.testing import run_main

    import flows.main
    from flows.common import from_file

    real = flows.main.ClickHouseWriter
    if discard:
        flows.main.ClickHouseWriter = partial(ClickHouseWriter, client_factory=DiscardingClient)  # type: ignore[misc]
    try:
        flow, rt = from_file(flows.main.build, cfg_path)
    finally:
        flows.main.ClickHouseWriter = real  # type: ignore[misc]
    t0 = time.perf_counter()
    try:
        run_main(flow)
    finally:
        rt.close()
    return time.perf_counter() - t0


def record(run: dict[str, Any], out_dir: Path) -> None:
    """Append this run's rows under the benchmark's headings at the end of RESULTS.md (each heading and
    header once, and again whenever its columns change) and the JSON."""
    with (out_dir / "clickhouse.jsonl").open("a") as f:
        f.write(json.dumps(run) + "\n")
    e, fl = run["env"], run["flow"]
    machine = [e["utc"], f"`{e['rev']}`", e["machine"], e["cpu"], str(e["nproc"]), str(e["load1"])]
    head = ["utc", "rev", "machine", "cpu", "nproc", "load1"]
    append_row(out_dir / "RESULTS.md", HEADING, PREAMBLE, [
        *head, "rows", *(f"rows/s b={p['batch_rows']} f={p['flush_interval']:g}" for p in run["writer"]),
        "flow events", "flow ev/s", "flow ev/s discard", "sink share",
    ], [
        *machine, f"{run['rows']:,}", *(f"{p['rows_per_s']:,.0f}" for p in run["writer"]), f"{fl['events']:,}",
        f"{fl['eps_real']:,.0f}", f"{fl['eps_discard']:,.0f}", f"{fl['sink_share']:.3f}",
    ])  # fmt: skip
    append_row(out_dir / "RESULTS.md", INSERT_HEADING, INSERT_PREAMBLE,
               [*head, *(f"rows/s n={p['insert_rows']:,}" for p in run["inserts"])],
               [*machine, *(f"{p['rows_per_s']:,.0f}" for p in run["inserts"])])


def append_row(results: Path, heading: str, preamble: str, header: list[str], row: list[str]) -> None:
    """A table row at the end of ``results``: after the heading and its preamble unless the last section is
    this table's, and after the header unless the file ends with a table of these columns."""
    text = results.read_text() if results.exists() else ""
    text += "" if text.endswith("\n") or not text else "\n"
    section = text[text.rfind("\n## ") + 1:]  # rows go at the end: the last section must be this table's
    add = "" if section.startswith(heading) else f"\n{heading}\n{preamble}\n"
    add += table_head(text + add, header)
    results.write_text(text + add + _md(row) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clickhouse", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="simulated events for the writer (default 200,000)")
    p.add_argument("--flow-events", type=int, default=50_000, help="events through the main flow (default 50,000)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md / clickhouse.jsonl")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    env = environment()
    log(f"nudgeflow clickhouse bench: rev {env['rev']}, {env['cpu']} x{env['nproc']}, load {env['load1']}")
    work = Path(tempfile.mkdtemp(prefix="nfbench-ch-"))
    redis = None if ping(DEFAULT_REDIS_URL) else ensure_redis(None)
    try:
        dsn = f"chdb://{work / 'chdb'}"
        rows = event_rows(a.rows, max(1, a.rows // 10), a.seed)
        inserts = []
        for n in INSERT_SIZES:
            r = insert_rate(dsn, f"ibench{n}", rows[:INSERT_ROWS], n)
            inserts.append(r)
            log(f"  inserts of {n:<6,} rows {r['rows_per_s']:>10,.0f} rows/s  ({r['rows']:,} rows in {r['wall_s']:.2f}s)")
        writer = []
        for i, (b, f) in enumerate(POLICIES):
            r = writer_rate(dsn, f"wbench{i}", rows, b, f)
            writer.append(r)
            log(f"  writer batch_rows={b:<6} flush={f:<4g}s {r['rows_per_s']:>10,.0f} rows/s  "
                f"({r['rows']:,} rows in {r['wall_s']:.2f}s, {r['parts']} parts)")
        times = {}
        for variant in ("discard", "real", "discard", "real"):  # alternated, best of two: the machine is shared
            cfg = work / f"flow-{variant}.yaml"
            cfg.write_text(FLOW_CONFIG.format(
                users=max(1, a.flow_events // 10), events=a.flow_events, seed=a.seed, config=CONFIG,
                redis_url=redis.url if redis else DEFAULT_REDIS_URL, prefix=f"nfbenchch{variant}{len(times)}",
                chdb=work / "chdb", database=f"fbench_{variant}_{len(times)}"))
            t = flow_time(cfg, discard=variant == "discard")
            times[variant] = min(t, times.get(variant, t))
            log(f"  flow ({variant:<7}) {a.flow_events / t:>10,.0f} events/s  ({t:.2f}s)")
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    flow = {"events": a.flow_events, "real_s": times["real"], "discard_s": times["discard"],
            "eps_real": a.flow_events / times["real"], "eps_discard": a.flow_events / times["discard"],
            "sink_share": 1 - times["discard"] / times["real"]}
    run = {"env": env, "rows": len(rows), "seed": a.seed, "put_rows": PUT_ROWS, "inserts": inserts, "writer": writer,
           "flow": flow}
    if not a.no_record:
        record(run, HERE)
        log(f"recorded in {HERE / 'RESULTS.md'} and {HERE / 'clickhouse.jsonl'}")
    rates = " ".join([*(f"rows_s_n{p['insert_rows']}={p['rows_per_s']:.0f}" for p in inserts),
                      *(f"rows_s_b{p['batch_rows']}_f{p['flush_interval']:g}={p['rows_per_s']:.0f}" for p in writer)])
    log(f"BENCH_CLICKHOUSE {rates} flow_eps={flow['eps_real']:.0f} flow_eps_discard={flow['eps_discard']:.0f} "
        f"sink_share={flow['sink_share']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
