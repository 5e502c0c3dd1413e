"""The worker's HTTP surface: ``/metrics`` (Prometheus), ``/health``, ``/ready`` and, for a
pipeline that tracks jobs, ``/jobs/ID``.

Served by aiohttp in the workers' own event loop, so an answer at all proves the loop runs:

- ``/health`` (liveness): 200 while no worker of the process has failed (a fatal error, a
  fence); 503 otherwise, so an orchestrator restarts the process;
- ``/ready`` (readiness): 200 when every worker is ready (set up, joined, every assigned
  partition restored, not paused by the breaker, reaching a broker); 503 with each worker's
  state otherwise;
- ``/metrics``: the metrics of :mod:`pipeline.ops.metrics` in the Prometheus text format, read
  from the workers' counters at scrape time; partition lags are asked of the consumers then;
- ``/jobs/ID``: the job's status from the pipeline's status table (:mod:`pipeline.jobs`), 404
  for an unknown job.

Example:
    >>> async with serve(workers, "127.0.0.1", 9400) as address:  # doctest: +SKIP
    ...     print(address)                                        # http://127.0.0.1:9400
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline.errors import ConfigError, PipelineError
from pipeline.ops.metrics import StageCollector
from pipeline.security import Bootstrap

if TYPE_CHECKING:
    from pipeline.runtime.worker import StageWorker

log = logging.getLogger(__name__)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for all interfaces) for ``--http``.

    Example:
        >>> parse_address("127.0.0.1:9400")
        ('127.0.0.1', 9400)
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http wants HOST:PORT (e.g. 127.0.0.1:9400), not {text!r}")
    return host or "0.0.0.0", int(port)


def _states(workers: Sequence[StageWorker]) -> dict[str, dict[str, object]]:
    return {
        w.node.label: {"state": w.stats.state, "ready": w.stats.ready,
                            "reachable": w.stats.reachable}
        for w in workers
    }  # fmt: skip


def app(
    workers: Sequence[StageWorker], jobs: tuple[Bootstrap, str] | None = None
) -> web.Application:
    """The aiohttp application serving ``workers`` (and the job status table ``jobs``: where
    to connect, which topic)."""
    collector = StageCollector(workers)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    async def metrics(_: web.Request) -> web.Response:
        lags = {}
        for w in workers:
            with contextlib.suppress(Exception):  # a lag we cannot learn now is left out
                lags[w.node.label] = await w.transport.lag()
        collector.lags = lags
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_: web.Request) -> web.Response:
        failed = [w.node.label for w in workers if w.failed]
        body = {"status": "failed" if failed else "ok", "failed": failed,
                "stages": _states(workers)}  # fmt: skip
        return web.json_response(body, status=503 if failed else 200)

    async def ready(_: web.Request) -> web.Response:
        ok = all(w.stats.ready for w in workers)
        body = {"ready": ok, "stages": _states(workers)}
        return web.json_response(body, status=200 if ok else 503)

    async def job(request: web.Request) -> web.Response:
        from pipeline.jobs import read_status

        assert jobs is not None
        ident = request.match_info["job"]
        try:
            found = await read_status(jobs[0], jobs[1], ident)
        except PipelineError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        if found is None:
            return web.json_response({"error": f"no job {ident}"}, status=404)
        return web.json_response(found.as_dict())

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/health", health)
    application.router.add_get("/ready", ready)
    if jobs is not None:
        application.router.add_get("/jobs/{job}", job)
    return application


@contextlib.asynccontextmanager
async def serve(
    workers: Sequence[StageWorker],
    host: str,
    port: int,
    *,
    jobs: tuple[Bootstrap, str] | None = None,
) -> AsyncIterator[str]:
    """Serve ``workers``' HTTP surface on ``host:port`` (0: a free port) while in the block;
    yields the base URL."""
    runner = web.AppRunner(app(workers, jobs), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--http {host}:{port}: cannot listen there ({exc})") from exc
        bound = runner.addresses[0][1] if runner.addresses else port
        url = f"http://{host}:{bound}"
        log.info("HTTP surface at %s (/metrics, /health, /ready)", url)
        yield url
    finally:
        await runner.cleanup()
