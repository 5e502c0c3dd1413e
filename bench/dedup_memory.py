"""Benchmark ``dedup_memory``: what 1,000,000 dedup keys cost in the state table.

Six structures, each filled with 1,000,000 distinct entries in a fresh interpreter (spawned
by the run; a process that already freed a big table would reuse its memory and under-report
the next one's growth):

- ``seq_table``: ``PartitionTable.check_sequence`` + ``remember_sequence`` for 10-byte keys
  (``key0000042``) from one 16-byte writer, position ``position(1000 + i, 0)``;
  ``take_dirty()`` every 2,000 records, as a commit would;
- ``seq_floor``: a plain ``dict[bytes, int]``, key -> 1000 + i, with the same check;
- ``id_table``: ``PartitionTable.seen_id`` + ``remember_id`` for 16-byte event ids, ``now_ms()``
  per record, ``max_ids`` above the count so that nothing is evicted;
- ``id_floor``: a plain ``dict[bytes, int]``, id -> ms, with the same check;
- ``id_rocks``: ``id_table`` with the table's RocksDB store (``--state-dir``): the ids and
  their time index live in RocksDB; RSS is the process's (RocksDB's memtables and caches
  included), and the store's size on disk is reported beside it;
- ``id_sketch`` (not the framework; the change the README recommends): the event-id part of
  the table as a plain ``dict`` (id -> ms) plus a ``deque`` of ids in arrival order for
  expiry, instead of an ``OrderedDict``; same checks, same changelog entries.

Keys are sliced from one pre-built buffer inside the loop, so every structure pays for its
own key objects. Per structure: RSS growth (``/proc/self/statm``) and a second fill under
``tracemalloc`` (live Python allocations only), bytes per key, and the time per
check-and-remember, gross and net of the loop itself (slicing, position or clock).
No broker is needed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from pathlib import Path
from typing import Any

from bench import common, report
from pipeline.runtime.state import ID_PREFIX

NAME = "dedup_memory"
VARIANTS = ("seq_floor", "seq_table", "id_floor", "id_table", "id_rocks", "id_sketch")
KEY_BYTES, ID_BYTES = 10, 16


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    keys: int = 1_000_000
    batch: int = 2_000  # take_dirty() every this many records (one commit)
    results: Path = common.RESULTS


def run(config: Config) -> dict[str, Any]:
    load_at_start = common.load_average()
    measured: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        measured[variant] = _child(variant, config)
        m = measured[variant]
        print(
            f"[{NAME}] {variant:<10} rss {m['rss_bytes_per_key']:>6.1f} B/key, "
            f"tracemalloc {m['traced_bytes_per_key']:>6.1f} B/key, "
            f"{m['us_per_record']:.3f} us/record ({m['us_per_record_net']:.3f} net)"
        )
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "ratio": _ratio(measured, "seq_table", "seq_floor", "rss_bytes_per_key"),
        "ratios": {
            f"{a}/{b} {what}": _ratio(measured, a, b, what)
            for a, b in (
                ("seq_table", "seq_floor"),
                ("id_table", "id_floor"),
                ("id_rocks", "id_table"),
                ("id_sketch", "id_floor"),
                ("id_sketch", "id_table"),
            )
            for what in ("rss_bytes_per_key", "traced_bytes_per_key", "us_per_record_net")
        },
        "conditions": {
            "keys": config.keys,
            "key_bytes": KEY_BYTES,
            "id_bytes": ID_BYTES,
            "take_dirty_every": config.batch,
            "process": "one fresh interpreter per structure, same Python, same run",
            "rss": "resident set growth across the fill, after gc.collect()",
            "tracemalloc": "live traced bytes after a second fill of a fresh structure",
            "timing": "gross: the whole fill loop / keys; net: minus the same loop without "
            "the structure (key slicing, position() or now_ms())",
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
        },
        "structures": measured,
    }
    print()
    print(_table(doc))
    path = report.write(NAME, doc, config.results)
    print(f"[{NAME}] results: {path}")
    return doc


def _child(variant: str, config: Config) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.dedup_memory", variant, str(config.keys)]
    args.append(str(config.batch))
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{NAME} {variant} failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _ratio(measured: dict[str, dict[str, Any]], a: str, b: str, what: str) -> float | None:
    x, y = measured.get(a, {}).get(what), measured.get(b, {}).get(what)
    return round(x / y, 3) if x and y else None


def _table(doc: dict[str, Any]) -> str:
    c = doc["conditions"]
    head = (
        f"{'structure':<12}{'entries':>10}{'RSS MB':>9}{'RSS B/key':>11}{'traced B/key':>14}"
        f"{'us/record':>11}{'net us':>8}{'vs floor (RSS)':>16}{'disk B/key':>12}"
    )
    lines = [
        f"{NAME}: {c['keys']:,} distinct keys ({c['key_bytes']} B) / event ids "
        f"({c['id_bytes']} B), memory store (id_rocks: RocksDB), {c['cores']} cores, load at start "
        f"{c['load_average_1_5_15min_at_start']}",
        head,
        "-" * len(head),
    ]
    for name, m in doc["structures"].items():
        floor = "seq_floor" if name.startswith("seq") else "id_floor"
        vs = _ratio(doc["structures"], name, floor, "rss_bytes_per_key")
        lines.append(
            f"{name:<12}{m['entries']:>10,}{m['rss_growth_bytes'] / 2**20:>9.1f}"
            f"{m['rss_bytes_per_key']:>11.1f}{m['traced_bytes_per_key']:>14.1f}"
            f"{m['us_per_record']:>11.3f}{m['us_per_record_net']:>8.3f}"
            f"{'' if vs is None else f'{vs:.2f}':>16}{m.get('disk_bytes_per_key') or '':>12}"
        )
    return "\n".join(lines)


# -- the child process ---------------------------------------------------------------------


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _blob(variant: str, n: int) -> tuple[bytes, int]:
    if variant.startswith("seq"):
        return b"".join(b"key%07d" % i for i in range(n)), KEY_BYTES
    return random.Random(7).randbytes(ID_BYTES * n), ID_BYTES


def _fill(variant: str, blob: bytes, w: int, n: int, batch: int) -> tuple[Any, int]:
    """Fill one structure; return it and how many entries it holds."""
    from pipeline.runtime.state import DUPLICATE, PartitionTable, now_ms, position
    from pipeline.stage import DedupPolicy

    if variant == "seq_floor":
        d: dict[bytes, int] = {}
        for start in range(0, n, batch):
            for i in range(start, min(n, start + batch)):
                key, seq = blob[i * w : i * w + w], 1000 + i
                last = d.get(key)
                if last is None or seq > last:
                    d[key] = seq
        return d, len(d)
    if variant == "id_floor":
        ttl = 7 * 24 * 3600 * 1000
        ids: dict[bytes, int] = {}
        for start in range(0, n, batch):
            for i in range(start, min(n, start + batch)):
                eid, now = blob[i * w : i * w + w], now_ms()
                seen = ids.get(eid)
                if seen is None or now - seen >= ttl:
                    ids[eid] = now
        return ids, len(ids)
    policy = DedupPolicy(max_ids=2 * n)
    table: Any = PartitionTable(0, {}, policy)
    if variant == "id_rocks":
        from rocksdict import Rdict

        path = Path(tempfile.mkdtemp(prefix="bench-ids-"))
        store: Any = Rdict(str(path / "ids"))
        table = PartitionTable(0, store, policy, persistent=True)
        _ROCKS_DIRS[id(table)] = path
    if variant == "id_sketch":
        table = IdSketch(ttl_ms=7 * 24 * 3600 * 1000, max_ids=2 * n)
    if variant == "seq_table":
        writer = b"0123456789abcdef"
        for start in range(0, n, batch):
            now = now_ms()
            for i in range(start, min(n, start + batch)):
                key, pos = blob[i * w : i * w + w], position(1000 + i, 0)
                if table.check_sequence(key, writer, pos) != DUPLICATE:
                    table.remember_sequence(key, writer, pos, now)
            table.take_dirty()
        return table, len(table.store)
    for start in range(0, n, batch):
        for i in range(start, min(n, start + batch)):
            eid, now = blob[i * w : i * w + w], now_ms()
            if not table.seen_id(eid, now):
                table.remember_id(eid, now)
        table.take_dirty()
    return table, len(table.ids)


_ROCKS_DIRS: dict[int, Path] = {}  # id(table) -> its RocksDB directory (id_rocks)


def _close(structure: Any) -> int:
    """Close a RocksDB-backed table; return its bytes on disk (0 for memory structures)."""
    path = _ROCKS_DIRS.pop(id(structure), None)
    if path is None:
        return 0
    structure.store.close()
    size: int = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    return size


class IdSketch:
    """Event ids in a ``dict`` plus a ``deque`` in arrival order (instead of an OrderedDict).

    Expiry pops the deque's head while its entry is older than the TTL or the dict is over
    ``max_ids``; a head whose dict entry is gone already is just dropped. (An id remembered
    again after it expired sits in the deque twice; the dict keeps the newer time.) A sketch
    for this benchmark, not the framework.
    """

    __slots__ = ("dirty", "ids", "max_ids", "order", "ttl_ms")

    def __init__(self, ttl_ms: int, max_ids: int) -> None:
        self.ids: dict[bytes, int] = {}
        self.order: deque[bytes] = deque()
        self.ttl_ms, self.max_ids = ttl_ms, max_ids
        self.dirty: dict[bytes, bytes | None] = {}

    def seen_id(self, event_id: bytes, now_ms: int) -> bool:
        seen = self.ids.get(event_id)
        return seen is not None and now_ms - seen < self.ttl_ms

    def remember_id(self, event_id: bytes, now_ms: int) -> None:
        self.ids[event_id] = now_ms
        self.order.append(event_id)
        self.dirty[ID_PREFIX + event_id] = now_ms.to_bytes(8, "big")
        ids, order = self.ids, self.order
        while order:
            oldest = order[0]
            seen = ids.get(oldest)
            if seen is not None and len(ids) <= self.max_ids and now_ms - seen < self.ttl_ms:
                break
            order.popleft()
            if seen is not None:
                del ids[oldest]

    def take_dirty(self) -> dict[bytes, bytes | None]:
        dirty, self.dirty = self.dirty, {}
        return dirty


def _loop_only(variant: str, blob: bytes, w: int, n: int) -> float:
    """The fill loop's own cost: the key slice and the position or clock call."""
    from pipeline.runtime.state import now_ms, position

    t0 = time.perf_counter()
    if variant == "seq_table":
        for i in range(n):
            _key, _pos = blob[i * w : i * w + w], position(1000 + i, 0)
    elif variant == "seq_floor":
        for i in range(n):
            _key, _seq = blob[i * w : i * w + w], 1000 + i
    else:
        for i in range(n):
            _key, _now = blob[i * w : i * w + w], now_ms()
    return time.perf_counter() - t0


def measure(variant: str, n: int, batch: int) -> dict[str, Any]:
    blob, w = _blob(variant, n)
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    structure, entries = _fill(variant, blob, w, n, batch)
    seconds = time.perf_counter() - t0
    gc.collect()
    rss = _rss() - rss0
    disk = _close(structure)
    del structure
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    structure, _ = _fill(variant, blob, w, n, batch)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    _close(structure)
    del structure
    gc.collect()
    loop = _loop_only(variant, blob, w, n)
    return {
        "variant": variant,
        "keys": n,
        "entries": entries,
        "rss_growth_bytes": rss,
        "rss_bytes_per_key": round(rss / n, 1),
        "disk_bytes": disk,
        "disk_bytes_per_key": round(disk / n, 1),
        "traced_bytes": traced,
        "traced_bytes_per_key": round(traced / n, 1),
        "seconds": round(seconds, 3),
        "us_per_record": round(seconds * 1e6 / n, 3),
        "loop_us_per_record": round(loop * 1e6 / n, 3),
        "us_per_record_net": round(max(0.0, seconds - loop) * 1e6 / n, 3),
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
