"""Schedule triggers on the real broker: one emitter among replicas, takeover, catch-up."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import ticks
from tests.integration.helpers import ROOT, StageProcess, read_all

REF = "tests.integration.apps.ticks:build"
SESSION_MS = 6000
_LEADING = re.compile(r"^(\S+ \S+) INFO .*schedule tick: leading from", re.M)
_EVENTS = re.compile(r"schedule tick: (leading from|no longer leading)")


class Replica:
    """``pipeline run REF --schedule tick`` as a child process."""

    def __init__(self, bootstrap: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", REF, "--schedule", "tick",
             "--bootstrap", bootstrap, "--session-timeout-ms", str(SESSION_MS)],
            cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self._out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def leading_since(self) -> list[float]:
        """When this replica became the leader (epoch seconds), from its log."""
        text = self.log.read_text(errors="replace")
        return [
            dt.datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in _LEADING.findall(text)
        ]

    def leading_now(self) -> bool:
        """Whether its log's last leadership event is that it leads."""
        events = _EVENTS.findall(self.log.read_text(errors="replace"))
        return bool(events) and events[-1] == "leading from"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self._out.close()


def ticks_in(records: list) -> list[int]:
    from pipeline import SchemaStore

    decode = SchemaStore.from_directory(ticks.SCHEMAS).codec(ticks.EVENT).decode
    return [decode(r.value)["n"] for r in records]


def test_three_replicas_emit_one_tick_per_second_and_survive_a_killed_leader(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline()
    p = ticks.build(name, "all")
    asyncio.run(ensure_topics(kafka_bootstrap, topic_specs(p)))
    env = {"TICKS_PIPELINE": name, "TICKS_CATCH_UP": "all"}
    replicas = [Replica(kafka_bootstrap, env, tmp_path / f"r{i}.log") for i in range(3)]
    stage = StageProcess(REF, "seen", kafka_bootstrap, env, tmp_path / "seen.log")
    try:
        deadline = time.monotonic() + 30
        while not any(r.leading_since() for r in replicas):
            assert time.monotonic() < deadline, "no replica became the leader"
            time.sleep(0.2)
        time.sleep(12)
        [leader] = [r for r in replicas if r.leading_now()]
        leader.proc.kill()  # SIGKILL: no goodbye to the group
        killed_at = time.time()
        time.sleep(18)
    finally:
        for r in replicas:
            r.stop()
    survivors = [r for r in replicas if r is not leader]
    takeovers = [t for r in survivors for t in r.leading_since() if t > killed_at]
    assert takeovers, "no replica took over"
    takeover_s = min(takeovers) - killed_at
    # The group notices a silent member after its session timeout, then hands the partition.
    assert takeover_s < SESSION_MS / 1000 + 4, takeover_s
    try:
        time.sleep(3)  # the stage drains what was emitted last
    finally:
        assert stage.terminate() == 0, stage.output()[-2000:]
    emitted = ticks_in(asyncio.run(read_all(kafka_bootstrap, p.source)))
    downstream = ticks_in(asyncio.run(read_all(kafka_bootstrap, p.sink_topic or "")))
    print(
        f"\n{len(set(emitted))} ticks over {max(emitted) - min(emitted) + 1} s, "
        f"{len(emitted) - len(set(emitted))} emitted twice (takeover), takeover after "
        f"{takeover_s:.1f}s (session timeout {SESSION_MS / 1000:.0f}s)"
    )
    assert len(downstream) == len(set(downstream)), "a tick was doubled downstream"
    assert sorted(downstream) == list(range(min(downstream), max(downstream) + 1)), (
        "a second without its tick"
    )
    assert len(downstream) >= 27  # ~30 s of ticks
    assert set(downstream) == set(emitted)


@pytest.mark.parametrize("policy", ["all", "latest", "none"])
def test_missed_ticks_after_a_10s_stop_follow_the_catch_up_policy(
    kafka_bootstrap: str, names: Names, tmp_path: Path, policy: str
) -> None:
    name = names.pipeline(policy)
    p = ticks.build(name, policy)
    asyncio.run(ensure_topics(kafka_bootstrap, topic_specs(p)))
    env = {"TICKS_PIPELINE": name, "TICKS_CATCH_UP": policy}

    def run_for(seconds: float, log: Path) -> None:
        replica = Replica(kafka_bootstrap, env, log)
        deadline = time.monotonic() + 30
        while not replica.leading_since():
            assert time.monotonic() < deadline and replica.proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(seconds)
        assert replica.stop() == 0, log.read_text()[-2000:]

    run_for(4, tmp_path / "first.log")
    stopped = time.time()
    time.sleep(10)
    restarted = time.time()
    run_for(4, tmp_path / "second.log")
    emitted = sorted(ticks_in(asyncio.run(read_all(kafka_bootstrap, p.source))))
    before = [t for t in emitted if t <= stopped]
    missed = [t for t in emitted if stopped < t < restarted - 1]
    after = [t for t in emitted if t >= restarted]
    assert len(before) >= 3 and len(after) >= 3, emitted
    assert len(emitted) == len(set(emitted))
    if policy == "all":
        assert sorted(emitted) == list(range(emitted[0], emitted[-1] + 1)), emitted
        assert len(missed) >= 8
    elif policy == "latest":
        assert len(missed) <= 1, missed  # the latest missed (or the one of the restart)
        assert emitted[len(before)] >= restarted - 2  # nothing older than the restart
    else:
        assert missed == [], missed
        assert emitted[len(before)] >= int(restarted) - 1


def test_pipeline_up_runs_schedule_replicas_beside_the_stages(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline()
    p = ticks.build(name, "all")
    asyncio.run(ensure_topics(kafka_bootstrap, topic_specs(p)))
    env = {**os.environ, "TICKS_PIPELINE": name, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "up", REF, "--scale", "tick=2",
         "--bootstrap", kafka_bootstrap, "--logs", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(15)
    finally:
        up.send_signal(signal.SIGINT)
        output = up.communicate(timeout=60)[0]
    assert up.returncode == 0, output
    assert "tick[0]: schedule replica" in output and "tick[1]: schedule replica" in output
    logs = [tmp_path / f"schedule-tick-{i}.log" for i in range(2)]
    leaders = [log for log in logs if "leading from" in log.read_text()]
    assert leaders, "no replica led"
    downstream = ticks_in(asyncio.run(read_all(kafka_bootstrap, p.sink_topic or "")))
    assert len(downstream) >= 5 and len(downstream) == len(set(downstream)), downstream
    assert sorted(downstream) == list(range(min(downstream), max(downstream) + 1))


async def test_a_tick_is_held_while_the_previous_run_is_in_flight(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    from pipeline import JobState, JobStatus
    from pipeline.record import ID_HEADER
    from tests.integration.apps import slowticks
    from tests.integration.helpers import TopicReader

    ref = "tests.integration.apps.slowticks:build"
    name = names.pipeline()
    env = {"SLOW_PIPELINE": name}
    p = slowticks.build(name)
    assert p.jobs is not None
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    worker = StageProcess(ref, "work", kafka_bootstrap, env, tmp_path / "work.log")
    log = tmp_path / "schedule.log"
    with log.open("wb") as out:
        replica = subprocess.Popen(  # noqa: ASYNC220 (a child that outlives this call)
            [sys.executable, "-m", "pipeline.cli", "run", ref, "--schedule", "tick",
             "--bootstrap", kafka_bootstrap],
            cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    began = time.monotonic()
    try:
        await asyncio.sleep(16)
    finally:
        replica.send_signal(signal.SIGTERM)
        assert replica.wait(30) == 0, log.read_text()
        ran = time.monotonic() - began
        await asyncio.sleep(3)  # the last tick's run ends
        worker.terminate()
    async with (
        TopicReader(kafka_bootstrap, p.source) as source,
        TopicReader(kafka_bootstrap, p.jobs.replies) as replies,
    ):
        await source.settle(2.0)
        await replies.settle(2.0)
    published = sorted((r.timestamp, dict(r.headers)[ID_HEADER].decode()) for r in source.records)
    ends = {s.job: s for s in (JobStatus.decode(r.value) for r in replies.records)}
    print(f"\n[schedule] {len(published)} ticks in {ran:.0f}s with runs of 2.2s")
    assert len(published) >= 4, log.read_text()
    assert len(published) <= ran / slowticks.RUN_SECONDS + 1  # held, not one per second
    assert len({job for _, job in published}) == len(published)  # none doubled
    for (_, before), (at, after) in itertools.pairwise(published):
        assert ends[before].state is JobState.COMPLETED
        assert at >= ends[before].time, f"{after} started before {before} ended"
    assert "held: the run of tick@" in log.read_text()
