"""Priority lanes on the broker: with 50,000 records backlogged in each lane, the heavy lane
takes at least 8/9 of the first half of the output; every record arrives once, each key in
order within its lane; dead letters stay in their lane and replay to it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline import Publisher, SchemaStore
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import lanes
from tests.integration.apps.chain import EVENT, SCHEMAS
from tests.integration.dlq_helpers import cli
from tests.integration.helpers import StageProcess, TopicReader

REF = "tests.integration.apps.lanes:build"
PER_LANE = 50_000


async def lanes_pipeline(bootstrap: str, names: Names) -> tuple[str, dict[str, str], Any, Any]:
    """A lanes pipeline of this test's own, its topics created: name, env, pipeline, codec."""
    name = names.pipeline()
    p = lanes.build(name)
    await ensure_topics(bootstrap, topic_specs(p))
    return name, {"LANES_PIPELINE": name}, p, SchemaStore.from_directory(SCHEMAS).codec(EVENT)


async def test_a_backlog_on_both_lanes_gives_the_heavy_lane_8_of_9(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name, env, p, codec = await lanes_pipeline(kafka_bootstrap, names)
    for lane in ("high", "low"):  # the backlog, before the stage starts
        async with Publisher(kafka_bootstrap, f"{name}.{lane}", codec, "key") as pub:
            await pub.publish_many(
                {"key": f"k{n % 1000}", "n": n, "hops": 0, "payload": ""} for n in range(PER_LANE)
            )
    proc = StageProcess(REF, "work", kafka_bootstrap, env, tmp_path / "work.log")
    try:
        async with TopicReader(kafka_bootstrap, str(p.sink_topic)) as out:
            await out.until_distinct(2 * PER_LANE, 180)
            await out.settle(2.0)
    finally:
        assert proc.terminate() == 0, proc.output()[-3000:]
    events = [codec.decode(r.value) for r in out.records]
    assert len(events) == 2 * PER_LANE  # each once
    handled = sorted(events, key=lambda e: e["hops"])  # the order the stage took them in
    first_half = handled[:PER_LANE]
    share = sum(e["payload"] == "high" for e in first_half) / len(first_half)
    print(f"\n[priority] high lane's share of the first {PER_LANE:,} handled: {share:.4f}")
    assert share >= 8 / 9
    order: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in handled:
        order[(e["payload"], e["key"])].append(e["n"])
    assert all(ns == sorted(ns) for ns in order.values()), "a key's order broke within a lane"
    assert {lane for lane, _ in order} == {"high", "low"}


async def test_dead_letters_stay_in_their_lane_and_replay_to_it(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name, env, p, codec = await lanes_pipeline(kafka_bootstrap, names)
    async with Publisher(kafka_bootstrap, f"{name}.low", codec, "key") as pub:
        await pub.publish_many(
            {"key": f"k{n}", "n": n, "hops": 0, "payload": "poison" if n == 3 else ""}
            for n in range(10)
        )
    proc = StageProcess(REF, "work", kafka_bootstrap, env, tmp_path / "work.log")
    try:
        async with TopicReader(kafka_bootstrap, str(p.sink_topic)) as out:
            await out.until_distinct(9, 60)
        asked = cli("dlq", "list", REF, "work", "--bootstrap", kafka_bootstrap, env=env)
        assert asked.returncode == 1 and "reads priority lanes: say which" in asked.stderr
        assert f"{name}.high, {name}.low" in asked.stderr
        low = ("--lane", f"{name}.low")
        listed = cli("dlq", "list", REF, "work", *low, "--json", "--bootstrap", kafka_bootstrap,
                     env=env)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["by_class"] == {"StageError": 1}
        high = cli("dlq", "list", REF, "work", "--lane", f"{name}.high", "--json",
                   "--bootstrap", kafka_bootstrap, env=env)  # fmt: skip
        assert json.loads(high.stdout)["by_class"] == {}
        assert proc.terminate() == 0
        proc = StageProcess(REF, "work", kafka_bootstrap, {**env, "LANES_FIXED": "1"},
                            tmp_path / "work2.log")  # fmt: skip
        replayed = cli("dlq", "replay", REF, "work", *low, "--bootstrap", kafka_bootstrap,
                       env=env)  # fmt: skip
        assert replayed.returncode == 0, replayed.stderr
        assert f"to {name}.low" in replayed.stdout  # back to its own lane
        async with TopicReader(kafka_bootstrap, str(p.sink_topic)) as out:
            await out.until_distinct(10, 60)
            assert out.distinct() == 10
    finally:
        proc.terminate()
