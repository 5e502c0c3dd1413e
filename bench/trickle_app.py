"""The pipeline the ``trickle`` benchmark runs with ``pipeline run``, in a process of its own.

One stage, the throughput stage with the default dedup policy (as users run it), over the
topic named by ``BENCH_TRICKLE_SOURCE``; its output is ``BENCH_TRICKLE_NAME.price``.
"""

from __future__ import annotations

import os

from bench import workload
from bench.contenders.stage import sync_price_stage
from pipeline.dsl import Pipeline, TopicPolicy

pipeline = Pipeline(
    os.environ.get("BENCH_TRICKLE_NAME", "trickle"),
    source=os.environ.get("BENCH_TRICKLE_SOURCE", "trickle.in"),
    key=workload.KEY_FIELD,
    schemas=workload.schema_store(),
    topics=TopicPolicy(partitions=int(os.environ.get("BENCH_TRICKLE_PARTITIONS", "3"))),
) | sync_price_stage(dedup=True)
