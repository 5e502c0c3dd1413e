"""Run a contender in a subprocess (faust, Quix Streams) and collect its own timing.

The child gets a JSON config file and writes a JSON report: ``t_first`` (first record
received), ``t_end`` (its commit covered every record), both from ``time.monotonic()`` in the
child, plus what it counted. Its log goes to a file whose tail ends up in the result when the
run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common

ROOT = Path(__file__).resolve().parents[2]  # the repository: the child imports ``bench``


async def run_external(
    module: str,
    *,
    label: str,
    bootstrap: str,
    source: str,
    output: str,
    group: str,
    target: int,
    time_limit: float,
    extra: dict[str, Any] | None = None,
) -> common.RunResult:
    """Run ``python -m module CONFIG`` until it reports, then check the broker's view."""
    result = common.RunResult(label)
    with tempfile.TemporaryDirectory(prefix=f"bench-{label}-") as tmp:
        work = Path(tmp)
        config = {
            "bootstrap": bootstrap,
            "source": source,
            "output": output,
            "group": group,
            "target": target,
            "workdir": str(work),
            "report": str(work / "report.json"),
            **(extra or {}),
        }
        (work / "config.json").write_text(json.dumps(config))
        log_path = work / "child.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                str(work / "config.json"),
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            try:
                await asyncio.wait_for(proc.wait(), time_limit)
            except TimeoutError:
                result.error = f"{label} did not finish within {time_limit:.0f}s"
            finally:
                await _stop(proc)
        report = _read_report(Path(config["report"]))
        if report.get("error"):
            result.error = str(report["error"])
        elif result.error is None and "t_end" not in report:
            result.error = f"{label} exited with code {proc.returncode} without a report"
        if result.error is None:
            result.seconds = float(report["t_end"]) - float(report["t_first"])
            result.records = int(report["committed"])
            result.notes.update(report.get("notes", {}))
        else:
            result.notes["log_tail"] = _tail(log_path)
    if result.error is None:
        await common.verify(bootstrap, result, output, group, source)
    return result


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (a clean shutdown for both frameworks), then SIGKILL if it lingers."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _read_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def load_config(argv: list[str]) -> dict[str, Any]:
    """The child's side: read the config file named on the command line."""
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m {argv[0]} CONFIG.json")
    config: dict[str, Any] = json.loads(Path(argv[1]).read_text())
    return config


def write_report(config: dict[str, Any], report: dict[str, Any]) -> None:
    """The child's side: write the report atomically (the parent may read at any time)."""
    path = Path(config["report"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)
