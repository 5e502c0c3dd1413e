"""Benchmarks that report ratios against baselines measured in the same run, on one broker.

``python -m bench`` runs them all (``--help`` for the options); results go to
``bench/results/<name>.json``. See :mod:`bench.stage_throughput` and :mod:`bench.concurrency`.
"""
