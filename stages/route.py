"""Content-based routing: one tagged stream, then one filtering branch per route.

A stage in this framework writes exactly one output topic, through the worker's commit path
(transactions in exactly-once mode, "durable before the offset" in at-least-once mode). A
router that produced to several topics itself would step outside that path and lose the
guarantees, so routing is split in two parts that both stay inside it:

1. :func:`route` is a normal stage: it evaluates the routes on each record and writes the
   record unchanged, with the same key, sequence number and event id, to its one output
   topic ``P.S``, tagged with a ``route`` header (``b"eu"``, or ``b"eu,priority"`` when
   ``fan_out`` lets a record match several routes).
2. :func:`take_route` is a filter stage that keeps the records of one route. Put it inline
   (``| route(...) | take_route("eu", ...)``), or let :func:`branch` / :func:`branches` build
   one small pipeline per route that reads ``P.S`` and writes the per-route topic ``P.S.r``
   (or a name of your choice). Each branch is an ordinary pipeline: its own consumer group,
   scaled and deployed on its own, continued with ``|`` like any other.

Each branch reads the whole tagged stream and drops the other routes' records (counted as
filtered in its stats). Kafka serves several consumer groups of one topic cheaply; the price
is that every branch decodes every record. (Letting a stage pick a topic per output would
avoid that, but needs a change in the worker's output path; this design needs none.)
Downstream of a branch, sequence numbers have gaps where other routes' records were, as after
any filter.

A record that matches no route goes to the ``default`` route if there is one; else it is
dead-lettered as :class:`Unroutable` (or, with ``drop_unmatched=True``, filtered and counted).
A route predicate that raises is deterministic bad input, not a passing fault: the record is
dead-lettered at once as :class:`Unroutable`, naming the route and the error.

Example:
    >>> from pipeline import Pipeline, SchemaStore
    >>> store = SchemaStore()
    >>> _ = store.add({"type": "record", "name": "shop.Order", "fields": [
    ...     {"name": "id", "type": "string"}, {"name": "country", "type": "string"}]})
    >>> regions = route("region", schema="shop.Order", routes={
    ...     "eu": lambda o: o["country"] in {"DE", "FR"},
    ...     "us": lambda o: o["country"] == "US",
    ... }, default="rest")
    >>> main = Pipeline("shop", source="shop.in", key="id", schemas=store) | regions
    >>> eu = branch(main, "region", "eu")   # reads shop.region, keeps route "eu"
    >>> eu.source, eu.sink_topic
    ('shop.region', 'shop.region.eu')
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.dsl import Pipeline
from pipeline.errors import DefinitionError, StageError
from pipeline.record import Emit, Record
from pipeline.stage import DedupPolicy, Stage, stage
from stages._common import bump, check_callable, check_safe_name

__all__ = [
    "ROUTE_HEADER",
    "Unroutable",
    "branch",
    "branches",
    "route",
    "routes_of",
    "take_route",
]

#: The header that carries a record's route name(s), comma-separated.
ROUTE_HEADER = "route"

Predicate = Callable[[Any], object]


class Unroutable(StageError):
    """A record matched no route (and there is no default), or a route predicate raised.

    Not retriable: routing is a function of the value, so a retry would route the same way.
    """

    retriable = False


class _Router:
    """The route stage's function; ``routes`` lets :func:`branches` find the route names."""

    def __init__(
        self,
        name: str,
        routes: Mapping[str, Predicate],
        default: str | None,
        fan_out: bool,
        drop_unmatched: bool,
        counts: Counter[str] | None,
    ) -> None:
        self.name = name
        self._checks = list(routes.items())
        self._default = default
        self._fan_out = fan_out
        self._drop = drop_unmatched
        self._counts = counts
        self._tags = {r: [(ROUTE_HEADER, r.encode())] for r in (*routes, default) if r}
        self.routes: tuple[str, ...] = (*routes, *((default,) if default else ()))

    def __call__(self, value: Any) -> Any:
        matched = []
        for name, check in self._checks:
            try:
                hit = check(value)
            except Exception as exc:
                raise Unroutable(
                    f"route '{name}' failed on this record: {type(exc).__name__}: {exc}"
                ) from exc
            if hit:
                matched.append(name)
                if not self._fan_out:
                    break
        if not matched:
            if self._default is None:
                bump(self._counts, "unmatched")
                if self._drop:
                    return None
                raise Unroutable(f"record matches none of the routes {', '.join(self.routes)}")
            matched.append(self._default)
        for name in matched:
            bump(self._counts, name)
        if len(matched) == 1:
            return Emit(value, headers=self._tags[matched[0]])
        return Emit(value, headers=[(ROUTE_HEADER, ",".join(matched).encode())])


def route(
    name: str,
    *,
    schema: str,
    routes: Mapping[str, Predicate],
    default: str | None = None,
    fan_out: bool = False,
    drop_unmatched: bool = False,
    dedup: DedupPolicy | None = None,
    counts: Counter[str] | None = None,
) -> Stage:
    """A stage that tags each record with the route(s) it belongs to (see the module doc).

    Args:
        name: Stage name; its output topic ``P.<name>`` is the tagged stream.
        schema: The records' schema (input and output: routing does not change values).
        routes: Route name -> predicate of the value, tried in order; the first match wins
            (all matches with ``fan_out``). Names become topic names and header values.
        default: Route of records that match none.
        fan_out: Tag a record with every route it matches, not just the first.
        drop_unmatched: Without a default, filter unmatched records out instead of
            dead-lettering them as :class:`Unroutable`.
        dedup: Deduplication of the stage's input.
        counts: If given, counts records per route name and ``"unmatched"`` (in this process).

    Raises:
        DefinitionError: No routes, a bad route name, a predicate that is not callable, or
            a default that is also a route.

    Example:
        >>> s = route("size", schema="t.Order", routes={"big": lambda o: o["n"] > 9},
        ...           default="small")
        >>> s({"n": 12}).headers, s({"n": 1}).headers
        ([('route', b'big')], [('route', b'small')])
    """
    if not routes:
        raise DefinitionError(f"stage '{name}': routes must name at least one route")
    for route_name, check in routes.items():
        check_safe_name(name, "route name", route_name)
        check_callable(name, f"the predicate of route '{route_name}'", check)
    if default is not None:
        check_safe_name(name, "default route", default)
        if default in routes:
            raise DefinitionError(f"stage '{name}': default route '{default}' is also a route")
    router = _Router(name, routes, default, fan_out, drop_unmatched, counts)
    return stage(name, input=schema, output=schema, dedup=dedup)(router)


class _Take:
    def __init__(self, route: str, header: str) -> None:
        self._route = route
        self._tag = route.encode()
        self._header = header

    def __call__(self, value: Any, record: Record) -> Any:
        tag = record.header(self._header)
        if tag is None:
            return None
        if tag == self._tag or self._route in tag.decode("utf-8", "replace").split(","):
            return value
        return None


def take_route(
    route: str,
    *,
    schema: str,
    name: str | None = None,
    header: str = ROUTE_HEADER,
    dedup: DedupPolicy | None = None,
) -> Stage:
    """A filter stage that keeps the records tagged with ``route`` and drops the others.

    Args:
        route: The route to keep.
        schema: The records' schema.
        name: Stage name (default ``take-<route>``).
        header: The header that carries routes (default ``route``).
        dedup: Deduplication of the stage's input.

    Example:
        >>> from pipeline import Record
        >>> keep = take_route("eu", schema="t.Order")
        >>> keep({"n": 1}, Record(b"k", {}, headers=[("route", b"eu,vip")]))
        {'n': 1}
    """
    check_safe_name(name or f"take-{route}", "route", route)
    fn = _Take(route, header)
    return stage(name or f"take-{route}", input=schema, output=schema, dedup=dedup)(fn)


def routes_of(stage: Stage) -> tuple[str, ...]:
    """The route names a routing stage (:func:`route`, a routed :func:`~stages.validate`) tags.

    Raises:
        DefinitionError: The stage does not route.

    Example:
        >>> routes_of(route("r", schema="t.O", routes={"a": bool}, default="b"))
        ('a', 'b')
    """
    routes = getattr(stage.fn, "routes", None)
    if not isinstance(routes, tuple) or not routes:
        raise DefinitionError(
            f"stage '{stage.name}' does not route records (build it with stages.route, or "
            f"stages.validate with rejected=...)"
        )
    return routes


def branch(
    pipeline: Pipeline,
    stage_name: str,
    route: str,
    *,
    topic: str | None = None,
    key: str | None = None,
) -> Pipeline:
    """A pipeline that reads routing stage ``stage_name``'s output and keeps route ``route``.

    The branch is named ``P.S.r`` (pipeline, stage, route); its first stage, ``take``, writes
    the per-route topic ``topic`` (default ``P.S.r``). It inherits the pipeline's schemas,
    topic policy and delivery; continue it with ``|``.

    Args:
        pipeline: The pipeline that contains the routing stage.
        stage_name: The routing stage.
        route: The route this branch keeps.
        topic: The per-route topic (default ``P.S.r``).
        key: The sequence key field (default: the pipeline's).

    Raises:
        DefinitionError: No such stage, a stage that does not route, an unknown route.

    Example:
        >>> from pipeline import Pipeline, SchemaStore
        >>> store = SchemaStore()
        >>> _ = store.add({"type": "record", "name": "t.O", "fields": [
        ...     {"name": "id", "type": "string"}, {"name": "n", "type": "int"}]})
        >>> p = Pipeline("p", source="p.in", key="id", schemas=store) | route(
        ...     "size", schema="t.O", routes={"big": lambda o: o["n"] > 9}, default="small")
        >>> big = branch(p, "size", "big", topic="p.big-ones")
        >>> big.name, big.source, big.sink_topic, big.nodes()[0].group
        ('p.size.big', 'p.size', 'p.big-ones', 'p.size.big.take')
    """
    node = pipeline.node(stage_name)
    known = routes_of(node.stage)
    if route not in known:
        raise DefinitionError(
            f"stage '{stage_name}' has no route '{route}'; its routes: {', '.join(known)}"
        )
    if node.output_topic is None:  # pragma: no cover - a routing stage always has an output
        raise DefinitionError(f"stage '{stage_name}' writes no output topic")
    schema = node.stage.output or node.stage.input
    name = f"{pipeline.name}.{stage_name}.{route}"
    root = Pipeline(
        name,
        source=node.output_topic,
        key=key or pipeline.key,
        schemas=pipeline.schemas,
        topics=pipeline.topics,
        delivery=pipeline.delivery,
    )
    return root.then(take_route(route, schema=schema, name="take"), output_topic=topic or name)


def branches(
    pipeline: Pipeline,
    stage_name: str,
    *,
    topics: Mapping[str, str] | None = None,
    key: str | None = None,
) -> dict[str, Pipeline]:
    """One :func:`branch` per route of routing stage ``stage_name``, by route name.

    Args:
        topics: Per-route topic names that replace the default ``P.S.r``.

    Raises:
        DefinitionError: As :func:`branch`, or ``topics`` names a route the stage lacks.

    Example:
        >>> from pipeline import Pipeline, SchemaStore
        >>> store = SchemaStore()
        >>> _ = store.add({"type": "record", "name": "t.O", "fields": [
        ...     {"name": "id", "type": "string"}, {"name": "n", "type": "int"}]})
        >>> p = Pipeline("p", source="p.in", key="id", schemas=store) | route(
        ...     "size", schema="t.O", routes={"big": lambda o: o["n"] > 9}, default="small")
        >>> {name: b.sink_topic for name, b in branches(p, "size").items()}
        {'big': 'p.size.big', 'small': 'p.size.small'}
    """
    known = routes_of(pipeline.node(stage_name).stage)
    unknown = sorted(set(topics or ()) - set(known))
    if unknown:
        raise DefinitionError(
            f"stage '{stage_name}' has no route {', '.join(unknown)}; its routes: "
            f"{', '.join(known)}"
        )
    topics = topics or {}
    return {r: branch(pipeline, stage_name, r, topic=topics.get(r), key=key) for r in known}
