"""``python -m bench``: run the benchmarks on one broker and write ``bench/results/*.json``.

The broker is ``PIPELINE_BOOTSTRAP`` when set, else a local one started for the run (see
:func:`pipeline.broker.open_broker`). Every run uses fresh topics and groups, deleted at the
end unless ``--keep-topics``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from bench import (
    cluster,
    common,
    concurrency,
    crash_guard,
    dedup_memory,
    delivery,
    faust_adapter,
    latency,
    ops_overhead,
    priority,
    publisher,
    restore,
    security,
    stage_throughput,
    trickle,
)
from pipeline.broker import open_broker
from pipeline.config import Settings

BENCHMARKS = (
    stage_throughput.NAME,
    concurrency.NAME,
    delivery.NAME,
    restore.NAME,
    cluster.NAME,
    ops_overhead.NAME,
    crash_guard.NAME,
    priority.NAME,
    security.NAME,
    dedup_memory.NAME,
    faust_adapter.NAME,
    latency.NAME,
    publisher.NAME,
    trickle.NAME,
)
NO_BROKER = frozenset({dedup_memory.NAME})


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return names


def _positive(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    t = stage_throughput.Config()
    c = concurrency.Config()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks that report ratios against baselines measured in the same run.",
    )
    p.add_argument(
        "--only",
        type=lambda s: _names(s, BENCHMARKS, "benchmark"),
        default=BENCHMARKS,
        metavar="NAME[,NAME]",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    p.add_argument("--records", type=_positive, default=t.records, help="stage_throughput input")
    p.add_argument("--repeat", type=_positive, default=t.repeat, help="runs per contender")
    p.add_argument(
        "--contenders",
        type=lambda s: _names(s, stage_throughput.CONTENDERS, "contender"),
        default=t.contenders,
        metavar="NAME[,NAME]",
        help=f"stage_throughput contenders (default: {','.join(t.contenders)})",
    )
    p.add_argument(
        "--faust-records",
        type=_positive,
        default=None,
        help="cap faust's run (it is ~10x slower); default: all records",
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up pass that precedes the timed runs",
    )
    p.add_argument("--keys", type=_positive, default=t.keys, help="distinct keys (throughput)")
    p.add_argument("--partitions", type=_positive, default=t.partitions)
    p.add_argument(
        "--latency-rate", type=_positive, default=latency.RATE, help="latency: records/s"
    )
    p.add_argument(
        "--latency-seconds", type=float, default=latency.SECONDS, help="latency: seconds"
    )
    p.add_argument(
        "--trickle-rate", type=_positive, default=trickle.RATE, help="trickle: records/s"
    )
    p.add_argument(
        "--trickle-seconds", type=float, default=trickle.SECONDS, help="trickle: seconds"
    )
    p.add_argument("--c1-records", type=_positive, default=c.c1_records)
    p.add_argument("--c64-records", type=_positive, default=c.c64_records)
    p.add_argument(
        "--profile",
        nargs="?",
        const="stage",
        default=None,
        choices=("stage", "stage_dedup"),
        help="also profile one run of the framework (default: stage) with pyinstrument",
    )
    d, r, m = delivery.Config(), restore.Config(), dedup_memory.Config()
    p.add_argument("--delivery-records", type=_positive, default=d.records, help="delivery input")
    p.add_argument(
        "--delivery-repeat", type=_positive, default=d.repeat, help="runs per delivery mode"
    )
    p.add_argument(
        "--delivery-big-fetch",
        type=lambda s: int(s.replace("_", "")),
        default=d.big_fetch,
        metavar="RECORDS",
        help="also run exactly-once with this many records per fetch (0: skip)",
    )
    p.add_argument(
        "--delivery-dedup",
        action="store_true",
        help="also run both delivery modes with the dedup table on",
    )
    p.add_argument(
        "--delivery-concurrency",
        type=int,
        default=d.concurrency,
        metavar="N",
        help="also run both modes with an I/O-bound async stage at this concurrency (0: skip)",
    )
    p.add_argument(
        "--delivery-profile",
        choices=("auto", "always", "never"),
        default=d.profile,
        help="profile one exactly-once run: when below target (auto), always or never",
    )
    p.add_argument(
        "--restore-keys", type=_positive, default=r.keys, help="keys in the restored table"
    )
    p.add_argument(
        "--restore-repeat", type=_positive, default=r.repeat, help="runs per restore path"
    )
    p.add_argument(
        "--restore-stores",
        type=lambda s: _names(s, restore.STORES, "store"),
        default=r.stores,
        metavar="NAME[,NAME]",
        help=f"local stores to restore into (default: {','.join(r.stores)})",
    )
    p.add_argument("--dedup-keys", type=_positive, default=m.keys, help="dedup_memory keys")
    k = cluster.Config()
    p.add_argument(
        "--cluster-records", type=_positive, default=k.records, help="cluster benchmark input"
    )
    p.add_argument("--results", type=Path, default=common.RESULTS, help="where JSON goes")
    p.add_argument("--keep-topics", action="store_true", help="do not delete the topics")
    p.add_argument("-v", "--verbose", action="store_true", help="framework and client logs")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace, bootstrap: str, broker: str) -> None:
    topics = common.Topics(bootstrap, args.partitions)
    try:
        if stage_throughput.NAME in args.only:
            await stage_throughput.run(
                bootstrap,
                broker,
                stage_throughput.Config(
                    records=args.records,
                    partitions=args.partitions,
                    keys=args.keys,
                    repeat=args.repeat,
                    contenders=args.contenders,
                    faust_records=args.faust_records,
                    warmup=args.warmup,
                    profile=args.profile,
                    results=args.results,
                ),
                topics,
            )
        if concurrency.NAME in args.only:
            await concurrency.run(
                bootstrap,
                broker,
                concurrency.Config(
                    c1_records=args.c1_records,
                    c64_records=args.c64_records,
                    partitions=args.partitions,
                    results=args.results,
                ),
                topics,
            )
        if delivery.NAME in args.only:
            await delivery.run(
                bootstrap,
                broker,
                delivery.Config(
                    records=args.delivery_records,
                    partitions=args.partitions,
                    keys=args.keys,
                    repeat=args.delivery_repeat,
                    warmup=args.warmup,
                    big_fetch=args.delivery_big_fetch or None,
                    dedup=args.delivery_dedup,
                    concurrency=args.delivery_concurrency or None,
                    profile=args.delivery_profile,
                    results=args.results,
                ),
                topics,
            )
        if restore.NAME in args.only:
            await restore.run(
                bootstrap,
                broker,
                restore.Config(
                    keys=args.restore_keys,
                    partitions=args.partitions,
                    repeat=args.restore_repeat,
                    stores=args.restore_stores,
                    results=args.results,
                ),
                topics,
            )
        if cluster.NAME in args.only:
            await cluster.run(
                bootstrap,
                broker,
                cluster.Config(
                    records=args.cluster_records,
                    partitions=args.partitions,
                    keys=args.keys,
                    repeat=args.repeat,
                    results=args.results,
                ),
                topics,
            )
        if security.NAME in args.only:
            await security.run(
                bootstrap,
                broker,
                security.Config(
                    records=args.cluster_records,
                    partitions=args.partitions,
                    keys=args.keys,
                    repeat=args.repeat,
                    results=args.results,
                ),
                topics,
            )
        # One stage against itself with one thing changed, over --records: the same knobs.
        for pair in (ops_overhead, crash_guard, priority):
            if pair.NAME in args.only:
                config = pair.Config(
                    records=args.records, partitions=args.partitions, keys=args.keys,
                    repeat=args.repeat, results=args.results,
                )  # fmt: skip
                await pair.run(bootstrap, broker, config, topics)
        if latency.NAME in args.only:
            config = latency.Config(
                rate=args.latency_rate, seconds=args.latency_seconds, repeat=args.repeat,
                partitions=args.partitions, results=args.results,
            )  # fmt: skip
            await latency.run(bootstrap, broker, config, topics)
        if trickle.NAME in args.only:
            config = trickle.Config(
                rate=args.trickle_rate, seconds=args.trickle_seconds,
                repeat=min(args.repeat, 2), results=args.results,
            )  # fmt: skip
            await trickle.run(bootstrap, broker, config, topics)
        if publisher.NAME in args.only:
            config = publisher.Config(
                records=min(args.records, 100_000), partitions=args.partitions,
                keys=args.keys, repeat=args.repeat, results=args.results,
            )  # fmt: skip
            await publisher.run(bootstrap, broker, config, topics)
        if faust_adapter.NAME in args.only:  # Faust is slow: its own record count
            config = faust_adapter.Config(
                records=args.faust_records or faust_adapter.RECORDS,
                partitions=args.partitions, keys=args.keys, results=args.results,
            )  # fmt: skip
            await faust_adapter.run(bootstrap, broker, config, topics)
    finally:
        if not args.keep_topics:
            await topics.delete_all()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The framework's warnings are counted into each run's result; on the console only with -v.
    framework = logging.getLogger("pipeline")
    framework.addHandler(common.TALLY)
    if not args.verbose:
        framework.propagate = False
        # Fresh topics make the clients log retriable leader changes and coordinator waits.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    t0 = time.monotonic()
    if dedup_memory.NAME in args.only:  # no broker; first, before a broker JVM takes memory
        dedup_memory.run(dedup_memory.Config(keys=args.dedup_keys, results=args.results))
    if any(name not in NO_BROKER for name in args.only):
        with open_broker(Settings()) as handle:
            broker = f"{handle.source} {handle.bootstrap}"
            print(f"broker: {broker}")
            asyncio.run(_run(args, handle.bootstrap, broker))
    print(f"total {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
