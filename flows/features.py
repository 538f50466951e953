"""Features only: source → parse → features → Redis (dead letters to their sink).

For shops that want the feature store without triggers, and for measuring the
feature engine on its own (``benchmarks/``)::

    NUDGEFLOW_CONFIG=config/local.yaml python -m bytewax.run flows.features:flow
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors import kafka
from connectors.files import dlq_line
from connectors.redis_store import RedisFeatureSink
from flows.common import Runtime, feature_step, flow_attribute, output, parsed_input, redis_url
from nudgeflow.configload import Deployment


def build(dep: Deployment) -> tuple[Dataflow, Runtime]:
    """Build the features-only dataflow for a deployment."""
    s = dep.settings
    url, embedded = redis_url(s)
    flow = Dataflow(f"{s.name}_features")
    fs = feature_step(parsed_input(flow, dep), dep, needed=None)
    output("dlq_out", s, s.dlq, "dlq", dep.base, fs.dead, dlq_line, kafka.dlq_message)
    op.output("features_redis", fs.published, RedisFeatureSink(s.redis, url))
    return flow, Runtime(s, dep.base, url, None, embedded, fs.logics)


__getattr__ = flow_attribute(build)
