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
        [sys.executable, "-m", "tools.demo", "--quick", "--output_dir", str(out)],
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


@pytest.mark.parametrize("spelling", ["--output_dir", "--out"])
def test_output_folder_option_and_its_deprecated_spelling(tmp_path: Path, monkeypatch, spelling):
    """--output_dir is the trainer's name; the old --out still works and says so in one line."""
    import importlib.util

    from click.testing import CliRunner

    path = Path(__file__).resolve().parents[1] / "tools" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_under_test", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, demo)  # dataclasses look their module up
    spec.loader.exec_module(demo)
    used = []

    def fake_run(out: Path, settings: demo.DemoSettings) -> dict:
        used.append((out, settings))
        return {"records_per_split": {"test": 1}, "steps": 0, "total_seconds": 0, "seconds": {},
                "accuracy_before": 0.0, "accuracy_after": 1.0, "output_dir": str(out)}  # fmt: skip

    monkeypatch.setattr(demo, "run_demo", fake_run)
    result = CliRunner().invoke(demo.main, [spelling, str(tmp_path / "d"), "--quick"])
    assert result.exit_code == 0, result.output
    assert used == [(tmp_path / "d", demo.QUICK)]
    notes = [line for line in result.stderr.splitlines() if "deprecated" in line]
    expected = [] if spelling == "--output_dir" else ["note: --out is deprecated; use --output_dir"]
    assert notes == expected
