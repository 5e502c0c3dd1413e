"""What a new user hit when trying the CLI from the README (issue 12): each with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import EncodeError, Pipeline, SchemaStore, stage
from pipeline.testing import TestDriver

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_BOOTSTRAP"}
    env["PYTHONPATH"] = ""  # only what the CLI itself makes importable
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_a_module_that_raises_on_import_is_one_paragraph(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "import os\n\ndef connect():\n    raise RuntimeError('no DATABASE_URL set')\n\nconnect()\n"
    )
    for command in ("graph", "run"):
        args = [command, "broken:pipeline"] + (["--all"] if command == "run" else [])
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "RuntimeError: no DATABASE_URL set" in proc.stderr
        assert f"{tmp_path / 'broken.py'}:4" in proc.stderr  # the user's own line
    debug = cli("--debug", "graph", "broken:pipeline", cwd=tmp_path)
    assert "Traceback" in debug.stderr and "connect()" in debug.stderr


def test_a_pipeline_file_loads_from_anywhere(tmp_path: Path) -> None:
    proc = cli("graph", f"{ROOT}/tests/integration/apps/chain.py:build", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline chain" in proc.stdout
    missing = cli("graph", "examples.orders.pipeline:pipeline", cwd=tmp_path)
    assert missing.returncode == 1 and "run the command from your project's root" in missing.stderr


def test_all_and_stage_together_is_named_as_such() -> None:
    proc = cli("run", "examples.orders.pipeline:pipeline", "--all", "--stage", "price")
    assert proc.returncode == 1
    assert "give either --all or --stage NAME, not both" in proc.stderr


def test_piped_output_is_not_wrapped_at_80_columns() -> None:
    proc = cli("graph", "examples.orders.pipeline:pipeline")
    assert proc.returncode == 0
    assert max(len(line) for line in proc.stdout.splitlines()) > 80, "wrapped"
    for line in proc.stdout.splitlines():
        assert not line.startswith(" " * 20), f"a wrapped continuation line: {line!r}"


def test_a_typo_in_an_output_field_is_a_dead_letter_not_a_silent_loss() -> None:
    store = SchemaStore()
    store.add({"type": "record", "name": "t.E", "fields": [{"name": "id", "type": "string"},
              {"name": "total", "type": "double", "default": 0.0}]})  # fmt: skip

    @stage(input="t.E", output="t.E")
    def typo(e: dict[str, Any]) -> dict[str, Any]:
        return {"id": e["id"], "totl": 12.5}  # 'totl': the value would vanish

    driver = TestDriver(Pipeline("p", source="p.in", key="id", schemas=store) | typo)
    driver.send({"id": "a", "total": 1.0})
    driver.run()
    assert driver.outputs() == []
    [dead] = driver.dead_letters()
    assert dead.error_class == "EncodeError"
    assert "field(s) totl not in the schema" in dead.error_message
    with pytest.raises(EncodeError, match="totl"):  # the publisher refuses it too
        store.codec("t.E").encode({"id": "a", "totl": 1.0})
    assert store.codec("t.E").encode({"id": "a"})  # a missing field with a default is fine


def test_run_batching_options() -> None:
    """``pipeline run --max-records/--batch-wait-ms``: the worker's batching."""
    from pipeline.cli.commands import _batching
    from pipeline.runtime.transport import Batching

    assert _batching(None, 0) == Batching()
    waited = _batching(500, 40)
    assert (waited.max_records, waited.fetch_wait_ms) == (500, 40)
    assert waited.fetch_min_bytes > 64 * 1024  # the broker holds the fetch for a batch
    assert Batching().fetch_min_bytes == 1  # by default it answers at the first record
