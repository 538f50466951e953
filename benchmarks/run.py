"""The benchmark harness: ``python -m benchmarks.run`` (``make bench``).

Starts a tansu broker (in memory), produces simulated shopper events keyed by
user, then runs every stage of :data:`benchmarks.stage.STAGES` on that topic,
each in a fresh ``python -m benchmarks.stage`` process, prints a table, appends
the run to ``benchmarks/RESULTS.md`` and ``benchmarks/results.jsonl``, and
ends with one machine-readable ``BENCH ...`` line. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from connectors.embedded import DEFAULT_REDIS_URL, EmbeddedRedis, ensure_redis, ping
from connectors.simulator import SimulatorConfig, iter_records, resolve_start_ms
from connectors.tansu import TansuBroker, create_topics, produce
from nudgeflow.cluster import loopback_addresses

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_EVENTS = 200_000
QUICK_EVENTS = 20_000
DEFAULT_USERS = 20_000
BAD_RATE = 0.001
STAGE_TIMEOUT_S = 600.0

#: (numerator, denominator) stages whose events/s ratio is reported; skipped when a stage did not run
RATIOS: list[tuple[str, str]] = [
    ("parse", "raw"), ("identity", "parse"), ("features", "features_noid"), ("full", "full_noid"), ("features", "raw"), ("features", "parse"), ("full", "raw"), ("full", "bare"), ("bare", "raw"),
    ("features_rec1s", "features"), ("features_rec10s", "features"), ("full_rec10s", "full"), ("features", "features_nocompact"),
    ("full", "quix"), ("bare", "quix_bare"), ("quix", "quix_bare"),
    ("full", "faust"), ("bare", "faust_bare"), ("faust", "faust_bare"), ("features_x2", "features_x1"),
    ("bare_x2", "bare_x1"), ("peerjob", "quix"), ("peerjob", "faust"), ("full", "peerjob"),
]
#: the last line, exactly ``BENCH k=v ...`` with these fields in this order, numbers only (0 when not measured):
#: (name, stage, figure), (name, (num, den), None) for a ratio, or (name, None, key of the run) for a run figure
BENCH_FIELDS: list[tuple[str, Any, str | None]] = [
    ("full_eps", "full", "eps"),
    ("bare_eps", "bare", "eps"),
    ("raw_eps", "raw", "eps"),
    ("quix_eps", "quix", "eps"),
    ("full_vs_bare", ("full", "bare"), None),
    ("full_vs_quix", ("full", "quix"), None),
    ("p99_ms", None, "p99_ms"),
    ("scale2", ("features_x2", "features_x1"), None),
]
#: stages run by another engine in its own virtualenv: name → (installer of its Python, module); same
#: arguments and JSON line as ``benchmarks.stage``
PEER_STAGES: dict[str, tuple[str, str]] = {
    "quix_bare": ("quix", "benchmarks.peers.quix_job"),
    "quix": ("quix", "benchmarks.peers.quix_job"),
    "faust_bare": ("faust", "benchmarks.peers.faust_job"),
    "faust": ("faust", "benchmarks.peers.faust_job"),
}
#: stages of several Bytewax processes (``cluster_main``, as ``nudgeflow run --processes N``): name → (stage,
#: processes). They read their own topic of SCALE_PARTITIONS partitions, so 2 processes get 2 partitions each;
#: the features flow, as chDB (in the full flow) lives in one process, and the bare counter, what a second
#: process buys Bytewax itself on the same cores in the same run (``bare_x2`` / ``bare_x1``, beside ``scale2``).
SCALE_STAGES: dict[str, tuple[str, int]] = {
    "features_x1": ("features", 1), "features_x2": ("features", 2), "bare_x1": ("bare", 1), "bare_x2": ("bare", 2),
}
SCALE_PARTITIONS = 4
#: the scale stages' topic holds this many times the records and shoppers of the run: the processes of a
#: cluster connect to each other before reading (0.5–2.5 s here, inside the measured wall), a fifth of
#: ``features_x2``'s wall at 200k records, which made ``scale2`` 0.80–1.03 from one run to the next on the
#: same machine (1.22 at 600k; ``benchmarks/RESULTS.md``, 2026-12-07)
SCALE_FACTOR = 3
PEERS_DIR = HERE / "peers"
#: peer → what its virtualenv needs
PEER_PACKAGES: dict[str, list[str]] = {
    "quix": ["quixstreams", "redis", "orjson"],
    "faust": ["faust-streaming", "redis", "orjson"],
}
LATENCY_LOG = HERE / "latency.jsonl"
PROFILE_TOP = 15
#: steps below this share of samples are left out of the profile's step table (they stay in results.jsonl)
STEP_MIN_SHARE = 0.005
#: frames of these folders are "ours" in the profile
OUR_CODE = ("operators/", "flows/", "connectors/", "nudgeflow/", "benchmarks/")


def stage_names() -> list[str]:
    """Every stage, in the order they run: Bytewax's, then the peers', then the scaling pair."""
    from benchmarks.stage import STAGES

    return [*STAGES, *PEER_STAGES, *SCALE_STAGES]


def peer_python(peer: str) -> Path:
    """The Python of ``benchmarks/peers/.venv-<peer>``, created and filled with pip on first use, reused after."""
    venv = PEERS_DIR / f".venv-{peer}"
    python = venv / "bin" / "python"
    ready = venv / ".installed"  # written last: a half-finished install is redone
    if not ready.exists():
        log(f"installing {peer} into {venv} (first use) ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[peer]], check=True)
        ready.write_text(" ".join(PEER_PACKAGES[peer]) + "\n")
    return python


# -- the machine and the tree


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def git_revision() -> str:
    """``git rev-parse --short HEAD``, plus ``+dirty`` when the tree has changes (untracked files count) other
    than the benchmarks' own records: a run after another of the same session is still of that revision."""
    rev = _git("rev-parse", "--short", "HEAD") or "unknown"
    records = (":(exclude)benchmarks/RESULTS.md", ":(exclude)benchmarks/*.jsonl")
    return rev + ("+dirty" if _git("status", "--porcelain", "--", ".", *records) else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "rev": git_revision(),
        # platform.processor() is empty on many Linux builds: then only the machine type
        "machine": "/".join(x for x in (platform.processor(), platform.machine()) if x),
        "cpu": cpu_model(),
        "nproc": os.cpu_count() or 0,
        "python": platform.python_version(),
        # the base interpreter (a venv's link hides it): builds of one version differ by 15-30 % (the Makefile)
        "python_bin": getattr(sys, "_base_executable", sys.executable),
        "bytewax": version("bytewax"),
        "load1": round(os.getloadavg()[0], 2),
    }


# -- producing


def user_key(rec: bytes) -> bytes | None:
    """The shopper id of a simulator record (its user id, else the anonymous id it carries), found without
    parsing (orjson writes no spaces).

    Records whose ids are missing or not strings (deliberately bad ones) get no key.

    >>> user_key(b'{"event_id":"sim-0-1","user_id":"u00042","type":"browse"}')
    b'u00042'
    >>> user_key(b'{"event_id":"sim-0-1","user_id":42}') is None
    True
    """
    for field in (b'"user_id":"', b'"device_id":"', b'"anonymous_id":"', b'"account_id":"'):
        i = rec.find(field)
        if i >= 0:
            i += len(field)
            j = rec.find(b'"', i)
            return rec[i:j] if j > 0 else None
    return None


def simulator_config(users: int, events: int, seed: int, span_days: float | None = None) -> SimulatorConfig:
    """One simulator partition (so the topic is in event-time order per user and overall), 0.1 % bad records.

    The start is the simulator's own (now minus the history the events need)
    moved back to midnight UTC: the same arguments give the same records on any
    day up to a whole-day shift of every time stamp, which changes nothing the
    flow computes (local night is periodic), while the ``future_ts`` bad records
    still lie in the future. ``span_days``: the simulator's span (its default, a week, when None).
    """
    cfg = SimulatorConfig(users=users, events=events, seed=seed, partitions=1, bad_rate=BAD_RATE)
    if span_days is not None:
        cfg = cfg.model_copy(update={"span_s": int(span_days * 86400)})
    start = resolve_start_ms(cfg)
    return cfg.model_copy(update={"start_ms": start - start % 86_400_000})


def keyed_records(cfg: SimulatorConfig) -> Iterator[tuple[bytes | None, bytes]]:
    """(user id, record) pairs; the record is copied because each ``orjson.dumps`` result kept
    alive pins about 4 KB of heap (orjson 3.13), which made 200k held records cost 0.9 GB."""
    for rec in iter_records(cfg):
        yield user_key(rec), bytes(memoryview(rec))


def _proc_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# -- running a stage in a fresh process


def stage_command(name: str, args: list[str]) -> list[str]:
    """The command of one stage process: ``benchmarks.stage`` in this Python, or a peer job in its own."""
    if name in PEER_STAGES:
        peer, module = PEER_STAGES[name]
        return [str(peer_python(peer)), "-m", module, name, *args]
    return [sys.executable, "-m", "benchmarks.stage", name, *args]


def run_stage(
    name: str, broker: TansuBroker, topic: str, events: int, redis_url: str, prefix: str, processes: int = 1,
    wrap: list[str] | None = None, stage: str | None = None,
) -> dict[str, Any]:
    """Run a stage in fresh processes: one (under ``wrap``, e.g. a profiler, if given) or ``processes`` of a Bytewax
    cluster, running the stage ``stage`` (default ``name``); its figures (a cluster's merged by :func:`merge`)."""
    stage = stage or name
    workdir = Path(tempfile.mkdtemp(prefix=f"nfbench-{name}-"))
    args = [
        "--bootstrap", broker.bootstrap, "--topic", topic, "--events", str(events),
        "--redis-url", redis_url, "--prefix", f"{prefix}-{name}",
    ]  # fmt: skip
    if processes == 1:
        cmds = [[*(wrap or []), *stage_command(stage, [*args, "--workdir", str(workdir)])]]
    else:
        addresses = ";".join(loopback_addresses(processes))
        cmds = [
            stage_command(stage, [*args, "--workdir", str(workdir / str(i)), "--addresses", addresses, "--process-id", str(i)])
            for i in range(processes)
        ]
    pid = broker.process.pid if broker.process else None
    b0 = _proc_cpu_s(pid)
    t0 = time.perf_counter()
    try:
        procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
        outs = [p.communicate(timeout=STAGE_TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired as e:
        for p in procs:
            p.kill()
        raise RuntimeError(f"stage {name} did not finish in {STAGE_TIMEOUT_S:.0f}s") from e
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    process_s = time.perf_counter() - t0
    b1 = _proc_cpu_s(pid)
    results = []
    for p, (out, err) in zip(procs, outs):
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines or p.returncode != 0:
            raise RuntimeError(f"stage {name} failed (rc={p.returncode}): {lines[-1:]}\n{err[-4000:]}")
        results.append(json.loads(lines[-1]))
    res = results[0] if processes == 1 else merge(name, results, events)
    if not res.get("ok"):
        raise RuntimeError(f"stage {name} read {res.get('consumed')} of {events} records: {res}")
    res["process_s"] = process_s  # the whole child: interpreter start, imports, build, run, report
    if b0 is not None and b1 is not None:
        res["broker_cpu_s"] = b1 - b0
    return res


def merge(name: str, results: list[dict[str, Any]], events: int) -> dict[str, Any]:
    """One figure set for the processes of a cluster stage: the slowest process's wall time, CPU and memory summed.

    Each process of our flows counted what it accepted, and dead letters are counted from the shared DLQ topic,
    once; a process of the bare counter counted what it read.
    """
    wall = max(r["wall_s"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    consumed = sum(r.get("accepted", r["consumed"]) for r in results) + max(r.get("kafka_dlq", 0) for r in results)
    return {
        "stage": name, "processes": len(results), "events": events, "wall_s": wall, "cpu_s": cpu,
        "user_s": sum(r["user_s"] for r in results), "sys_s": sum(r["sys_s"] for r in results),
        "max_rss_mb": sum(r["max_rss_mb"] for r in results), "eps": events / wall, "us_cpu_per_event": cpu / events * 1e6,
        "per_process": [{k: r.get(k) for k in ("wall_s", "cpu_s", "accepted", "consumed", "max_rss_mb")} for r in results],
        "state_users": sum(r.get("state_users", 0) for r in results), "consumed": consumed, "ok": consumed == events,
    }  # fmt: skip


# -- profiling


def _frame(f: str) -> tuple[str, str]:
    """``func (path/file.py:12)`` of py-spy's raw format → (function, file)."""
    func, _, where = f.rpartition(" (")
    return func, where.rsplit(":", 1)[0]


#: frames that mark a sample as taken while the flow ran: the timed region (benchmarks.measure), the ClickHouse writer
TIMED_FRAMES = frozenset({"measure", "ClickHouseWriter._run"})
#: innermost frames of a thread that waits (it costs no CPU)
IDLE_FRAMES = frozenset({"Condition.wait", "Event.wait", "wait", "Thread._wait_for_tstate_lock", "sleep"})


def profile(raw: Path, us_per_event: float) -> dict[str, Any]:
    """py-spy's raw samples summed by our functions (``OUR_CODE``), top PROFILE_TOP by self time, and by step.

    **self** of one of our functions: samples whose innermost frame of ours is it, so the library code it calls
    (Bytewax's Python, redis-py, orjson, chDB's client) counts as its cost; **inclusive**: samples with it
    anywhere on the stack. µs per event = share of samples × the stage's CPU µs per event (py-spy samples
    Python stacks of running threads: native-only threads, e.g. librdkafka's, are not in the shares).
    **steps**: every sample under the callback Bytewax called (:func:`step_of`), so the shares add up to 100 %.
    """
    total = 0
    self_n: dict[tuple[str, str], int] = {}
    incl_n: dict[tuple[str, str], int] = {}
    leaves: dict[tuple[str, str], dict[str, int]] = {}
    step_n: dict[tuple[str, str], int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        # only the flow at work: the timed run (its worker and the ClickHouse writer), not build, report or waits
        if not any(f[0] in TIMED_FRAMES for f in frames) or frames[-1][0] in IDLE_FRAMES:
            continue
        total += n
        step = step_of(frames)
        step_n[step] = step_n.get(step, 0) + n
        ours = [f for f in frames if f[1].startswith(OUR_CODE)]
        if not ours:
            ours = [("(outside our code)", "")]
        for f in set(ours):
            incl_n[f] = incl_n.get(f, 0) + n
        own = ours[-1]
        self_n[own] = self_n.get(own, 0) + n
        leaf = frames[-1][0] if frames[-1] != own else "(itself)"
        lv = leaves.setdefault(own, {})
        lv[leaf] = lv.get(leaf, 0) + n
    rows = []
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:PROFILE_TOP]:
        top_leaf = max(leaves[f].items(), key=lambda kv: kv[1])[0]
        rows.append({
            "function": f[0], "file": f[1], "self_share": n / total, "self_us": n / total * us_per_event,
            "incl_share": incl_n[f] / total, "incl_us": incl_n[f] / total * us_per_event, "top_leaf": top_leaf,
        })  # fmt: skip
    steps = [{"callback": f[0], "file": f[1], "share": n / total, "us": n / total * us_per_event}
             for f, n in sorted(step_n.items(), key=lambda kv: -kv[1])]
    return {"samples": total, "us_cpu_per_event": us_per_event, "top": rows, "steps": steps}


BETWEEN_STEPS = ("(Bytewax between steps)", "")


def step_of(frames: list[tuple[str, str]]) -> tuple[str, str]:
    """The step a sample was taken in: the outermost frame of ours below the timed region that is not the
    harness's (the callback Bytewax called: a logic's ``on_batch``, a mapper, a sink partition's ``write_batch``,
    or the ClickHouse writer's thread); :data:`BETWEEN_STEPS` when there is none (Bytewax's own work).

    >>> step_of([("measure", "benchmarks/measure.py"), ("run", "benchmarks/stage.py"),
    ...          ("FeatureLogic.on_batch", "operators/features.py"), ("read", "operators/features.py")])
    ('FeatureLogic.on_batch', 'operators/features.py')
    >>> step_of([("measure", "benchmarks/measure.py"), ("run", "benchmarks/stage.py"), ("shim", "bytewax/operators.py")])
    ('(Bytewax between steps)', '')
    >>> step_of([("Thread.run", "threading.py"), ("ClickHouseWriter._run", "connectors/clickhouse.py"),
    ...          ("ClickHouseWriter._insert", "connectors/clickhouse.py")])
    ('ClickHouseWriter._run', 'connectors/clickhouse.py')
    """
    timed = False
    for f in frames:
        if f[0] in TIMED_FRAMES:
            timed = True
            if not f[1].startswith("benchmarks/"):  # the writer's thread is a step of its own
                return f
        elif timed and f[1].startswith(OUR_CODE) and not f[1].startswith("benchmarks/"):
            return f
    return BETWEEN_STEPS


def profile_markdown(run: dict[str, Any], prof: dict[str, Any]) -> str:
    """The "Profile of the <stage> flow" section appended to RESULTS.md."""
    env, stage, gil = run["env"], prof["stage"], prof.get("gil", False)
    out = [
        f"## Profile of the {stage} flow",
        "",
        f"`python -m benchmarks.run --profile {stage}{' --profile-gil' if gil else ''}`, {env['utc']} UTC, rev "
        f"`{env['rev']}`, {env['cpu']} x{env['nproc']}, "
        f"{run['events']:,} events ({run['users']:,} users): the `{stage}` stage run once more under "
        f"`py-spy record -f raw -r 250{' --gil' if gil else ''}`, {prof['samples']:,} samples, summed by our functions "
        f"(`benchmarks.run.profile`). **self**: samples whose innermost frame of ours is the function, so the library "
        f"code it calls is its cost; **incl.**: the function anywhere on the stack. µs/event = share × "
        + (f"{prof['us_cpu_per_event']:.1f} µs of wall time per event (the unprofiled `{stage}` stage). Only samples of "
           "the thread holding the interpreter lock: what keeps the flow's Python busy, which sets its speed; work "
           "that releases the lock (chDB's inserts, socket waits) is left out, and the µs are an upper bound (the lock "
           "is not held all the time)." if gil else
           f"{prof['us_cpu_per_event']:.1f} µs CPU per event (the unprofiled `{stage}` stage); native-only threads "
           "(librdkafka, chDB internals) are not sampled, so shares are of Python time."),
        "",
        "| # | function | file | self % | self µs/ev | incl. % | incl. µs/ev | most samples in |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(prof["top"], 1):
        out.append(
            f"| {i} | `{r['function']}` | {r['file']} | {r['self_share'] * 100:.1f} | {r['self_us']:.1f} | "
            f"{r['incl_share'] * 100:.1f} | {r['incl_us']:.1f} | `{r['top_leaf']}` |"
        )
    out += ["", "By step: each sample under the callback Bytewax called (a logic's `on_batch`, a mapper, a sink's "
            "`write_batch`; the ClickHouse writer's thread is one), the rest between steps.", "",
            "| step | file | % | µs/ev |", "| --- | --- | --- | --- |"]
    out += [f"| `{r['callback']}` | {r['file']} | {r['share'] * 100:.1f} | {r['us']:.1f} |"
            for r in prof["steps"] if r["share"] >= STEP_MIN_SHARE]
    return "\n".join(out) + "\n"


def append_profile(md: Path, section: str) -> None:
    """Append a section at the end of RESULTS.md, re-read just before (other harnesses append to it too)."""
    text = md.read_text() if md.exists() else RESULTS_HEADER
    md.write_text(text + ("" if text.endswith("\n\n") else "\n") + section)


# -- reporting


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one stage's runs in successive rounds, the one with the median events/s (the lower of the two middle
    ones for an even count), whole, so its figures stay those of one run; ``eps_rounds`` lists every round's.

    >>> r = median_run([{"eps": 90.0, "cpu_s": 1}, {"eps": 70.0, "cpu_s": 3}, {"eps": 80.0, "cpu_s": 2}])
    >>> r["eps"], r["cpu_s"], r["eps_rounds"]
    (80.0, 2, [90.0, 70.0, 80.0])
    """
    mid = sorted(runs, key=lambda r: r["eps"])[(len(runs) - 1) // 2]
    return {**mid, "eps_rounds": [r["eps"] for r in runs]} if len(runs) > 1 else mid


def ratios(stages: dict[str, dict[str, Any]]) -> dict[str, float]:
    """events/s of one stage over another's (full_vs_raw = 0.25: the full flow runs at a quarter of the ceiling)."""
    return {
        f"{a}_vs_{b}": stages[a]["eps"] / stages[b]["eps"] for a, b in RATIOS if a in stages and b in stages
    }


def checks(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Cross-checks of a stage's outputs that do not invalidate its timing."""
    out = []
    for name in ("full", "peerjob"):
        sk = stages.get(name)
        for what in ("actions", "dlq") if sk else ():
            if sk.get(f"kafka_{what}") != sk.get(f"ch_{what}"):
                out.append(f"{name}: {what} in Kafka {sk.get(f'kafka_{what}')} != in ClickHouse {sk.get(f'ch_{what}')}")
    quix, faust, ours = stages.get("quix"), stages.get("faust"), stages.get("peerjob")
    if quix and faust:  # the same job (benchmarks.peers.job) on the same records: the same output
        for what in ("kafka_actions", "redis_users"):
            if quix.get(what) != faust.get(what):
                out.append(f"peers: {what} quix {quix.get(what)} != faust {faust.get(what)}")
    for name, peer in (("quix", quix), ("faust", faust)):
        # the same shoppers in Redis (actions differ by design: nudgeflow's timers fire for shoppers who never
        # come back, the peers notice an abandoned cart at the shopper's next event)
        if ours and peer and ours.get("redis_users") != peer.get("redis_users"):
            out.append(f"peerjob: Redis users {ours.get('redis_users')} != {name}'s {peer.get('redis_users')}")
    return out


def table(run: dict[str, Any]) -> str:
    head = f"{'stage':<15} {'events/s':>10} {'µs CPU/ev':>10} {'wall s':>8} {'CPU s':>8} {'max RSS MB':>11} {'broker CPU s':>13}"
    rows = [head, "-" * len(head)]
    for name, r in run["stages"].items():
        broker = r.get("broker_cpu_s")
        rows.append(
            f"{name:<15} {r['eps']:>10,.0f} {r['us_cpu_per_event']:>10.2f} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
            f"{r['max_rss_mb']:>11.0f} {'' if broker is None else f'{broker:.2f}':>13}"
        )
    p = run["produce"]
    rows.append(f"{'(produce)':<15} {p['eps']:>10,.0f} {'':>10} {p['produce_s']:>8.2f}")
    if run["ratios"]:
        rows.append("events/s ratios: " + "  ".join(f"{k.replace('_vs_', '/')} {v:.3f}" for k, v in run["ratios"].items()))
    for name, r in run["stages"].items():
        if "first_record_s" in r:
            rows.append(
                f"{name}: first record {r['first_record_s']:.2f}s after flow start (source start-up), "
                f"last at {r['last_record_s']:.2f}s, end {r['wall_s']:.2f}s"
            )
    for name, sk in run["stages"].items():
        if "ch_events" in sk:  # the main flow's stages
            rows.append(
                f"{name}: flow {sk['flow_s']:.2f}s + close {sk['close_s']:.2f}s; ClickHouse rows events={sk.get('ch_events')} "
                f"dlq={sk.get('ch_dlq')} actions={sk.get('ch_actions')}; Kafka actions={sk.get('kafka_actions')} "
                f"dlq={sk.get('kafka_dlq')}; Redis users={sk.get('redis_users')}; looks at quiet shoppers={sk.get('idle_looks')}"
            )
        elif name in ("quix", "faust"):  # the peers' job: compare with peerjob's
            rows.append(f"{name}: Kafka actions={sk.get('kafka_actions')}; Redis users={sk.get('redis_users')}")
    return "\n".join(rows)


def bench_figures(run: dict[str, Any]) -> dict[str, float]:
    """The figures of the ``BENCH`` line, 0 for any not measured in this run (a stage left out, no latency run)."""
    out: dict[str, float] = {}
    for key, src, fig in BENCH_FIELDS:
        if src is None:
            v = run.get(fig)
        elif fig is None:
            v = run["ratios"].get(f"{src[0]}_vs_{src[1]}")
        else:
            v = run["stages"].get(src, {}).get(fig)
        out[key] = float(v or 0.0)
    return out


def bench_line(run: dict[str, Any]) -> str:
    """``BENCH full_eps=<n> … scale2=<x>``: events/s as integers, the rest with 4 (ratios) or 1 (ms) decimals."""
    parts = []
    for key, v in run["bench"].items():
        parts.append(f"{key}={v:.0f}" if key.endswith("_eps") else f"{key}={v:.1f}" if key.endswith("_ms") else f"{key}={v:.4f}")
    return "BENCH " + " ".join(parts)


def latest_latency(path: Path = LATENCY_LOG) -> tuple[float, str] | None:
    """p99 event→action latency (ms) of the newest ``benchmarks.latency`` run through Kafka with the default source
    settings (runs ``--via file`` or with ``--add-config`` are experiments), and which run it was; not re-measured
    here (minutes)."""
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        r = json.loads(line) if line.strip() else {}
        lat = r.get("latency")
        src = lat.get("source", {}) if lat else {}
        if lat and src.get("via", "kafka") == "kafka" and not src.get("add_config"):
            return lat["e2e_ms"]["p99"], (
                f"benchmarks.latency run of {r['env']['utc']} UTC (rev {r['env']['rev']}, {lat['rate']:.0f} events/s)"
            )
    return None


RESULTS_HEADER = """\
# Benchmark results

One row per run of `python -m benchmarks.run` (`make bench`), appended by the harness; the same
figures, and more (build time, CPU split, broker CPU, row counts), are in `results.jsonl`, one JSON
object per run. Read `README.md` in this folder for what each stage measures.

Columns: **utc** when the run started; **rev** `git rev-parse --short HEAD` (`+dirty`: the tree had
changes besides these records); **machine** `platform.processor()/machine`; **cpu** model from `/proc/cpuinfo`; **nproc**
cores; **py** Python version; **load1** 1-minute load average at the start (this machine is shared:
a high load means noisy figures); **events** records on the topic (users, Kafka partitions).
Then per stage (`raw`, `bare`, `features`, `full`): **ev/s** records read per second of wall time from
flow start to end (for `full` including the final ClickHouse flush); **µs/ev** CPU time of the
stage's process (all threads) per record; **wall s**; **RSS MB** peak resident memory of the stage's
process. **produce ev/s** how fast the harness filled the topic. Ratios are of events/s:
**full/raw** = 0.25 means the full flow runs at a quarter of the raw Kafka+orjson ceiling.

Only compare rows from the same machine, event count and users.
"""


def _stage_columns(names: list[str]) -> list[str]:
    return [f"{n} {c}" for n in names for c in ("ev/s", "µs/ev", "wall s", "RSS MB")]


def results_row(run: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The markdown columns and cells of one run."""
    env = run["env"]
    cols = ["utc", "rev", "machine", "cpu", "nproc", "py", "load1", "events"]
    cells = [
        env["utc"], f"`{env['rev']}`", env["machine"], env["cpu"], str(env["nproc"]), env["python"], f"{env['load1']:.2f}",
        f"{run['events']:,} ({run['users']:,} users, {run['partitions']} part.)",
    ]
    names = list(run["stages"])
    scaled = [run["stages"][n] for n in names if n in SCALE_STAGES]
    if scaled:  # their own topic (SCALE_FACTOR)
        cells[-1] += f"; scale stages {scaled[0]['events']:,} ({run['users'] * SCALE_FACTOR:,} users, {SCALE_PARTITIONS} part.)"
    if run.get("rounds", 1) > 1:
        cells[-1] += f"; each stage the median of {run['rounds']} rounds"
    cols += _stage_columns(names)
    for n in names:
        r = run["stages"][n]
        cells += [f"{r['eps']:,.0f}", f"{r['us_cpu_per_event']:.2f}", f"{r['wall_s']:.2f}", f"{r['max_rss_mb']:.0f}"]
    cols.append("produce ev/s")
    cells.append(f"{run['produce']['eps']:,.0f}")
    for k, v in run["ratios"].items():
        cols.append(k.replace("_vs_", "/"))
        cells.append(f"{v:.3f}")
    return cols, cells


def _md(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def table_head(text: str, cols: list[str]) -> str:
    r"""What to write after ``text`` (RESULTS.md so far) before a row of ``cols``, so the row lands in a table of
    them: nothing when the text ends with such a table, else a blank line, the header and its rule (a note, a
    profile or another table may have come after the last one, and a row after them would be loose text).

    >>> table_head("| a | b |\n| --- | --- |\n| 1 | 2 |\n", ["a", "b"])
    ''
    >>> table_head("| a | b |\n| --- | --- |\n| 1 | 2 |\n\nA note.\n", ["a", "b"])
    '\n| a | b |\n| --- | --- |\n'
    """
    lines = text.splitlines()
    top = len(lines)
    while top and lines[top - 1].startswith("|"):
        top -= 1
    if top < len(lines) and lines[top] == _md(cols):
        return ""
    gap = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    return gap + _md(cols) + "\n" + _md(["---"] * len(cols)) + "\n"


def append_section_row(out_dir: Path, heading: str, section: str, cols: list[str], cells: list[str],
                       jsonl: str, run: dict[str, Any]) -> None:
    """A harness's run at the end of RESULTS.md, under its ``section`` (written once, the first time ``heading`` is
    missing) in a table of ``cols`` (its header again unless the file ends with such a table), and as one line of
    ``jsonl``. The file is read right before appending: other harnesses append to it too."""
    md = out_dir / "RESULTS.md"
    text = md.read_text() if md.exists() else ""
    add = "" if heading in text else ("" if text.endswith("\n") or not text else "\n") + section
    add += table_head(text + add, cols)
    with md.open("a") as f:
        f.write(add + _md(cells) + "\n")
    with (out_dir / jsonl).open("a") as f:
        f.write(json.dumps(run) + "\n")


def record(run: dict[str, Any], out_dir: Path) -> None:
    """Append the run to RESULTS.md (a table header again unless it ends with a table of these columns) and
    results.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "RESULTS.md"
    cols, cells = results_row(run)
    text = md.read_text() if md.exists() else RESULTS_HEADER
    md.write_text(text + table_head(text, cols) + _md(cells) + "\n")
    with (out_dir / "results.jsonl").open("a") as f:
        f.write(json.dumps(run, sort_keys=False) + "\n")


# -- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=None, help=f"records to produce (default {DEFAULT_EVENTS:,})")
    p.add_argument("--users", type=int, default=None,
                   help=f"simulated shoppers (default {DEFAULT_USERS:,}; with --quick, events/10)")
    p.add_argument("--partitions", type=int, default=3, help="Kafka partitions of the input topic (default 3)")
    p.add_argument("--seed", type=int, default=42, help="simulator seed (default 42)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_EVENTS:,} events")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md / results.jsonl")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(stage_names())}")
    p.add_argument("--profile", nargs="?", const="full", default=None, metavar="STAGE",
                   help="run a stage (default full) once more under py-spy and append its top costs to RESULTS.md")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the interpreter lock (py-spy --gil)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the stages this many times, round after round, and keep each stage's median run by events/s "
                        "(default 1): one run's figures move by 10-30 %% here from one minute to the next")
    p.add_argument("--out-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.profile_gil and not a.profile:
        p.error("--profile-gil goes with --profile")
    if a.rounds < 1:
        p.error("--rounds is at least 1")
    if a.events is None:
        a.events = QUICK_EVENTS if a.quick else DEFAULT_EVENTS
    if a.users is None:
        a.users = max(1, a.events // 10) if a.quick else DEFAULT_USERS
    names = stage_names()
    a.stage_list = names if a.stages is None else [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(a.stage_list) - set(names)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; known: {names}")
    return a


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_redis() -> tuple[str, EmbeddedRedis | None]:
    """The Redis at 127.0.0.1:6379 when it answers, else one started for the run (the caller stops it)."""
    if ping(DEFAULT_REDIS_URL):
        return DEFAULT_REDIS_URL, None
    server = ensure_redis(None)
    return server.url, server


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    env = environment()
    log(f"nudgeflow bench: {a.events:,} events, {a.users:,} users, {a.partitions} partitions, seed {a.seed}; "
        f"rev {env['rev']}, {env['cpu']} x{env['nproc']}, load {env['load1']}")

    redis_url, redis_server = bench_redis()
    prefix = f"nfbench-{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}.events"
    try:
        with TansuBroker() as broker:
            create_topics(broker.bootstrap, [topic], partitions=a.partitions)

            cfg = simulator_config(a.users, a.events, a.seed)
            t0 = time.perf_counter()
            records = list(keyed_records(cfg))
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            n = produce(broker.bootstrap, topic, records, timeout_s=120)
            produce_s = time.perf_counter() - t0
            nbytes = sum(len(v) for _, v in records)
            del records
            assert n == a.events, (n, a.events)
            produced = {"generate_s": gen_s, "produce_s": produce_s, "eps": n / produce_s, "bytes": nbytes}
            log(f"produced {n:,} records ({nbytes / 1e6:.1f} MB) to {topic}: generated in {gen_s:.2f}s, "
                f"produced in {produce_s:.2f}s ({n / produce_s:,.0f}/s)")

            scale_topic, scale_n = f"{prefix}.events{SCALE_PARTITIONS}", a.events * SCALE_FACTOR
            if set(a.stage_list) & set(SCALE_STAGES):
                create_topics(broker.bootstrap, [scale_topic], partitions=SCALE_PARTITIONS)
                scale_cfg = simulator_config(a.users * SCALE_FACTOR, scale_n, a.seed)
                assert produce(broker.bootstrap, scale_topic, list(keyed_records(scale_cfg)), timeout_s=300) == scale_n
                log(f"produced {scale_n:,} records ({a.users * SCALE_FACTOR:,} users) to {scale_topic} for the scale stages")

            runs: dict[str, list[dict[str, Any]]] = {}
            for rnd in range(a.rounds):  # round after round, so a slow minute touches every stage alike
                for name in a.stage_list:
                    stage, processes = SCALE_STAGES.get(name, (name, 1))
                    scaled = name in SCALE_STAGES
                    r = run_stage(name, broker, scale_topic if scaled else topic, scale_n if scaled else n, redis_url,
                                  prefix if rnd == 0 else f"{prefix}-r{rnd}", processes=processes, stage=stage)
                    runs.setdefault(name, []).append(r)
                    label = name if a.rounds == 1 else f"{name} ({rnd + 1}/{a.rounds})"
                    log(f"  {label:<15} {r['eps']:>10,.0f} events/s  wall {r['wall_s']:.2f}s  cpu {r['cpu_s']:.2f}s  "
                        f"max RSS {r['max_rss_mb']:.0f} MB  (process {r['process_s']:.1f}s)")
            stages = {name: median_run(rs) for name, rs in runs.items()}
            prof = None
            if a.profile:
                raw = Path(tempfile.mkdtemp(prefix="nfbench-profile-")) / f"{a.profile}.txt"
                spy = [str(Path(sys.executable).parent / "py-spy"), "record", "-o", str(raw), "-f", "raw", "-r", "250",
                       *(["--gil"] if a.profile_gil else []), "--"]
                r = run_stage(f"{a.profile}_profiled", broker, topic, n, redis_url, prefix, wrap=spy, stage=a.profile)
                unprofiled = stages.get(a.profile, r)
                prof = profile(raw, 1e6 / unprofiled["eps"] if a.profile_gil else unprofiled["us_cpu_per_event"])
                prof["stage"], prof["gil"] = a.profile, a.profile_gil
                prof["profiled_run"] = {k: r[k] for k in ("eps", "us_cpu_per_event", "wall_s")}
                shutil.rmtree(raw.parent, ignore_errors=True)
                log(f"  profiled {a.profile}: {r['eps']:,.0f} events/s under py-spy, {prof['samples']:,} samples")
    finally:
        if redis_server is not None:
            redis_server.stop()

    for w in checks(stages):
        log(f"WARNING: {w}")
    run = {
        "env": env, "events": a.events, "users": a.users, "partitions": a.partitions, "seed": a.seed,
        "bad_rate": BAD_RATE, "redis": "local" if redis_server is None else "started", "rounds": a.rounds,
        "produce": produced, "stages": stages, "ratios": ratios(stages),
    }  # fmt: skip
    latency = latest_latency()
    if latency is not None:
        run["p99_ms"], run["p99_from"] = latency
    if prof is not None:
        run["profile"] = prof
    run["bench"] = bench_figures(run)
    log("")
    log(table(run))
    if latency is not None:
        log(f"p99_ms {latency[0]:.1f}: {latency[1]}")
    if prof is not None:
        log(profile_markdown(run, prof))
    if not a.no_record:
        record(run, a.out_dir)
        if prof is not None:
            append_profile(a.out_dir / "RESULTS.md", profile_markdown(run, prof))
        log(f"recorded in {a.out_dir / 'RESULTS.md'} and {a.out_dir / 'results.jsonl'}")
    log(bench_line(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
