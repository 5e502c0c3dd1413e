"""``make demo`` for real: the orders demo as a subprocess on the session broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from examples.orders.pipeline import STAGES
from tests.integration.helpers import ROOT

ROW = re.compile(r"^\s*(\w+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)(?:\s|$)")


def summary_rows(output: str) -> dict[str, list[int]]:
    """Stage name -> [in, out, filtered, duplicates, dead letters], from the printed table."""
    rows: dict[str, list[int]] = {}
    for line in output.splitlines():
        match = ROW.match(line)
        if match and match.group(1) in (*STAGES, "pipeline"):
            rows[match.group(1)] = [int(g.replace(",", "")) for g in match.groups()[1:]]
    return rows


@pytest.mark.parametrize("faust", [(), ("price", "fraud")], ids=["workers", "faust-price-fraud"])
def test_demo_runs_and_every_record_is_accounted_for(
    kafka_bootstrap: str, tmp_path: Path, faust: tuple[str, ...]
) -> None:
    """The demo as it ships; and with price and fraud as agents of faust-streaming apps
    (pipeline faust, Faust's own worker) between framework workers."""
    orders = 3_000
    env = {**os.environ, "PIPELINE_BOOTSTRAP": kafka_bootstrap, "PYTHONUNBUFFERED": "1"}
    extra = ["--faust", ",".join(faust)] if faust else []
    done = subprocess.run(
        [sys.executable, "-m", "examples.orders.demo", "--orders", str(orders),
         "--workdir", str(tmp_path), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, f"{output}\n--- stage logs ---\n{logs}"
    assert "PASS" in output and "FAIL" not in output, output
    assert "Traceback" not in logs, logs
    for stage in faust:  # those stages ran in Faust's worker
        log = (tmp_path / f"{stage}-0.log").read_text(errors="replace")
        assert "[^Worker]: Ready" in log and f"stage {stage} (faust)" in log, log[-2000:]

    rows = summary_rows(output)
    assert set(rows) == {*STAGES, "pipeline"}, output
    previous_out = orders
    for stage in STAGES:
        n_in, n_out, filtered, dupes, dead = rows[stage]
        assert n_in == n_out + filtered + dupes + dead, (stage, rows[stage])
        assert n_in == previous_out, f"{stage} read {n_in}, its upstream wrote {previous_out}"
        previous_out = n_out
    published, outbox, filtered, dupes, dead = rows["pipeline"]
    assert published == orders
    assert outbox == rows["notify"][1]
    assert published == outbox + filtered + dupes + dead
    assert dupes > 0 and dead > 0 and filtered > 0  # the faults were injected and caught
    assert rows["validate"][3] == dupes  # retransmissions die at the first stage
