"""The operational surface of running stages: Prometheus metrics and health endpoints.

- :mod:`.metrics`: a Prometheus collector that reads each worker's counters when scraped (no
  cost per record beyond the counters the stats already keep);
- :mod:`.http`: the worker's HTTP surface (``pipeline run ... --http HOST:PORT``): ``/metrics``,
  ``/health``, ``/ready``.
"""
