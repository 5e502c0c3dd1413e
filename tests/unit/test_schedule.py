"""Schedules without a broker: which ticks are due, catch-up policies, validation, the DSL."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline import DefinitionError
from pipeline.schedule import CatchUp, Schedule
from tests.integration.apps import ticks


def at(second: int, minute: int = 0, hour: int = 0, day: int = 1) -> dt.datetime:
    return dt.datetime(2026, 1, day, hour, minute, second, tzinfo=dt.UTC)


def every_second(catch_up: str) -> Schedule:
    return Schedule("t", every=1, make=lambda tick: {}, catch_up=catch_up)  # type: ignore[arg-type]


def test_on_time_the_tick_of_the_moment_is_due_whatever_the_policy() -> None:
    for policy in CatchUp:
        s = every_second(policy)
        assert s.due(after=at(4), now=at(5, 0) + dt.timedelta(milliseconds=30)) == [at(5)]
        assert s.due(after=at(5), now=at(5) + dt.timedelta(milliseconds=900)) == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("all", [at(s) for s in range(1, 11)]), ("latest", [at(10)]), ("none", [at(10)])],
)
def test_after_a_10s_outage_the_policy_decides(policy: str, expected: list[dt.datetime]) -> None:
    # Restarted 0.2 s after the tick of second 10: that tick is the current one.
    now = at(10) + dt.timedelta(milliseconds=200)
    assert every_second(policy).due(after=at(0), now=now) == expected


def test_none_skips_a_missed_tick_that_is_not_the_current_one() -> None:
    s = Schedule("nightly", cron="0 2 * * *", make=lambda t: {}, catch_up="none")  # type: ignore[arg-type]
    assert s.due(after=at(0, hour=2), now=at(0, hour=9, day=2)) == []  # 02:00 on day 2 missed
    latest = Schedule("nightly", cron="0 2 * * *", make=lambda t: {})
    assert latest.due(after=at(0, hour=2), now=at(0, hour=9, day=3)) == [at(0, hour=2, day=3)]


def test_ticks_are_numbered_by_their_second_and_named_by_their_time() -> None:
    s = Schedule("t", every=15, make=lambda t: {})
    tick = s.after(at(7))
    assert tick == at(15)
    assert s.sequence(tick) == int(at(15).timestamp()) and s.event_id(tick).startswith("t@2026")
    assert s.after(tick) == at(30)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"every": 1, "cron": "* * * * *"}, "exactly one of"),
        ({}, "exactly one of"),
        ({"every": 0}, "positive"),
        ({"cron": "61 * * * *"}, "not a cron line"),
        ({"every": 1, "catch_up": "some"}, "catch_up must be"),
    ],
)
def test_bad_schedules_are_refused(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(DefinitionError, match=says):
        Schedule("t", make=lambda t: {}, **kwargs)  # type: ignore[arg-type]


def test_a_pipeline_names_its_schedules() -> None:
    p = ticks.build("dsl", "all")
    assert p.schedule("tick").every == 1
    with pytest.raises(DefinitionError, match=r"no schedule 'nope'.*tick"):
        p.schedule("nope")
    with pytest.raises(DefinitionError, match="already has a schedule named 'tick'"):
        p.with_schedule(p.schedules[0])
    assert ticks.tick_event(at(3))["n"] == int(at(3).timestamp())


async def test_holding_ticks_needs_the_pipelines_job_status() -> None:
    import asyncio

    from pipeline.runtime.scheduler import ScheduleRunner

    base = ticks.build("t")
    held = Schedule("held", every=1, make=ticks.tick_event)  # overlap=False: the default
    with pytest.raises(DefinitionError, match=r"\.with_jobs\(\), or let ticks overlap"):
        await ScheduleRunner(base.with_schedule(held), held, "127.0.0.1:9").run(asyncio.Event())
