"""Jobs through a three-stage pipeline, each stage its own process: results back to 200
concurrent callers, a dead-lettered job reported failed (stage, error class), completed after a
fixed replay; the status table, ``pipeline jobs status`` and the client agree."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pipeline import JobClient, JobFailedError, JobState
from pipeline.broker.ports import free_port
from pipeline.jobs import read_status
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import jobsapp
from tests.integration.dlq_helpers import cli
from tests.integration.helpers import ROOT, StageProcess

REF = "tests.integration.apps.jobsapp:build"
STAGES = ("enter", "check", "finish")


def job_status(ref: str, job: str, bootstrap: str, env: dict[str, str]) -> dict[str, object]:
    shown = cli("jobs", "status", ref, job, "--json", "--bootstrap", bootstrap, env=env)
    assert shown.returncode == 0, shown.stderr
    doc: dict[str, object] = json.loads(shown.stdout)
    return doc


def event(n: int, payload: str = "") -> dict[str, object]:
    return {"key": f"k{n % 50}", "n": n, "hops": 0, "payload": payload}


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_200_callers_get_their_own_results_and_a_failed_job_completes_after_a_replay(
    kafka_bootstrap: str, names: Names, tmp_path: Path, delivery: str
) -> None:
    name = names.pipeline()
    env = {"JOBS_PIPELINE": name, "JOBS_DELIVERY": delivery}
    p = jobsapp.build(name).with_delivery(delivery)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    procs = {s: StageProcess(REF, s, kafka_bootstrap, env, tmp_path / f"{s}.log") for s in STAGES}
    try:
        async with JobClient(kafka_bootstrap, p) as client:
            # 200 callers at once, each submitting its job and waiting for its own result.
            async def caller(n: int) -> tuple[int, object]:
                job = await client.submit(event(n))
                return n, await client.result(job, timeout=90)

            began = time.monotonic()
            results = await asyncio.gather(*(caller(n) for n in range(200)))
            took = time.monotonic() - began
            for n, result in results:
                assert isinstance(result, dict)
                assert (result["n"], result["hops"], result["payload"]) == (n, 3, f"done:{n}")

            # A job whose record the middle stage dead-letters: failed, with stage and class.
            bad = await client.submit(event(999, "fail"))
            with pytest.raises(JobFailedError) as failed:
                await client.result(bad, timeout=60)
            assert (failed.value.stage, failed.value.error_class) == ("check", "StageError")
            status = await client.status(bad)
            assert status is not None and status.state is JobState.FAILED
            table = await read_status(kafka_bootstrap, p.jobs.status, bad)  # type: ignore[union-attr]
            assert table == status
            shown = cli(
                "jobs", "status", REF, bad, "--json", "--bootstrap", kafka_bootstrap, env=env
            )
            assert shown.returncode == 0, shown.stderr
            doc = json.loads(shown.stdout)
            assert (doc["state"], doc["stage"], doc["error_class"]) == (
                "failed",
                "check",
                "StageError",
            )

            # The bug is fixed: the stage restarts with the fix, the dead letter is replayed.
            assert procs["check"].terminate() == 0
            procs["check"] = StageProcess(
                REF, "check", kafka_bootstrap, {**env, "JOBS_FIXED": "1"}, tmp_path / "check2.log"
            )
            replay = cli("dlq", "replay", REF, "check", "--bootstrap", kafka_bootstrap, env=env)
            assert replay.returncode == 0, replay.stderr
            async with asyncio.timeout(30):  # the replay's mark reaches the client
                while (seen := await client.status(bad)) is None or seen.state is JobState.FAILED:  # noqa: ASYNC110 (another process writes it)
                    await asyncio.sleep(0.1)
            result = await client.result(bad, timeout=60)
            assert isinstance(result, dict) and result["payload"] == "done:999"
            done = await read_status(kafka_bootstrap, p.jobs.status, bad)  # type: ignore[union-attr]
            assert done is not None and done.state is JobState.COMPLETED
            assert (done.stage, done.step, done.steps) == ("finish", 3, 3)
            shown = cli(
                "jobs", "status", REF, bad, "--json", "--bootstrap", kafka_bootstrap, env=env
            )
            assert json.loads(shown.stdout)["state"] == "completed"
            # Another job's id is not this client's: it gets no reply meant for someone else.
            assert await client.status("no-such-job") is None
        print(f"\n[jobs] {delivery}: 200 concurrent jobs through 3 stage processes in {took:.1f}s")
    finally:
        for proc in procs.values():
            proc.terminate()


async def test_callbacks_are_posted_retried_once_per_end_and_a_worker_serves_jobs(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline()
    env = {"JOBS_PIPELINE": name}
    p = jobsapp.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    # The caller's service: refuses each end's first POST (503), takes the next ones.
    posts: list[tuple[str, dict[str, object]]] = []

    async def receive(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        posts.append((key, await request.json()))
        return web.Response(status=503 if sum(k == key for k, _ in posts) == 1 else 200)

    app = web.Application()
    app.router.add_post("/done", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/done"
    port = free_port()
    procs = [
        StageProcess(REF, s, kafka_bootstrap, env, tmp_path / f"{s}.log",
                     ("--http", f"127.0.0.1:{port}") if s == "finish" else ())
        for s in STAGES
    ]  # fmt: skip
    log = tmp_path / "callbacks.log"
    with log.open("wb") as out:
        dispatcher = subprocess.Popen(  # noqa: ASYNC220 (a child that outlives this call)
            [sys.executable, "-m", "pipeline.cli", "jobs", "callbacks", REF,
             "--bootstrap", kafka_bootstrap],
            cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with JobClient(kafka_bootstrap, p) as client:
            good = [await client.submit(event(n), callback=url) for n in range(20)]
            bad = await client.submit(event(99, "fail"), callback=url)
            quiet = await client.submit(event(7))  # no callback
            for job in good:
                await client.result(job, timeout=60)
            with pytest.raises(JobFailedError):
                await client.result(bad, timeout=60)
            await client.result(quiet, timeout=60)
            async with asyncio.timeout(60):
                while len({k for k, _ in posts}) < 21 or len(posts) < 42:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/jobs/{bad}") as r:
                    assert r.status == 200
                    served = await r.json()
                async with session.get(f"http://127.0.0.1:{port}/jobs/nope") as r:
                    assert r.status == 404
            status = await read_status(kafka_bootstrap, p.jobs.status, bad)  # type: ignore[union-attr]
            assert status is not None and served == status.as_dict()
    finally:
        dispatcher.send_signal(signal.SIGTERM)
        code = dispatcher.wait(30)
        for proc in procs:
            proc.terminate()
        await runner.cleanup()
    assert code == 0, log.read_text()
    by_job: dict[str, list[tuple[str, dict[str, object]]]] = {}
    for key, body in posts:
        by_job.setdefault(str(body["job"]), []).append((key, body))
    assert set(by_job) == {*good, bad}  # the job without a callback posts nothing
    for job, seen in by_job.items():
        assert len(seen) == 2  # refused once, taken once: retried, and no more
        assert seen[0] == seen[1]  # the same key and body on every attempt
        assert seen[0][0].startswith(f"{job}:")
    assert by_job[bad][0][1]["state"] == "failed" and by_job[bad][0][1]["stage"] == "check"
    assert all(by_job[j][0][1]["state"] == "completed" for j in good)
    assert "21 delivered, 0 given up (42 POSTs)" in log.read_text()
