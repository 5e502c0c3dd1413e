"""The dashboard's graph of one or more pipelines: stages and the topics between them (no I/O).

Nodes are stages and topics; a topic read or written by several pipelines (a branch reading
its main pipeline's output) is one node, so branches join where they really do. Each stage
has its dead-letter topic and, when it deduplicates, its state changelog beside it; a pipeline
built with ``.with_jobs()`` shows its status table. The page lays the graph out (dagre) and
colours the stage nodes with the live status it receives.

Example:
    >>> from pipeline import Pipeline, SchemaStore, stage
    >>> store = SchemaStore()
    >>> _ = store.add({"type": "record", "name": "a.R", "fields": []})
    >>> @stage(input="a.R", output="a.R")
    ... def step(r): return r
    >>> g = graph([Pipeline("p", source="p.in", key=None, schemas=store) | step])
    >>> sorted(n["id"] for n in g["nodes"])
    ['s:p/step', 't:p.in', 't:p.step', 't:p.step.dlq', 't:p.step.state']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.dsl import Pipeline, StageNode
from pipeline.stage import DedupMode


def stage_id(node: StageNode) -> str:
    """The graph id of a stage node: ``s:PIPELINE/LABEL``."""
    return f"s:{node.pipeline}/{node.label}"


def graph(pipelines: Iterable[Pipeline]) -> dict[str, Any]:
    """``{"nodes": [...], "edges": [...]}`` of ``pipelines``, as the page draws them.

    A node is ``{"id", "kind", "label", ...}`` with kind ``stage``, ``source``, ``topic``,
    ``sink``, ``dlq``, ``state`` or ``jobs``; an edge is ``{"from", "to", "kind"}`` with kind
    ``data``, ``dlq``, ``state`` or ``jobs``.
    """
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, str]] = []
    written: set[str] = set()
    read: set[str] = set()

    def topic(name: str, kind: str) -> str:
        ident = f"t:{name}"
        nodes.setdefault(ident, {"id": ident, "kind": kind, "label": name, "topic": name})
        return ident

    for pipeline in pipelines:
        for node in pipeline.nodes():
            me = stage_id(node)
            nodes[me] = {
                "id": me, "kind": "stage", "label": node.label, "stage": node.name,
                "lane": node.lane, "pipeline": node.pipeline, "group": node.group,
                "input": node.input_topic, "output": node.output_topic, "dlq": node.dlq_topic,
                "step": node.index + 1, "steps": node.steps,
            }  # fmt: skip
            edges.append({"from": topic(node.input_topic, "topic"), "to": me, "kind": "data"})
            read.add(node.input_topic)
            if node.output_topic:
                edges.append({"from": me, "to": topic(node.output_topic, "topic"), "kind": "data"})
                written.add(node.output_topic)
            edges.append({"from": me, "to": topic(node.dlq_topic, "dlq"), "kind": "dlq"})
            if node.stage.dedup.mode is not DedupMode.OFF:
                edges.append({"from": me, "to": topic(node.state_topic, "state"), "kind": "state"})
            if node.jobs is not None:
                edges.append({"from": me, "to": topic(node.jobs.status, "jobs"), "kind": "jobs"})
    for ident, entry in nodes.items():
        if entry["kind"] == "topic":  # where data enters and leaves the graph
            name = entry["topic"]
            if name not in written:
                entry["kind"] = "source"
            elif name not in read:
                entry["kind"] = "sink"
        nodes[ident] = entry
    return {"nodes": list(nodes.values()), "edges": edges}
