"""The demo pipeline end to end (issue 7): a reduced ``make demo`` must learn, offline.

It runs the same commands as ``make demo`` (synth → convert → validate → make-tiny → train with
evaluation before and after) with fewer training steps, in a subprocess, and checks that the tiny
model, initialised from scratch, classifies the held-out test videos far above chance (25 %).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHANCE = 0.25


@pytest.mark.slow
def test_quick_demo_learns_far_above_chance(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr

    report = json.loads((out / "report.json").read_text())
    splits = report["records_per_split"]
    assert set(splits) == {"train", "val", "test"} and min(splits.values()) > 0
    assert report["accuracy_before"] is not None and report["accuracy_after"] is not None
    assert report["accuracy_after"] >= 2.4 * CHANCE, report
    assert report["accuracy_after"] > report["accuracy_before"], report

    run = Path(report["output_dir"])
    assert (run / "loss_curve.png").stat().st_size > 0
    after = json.loads((run / "eval_after.json").read_text())
    assert len(after["examples"]) == splits["test"]
    assert "accuracy after" in result.stdout
