"""benchmarks/train_throughput.py: the --tiny CI run, failure rows, the plan of variants (trainer
options x micro-batch) and the report; benchmarks/packing.py's report; gpu_checks.sh's dry run."""

from __future__ import annotations

import importlib.util
import json
import os
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


def table_cells(markdown: str) -> list[dict[str, str]]:
    """{column: cell} for every data row of the markdown table, in order."""
    rows, header = [], None
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| mode |"):
            header = cells
        elif line.startswith("| ") and cells[0] in MODES:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def table_rows(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    """(mode, attention) -> {column: cell} for the rows without trainer options."""
    return {
        (row["mode"], row["attention"]): row
        for row in table_cells(markdown)
        if row["options"] == "–"
    }


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


def test_variants_measure_the_trainers_options_and_record_them(tmp_path):
    """--bf16-weights builds the trainer's optimizer (fp32 masters); --liger needs CUDA and says so;
    every row records its options and micro-batch."""
    out = tmp_path / "variants.md"
    proc = run_harness(
        "--attn", "sdpa", "--variants", "full+bf16w,full+liger@2", "--no-isolate", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = table_cells(proc.stdout)
    assert [(c["options"], c["mb"]) for c in cells] == [("bf16-weights", "1"), ("liger", "2")]
    assert cells[0]["status"] == "ok"
    assert cells[0]["weights"] == "bf16+fp32 masters, bf16 autocast"
    assert cells[1]["status"].startswith("skipped: needs CUDA")
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows[0]["options"] == ["bf16-weights"] and rows[0]["micro_batch"] == 1
    assert rows[0]["optimizer"] == "MasterWeightAdamW (foreach)"
    assert rows[1]["options"] == ["liger"] and rows[1]["micro_batch"] == 2
    assert "optimizer MasterWeightAdamW" in out.read_text()


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


def test_variants_parse_with_options_in_a_fixed_order_and_aliases(harness):
    variants = harness.parse_variants("full, full+liger+bf16w@4,best@2,qlora+compile")
    assert variants == [
        harness.Variant("full"),
        harness.Variant("full", ("bf16-weights", "liger"), 4),
        harness.Variant("best", (), 2, best=True),
        harness.Variant("qlora", ("compile",)),
    ]
    for bad in ("fulll", "full+fast", "full@0", "full@x", ""):
        with pytest.raises(harness.click.BadParameter):
            harness.parse_variants(bad)


def test_best_is_the_fastest_measured_full_row_of_the_same_attention(harness):
    rows = [
        harness.RunResult("full", "sdpa", tokens_per_s=100.0, options=[]),
        harness.RunResult("full", "sdpa", tokens_per_s=150.0, options=["bf16-weights"]),
        harness.RunResult("full", "sdpa", status="error", options=["liger"]),
        harness.RunResult("full", "eager", tokens_per_s=900.0, options=["compile"]),
        harness.RunResult("lora", "sdpa", tokens_per_s=999.0, options=[]),
    ]
    best = harness.Variant("best", (), 4, best=True)
    assert harness.resolve_variant(best, "sdpa", rows) == harness.Variant(
        "full", ("bf16-weights",), 4
    )
    assert "no full fine-tuning row" in harness.resolve_variant(best, "flash_attention_2", rows)
    plain = harness.Variant("lora")
    assert harness.resolve_variant(plain, "sdpa", rows) is plain


def test_a_variant_adds_its_options_and_micro_batch_to_the_command_lines(harness, tmp_path):
    base = _spec(harness, tmp_path)
    base.compile = True  # --compile: every row
    spec = harness.spec_for(base, harness.Variant("lora", ("liger",), 4), "eager")
    assert (spec.mode, spec.attn, spec.micro_batch) == ("lora", "eager", 4)
    assert spec.options == ["liger", "compile"]
    assert spec.stem == "lora_liger_compile_mb4_eager"
    assert harness.spec_for(base, harness.Variant("full"), "sdpa").micro_batch == 1


def test_rows_that_cannot_run_here_say_why(harness, tmp_path, monkeypatch):
    spec = _spec(harness, tmp_path)
    spec.liger = True
    assert "needs CUDA" in harness.precheck(spec)
    spec.device = "cuda"
    real_find_spec = harness.importlib.util.find_spec
    monkeypatch.setattr(
        harness.importlib.util,
        "find_spec",
        lambda name: None if name in ("liger_kernel", "bitsandbytes") else real_find_spec(name),
    )
    assert harness.precheck(spec) == "liger_kernel is not installed"
    spec.liger, spec.mode = False, "qlora"
    assert harness.precheck(spec) == "bitsandbytes is not installed"


def test_a_missing_trainer_module_makes_the_row_not_available(harness, tmp_path, monkeypatch):
    from phi3v_train.training.config import TrainConfig

    spec = _spec(harness, tmp_path)
    spec.bf16_weights = True
    config = harness.trainer_config(spec)
    assert config.bf16 and config.bf16_weights  # on CPU too: the tiny run exercises the masters
    assert harness.weights_dtype(spec, config) == harness.torch.bfloat16
    model = harness.torch.nn.Linear(2, 2)
    monkeypatch.setitem(sys.modules, "phi3v_train.training.optimizer", None)
    with pytest.raises(harness.Unavailable, match="phi3v_train.training.optimizer"):
        harness.build_optimizer_for(model, config, spec)
    # Without the module, a row without --bf16-weights still gets the same AdamW.
    optimizer = harness.build_optimizer_for(model, TrainConfig(), spec)
    assert type(optimizer) is harness.torch.optim.AdamW

    def unavailable(spec, batches):
        raise harness.Unavailable("phi3v_train.training.kernels: no module")

    monkeypatch.setattr(harness, "measure", unavailable)
    row = harness.run_in_process(spec, [])
    assert (row.status, row.options) == ("not available", ["bf16-weights"])


def test_compile_warms_up_over_every_batch_shape_and_gets_twice_the_timeout(harness, tmp_path):
    spec = _spec(harness, tmp_path)
    spec.warmup = 2
    assert harness.warmup_steps(spec, batch_count=6) == 2
    spec.compile = True
    assert harness.warmup_steps(spec, batch_count=6) == 7
    limits = harness.RunLimits(timeout=75, time_limit=1000)
    assert limits.run_timeout(spec) == pytest.approx(150, abs=1)
    late = harness.RunLimits(timeout=75, time_limit=100, started=time.monotonic() - 40)
    assert late.run_timeout(spec) == pytest.approx(60, abs=1)
    assert late.refusal() is None
    spent = harness.RunLimits(timeout=75, time_limit=100, started=time.monotonic() - 85)
    assert "left of the 100 s limit" in spent.refusal()


def test_memory_notes_hold_lora_and_qlora_to_the_originals_figures(harness):
    gib = harness.GIB
    rows = [
        harness.RunResult("lora", "sdpa", micro_batch=1, peak_mem_gib=12e9 / gib),
        harness.RunResult("qlora", "sdpa", micro_batch=1, peak_mem_gib=11e9 / gib),
        harness.RunResult("qlora", "sdpa", micro_batch=4, peak_mem_gib=14e9 / gib),
        harness.RunResult("full", "sdpa", micro_batch=1, peak_mem_gib=60.0),
    ]
    notes = harness.memory_notes(rows)
    assert len(notes) == 2
    assert "lora / sdpa, mb 1: peak 12.0 GB" in notes[0] and notes[0].endswith("met")
    assert "qlora" in notes[1] and notes[1].endswith("NOT met")


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
    limits = harness.RunLimits(timeout=60, budget=5, started=time.monotonic() - 10)
    row = harness.run_one(spec, [], tmp_path / "b.safetensors", None, limits)
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


@pytest.fixture(scope="module")
def packing_bench():
    spec = importlib.util.spec_from_file_location("packing_bench", HARNESS.with_name("packing.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["packing_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_packing_report_sets_the_modes_side_by_side_with_the_target(packing_bench):
    rows = [
        packing_bench.ModeResult(
            "short-mix",
            "padded",
            3,
            8,
            real_tokens=900,
            slot_tokens=2000,
            seconds=3.0,
            losses=[2.0, 1.5],
        ),
        packing_bench.ModeResult(
            "short-mix",
            "packed",
            3,
            8,
            real_tokens=900,
            slot_tokens=900,
            seconds=1.5,
            losses=[2.0, 1.5001],
        ),
        packing_bench.ModeResult("docvqa", "padded", 3, 4, real_tokens=10, seconds=1.0),
    ]
    table = packing_bench.format_table(rows)
    assert "| short-mix | padded | 8 | 3 | 900 | 300 | 45.0 % |" in table
    lines = packing_bench.speedups(rows)
    assert len(lines) == 1  # docvqa has no packed row (cut short): no ratio
    assert lines[0].startswith("- short-mix (micro-batch 8): packed/padded tokens/s 2.00x")
    assert "max |loss difference| 1.00e-04" in lines[0] and lines[0].endswith("met")


def test_gpu_checks_dry_run_prints_every_stage_in_order(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_checks.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [line for line in proc.stdout.splitlines() if line.startswith("+ [")]
    stages = ["pytest -m gpu", "benchmarks/train_throughput.py", "benchmarks/packing.py"]
    assert [next(i for i, c in enumerate(commands) if s in c) for s in stages] == sorted(
        next(i for i, c in enumerate(commands) if s in c) for s in stages
    )
    bench = next(c for c in commands if "train_throughput.py" in c)
    assert "--variants full,full+bf16-weights,full+liger," in bench and "best@4,lora,qlora" in bench
    assert "--time-limit" in bench
    packing = next(c for c in commands if "benchmarks/packing.py" in c)
    assert "--model full --device cuda" in packing and "--loads short-mix,docvqa" in packing
