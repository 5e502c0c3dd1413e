"""Poison records on the real broker: dead letters, ``pipeline dlq``, EOS crashes, parking.

The stage runs as an OS process (``pipeline run``) with the test app
:mod:`tests.integration.apps.poison`; ``pipeline dlq`` runs as the real CLI.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.runtime import deadletter as dlq
from pipeline.testing import Names
from tests.integration.apps import poison
from tests.integration.dlq_helpers import (
    REF,
    Offsets,
    Published,
    cli,
    cli_json,
    header,
    numbers,
    publish,
    setup,
    stats_of,
    store,
    until_numbered,
    wait_for,
    wait_for_stats,
)
from tests.integration.helpers import (
    StageProcess,
    TopicReader,
    count,
    duplicates,
    end_offsets,
    read_all,
    seq_of,
)

# -- five kinds of poison in 20,000 records, then the fix and two replays -----------------

KINDS = {7: "truncated", 57: "unknown_fp", 107: "legacy", 157: "fail", 207: "flaky"}
EXPECTED = {  # kind -> (error class, attempts, a phrase of the message)
    "truncated": ("DecodeError", "0", "corrupt Avro record (test.chain.Event)"),
    "unknown_fp": ("DecodeError", "0", "unknown schema fingerprint 0123456789abcdef"),
    "legacy": ("DecodeError", "0", "test.poison.Legacy as test.chain.Event"),
    "fail": ("ValueError", "3", "always fails"),
}


async def test_poison_is_dead_lettered_once_with_its_headers_then_replayed_after_the_fix(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    total = 20_000
    p, env = await setup(kafka_bootstrap, names, "five", POISON_ATTEMPTS="3")
    plan = [(f"k{i % 200}", i, KINDS.get(i % 400, "good")) for i in range(total)]
    published = Published()
    await publish(kafka_bootstrap, p.source, plan, published)
    good = published.numbers_of("good", "flaky")
    bad = total - len(good)
    sink, dead_topic = f"{p.name}.work", f"{p.name}.work.dlq"
    stats_file = tmp_path / "stats.json"
    args = ("--stats-file", str(stats_file))
    worker = StageProcess(REF, "work", kafka_bootstrap, env, tmp_path / "run1.log", args)
    try:
        await wait_for(kafka_bootstrap, sink, len(good), 120, "good records")
        await wait_for(kafka_bootstrap, dead_topic, bad, 60, "dead letters")
    finally:
        assert worker.terminate() == 0, worker.output()[-3000:]
    stats = stats_of(stats_file)
    assert stats["dead_by_error"] == {"DecodeError": 150, "ValueError": 50}
    assert stats["retries"] == 50 * 2 + 50 * 2  # fail: 2 retries each; flaky: 2 then success
    assert re.search(r"dead letters by error class: (DecodeError|ValueError)=", worker.output())
    codec = store().codec(poison.EVENT)
    out = await read_all(kafka_bootstrap, sink)
    assert sorted(codec.decode(r.value)["n"] for r in out) == sorted(good)
    await check_dead_letters(kafka_bootstrap, p.source, dead_topic, published, bad)

    # The bug is fixed: replay the ValueErrors through the CLI, twice.
    first = await replay_twice_after_the_fix(kafka_bootstrap, p, env, tmp_path, bad)
    stats = stats_of(stats_file)
    assert (stats["consumed"], stats["produced"], stats["duplicates"]) == (100, 50, 50)
    assert stats["dead_letters"] == 0
    out = await read_all(kafka_bootstrap, sink)
    assert len(out) == len(good) + 50, "the second replay added records"
    assert duplicates(out) == 0
    replayed = [r for r in out if header(r, dlq.REPLAYED)]
    assert {published.kinds[(r.key, seq_of(r))] for r in replayed} == {"fail"}
    assert {header(r, dlq.REPLAYED) for r in replayed} == {first}
    assert all(not k.startswith("dlq.error") for r in replayed for k, _ in r.headers)
    assert await count(kafka_bootstrap, dead_topic) == bad  # the replays dead-lettered nothing
    print(
        f"\n{total} records: {len(good)} to the sink, {bad} dead letters; replay 1 moved 50 "
        f"through, replay 2 added nothing ({stats['duplicates']} duplicates dropped)"
    )


async def check_dead_letters(
    bootstrap: str, source: str, dead_topic: str, published: Published, bad: int
) -> None:
    """Each poison record once, with the right headers, pointing at its original record."""
    inputs = {(r.partition, r.offset): r for r in await read_all(bootstrap, source)}
    dead = await read_all(bootstrap, dead_topic)
    assert len(dead) == bad
    idents = Counter((r.key, seq_of(r)) for r in dead)
    assert set(idents.values()) == {1}, "a poison record dead-lettered twice"
    for r in dead:
        kind = published.kinds[(r.key, seq_of(r))]
        error, attempts, phrase = EXPECTED[kind]
        assert header(r, dlq.STAGE) == "work"
        assert (header(r, dlq.ERROR_CLASS), header(r, dlq.ATTEMPTS)) == (error, attempts), kind
        assert phrase in header(r, dlq.ERROR_MESSAGE), (kind, header(r, dlq.ERROR_MESSAGE))
        assert error in header(r, dlq.TRACEBACK) and "Traceback" in header(r, dlq.TRACEBACK)
        assert header(r, dlq.TOPIC) == source
        src = inputs[(int(header(r, dlq.PARTITION)), int(header(r, dlq.OFFSET)))]
        assert (src.key, src.value, r.partition) == (r.key, r.value, src.partition)
    assert Counter(published.kinds[i] for i in idents) == dict.fromkeys(EXPECTED, 50)


async def replay_twice_after_the_fix(
    bootstrap: str, p: Any, env: dict[str, str], tmp_path: Path, bad: int
) -> str:
    """List, dry-run, show; then, with the fixed stage running, replay twice; the first id."""
    listed = cli_json("dlq", "list", REF, "work", "--bootstrap", bootstrap, env=env)
    assert listed["by_class"] == {"DecodeError": 150, "ValueError": 50}
    assert listed["replayed"] == 0
    replay = ("dlq", "replay", REF, "work", "--bootstrap", bootstrap,
              "--where", "error_class=ValueError")  # fmt: skip
    dry = cli_json(*replay, "--dry-run", env=env)
    assert (dry["matched"], dry["replayed"], dry["read"]) == (50, 50, bad)
    before = await count(bootstrap, p.source)
    shown = cli("dlq", "show", REF, "work", "--bootstrap", bootstrap, "--limit", "2",
                "--where", "error_class=ValueError", env=env)  # fmt: skip
    assert shown.returncode == 0 and "always fails" in shown.stdout, shown.stdout + shown.stderr
    assert '"payload": "fail"' in shown.stdout, shown.stdout  # decoded with the input schema
    assert await count(bootstrap, p.source) == before, "a dry run published something"
    fixed = {**env, "POISON_FIXED": "1"}
    stats_file = tmp_path / "stats.json"
    args = ("--stats-file", str(stats_file))
    worker = StageProcess(REF, "work", bootstrap, fixed, tmp_path / "run2.log", args)
    try:
        first = cli_json(*replay, env=env)
        assert (first["matched"], first["replayed"], first["skipped"]) == (50, 50, 0)
        await wait_for(bootstrap, f"{p.name}.work", before - bad + 50, 60, "replayed records")
        second = cli_json(*replay, env=env)
        assert second["replayed"] == 50 and second["replay_id"] != first["replay_id"]
        await wait_for_stats(stats_file, "duplicates", 50, 60)
        await asyncio.sleep(1.0)  # anything more would show now
    finally:
        assert worker.terminate() == 0, worker.output()[-3000:]
    # `dlq list` marks what was replayed (twice: counted once); the dead letters stay.
    listed = cli_json("dlq", "list", REF, "work", "--bootstrap", bootstrap, env=env)
    assert listed["by_class"] == {"DecodeError": 150, "ValueError": 50}
    assert listed["replayed_by_class"] == {"ValueError": 50} and listed["replayed"] == 50
    return str(first["replay_id"])


async def test_dlq_cli_errors_are_clear(kafka_bootstrap: str, names: Names) -> None:
    name = names.pipeline("errors")  # its topics are never created
    env = {"POISON_PIPELINE": name}
    unknown = cli("dlq", "list", REF, "nope", "--bootstrap", kafka_bootstrap, env=env)
    assert unknown.returncode == 1 and "has no stage named 'nope'" in unknown.stderr
    missing = cli("dlq", "list", REF, "work", "--bootstrap", kafka_bootstrap, env=env)
    assert missing.returncode == 1, missing.stderr
    assert f"dead-letter topic {name}.work.dlq does not exist" in missing.stderr
    down = cli("dlq", "replay", REF, "work", "--bootstrap", "127.0.0.1:1", env=env)
    assert down.returncode == 1 and "no Kafka broker answers" in down.stderr, down.stderr
    where = cli("dlq", "replay", REF, "work", "--where", "colour=red", "-b", "x:1", env=env)
    assert where.returncode == 1 and "unknown field 'colour'" in where.stderr
    for done in (unknown, missing, down, where):
        assert "Traceback" not in done.stderr


# -- exactly-once: SIGKILL while dead letters are being written ---------------------------


async def test_sigkill_during_dead_letter_writes_loses_and_duplicates_nothing(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    # Records without seq or event id: no dedup table can hide a redelivery, only the
    # transactions (outputs, dead letters and offsets commit together) keep this exact.
    total = 20_000
    p, env = await setup(kafka_bootstrap, names, "eos", POISON_DELIVERY="exactly_once")
    kinds = ("good", "truncated", "good", "fatal")  # half of all records are poison
    plan = [(f"k{i % 300}", i, kinds[i % 4]) for i in range(total)]
    await publish(kafka_bootstrap, p.source, plan, Published(), dedup=False)
    poisoned = {i for i in range(total) if kinds[i % 4] != "good"}
    sink, dead_topic = f"{p.name}.work", f"{p.name}.work.dlq"
    args = ("--max-records", "500", "--session-timeout-ms", "6000")  # the dead are noticed soon
    worker = StageProcess(REF, "work", kafka_bootstrap, env, tmp_path / "0.log", args)
    killed_at = []
    try:
        async with Offsets(kafka_bootstrap) as offsets:
            for i, share in enumerate((0.25, 0.55), 1):  # kill twice, while dead letters flow
                # Kill as soon as the dead-letter topic grows past the mark, so that the
                # batch (or transaction) that wrote those dead letters has not committed yet.
                await offsets.wait(dead_topic, int(len(poisoned) * share), 120, poll=0.0)
                worker.kill()
                killed_at.append(await offsets.total(dead_topic))
                log = tmp_path / f"{i}.log"
                worker = StageProcess(REF, "work", kafka_bootstrap, env, log, args)
        async with (
            TopicReader(kafka_bootstrap, sink) as good_reader,
            TopicReader(kafka_bootstrap, dead_topic) as dead_reader,
        ):
            await until_numbered(good_reader, total - len(poisoned), 120)
            await until_numbered(dead_reader, len(poisoned), 60)
            await good_reader.settle(2.0)
            await dead_reader.settle(1.0)
    finally:
        assert worker.terminate() == 0, worker.output()[-3000:]
    assert killed_at[-1] < len(poisoned), "the kills came after all dead letters were written"
    good_ns, dead_ns = numbers(good_reader.records), numbers(dead_reader.records)
    assert len(good_ns) == len(set(good_ns)), "a record is in the sink twice"
    assert len(dead_ns) == len(set(dead_ns)), "a dead letter is in the topic twice"
    assert set(dead_ns) == poisoned and set(good_ns) == set(range(total)) - poisoned
    classes = Counter(header(r, dlq.ERROR_CLASS) for r in dead_reader.records)
    assert classes == {"DecodeError": len(poisoned) // 2, "StageError": len(poisoned) // 2}
    uncommitted = len(await read_all(kafka_bootstrap, dead_topic)) - len(dead_reader.records)
    assert uncommitted > 0, "no kill landed while a transaction was writing dead letters"
    print(
        f"\nEOS: SIGKILLed with {killed_at} dead-letter offsets written; read_committed holds "
        f"{len(poisoned)} dead letters once each ({uncommitted} aborted copies hidden)"
    )


# -- concurrency: a retry storm on one key does not stall the others ----------------------


async def test_a_retry_storm_on_one_key_does_not_stall_other_keys(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    others, storm = 30_000, 2
    # Each storm record: 7 waits, 0.2 + 0.3 + 0.45 + 0.6 * 4 = 3.35 s. The first one dies as
    # soon as its retries run out (other keys succeeded meanwhile); the second one fails when
    # no other key is left to judge it by, so it waits for the breaker's verdict timeout (5 s).
    p, env = await setup(
        kafka_bootstrap, names, "storm", POISON_CONCURRENCY="8", POISON_ATTEMPTS="8",
        POISON_BACKOFF="0.2", POISON_MAX_BACKOFF="0.6", POISON_VERDICT_S="5",
    )  # fmt: skip
    sink, dead_topic = f"{p.name}.work", f"{p.name}.work.dlq"
    worker = StageProcess(REF, "work", kafka_bootstrap, env, tmp_path / "storm.log")
    try:
        async with Offsets(kafka_bootstrap) as offsets:
            await publish(kafka_bootstrap, p.source, [("warmup", -1, "good")], Published())
            await offsets.wait(sink, 1, 60)
            plan = [(f"k{i % 100}", i, "good") for i in range(others)]
            seqs = Published()  # one per-key sequence for both rounds: no duplicates
            baseline = await offsets.timed(kafka_bootstrap, p.source, plan, seqs, sink, 1 + others)
            plan = [("storm", -2 - i, "storm") for i in range(storm)] + plan
            during = await offsets.timed(
                kafka_bootstrap, p.source, plan, seqs, sink, 1 + 2 * others
            )
            dead_then = await offsets.total(dead_topic)
            storm_done = during + await offsets.wait(dead_topic, storm, 60)
    finally:
        assert worker.terminate() == 0, worker.output()[-3000:]
    print(
        f"\nretry storm on one key ({storm} records, 3.35 s of retries each, concurrency 8): "
        f"{others} records of 100 other keys took {during:.2f}s ({others / during:.0f} rec/s, "
        f"publishing included) against {baseline:.2f}s ({others / baseline:.0f} rec/s) without "
        f"a storm; the storm went on until {storm_done:.2f}s ({dead_then} of its records "
        f"dead-lettered when the others were done)"
    )
    assert dead_then < storm, "the other keys waited for the storm key to finish"
    assert during < 3.3 or during < 3 * baseline, "the storm slowed the other keys down"


# -- park mode on the broker -------------------------------------------------------------


async def test_parked_key_survives_a_restart_and_a_replay_restores_its_order(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    p, env = await setup(kafka_bootstrap, names, "park", POISON_PARK="1")
    plan = [(f"k{i % 50}", i, "fail" if i == 5 * 50 + 7 else "good") for i in range(1000)]
    published = Published()
    await publish(kafka_bootstrap, p.source, plan, published)
    sink, dead_topic = f"{p.name}.work", f"{p.name}.work.dlq"
    parked_n = [n for key, n, _ in plan if key == "k7" and n > 5 * 50 + 7]  # 14 later records
    worker = StageProcess(REF, "work", kafka_bootstrap, env, tmp_path / "a.log")
    try:
        await wait_for(kafka_bootstrap, sink, 1000 - 1 - len(parked_n), 60, "other records")
        await wait_for(kafka_bootstrap, dead_topic, 1 + len(parked_n), 30, "parked records")
    finally:
        assert worker.terminate() == 0, worker.output()[-3000:]
    # Two more records of k7 while the stage is down; the restarted stage is "fixed", but the
    # key is still parked (restored from the changelog), so they are parked too.
    await publish(kafka_bootstrap, p.source, [("k7", 1000, "good"), ("k7", 1001, "good")],
                  published)  # fmt: skip
    fixed = {**env, "POISON_FIXED": "1"}
    worker = StageProcess(REF, "work", kafka_bootstrap, fixed, tmp_path / "b.log")
    try:
        await wait_for(kafka_bootstrap, dead_topic, 3 + len(parked_n), 60, "parked after restart")
        dead = await read_all(kafka_bootstrap, dead_topic)
        assert [header(r, dlq.ERROR_CLASS) for r in dead] == ["ValueError"] + ["Parked"] * (
            len(parked_n) + 2
        )
        first = dead[0]
        assert all(
            f"@{header(first, dlq.OFFSET)} was dead-lettered (ValueError)"
            in header(r, dlq.ERROR_MESSAGE)
            for r in dead[1:]
        )
        report = cli_json("dlq", "replay", REF, "work", "--bootstrap", kafka_bootstrap, env=env)
        assert report["replayed"] == len(dead) == len(parked_n) + 3
        await wait_for(kafka_bootstrap, sink, 1000 - 1 - len(parked_n) + len(dead), 60,
                       "replayed records")  # fmt: skip
        await publish(kafka_bootstrap, p.source, [("k7", 1002, "good")], published)
        await wait_for(kafka_bootstrap, sink, 1000 + 3, 60, "a new record of the key")
    finally:
        assert worker.terminate() == 0, worker.output()[-3000:]
    codec = store().codec(poison.EVENT)
    k7 = [
        codec.decode(r.value)["n"] for r in await read_all(kafka_bootstrap, sink) if r.key == b"k7"
    ]
    expected = [n for key, n, _ in plan if key == "k7"] + [1000, 1001, 1002]
    assert k7 == expected, "the parked key lost its order"
    assert await count(kafka_bootstrap, dead_topic) == len(parked_n) + 3
    ends = await end_offsets(kafka_bootstrap, sink)
    assert sum(ends.values()) == 1000 + 3
