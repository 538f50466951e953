"""The ``nudgeflow`` command: run flows, simulate shoppers, validate configs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from nudgeflow.yamlconf import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from nudgeflow.configload import Deployment

app = typer.Typer(help="nudgeflow: real-time marketing on Bytewax, Kafka, Redis and ClickHouse.", no_args_is_help=True)
#: piped (a log, ``make demo > out``) there is no terminal to fit: tables get 160 columns rather than rich's 80,
#: which cut model names (``purchas…`` twice); ``COLUMNS`` still decides where it is set
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="deployment config (YAML)")]


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/red] {e}", highlight=False)
    raise typer.Exit(2)


@app.command()
def run(
    config: ConfigOpt = Path("config/local.yaml"),
    workers: Annotated[int, typer.Option("--workers", "-w", help="worker threads in this process")] = 1,
    summary: Annotated[bool, typer.Option(help="print what happened when a bounded run ends")] = True,
    flow_name: Annotated[str, typer.Option("--flow", help="main (everything) or features (feature store only)")] = "main",
    processes: Annotated[int, typer.Option("--processes", "-p", min=1,
                                           help="local processes of Bytewax's cluster runtime (they use the cores)")] = 1,
    process_id: Annotated[Optional[int], typer.Option("--process-id", "-i",
                                                      help="this process's index in a cluster (with --addresses)")] = None,
    addresses: Annotated[Optional[str], typer.Option("--addresses", "-a",
                                                     help="host:port of every process of the cluster, ';'-separated")] = None,
    redis_url: Annotated[Optional[str], typer.Option("--redis-url", help="use this Redis instead of the config's")] = None,
    metrics_port: Annotated[Optional[int], typer.Option("--metrics-port", min=0, max=65535,
                                                        help="serve /metrics here instead of on metrics.port (with "
                                                             "--processes, process I uses metrics.port + I)")] = None,
    init_recovery: Annotated[bool, typer.Option("--init-recovery",
                                                help="create the recovery store if it does not exist yet (a service's "
                                                     "first start); an existing one is resumed")] = False,
) -> None:
    """Run a flow (same as ``python -m bytewax.run flows.<flow>:flow -w N [-i I -a ADDRESSES]``)."""
    import importlib

    from bytewax.run import cli_main

    from flows.common import from_file
    from nudgeflow.summary import print_summary

    if flow_name not in ("main", "features"):
        _fail(ValueError(f"unknown flow {flow_name!r}: main or features"))
    share = _share(process_id, addresses)
    if init_recovery:
        _init_recovery(config, share, existing_ok=True)
    if processes > 1:
        raise typer.Exit(_run_cluster(config, processes, workers, flow_name, redis_url))
    try:
        flow, rt = from_file(importlib.import_module(f"flows.{flow_name}").build, config, redis_url, metrics_port)
        options = rt.bytewax_options()
    except (ConfigError, FileNotFoundError) as e:
        _fail(e)
    try:
        cli_main(flow, workers_per_process=workers, process_id=process_id,
                 addresses=addresses.split(";") if addresses else None, **options)
    finally:
        rt.close()
    if summary and process_id is None and rt.writer is not None:
        print_summary(rt, console)


def _run_cluster(config: Path, processes: int, workers: int, flow_name: str, redis_url: str | None) -> int:
    """Check what the processes must share, start an embedded Redis once if the config wants one, run them."""
    from connectors.embedded import ensure_redis
    from nudgeflow.cluster import run_processes
    from nudgeflow.configload import load_deployment

    try:
        s = load_deployment(config).settings
    except ConfigError as e:
        _fail(e)
    if flow_name == "main" and not s.clickhouse.dsn:
        _fail(ValueError("chDB runs inside one process: a cluster of the main flow needs a ClickHouse server "
                         "(clickhouse.dsn), or run the feature store alone (--flow features)"))
    embedded = ensure_redis(redis_url or s.redis.url or None) if s.redis.embedded and not redis_url else None
    try:
        return run_processes(config, processes, workers, flow_name, redis_url or (embedded.url if embedded else s.redis.url),
                             s.metrics.port)
    finally:
        if embedded is not None:
            embedded.stop()


recovery_app = typer.Typer(help="Bytewax recovery store.")
app.add_typer(recovery_app, name="recovery")


def _share(process_id: int | None, addresses: str | None) -> tuple[int, int]:
    """(this process's index, processes) of a cluster started process by process; (0, 1) for one process."""
    if (process_id is None) != (addresses is None):
        _fail(ValueError("--process-id and --addresses go together"))
    if process_id is None or addresses is None:
        return 0, 1
    processes = len(addresses.split(";"))
    if not 0 <= process_id < processes:
        _fail(ValueError(f"--process-id {process_id} is not one of the {processes} --addresses"))
    return process_id, processes


def _init_recovery(config: Path, share: tuple[int, int], existing_ok: bool) -> None:
    """Create the config's recovery store (this process's share of it in a cluster)."""
    from flows.common import init_recovery_store
    from nudgeflow.settings import load_settings

    try:
        s, base = load_settings(config)
    except ConfigError as e:
        _fail(e)
    if s.recovery is None:
        if not existing_ok:
            _fail(ValueError(f"{config} has no recovery section"))
        return
    try:
        db = init_recovery_store(s, base, share)
    except ValueError as e:
        _fail(ValueError(f"{config}: {e}"))
    if db is None:
        if not existing_ok:
            _fail(FileExistsError(f"{s.recovery.dir} already holds a recovery store; remove it to start over"))
        return
    index, processes = share
    mine = len(range(index, s.recovery.partitions, processes))
    console.print(f"created {mine} of {s.recovery.partitions} recovery partition(s) in {db}")


@recovery_app.command("init")
def recovery_init(
    config: ConfigOpt = Path("config/local.yaml"),
    process_id: Annotated[Optional[int], typer.Option("--process-id", "-i",
                                                      help="this process's index, when each process of a cluster "
                                                           "keeps a store of its own (with --addresses)")] = None,
    addresses: Annotated[Optional[str], typer.Option("--addresses", "-a",
                                                     help="host:port of every process of the cluster")] = None,
) -> None:
    """Create the recovery store named by ``recovery.dir`` (once, before the first run); in a cluster whose
    processes keep stores apart, this process's partitions (those whose index is its own modulo the processes)."""
    _init_recovery(config, _share(process_id, addresses), existing_ok=False)


@app.command()
def simulate(
    config: ConfigOpt = Path("config/local.yaml"),
    out: Annotated[Optional[Path], typer.Option(help="write JSON lines to this file")] = None,
    kafka: Annotated[bool, typer.Option(help="produce to the config's Kafka input topic")] = False,
    events: Annotated[Optional[int], typer.Option(help="override the simulator's event count")] = None,
    seed: Annotated[Optional[int], typer.Option(help="override the seed")] = None,
) -> None:
    """Write simulated shopper events (the config's ``source.simulator``) to a file or Kafka."""
    from connectors.simulator import iter_records
    from nudgeflow.settings import load_settings

    try:
        s, _ = load_settings(config)
    except ConfigError as e:
        _fail(e)
    sim = s.source.simulator.model_copy(
        update={k: v for k, v in {"events": events, "seed": seed}.items() if v is not None}
    )
    if sim.events is None:
        _fail(ValueError("simulate needs a bounded event count (--events)"))
    if kafka == (out is not None):
        _fail(ValueError("give exactly one of --out FILE or --kafka"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with out.open("wb") as f:
            for rec in iter_records(sim):
                f.write(rec + b"\n")
                n += 1
        console.print(f"wrote {n} events to {out}")
        return
    from connectors.kafka import user_keyed
    from connectors.tansu import create_topics, produce

    topic = s.kafka.input_topics[0]
    create_topics(",".join(s.kafka.brokers), [topic], partitions=s.kafka.partitions)
    n = produce(",".join(s.kafka.brokers), topic, user_keyed(iter_records(sim)))
    console.print(f"produced {n} events to {topic}")


def _deployment(config: Path) -> Deployment:
    from nudgeflow.configload import load_deployment

    try:
        return load_deployment(config)
    except ConfigError as e:
        _fail(e)
        raise  # unreachable: _fail exits


@app.command()
def validate(config: ConfigOpt = Path("config/local.yaml")) -> None:
    """Check a deployment config and the files it names; errors name file, line and field."""
    from operators.features import FeaturePlan

    dep = _deployment(config)
    s = dep.settings
    console.print(f"{config}: ok")
    if dep.csv_mapping is not None and s.source.csv is not None:
        where = dep.resolve(s.source.csv.mapping) if isinstance(s.source.csv.mapping, str) else "source.csv.mapping"
        console.print(f"{where}: ok, {len(dep.csv_mapping.columns)} columns")
    console.print(f"{dep.resolve(s.features.definitions)}: ok, {len(FeaturePlan(dep.features).names)} features")
    if s.models:
        console.print(f"{dep.resolve(s.models)}: ok, {len(dep.models.models)} models")
    console.print(f"{dep.resolve(s.triggers)}: ok, {len(dep.triggers.triggers)} triggers")


@app.command()
def backtest(
    triggers: Annotated[Path, typer.Option("--triggers", "-t", help="the trigger file to try (checked like validate)")],
    events: Annotated[str, typer.Option("--events", "-e", help="a JSONL file of events, or 'clickhouse': the "
                                        "deployment's events table")],
    config: ConfigOpt = Path("config/local.yaml"),
    since: Annotated[Optional[str], typer.Option(help="ClickHouse events from: 2026-11-01, an ISO time or 7d ago")] = None,
    until: Annotated[Optional[str], typer.Option(help="ClickHouse events before: a date, ISO time or duration ago")] = None,
    out: Annotated[Optional[Path], typer.Option(help="keep the run's actions, dead letters and chDB here (new or "
                                                "empty folder); default: a temporary folder, removed")] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", help="worker threads in this process")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as one JSON object")] = False,
) -> None:
    """Replay history through the real flow with other triggers, sending nothing; print what they would have done.

    Per trigger: fires, holdouts (would have fired), suppressions by guard and users reached. Features,
    models and guards are the deployment's own: the models start cold and learn on the history as they
    would live. Guards count in a fresh embedded Redis, results go to a throwaway chDB, actions and dead
    letters to files: production Redis, ClickHouse, Kafka and webhooks are never written.
    """
    import time

    from nudgeflow.backtest import CLICKHOUSE, backtest as run_backtest, parse_time, print_results

    dep = _deployment(config)
    now = int(time.time() * 1000)
    try:
        figures = run_backtest(
            dep, triggers, events if events == CLICKHOUSE else Path(events),
            since=parse_time(since, now) if since else None, until=parse_time(until, now) if until else None,
            out=out, workers=workers,
        )
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    if as_json:
        print(json.dumps(figures))
    else:
        print_results(figures, console)


@app.command()
def query(
    name: Annotated[Optional[str], typer.Argument(help="a saved query (nudgeflow query --list)")] = None,
    config: ConfigOpt = Path("config/local.yaml"),
    since: Annotated[Optional[str], typer.Option(help="from: 2026-11-01, an ISO time or 7d ago; default all")] = None,
    until: Annotated[Optional[str], typer.Option(help="before: a date, ISO time or duration ago; default now")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="a query parameter, e.g. window=3d")] = None,
    list_queries: Annotated[bool, typer.Option("--list", help="list the saved queries and their parameters")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON objects")] = False,
) -> None:
    """Run a saved analyst query (nudgeflow/queries/<name>.sql) on the deployment's ClickHouse and print a table."""
    import time

    from connectors.clickhouse import connect
    from flows.common import clickhouse_dsn
    from nudgeflow.backtest import parse_time
    from nudgeflow.queries import QUERIES, as_records, cell, run_query
    from nudgeflow.settings import load_settings
    from nudgeflow.summary import table

    if list_queries or name is None:
        console.print(table("saved queries (nudgeflow query <name>)", ["name", "answers", "parameters"],
                            [(q.name, q.title, " ".join(f"{p.name}={p.default}" for p in q.params))
                             for q in QUERIES.values()]))
        return
    now = int(time.time() * 1000)
    if any("=" not in p for p in param or []):
        _fail(ValueError("--param takes name=value, e.g. window=3d"))
    try:
        params = dict(p.split("=", 1) for p in param or [])
        s, base = load_settings(config)
        client = connect(clickhouse_dsn(s, base))
        try:
            columns, rows = run_query(client, s.clickhouse.database, name, parse_time(since, now) if since else None,
                                      parse_time(until, now) if until else None, **params)
        finally:
            client.close()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(e)
    if as_json:
        print(json.dumps({"query": name, "columns": columns, "rows": as_records(columns, rows)}))
    else:
        console.print(table(f"{name}: {QUERIES[name].title}", columns, ([cell(v) for v in r] for r in rows)))


@app.command()
def report(
    config: ConfigOpt = Path("config/local.yaml"),
    since: Annotated[Optional[str], typer.Option(help="from: 2026-11-01, an ISO time or 7d ago; default all")] = None,
    until: Annotated[Optional[str], typer.Option(help="before: a date, ISO time or duration ago; default now")] = None,
    out: Annotated[Path, typer.Option(help="the HTML file to write")] = Path("report.html"),
) -> None:
    """Write a self-contained HTML report (SVG charts, no scripts) from the saved queries on the deployment's ClickHouse."""
    import time

    from connectors.clickhouse import connect
    from flows.common import clickhouse_dsn
    from nudgeflow.backtest import parse_time
    from nudgeflow.report import write_report
    from nudgeflow.settings import load_settings

    now = int(time.time() * 1000)
    try:
        s, base = load_settings(config)
        client = connect(clickhouse_dsn(s, base))
        try:
            write_report(client, s.clickhouse.database, s.name, out, parse_time(since, now) if since else None,
                         parse_time(until, now) if until else None)
        finally:
            client.close()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(e)
    console.print(f"wrote {out}")


@app.command()
def features(config: ConfigOpt = Path("config/local.yaml")) -> None:
    """List every feature the definitions produce (the names triggers and Redis use)."""
    from operators.features import FeaturePlan

    for name in FeaturePlan(_deployment(config).features).names:
        console.print(name)


@app.command()
def schema(out_dir: Annotated[Path, typer.Option(help="where to write the JSON Schemas")] = Path("config")) -> None:
    """Write JSON Schemas of the config files for editors (YAML language server)."""
    from nudgeflow.settings import SCHEMAS

    for name, model in SCHEMAS.items():
        path = out_dir / f"{name}.schema.json"
        path.write_text(json_schema(model))
        console.print(f"wrote {path}")


def json_schema(model: type[BaseModel]) -> str:
    """A config model's JSON Schema as ``nudgeflow schema`` writes it (and ``config/`` ships it)."""
    return json.dumps(model.model_json_schema(), indent=2) + "\n"


def main() -> None:  # pragma: no cover - console-script shim for `python -m nudgeflow.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
