"""The README's main job: the orders pipeline on a real Kafka broker, one OS process per stage.

``make demo`` runs ``python -m examples.orders.demo``, which

1. starts a local Kafka broker (or uses ``PIPELINE_BOOTSTRAP``), creates the topics and
   writes the 1,000 customers to the compacted topic the enrich stage's table loads;
2. starts each stage as its own process: ``python -m pipeline.cli run
   examples.orders.pipeline:pipeline --stage NAME --stats-file ...``;
3. publishes 100,000 records (``--orders N``): orders, ~2 % retransmissions, ~0.5 %
   undecodable bytes, ~0.5 % orders that break a business rule, ~0.2 % unknown customers;
4. waits until every stage's group has committed its whole input (lag 0 everywhere);
5. stops the stages with SIGTERM (then the broker, if it started one) and prints per stage:
   in, out, filtered, duplicates, dead letters by class, throughput; end-to-end latency; and
   whether every record is accounted for (PASS/FAIL, also the exit code).

Latency is measured from ``placed_at`` (stamped on the order just before it is handed to the
publisher) to the confirmation's append to the outbox topic, which the demo creates with
``message.timestamp.type=LogAppendTime`` so the broker stamps it (a stage keeps its input's
timestamp on its outputs, so the outbox's CreateTime would be the publish time). Notify's own
``confirmed_at`` gives a second figure that leaves out the last flush and commit.

``--secure`` runs it as a production cluster is run, on the secure local broker (``pipeline
kafka start --secure``) or on the cluster the ``PIPELINE_*`` security settings point at (as an
admin): every stage gets its own SCRAM user holding only the ACLs ``pipeline acl`` prints
(created here, passwords in ``WORKDIR/secrets``), the publisher its own, all over SASL_SSL.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from examples.orders import customers
from examples.orders.monitor import Activity, Cluster, Offsets, StageProcess, delta
from examples.orders.pipeline import CONFIRMATION, CUSTOMER, ORDER_PLACED, STAGES, pipeline
from examples.orders.report import (
    Outcome,
    StageResult,
    checks,
    latencies,
    notes,
    passed,
    render,
)
from examples.orders.workload import Faults, Workload
from pipeline import Connection, PipelineError, Publisher
from pipeline.broker import open_broker
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.ops.acl import apply, pipeline_acls
from pipeline.ops.users import client_env, ensure_users
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.security import Bootstrap, SecretStr, connection

REF = "examples.orders.pipeline:pipeline"
LOG_APPEND_TIME = 1  # aiokafka's timestamp_type of a broker-stamped record


class StageFailedError(Exception):
    """A stage process exited while the demo still needed it."""


class Demo:
    """One run of the demo against ``bootstrap``; :meth:`run` returns the exit code."""

    def __init__(self, bootstrap: Bootstrap, args: argparse.Namespace, console: Console) -> None:
        self.bootstrap = bootstrap
        self.publisher: Connection = connection(bootstrap)  # its own user with --secure
        self.stage_env: dict[str, dict[str, str]] = {}
        self.args = args
        self.console = console
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orders-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = pipeline.nodes()
        self.procs: list[StageProcess] = []
        self.activity = {name: Activity() for name in STAGES}
        self.published = 0

    async def run(self) -> int:
        """Set up, publish, drain, stop, report."""
        await self._create_topics()
        if self.args.secure:
            await self._provision()
        async with Cluster(self.bootstrap) as cluster:
            before = await self._offsets(cluster)
            try:
                await self._start_stages()
                cpu0 = [p.cpu_seconds() for p in self.procs]
                with self._progress() as progress:
                    watcher = asyncio.create_task(self._watch(progress))
                    try:
                        work, publish_s = await self._publish(progress)
                        t_drain = time.monotonic()
                        await self._drain(cluster)
                        await self._settle(cluster, before)
                        drain_s = time.monotonic() - t_drain
                    finally:
                        watcher.cancel()
                    self._update(progress)
                cpu1 = [p.cpu_seconds() for p in self.procs]
            except StageFailedError as exc:
                self.console.print(f"[bold red]FAIL[/]: {exc}", highlight=False)
                self.console.print(f"stage logs and stats files: {self.workdir}")
                return 1
            finally:
                codes = self._stop_stages()
            after = await self._offsets(cluster)
            confirmations = await self._read_outbox(cluster, before, after)
        mine = f"o-{work.run_id}-"
        outcome = Outcome(
            published=self.published, publish_s=publish_s, drain_s=drain_s,
            stages=self._results(before, after, codes, cpu0, cpu1),
            outbox=len(confirmations),
            outbox_distinct=len({c["order_id"] for c, _ in confirmations}),
            expected=work.expected,
            # Only this run's orders: leftovers of an earlier run would show its age instead.
            latencies=latencies([c for c in confirmations if c[0]["order_id"].startswith(mine)]),
            notes=notes(paced=bool(self.args.rate), confirmations=confirmations),
        )  # fmt: skip
        found = checks(outcome)
        render(self.console, outcome, found)
        ok = passed(found)
        if ok and not self.args.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self.console.print(f"stage logs and stats files: {self.workdir}")
        return 0 if ok else 1

    # -- set-up ---------------------------------------------------------------------------

    async def _create_topics(self) -> None:
        outbox = pipeline.sink_topic
        specs = [
            dataclasses.replace(s, config={**s.config, "message.timestamp.type": "LogAppendTime"})
            if s.name == outbox
            else s
            for s in topic_specs(pipeline)
        ]
        created = await ensure_topics(self.bootstrap, specs)
        self.console.print(
            f"topics: {len(created)} created, {len(specs) - len(created)} already there "
            f"({pipeline.topics.partitions} partitions each)"
        )
        table = customers.customer_topic(pipeline.name)
        rows = await customers.seed(self.bootstrap, table, pipeline.schemas.codec(CUSTOMER))
        self.console.print(f"customer table: {rows:,} rows written to compacted topic {table}")

    async def _provision(self) -> None:
        """Each stage's own user with only its ACLs, and the publisher's (``--secure``)."""
        admin = connection(self.bootstrap)
        if not admin.security.protocol.sasl:
            raise ConfigError(
                "--secure needs a SASL cluster and its admin: 'pipeline kafka start --secure', "
                "or PIPELINE_SECURITY_PROTOCOL=SASL_SSL and an admin's PIPELINE_SASL_* settings"
            )
        acls = pipeline_acls(pipeline)
        files = await ensure_users(admin, list(acls), self.workdir / "secrets")
        await apply(admin, [a for rules in acls.values() for a in rules])
        self.stage_env = {
            node.name: client_env(admin.security, node.principal, files[node.principal])
            for node in self.nodes
        }
        user = f"{pipeline.name}.publisher"
        self.publisher = Connection(
            admin.bootstrap,
            dataclasses.replace(
                admin.security, username=user,
                password=SecretStr(files[user].read_text().strip()),
            ),
        )  # fmt: skip
        self.console.print(
            f"secure: {len(acls)} users (one per stage, one publisher), "
            f"{sum(len(r) for r in acls.values())} ACLs ('pipeline acl'), over "
            f"{admin.security.describe()}"
        )

    async def _offsets(self, cluster: Cluster) -> dict[str, Offsets]:
        """End offsets of every topic, and each group's committed offsets (``group:NAME``)."""
        found: dict[str, Offsets] = {}
        for node in self.nodes:
            for topic in (node.input_topic, node.output_topic, node.dlq_topic):
                if topic and topic not in found:
                    found[topic] = await cluster.end_offsets(topic)
            found[f"group:{node.name}"] = await cluster.committed(node.group, node.input_topic)
        return found

    async def _start_stages(self) -> None:
        """Start the stage processes; wait until each runs (its stats file appears) and,
        briefly, until each has its partitions, so that startup is not counted as latency."""
        self.procs = StageProcess.start_all(
            REF,
            list(STAGES),
            self.bootstrap,
            self.workdir,
            stage_env=self.stage_env,
            faust=self.args.faust,
        )
        pids = ", ".join(
            f"{p.stage}{' (faust)' if p.instance.helper == 'faust' else ''} {p.proc.pid}"
            for p in self.procs
        )
        started = time.monotonic()
        with self.console.status(f"starting {len(self.procs)} stage processes ({pids}) ..."):
            while not all(p.stats_file.exists() for p in self.procs):
                self._check_alive()
                if time.monotonic() - started > 120:
                    raise StageFailedError("the stage processes did not start within 120s")
                await asyncio.sleep(0.25)
            # Not fatal if it never shows: records wait in the topics until the group forms.
            settle = time.monotonic() + 15
            while not all(p.assigned() for p in self.procs) and time.monotonic() < settle:
                self._check_alive()
                await asyncio.sleep(0.25)
        self.console.print(
            f"stage processes up in {time.monotonic() - started:.1f}s: {pids} "
            f"(logs and stats files in {self.workdir}; kept if the run fails, or with --workdir)"
        )

    # -- publishing and draining ----------------------------------------------------------

    def _progress(self) -> Progress:
        progress = Progress(
            TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=self.console,
        )  # fmt: skip
        progress.add_task("publish", total=self.args.orders, note="")
        for name in STAGES:
            progress.add_task(name, total=None, note="")
        return progress

    async def _publish(self, progress: Progress) -> tuple[Workload, float]:
        codec = pipeline.schemas.codec(ORDER_PLACED)
        faults = Faults(duplicates=self.args.duplicates, undecodable=self.args.poison)
        work = Workload(self.args.orders, codec, seed=self.args.seed, faults=faults)
        rate, source = self.args.rate, pipeline.source
        raw = AIOKafkaProducer(**self.publisher.client_args(), acks="all")
        t0 = time.monotonic()
        async with Publisher(self.publisher, source, codec, pipeline.key) as pub:
            await raw.start()
            try:
                sent: list[asyncio.Future[Any]] = []
                for n, event in enumerate(work.events(), 1):
                    if event.value is None:  # poison goes around the publisher's checks
                        sent.append(await raw.send(source, event.raw, key=event.key))
                    elif rate:
                        # Paced: each order is sent at once, as an application would; the
                        # publisher's group flush shares one round trip among the orders
                        # that arrive while the previous one is in flight.
                        sent.append(asyncio.ensure_future(pub.publish(
                            event.value, seq=event.seq, event_id=event.event_id,
                        )))  # fmt: skip
                    else:
                        pub.buffer(event.value, seq=event.seq, event_id=event.event_id)
                    self.published = n
                    if rate:
                        if (ahead := t0 + n / rate - time.monotonic()) > 0:
                            await asyncio.sleep(ahead)
                        if len(sent) >= 1000:  # keep the futures few
                            for f in sent:
                                if f.done():
                                    f.result()  # a failed publish fails the demo now
                            sent = [f for f in sent if not f.done()]
                    elif n % 2000 == 0:
                        await pub.flush()  # durable in chunks; lets the progress watcher run
                await pub.flush()
                await asyncio.gather(*sent)
            finally:
                await raw.stop()
        return work, time.monotonic() - t0

    async def _drain(self, cluster: Cluster) -> None:
        """Wait until each group, in pipeline order, has committed its whole input.

        A stage commits only after its outputs are durable, so once a stage has no lag its
        successor's input is complete; one pass in order with no lag means all are done.
        """
        deadline = time.monotonic() + self.args.timeout
        while True:
            self._check_alive()
            lags = [await cluster.lag(n.group, n.input_topic) for n in self.nodes]
            if not any(lags):
                return
            if time.monotonic() > deadline:
                waiting = ", ".join(
                    f"{n.name} {lag:,}" for n, lag in zip(self.nodes, lags, strict=True) if lag
                )
                raise StageFailedError(
                    f"not drained within {self.args.timeout:.0f}s; lag: {waiting}"
                )
            await asyncio.sleep(0.5)

    async def _settle(self, cluster: Cluster, before: dict[str, Offsets]) -> None:
        """Wait (a few seconds at most) until the stats files show the whole input consumed:
        they are rewritten once a second, so they trail the committed offsets a little."""
        targets = [
            delta(await cluster.end_offsets(n.input_topic), before[f"group:{n.name}"])
            for n in self.nodes
        ]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = [p.stats() or {} for p in self.procs]
            if all(int(s.get("consumed", 0)) >= t for s, t in zip(stats, targets, strict=True)):
                return
            await asyncio.sleep(0.1)

    async def _watch(self, progress: Progress) -> None:
        while True:
            self._update(progress)
            await asyncio.sleep(0.25)

    def _update(self, progress: Progress) -> None:
        now = time.monotonic()
        tasks = progress.tasks
        progress.update(tasks[0].id, completed=self.published)
        upstream = self.published
        for task, proc in zip(tasks[1:], self.procs, strict=True):
            stats = proc.stats() or {}
            consumed = int(stats.get("consumed", 0))
            self.activity[proc.stage].observe(consumed, now)
            dead = int(stats.get("dead_letters", 0))
            progress.update(
                task.id, completed=consumed, total=max(upstream, consumed),
                note=f"dead {dead:,}" if dead else "",
            )  # fmt: skip
            upstream = int(stats.get("produced", 0))

    def _check_alive(self) -> None:
        for proc in self.procs:
            if not proc.running:
                raise StageFailedError(
                    f"stage {proc.stage} exited with code {proc.proc.returncode}; "
                    f"last lines of {proc.log}:\n{proc.log_tail()}"
                )

    # -- stopping and counting ------------------------------------------------------------

    def _stop_stages(self) -> list[int | None]:
        """SIGTERM every stage process; each finishes its batch, commits and exits."""
        if not self.procs:
            return []
        running = [proc.running for proc in self.procs]  # the others were reported already
        with self.console.status("stopping the stage processes (SIGTERM) ..."):
            for proc in self.procs:
                proc.stop()
            codes: list[int | None] = [proc.wait() for proc in self.procs]
        for proc, code, was_running in zip(self.procs, codes, running, strict=True):
            if code != 0 and was_running:
                self.console.print(f"[red]stage {proc.stage} exited with {code}:[/]")
                self.console.print(proc.log_tail(), highlight=False, markup=False)
        return codes

    def _results(
        self,
        before: dict[str, Offsets],
        after: dict[str, Offsets],
        codes: list[int | None],
        cpu0: list[float | None],
        cpu1: list[float | None],
    ) -> list[StageResult]:
        results = []
        for node, proc, code, c0, c1 in zip(self.nodes, self.procs, codes, cpu0, cpu1, strict=True):
            committed = before[f"group:{node.name}"]
            out = node.output_topic or ""
            results.append(
                StageResult(
                    name=node.name, stats=proc.stats() or {},
                    arrived=delta(after[node.input_topic], committed),
                    written=delta(after[out], before[out]) if out else 0,
                    dead_written=delta(after[node.dlq_topic], before[node.dlq_topic]),
                    leftover=delta(before[node.input_topic], committed),
                    active_s=self.activity[node.name].span,
                    cpu_s=None if c0 is None or c1 is None else c1 - c0,
                    exit_code=code,
                )
            )  # fmt: skip
        return results

    async def _read_outbox(
        self, cluster: Cluster, before: dict[str, Offsets], after: dict[str, Offsets]
    ) -> list[tuple[dict[str, Any], int | None]]:
        """This run's confirmations, each with its broker append time (None if the topic
        stamps CreateTime: it existed before the demo created it with LogAppendTime)."""
        outbox = pipeline.sink_topic or ""
        decode = pipeline.schemas.codec(CONFIRMATION).decode
        return [
            (decode(r.value), r.timestamp if r.timestamp_type == LOG_APPEND_TIME else None)
            for r in await cluster.read(outbox, before[outbox], after[outbox])
        ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.orders.demo",
        description="Run the orders pipeline on a real Kafka broker, one process per stage.",
    )
    parser.add_argument("--orders", type=int, default=100_000, help="records to publish")
    parser.add_argument("--rate", type=float, default=0, help="orders/s (0: as fast as possible)")
    parser.add_argument("--duplicates", type=float, default=0.02, help="share of retransmissions")
    parser.add_argument("--poison", type=float, default=0.005, help="share of undecodable bytes")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated workload")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for draining")
    parser.add_argument("--workdir", type=Path, help="keep stage logs and stats files here")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="a SCRAM user per stage with only its ACLs, over SASL_SSL (needs 'pipeline kafka "
        "start --secure', or an admin's PIPELINE_SECURITY_* settings)",
    )
    parser.add_argument(
        "--faust",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        default=[],
        metavar="STAGE,...",
        help="run these stages as agents of a faust-streaming app (pipeline faust), the rest "
        "as framework workers (needs the 'faust' extra)",
    )
    args = parser.parse_args(argv)
    if args.orders < 1:
        parser.error("--orders must be at least 1")
    unknown = [s for s in args.faust if s not in STAGES]
    if unknown:
        parser.error(f"--faust: no stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    if args.faust and args.secure:
        parser.error("--faust runs over PLAINTEXT only (pipeline.faust.faust_app)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the exit code is 0 only if every record is accounted for."""
    args = parse_args(argv)
    # aiokafka logs an error while a topic created a moment ago is missing from its metadata,
    # then finds it; here that is noise. Client errors that matter are raised, not logged.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough that table rows stay whole
        console = Console(width=200)
    settings = Settings()
    where = settings.bootstrap or (
        "the local broker" if args.secure else "a local broker (starting it)"
    )
    console.print(f"[bold]orders demo[/]: {args.orders:,} records, broker: {where}")
    t0 = time.monotonic()
    try:
        if args.secure:
            from pipeline.cli.commands import bootstrap_address

            admin = bootstrap_address(None)
            console.print(f"broker {admin.describe()}", highlight=False)
            code = asyncio.run(Demo(admin, args, console).run())
            console.print(f"wall time {time.monotonic() - t0:.1f}s")
            return code
        with open_broker(settings) as broker:
            console.print(f"broker {broker.bootstrap} ({broker.source})")
            code = asyncio.run(Demo(broker.connection, args, console).run())
    except PipelineError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    console.print(f"wall time {time.monotonic() - t0:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
