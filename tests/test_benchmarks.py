"""benchmarks/train_throughput.py: the --tiny CI run, failure rows, and the report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HARNESS = REPO_ROOT / "benchmarks" / "train_throughput.py"
MODES = ("full", "frozen-vision", "lora", "qlora")


def run_harness(*args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    """The tiny CPU run, one timed step and no warm-up (the figures are not the point here)."""
    return subprocess.run(
        [sys.executable, str(HARNESS), "--tiny", "--warmup", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def table_rows(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    """(mode, attention) -> {column: cell} for every data row of the markdown table."""
    rows, header = {}, None
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| mode |"):
            header = cells
        elif line.startswith("| ") and cells[0] in MODES:
            rows[(cells[0], cells[1])] = dict(zip(header, cells, strict=True))
    return rows


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("train_throughput", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_measures_every_mode_and_writes_markdown_and_json(tmp_path):
    out = tmp_path / "bench" / "tiny.md"
    profiles = tmp_path / "profiles"
    proc = run_harness(
        "--attn", "sdpa,flash_attention_2", "--out", str(out), "--profile-dir", str(profiles)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = table_rows(proc.stdout)
    for mode in MODES:
        cells = rows[(mode, "sdpa")]
        assert cells["status"] == "ok", cells
        assert float(cells["img/s"]) > 0 and float(cells["tokens/s"]) > 0
        # CPU: fp32 weights, as phi3v-train without --bf16; QLoRA's linear layers are 4-bit.
        assert cells["weights"] == ("nf4+fp32" if mode == "qlora" else "fp32")
    # flash-attn has no CPU build: reported as a row, the other rows still ran.
    if importlib.util.find_spec("flash_attn") is None:
        for mode in MODES:
            assert rows[(mode, "flash_attention_2")]["status"].startswith("skipped: flash_attn")

    assert table_rows(out.read_text()).keys() == rows.keys()
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["environment"]["torch"]
    measured = {row["mode"]: row for row in payload["rows"] if row["status"] == "ok"}
    assert set(measured) == set(MODES)
    # The modes are set up by the trainer's strategies: check what actually trained.
    assert set(measured["full"]["training"].values()) == {"full"}
    assert measured["frozen-vision"]["training"]["vision"] == "frozen"
    assert measured["frozen-vision"]["training"]["language"] == "full"
    assert set(measured["lora"]["training"].values()) == {"lora"}
    assert set(measured["qlora"]["training"].values()) == {"lora"}
    assert measured["lora"]["trainable_params"] < measured["full"]["trainable_params"]
    assert measured["frozen-vision"]["tflop_per_sample"] < measured["full"]["tflop_per_sample"]
    # One DocVQA-like page per sample: images/s and tokens/s agree with the sample length.
    full = measured["full"]
    assert full["tokens_per_s"] == pytest.approx(full["img_per_s"] * full["tokens_per_sample"])
    # Where the time goes: the phases add up to the step, and one profiled step per run.
    assert sum(full["phase_s"].values()) == pytest.approx(full["step_s_mean"], rel=0.2)
    for mode in MODES:
        assert "aten::" in (profiles / f"{mode}_sdpa.txt").read_text()


def test_an_isolated_run_measures_in_its_own_process_and_keeps_its_log(tmp_path):
    out = tmp_path / "iso.md"
    proc = run_harness(
        "--modes", "full", "--attn", "eager", "--isolate", "--out", str(out), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table_rows(proc.stdout)[("full", "eager")]["status"] == "ok"
    assert (tmp_path / "iso_logs" / "full_eager.log").is_file()


def _spec(harness, tmp_path, mode="full"):
    return harness.RunSpec(
        mode=mode,
        attn="sdpa",
        device="cpu",
        precision="trainer",
        steps=1,
        warmup=0,
        micro_batch=1,
        num_crops=2,
        lora_rank=8,
        config_dir=str(tmp_path / "missing"),
        peak_tflops=None,
    )


def test_an_isolated_run_past_its_timeout_becomes_a_row(harness, tmp_path):
    spec = _spec(harness, tmp_path)
    row = harness.run_isolated(spec, tmp_path / "b.safetensors", tmp_path / "run.log", timeout=0.2)
    assert (row.mode, row.attn, row.status) == ("full", "sdpa", "timeout")


def test_a_crashing_isolated_run_becomes_a_row_with_its_last_message(harness, tmp_path):
    spec = _spec(harness, tmp_path, mode="qlora")
    row = harness.run_isolated(
        spec, tmp_path / "absent.safetensors", tmp_path / "run.log", timeout=120
    )
    assert row.status == "crash"
    assert "exit code 1" in row.error and "absent.safetensors" in row.error


def test_a_failing_measurement_is_a_row_not_an_abort(harness, tmp_path):
    row = harness.run_in_process(_spec(harness, tmp_path), batches=[])
    assert row.status == "error"
    assert row.error and "\n" not in row.error


def test_no_run_starts_once_the_budget_is_spent(harness, tmp_path):
    spec = _spec(harness, tmp_path, mode="lora")
    started = time.monotonic() - 10
    row = harness.run_one(spec, [], tmp_path / "b.safetensors", None, 60, 5, started)
    assert row.status == "skipped" and "budget" in row.error


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_is_detected_from_the_gpu_name(harness, monkeypatch, name, peak):
    monkeypatch.setattr(harness.torch.cuda, "get_device_name", lambda device: name)
    assert harness.detect_peak_tflops("cuda") == (name, peak)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_weights_dtype_is_the_trainers_own_rule(harness, tmp_path, mode, device):
    """The benchmark builds its model in the dtype phi3v_train.loading gives the trainer; only
    --precision bf16 (pure bf16, a benchmark-only mode) departs from it, and only under --bf16."""
    from phi3v_train.loading import training_dtype

    spec = _spec(harness, tmp_path, mode=mode)
    spec.device = device
    train_config = harness.trainer_config(spec)
    assert harness.weights_dtype(spec, train_config) == training_dtype(train_config)
    spec.precision = "bf16"
    expected = harness.torch.bfloat16 if device.startswith("cuda") else harness.torch.float32
    assert harness.weights_dtype(spec, train_config) == expected
