"""Jobs without a broker: what each stage reports to the status table and the reply topic
(the TestDriver runs the real workers on the memory broker), and the status model."""

from __future__ import annotations

import pytest

from pipeline import JobState, JobStatus, PipelineError
from pipeline.record import Emit
from pipeline.runtime.jobs import _jsonable
from pipeline.testing import TestDriver
from tests.unit.test_driver import build


def test_each_job_ends_completed_with_the_result_failed_with_the_stage_or_filtered() -> None:
    p = build().with_jobs()
    driver = TestDriver(p)
    driver.send({"id": "a", "n": 1}, job="j-ok")  # 1 -> 2 -> 4
    driver.send({"id": "b", "n": 3}, job="j-dead")  # inc dead-letters 3
    driver.send({"id": "c", "n": 0}, job="j-odd")  # 0 -> 1, filtered by double_evens
    driver.send({"id": "d", "n": 5})  # no job: nothing reported
    driver.run()

    ok = driver.job("j-ok")
    assert ok is not None
    assert (ok.state, ok.stage, ok.step, ok.steps) == (JobState.COMPLETED, "double_evens", 2, 2)
    assert ok.result == {"id": "a", "n": 4}
    dead = driver.job("j-dead")
    assert dead is not None
    assert (dead.state, dead.stage, dead.error_class) == (JobState.FAILED, "inc", "ValueError")
    assert "three is poison" in (dead.error or "")
    odd = driver.job("j-odd")
    assert odd is not None and (odd.state, odd.result) == (JobState.COMPLETED, None)

    assert p.jobs is not None
    reports = driver.records(p.jobs.status)
    keys = [r.key for r in reports]
    # The middle of a job (inc passed it on) is in the table; only its end is a reply.
    assert keys.count(b"j-ok") == 2 and keys.count(b"j-dead") == 1 and b"d" not in keys
    replies = {r.key: JobStatus.decode(r.value or b"") for r in driver.records(p.jobs.replies)}
    assert replies == {b"j-ok": ok, b"j-dead": dead, b"j-odd": odd}


def test_a_duplicate_of_a_job_reports_nothing_more() -> None:
    p = build().with_jobs()
    driver = TestDriver(p)
    driver.send({"id": "a", "n": 1}, job="j1", seq=7)
    driver.send({"id": "a", "n": 1}, job="j1", seq=7)  # a retransmission
    driver.run()
    assert p.jobs is not None
    assert [r.key for r in driver.records(p.jobs.replies)] == [b"j1"]


def test_status_reads_back_what_it_wrote_and_refuses_anything_else() -> None:
    s = JobStatus("j", JobState.FAILED, stage="s", step=2, steps=3, error_class="E", time=5)
    assert JobStatus.decode(s.encode()) == s
    assert s.done and not JobStatus("j", JobState.RUNNING).done
    for bad in (b"", b"{}", b'{"job": "j", "state": "lost"}', b"\xff"):
        with pytest.raises(PipelineError, match="not a job status"):
            JobStatus.decode(bad)


def test_results_become_json() -> None:
    assert _jsonable({"a": b"\x00\x01", "b": [Emit({"x": 1}, key=b"k")], "c": 1.5}) == {
        "a": "AAE=", "b": [{"x": 1}], "c": 1.5,
    }  # fmt: skip


def test_a_pipeline_without_jobs_has_no_job_topics() -> None:
    driver = TestDriver(build())
    driver.send({"id": "a", "n": 1})
    driver.run()
    with pytest.raises(PipelineError, match="does not track jobs"):
        driver.job("x")


async def test_a_job_client_publishes_to_the_lane_it_is_given() -> None:
    from pipeline import DefinitionError, JobClient
    from tests.unit import test_priority

    p = test_priority.build().with_jobs()
    assert JobClient("127.0.0.1:9", p)._publisher.topic == "orders.high"
    assert JobClient("127.0.0.1:9", p, lane="orders.low")._publisher.topic == "orders.low"
    with pytest.raises(DefinitionError, match="has no lane"):
        JobClient("127.0.0.1:9", p, lane="orders.none")
    with pytest.raises(DefinitionError, match="does not track jobs"):
        JobClient("127.0.0.1:9", test_priority.build())
