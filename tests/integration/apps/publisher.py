"""A publisher process, as one replica of an application: ``python -m
tests.integration.apps.publisher BOOTSTRAP TOPIC FIRST COUNT KEYS RETRANSMIT SEED``.

Publishes events ``n`` = FIRST .. FIRST+COUNT-1 with key ``k{n % KEYS}`` (every replica writes
the same keys), and after a random RETRANSMIT share of them publishes the same event again with
the stamp it got (same writer, same ``seq`` and event id): a retransmission. Prints one JSON
line: its writer identity, events sent and retransmissions.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from pipeline import Publisher, SchemaStore
from tests.integration.apps.lossless import EVENT, SCHEMAS


async def main(argv: list[str]) -> None:
    bootstrap, topic = argv[0], argv[1]
    first, count, keys = int(argv[2]), int(argv[3]), int(argv[4])
    share, rng = float(argv[5]), random.Random(int(argv[6]))
    codec = SchemaStore.from_directory(SCHEMAS).codec(EVENT)
    again = 0
    async with Publisher(bootstrap, topic, codec, "key", batch_records=500) as pub:
        for n in range(first, first + count):
            value = {"key": f"k{n % keys}", "n": n, "hops": 0, "payload": "p" * 100}
            stamp = pub.buffer(value)
            if rng.random() < share:
                pub.buffer(value, seq=stamp.seq, event_id=stamp.event_id)
                again += 1
            if n % 500 == 0:
                await pub.flush()  # let replicas interleave on the broker
    print(json.dumps({"writer": pub.writer.decode(), "sent": count, "retransmitted": again}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
