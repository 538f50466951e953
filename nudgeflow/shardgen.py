"""Pick the shard keys of :data:`operators.shards.BALANCED` by how Bytewax routes them.

Bytewax sends each key of a stateful step to worker ``hash(key) % workers``; the keys ``"0"`` … ``"63"`` land
29 and 35 on two workers and 5 to 13 on eight. This routes candidate names (``"<shard>-<salt>"``) through a
real cluster of every size from 2 to :data:`MAX_WORKERS` threads, records each one's worker, and picks one
salt a shard, in order, so that every prefix of the list (any ``shards`` up to its length) spreads as evenly
as it can over each cluster size. Run it again, and paste what it prints into ``operators/shards.py``, if a
Bytewax upgrade routes differently (``tests/test_shards.py`` fails then)::

    python -m nudgeflow.shardgen > /tmp/names.txt
"""

from __future__ import annotations

import math
import subprocess
import sys
from importlib.metadata import version

import orjson

MAX_WORKERS = 16
SHARDS = 256
SALTS = 64


def routes(keys: list[str], workers: int) -> dict[str, int]:
    """The worker index each key is routed to by a stateful step of a ``workers``-thread cluster (run in a
    child process: a Bytewax run keeps its threads' state until the interpreter ends)."""
    out = subprocess.run(
        [sys.executable, "-m", "nudgeflow.shardgen", "--route", str(workers)],
        input=orjson.dumps(keys), capture_output=True, check=True,
    ).stdout
    return orjson.loads(out)


def _route_here(workers: int) -> None:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, cluster_main

    keys = orjson.loads(sys.stdin.buffer.read())
    seen: dict[str, int] = {}

    class _Seen(StatelessSinkPartition[str]):
        def __init__(self, index: int):
            self.index = index

        def write_batch(self, items: list[str]) -> None:
            for k in items:
                seen[k] = self.index

    class _Sink(DynamicSink[str]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> _Seen:
            return _Seen(worker_index)

    flow = Dataflow("shard_routes")
    keyed = op.key_on("key", op.input("keys", flow, TestingSource(keys)), lambda k: k)
    held = op.stateful_map("held", keyed, lambda state, k: (None, k))  # runs where Bytewax routed the key
    op.output("where", op.map("key_of", held, lambda kv: kv[1]), _Sink())
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    sys.stdout.buffer.write(orjson.dumps(seen))


def pick(table: dict[int, dict[str, int]], shards: int = SHARDS, salts: int = SALTS) -> list[str]:
    """One name a shard, greedily: the salt that puts no worker of any cluster size above its even share of
    the names so far (``ceil(n / workers)``), and then leaves the workers most level."""
    counts = {w: [0] * w for w in table}
    names: list[str] = []
    for i in range(shards):
        def cost(name: str) -> int:
            total = 0
            for w, where in table.items():
                held = counts[w][where[name]]
                total += 100 * max(0, held + 1 - math.ceil((i + 1) / w)) + held - min(counts[w])
            return total

        best = min((f"{i}-{s}" for s in range(salts)), key=cost)
        names.append(best)
        for w, where in table.items():
            counts[w][where[best]] += 1
    return names


def main() -> None:
    if sys.argv[1:2] == ["--route"]:
        _route_here(int(sys.argv[2]))
        return
    candidates = [f"{i}-{s}" for i in range(SHARDS) for s in range(SALTS)]
    table = {w: routes(candidates, w) for w in range(2, MAX_WORKERS + 1)}
    names = pick(table)
    print(f"#: picked by python -m nudgeflow.shardgen for bytewax {version('bytewax')}")
    print("BALANCED = (")
    for i in range(0, len(names), 12):
        print("    " + " ".join(f'"{n}",' for n in names[i:i + 12]))
    print(")")


if __name__ == "__main__":
    main()
