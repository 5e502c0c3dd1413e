"""Run a pipeline's stages as agents of a faust-streaming ``App``.

Teams with Faust apps can adopt the framework's stages one at a time: a stage run by Faust
keeps the framework's topics and names, single-object Avro values, dedup (by sequence per
writer, or by event id; in the stage's changelog ``P.S.state``, the framework's own format),
retries then its dead-letter topic with the same ``dlq.*`` headers, and per-key order; so
``pipeline dlq`` works on its dead letters, and Faust-run and framework-run stages sit in one
pipeline. Faust owns consuming, committing and rebalancing.

Example (``app = faust_app(...)`` in a module, then Faust's own ``worker`` command)::

    # mymod.py
    from pipeline.faust import faust_app
    from examples.orders.pipeline import pipeline
    app = faust_app(pipeline, ["price"], "127.0.0.1:9092")

    $ faust -A mymod:app worker --without-web        # or: pipeline faust REF --stage price

``add_to(app, pipeline, stages, bootstrap)`` adds the stages to an app you have.
Needs the ``faust`` extra (``pip install 'kafka-pipeline[faust]'``).
"""

from __future__ import annotations

from pipeline.faust.app import FaustOptions, add_to, faust_app
from pipeline.faust.runner import FaustStage, FaustStages

__all__ = ["FaustOptions", "FaustStage", "FaustStages", "add_to", "faust_app"]
