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
from flows.common import Runtime, feature_step, flow_attribute, metered, output, parsed_input, redis_url, start_metrics
from nudgeflow.configload import Deployment


def build(dep: Deployment) -> tuple[Dataflow, Runtime]:
    """Build the features-only dataflow for a deployment."""
    s = dep.settings
    url, embedded = redis_url(s)
    metrics = start_metrics(s, url, None)
    flow = Dataflow(f"{s.name}_features")
    fs = feature_step(parsed_input(flow, dep, metrics), dep, needed=None, url=url)
    output("dlq_out", s, s.dlq, "dlq", dep.base, fs.dead, dlq_line, kafka.dlq_message, fs.shards)
    features_sink = RedisFeatureSink(s.redis, url)
    op.output("features_redis", fs.published, features_sink)
    metered(metrics, fs.dead, feature_logics=fs.logics, redis_features=features_sink)
    return flow, Runtime(s, dep.base, url, None, embedded, fs.logics, metrics)


__getattr__ = flow_attribute(build)
