"""``pipeline ui``: the dashboard's web server (aiohttp), its JSON API and its live stream.

Pages (rendered from Jinja templates, scripts and styles served from the package, no CDN):
``/`` the topology, ``/dlq/STAGE`` a stage's dead letters, ``/jobs`` job look-up. The pages
draw themselves from the JSON API below and from ``/api/events``, a server-sent event stream
that carries every stage's status (the same sampler as ``pipeline status``) about once a second.

Safe by default: it binds 127.0.0.1 and answers only requests addressed to a loopback name
(a page elsewhere cannot reach it through DNS rebinding). Reading is open to whoever can reach
it; changing anything (a replay) needs the token printed at start, sent back in the
``X-Pipeline-Token`` header of a JSON POST from the same origin. Opening the printed address
(``/?token=...``) stores the token in a same-site cookie the page's script reads and sends;
a page of another site can neither read that cookie nor send that header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from pipeline.dlq import Where
from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import ConfigError, DefinitionError, PipelineError, TopicError
from pipeline.jobs import read_history
from pipeline.ops.status import Member, StageStatus, StatusSampler
from pipeline.security import Bootstrap
from pipeline.ui.counts import DlqIndex
from pipeline.ui.pages import DlqBrowser, PageQuery
from pipeline.ui.replays import ReplayRuns
from pipeline.ui.topology import graph, stage_id

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Pipeline-Token"
TOKEN_COOKIE = "pipeline_ui_token"
_LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@dataclass(frozen=True, slots=True)
class UiOptions:
    """Where the dashboard listens and how often it samples.

    Example:
        >>> UiOptions(port=0).host
        '127.0.0.1'
    """

    host: str = "127.0.0.1"
    port: int = 8642
    interval: float = 1.0  # seconds between status samples (and live updates)
    token: str | None = None  # default: a new random one per start


def health_of(status: StageStatus) -> str:
    """One word for a stage's colour: ``stopped`` (no instance), ``failing`` (an instance's
    /health fails or does not answer), ``rebalancing``, or ``running``."""
    if not status.members:
        return "stopped"
    if any(m.health in ("failed", "no answer") for m in status.members):
        return "failing"
    if status.group_state != "Stable":
        return "rebalancing"
    return "running"


class Dashboard:
    """The dashboard of ``pipelines`` on ``bootstrap``: live state, dead letters, replays.

    Example:
        >>> async with Dashboard(bootstrap, [pipeline], UiOptions(port=0)) as ui:  # doctest: +SKIP
        ...     print(ui.url)
    """

    def __init__(
        self, bootstrap: Bootstrap, pipelines: Sequence[Pipeline], options: UiOptions | None = None
    ) -> None:
        if not pipelines:
            raise DefinitionError("the dashboard needs at least one pipeline")
        self.bootstrap = bootstrap
        self.pipelines = list(pipelines)
        self.options = options or UiOptions()
        self.token = self.options.token or secrets.token_urlsafe(24)
        self.nodes: list[tuple[Pipeline, StageNode]] = [
            (p, n) for p in self.pipelines for n in p.nodes()
        ]
        self.index = DlqIndex(bootstrap, [n for _, n in self.nodes])
        self.browser = DlqBrowser(bootstrap)
        self.replays = ReplayRuns(bootstrap, on_done=self.index.look_again)
        self.snapshot: dict[str, Any] = {"at": 0, "stages": {}, "error": "starting"}
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("pipeline.ui", "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
        )
        self.port = self.options.port

    @property
    def url(self) -> str:
        """The address to open, with the token (what ``pipeline ui`` prints)."""
        return f"http://{self.options.host}:{self.port}/?token={self.token}"

    async def __aenter__(self) -> Dashboard:
        self._tasks = [
            asyncio.create_task(self._sample_forever()),
            asyncio.create_task(self.index.run()),
        ]
        self._runner = web.AppRunner(
            self.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0
        )  # an open live stream must not hold a stop for a minute
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        try:
            await site.start()
        except OSError as exc:
            await self.__aexit__(None, None, None)
            raise ConfigError(
                f"the dashboard cannot listen on {self.options.host}:{self.options.port}: {exc}"
                " (choose another with --port)"
            ) from exc
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.replays.close()
        await self.browser.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the live state --------------------------------------------------------------------

    async def _sample_forever(self) -> None:
        """Sample every stage's status each ``interval``; a broker that goes away is retried."""
        interval = self.options.interval
        failing: str | None = None  # logged once per episode, shown on the page throughout
        while True:
            try:
                sampler = StatusSampler(
                    self.bootstrap, [n for _, n in self.nodes], ask_within=interval
                )
                async with sampler:
                    while True:
                        started = time.monotonic()
                        statuses = await sampler.sample()
                        await self._publish(self._snapshot(statuses))
                        if failing is not None:
                            log.info("status: the broker answers again")
                            failing = None
                        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
            except PipelineError as exc:
                if failing is None:
                    log.warning("status: %s (trying again every %.0f s)", exc, interval)
                failing = str(exc)
                await self._publish({**self.snapshot, "at": _now_ms(), "error": failing})
                await asyncio.sleep(interval)

    def _snapshot(self, statuses: list[StageStatus]) -> dict[str, Any]:
        stages: dict[str, Any] = {}
        for (_, node), status in zip(self.nodes, statuses, strict=True):
            counts = self.index.counts[node.dlq_topic]
            stages[stage_id(node)] = {
                "health": health_of(status),
                "group_state": status.group_state,
                "instances": len(status.members),
                "members": [_member(m) for m in status.members],
                "in_per_s": status.in_per_s,
                "out_per_s": status.out_per_s,
                "lag": status.total_lag,
                "dead_letters": status.dead_letters,
                "dlq_by_class": dict(counts.by_class.most_common(5)),
            }
        return {"at": _now_ms(), "stages": stages, "error": None}

    async def _publish(self, snapshot: dict[str, Any]) -> None:
        async with self._changed:
            self.snapshot = snapshot
            self._changed.notify_all()

    # -- the web application ---------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (pages, API, static files)."""
        app = web.Application(middlewares=[self._guard])
        static = resources.files("pipeline.ui") / "static"
        app.router.add_get("/", self._page_topology)
        app.router.add_get("/dlq/{stage}", self._page_dlq)
        app.router.add_get("/jobs", self._page_jobs)
        app.router.add_static("/static", str(static))
        app.router.add_get("/api/topology", self._api_topology)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/api/dlq/{stage}/summary", self._api_dlq_summary)
        app.router.add_get("/api/dlq/{stage}/records", self._api_dlq_records)
        app.router.add_post("/api/dlq/{stage}/replay", self._api_dlq_replay)
        app.router.add_get("/api/replays/{id}", self._api_replay)
        app.router.add_get("/api/jobs/{id}", self._api_job)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Loopback names only; the token of ``?token=`` kept in a cookie; errors as JSON."""
        host = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") else "[::1]"
        if self.options.host in ("127.0.0.1", "localhost", "::1") and host not in _LOOPBACK:
            return web.json_response({"error": f"not a loopback host: {host}"}, status=421)
        given = request.query.get("token")
        if given is not None and request.method == "GET" and "/api/" not in request.path:
            if not _same(given, self.token):
                return web.Response(
                    status=403, text="wrong token: use the address printed at start"
                )
            query = {k: v for k, v in request.query.items() if k != "token"}
            rest = request.rel_url.with_query(query)  # the page asked for, minus the token
            response = web.Response(status=303, headers={"Location": str(rest)})
            response.set_cookie(TOKEN_COOKIE, self.token, samesite="Strict", path="/")
            return response
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except PipelineError as exc:
            status = 404 if isinstance(exc, (DefinitionError, TopicError)) else 400
            if getattr(exc, "retriable", False):
                status = 503
            return web.json_response({"error": str(exc)}, status=status)

    def _authorized(self, request: web.Request) -> str | None:
        """Why a changing request is refused (``None``: it may go on)."""
        given = request.headers.get(TOKEN_HEADER, "")
        if not given or not _same(given, self.token):
            return f"a replay needs the token printed at start, in the {TOKEN_HEADER} header"
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return f"cross-site request refused (Origin {origin})"
        if request.content_type != "application/json":
            return "a replay is a JSON POST (Content-Type: application/json)"
        return None

    def _render(self, name: str, request: web.Request, **context: Any) -> web.Response:
        unlocked = _same(request.cookies.get(TOKEN_COOKIE, ""), self.token)
        html = self._templates.get_template(name).render(
            pipelines=[p.name for p in self.pipelines], unlocked=unlocked, **context
        )
        return web.Response(text=html, content_type="text/html")

    def _node(self, request: web.Request) -> tuple[Pipeline, StageNode]:
        """The stage (and lane) a request names: ``/{stage}?lane=...&pipeline=...``."""
        name, lane = request.match_info["stage"], request.query.get("lane") or None
        wanted = request.query.get("pipeline")
        found = [
            (p, n) for p, n in self.nodes
            if n.name == name and n.lane == lane and (wanted is None or p.name == wanted)
        ]  # fmt: skip
        if len(found) != 1:
            known = ", ".join(sorted({n.label for _, n in self.nodes}))
            what = "no such stage" if not found else "several stages of that name (?pipeline=)"
            raise DefinitionError(f"{what}: {name!r} (lane {lane}); stages: {known}")
        return found[0]

    async def _page_topology(self, request: web.Request) -> web.Response:
        return self._render("topology.html", request, title="Topology")

    async def _page_dlq(self, request: web.Request) -> web.Response:
        _, node = self._node(request)
        return self._render(
            "dlq.html", request, title=f"Dead letters of {node.label}", stage=node.name,
            lane=node.lane or "", pipeline=node.pipeline, topic=node.dlq_topic,
        )  # fmt: skip

    async def _page_jobs(self, request: web.Request) -> web.Response:
        tracked = [p.name for p in self.pipelines if p.jobs is not None]
        return self._render("jobs.html", request, title="Jobs", tracked=tracked)

    async def _api_topology(self, _: web.Request) -> web.Response:
        return web.json_response(graph(self.pipelines))

    async def _api_status(self, _: web.Request) -> web.Response:
        return web.json_response(self.snapshot)

    async def _api_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the latest status at once, then each new one; a comment line
        every 10 s keeps proxies from closing a quiet stream."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            async for snapshot in self._snapshots():
                data = json.dumps(snapshot, separators=(",", ":")) if snapshot else None
                await response.write(
                    f"event: status\ndata: {data}\n\n".encode() if data else b": alive\n\n"
                )
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def _snapshots(self) -> AsyncIterator[dict[str, Any] | None]:
        """The current snapshot, then each new one (``None`` after 10 quiet seconds)."""
        yield self.snapshot
        while True:
            snapshot: dict[str, Any] | None = None
            async with self._changed:  # never yield while holding it: that would stall _publish
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 10)
                    snapshot = self.snapshot
            yield snapshot

    async def _api_dlq_summary(self, request: web.Request) -> web.Response:
        _, node = self._node(request)
        summary = self.index.counts[node.dlq_topic].summary()
        return web.json_response({**summary, "error": self.index.error})

    async def _api_dlq_records(self, request: web.Request) -> web.Response:
        pipeline, node = self._node(request)
        q = request.query
        terms = [f"{f}={q[f]}" for f in ("error_class", "key") if q.get(f)]
        query = PageQuery(
            where=Where.parse(terms), since_ms=_ms(q.get("since")), until_ms=_ms(q.get("until")),
            cursor=PageQuery.parse_cursor(q.get("cursor", "")),
            limit=min(200, max(1, _number(q.get("limit", "50"), "limit"))),
        )  # fmt: skip
        started = time.monotonic()
        counts = self.index.counts[node.dlq_topic]
        page = await self.browser.page(pipeline, node, query, counts.replayed)
        return web.json_response({
            "rows": page.rows, "next": page.next_cursor, "scanned": page.scanned,
            "complete": page.complete, "took_ms": round((time.monotonic() - started) * 1000),
        })  # fmt: skip

    async def _api_dlq_replay(self, request: web.Request) -> web.Response:
        refused = self._authorized(request)
        if refused is not None:
            return web.json_response({"error": refused}, status=403)
        pipeline, node = self._node(request)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        where = body.get("where") or {}
        if not isinstance(where, dict):
            return web.json_response({"error": "where must be an object"}, status=400)
        terms = [f"{k}={v}" for k, v in where.items() if v not in (None, "")]
        run = self.replays.start(pipeline, node, Where.parse(terms), bool(body.get("dry_run")))
        return web.json_response(run.as_dict(), status=202)

    async def _api_replay(self, request: web.Request) -> web.Response:
        run = self.replays.runs.get(request.match_info["id"])
        if run is None:
            return web.json_response({"error": "no such replay"}, status=404)
        return web.json_response(run.as_dict())

    async def _api_job(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        for pipeline in self.pipelines:
            if pipeline.jobs is None:
                continue
            history = await read_history(self.bootstrap, pipeline.jobs.status, ident)
            if history:
                steps = [n.label for n in pipeline.nodes()]
                return web.json_response({
                    "job": ident, "pipeline": pipeline.name, "stages": steps,
                    "history": [h.as_dict() for h in history],
                })  # fmt: skip
        if not any(p.jobs is not None for p in self.pipelines):
            return web.json_response(
                {"error": "no pipeline here tracks jobs (build it with .with_jobs())"}, status=404
            )
        return web.json_response({"error": f"no job {ident!r} in the status table"}, status=404)


def _same(given: str, token: str) -> bool:
    """A constant-time comparison that takes any text (``compare_digest`` refuses non-ASCII
    strings, and a header is the sender's choice)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def _member(m: Member) -> dict[str, Any]:
    return {
        "client_id": m.client_id, "host": m.host, "partitions": m.partitions,
        "health": m.health, "ready": m.ready,
    }  # fmt: skip


def _ms(text: str | None) -> int | None:
    """A time from the page: milliseconds since the epoch (``None``: not given)."""
    return _number(text, "a time in milliseconds") if text else None


def _number(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"not {what}: {text!r}") from exc


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def serve(
    bootstrap: Bootstrap,
    pipelines: Sequence[Pipeline],
    options: UiOptions | None = None,
    started: Any = None,
) -> None:
    """Run the dashboard until cancelled; ``started(dashboard)`` is called once it listens."""
    async with Dashboard(bootstrap, pipelines, options) as dashboard:
        if started is not None:
            started(dashboard)
        await asyncio.Event().wait()
