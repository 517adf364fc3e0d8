"""``phi3v-train plan``: memory calibrated on the measured H100 peaks, the original's hardware
advice, the ``--gpus`` spec, the JSON schema and commands the trainer's CLI accepts."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from dataset_files import write_dataset
from PIL import Image

from phi3v_train.planning.flops import SampleShape
from phi3v_train.planning.gpus import parse_gpus
from phi3v_train.planning.memory import GIB, TRAINER_FUSED_ADAMW, Setup, estimate
from phi3v_train.planning.plan import plan_command, trainer_has_fsdp
from phi3v_train.planning.sizes import model_sizes
from phi3v_train.training.config import build_config
from phi3v_train.training.train import train_command

#: The architecture numbers of Phi-3.5-vision-instruct's config.json (the reference folder holds
#: the whole file; test_sizes_equal_the_official_config checks these give the same model).
PHI35V_CONFIG = {
    "model_type": "phi3_v",
    "architectures": ["Phi3VForCausalLM"],
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
}

#: benchmarks/RESULTS.md, 1xH100, 2455 tokens (one 4x4 page: 17 crops), checkpointing, SDPA, the
#: trainer's precision under --bf16: (mode, micro-batch, measured max_memory_allocated GiB).
MEASURED_H100 = [
    ("full", 1, 62.2),
    ("frozen-vision", 1, 59.7),
    ("lora", 1, 11.9),
    ("lora", 4, 18.8),
    ("qlora", 1, 6.6),
    ("qlora", 4, 13.5),
]
DOCVQA_LOAD = SampleShape(seq_len=2455, crops=17, image_tokens=17 * 144)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phi35v")
    (folder / "config.json").write_text(json.dumps(PHI35V_CONFIG))
    return folder


def run_plan(model_dir: Path, *args: str) -> dict:
    result = CliRunner().invoke(
        plan_command, ["--model_name_or_path", str(model_dir), *args, "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def by_key(report: dict) -> dict[tuple[str, str], dict]:
    return {(plan["mode"], plan["engine"]): plan for plan in report["plans"]}


def test_sizes_equal_the_official_config(model_dir: Path, reference_dir: Path) -> None:
    sizes = model_sizes(str(model_dir))
    assert sizes == model_sizes(str(reference_dir / "official"))
    assert (sizes.vision, sizes.projector, sizes.llm) == (303_507_456, 22_034_432, 3_821_079_552)


@pytest.mark.parametrize(("mode", "micro_batch", "measured"), MEASURED_H100)
def test_estimate_within_15_percent_of_measured_h100_peak(
    model_dir: Path, mode: str, micro_batch: int, measured: float
) -> None:
    # The benchmark stepped a fused AdamW, as the trainer does (the foreach one is tested below).
    setup = Setup(mode, "ddp", 1, True, micro_batch)
    allocated = estimate(model_sizes(str(model_dir)), setup, DOCVQA_LOAD).allocated
    assert abs(allocated / measured - 1) <= 0.15, (mode, micro_batch, allocated, measured)


def test_foreach_adamw_adds_a_scratch_copy_of_the_largest_group(model_dir: Path) -> None:
    """The trainer's fused AdamW (plain / DDP) has no scratch; PyTorch's default foreach one
    (still FSDP's) keeps a copy of the largest group (14 GiB on the full model)."""
    sizes = model_sizes(str(model_dir))
    fused = estimate(sizes, Setup("full", "ddp", 1, True, 1), DOCVQA_LOAD)
    foreach = estimate(sizes, Setup("full", "ddp", 1, True, 1, fused_adamw=False), DOCVQA_LOAD)
    assert TRAINER_FUSED_ADAMW and fused.optimizer_scratch == 0.0
    static = fused.allocated - fused.activations
    assert foreach.allocated == pytest.approx(static + 4 * sizes.largest_group_full / GIB)
    assert sizes.largest_group_full > 0.9 * sizes.llm  # the llm's decayed weights
    fsdp = estimate(sizes, Setup("full", "fsdp", 8, True, 1), DOCVQA_LOAD)
    assert fsdp.optimizer_scratch == pytest.approx(4 * sizes.largest_group_full / 8 / GIB)


def test_v100_plans_fp16_without_flash_attention(model_dir: Path) -> None:
    report = run_plan(model_dir, "--gpus", "8xV100-32GB")
    for plan in report["plans"]:
        assert plan["bf16"] is False and plan["attn"] == "sdpa"
        assert "--bf16" not in plan["command"] and "--use_flash_attention" not in plan["command"]
    plans = by_key(report)
    assert not plans["full", "ddp"]["fits"]  # 16 B per weight + DDP buckets > 32 GB
    assert plans["full", "zero2"]["fits"] or plans["full", "zero3"]["fits"]


@pytest.mark.parametrize("gpu", ["RTX4090", "RTX3090"])
def test_24gb_consumer_card_gets_lora_and_qlora_not_full(model_dir: Path, gpu: str) -> None:
    plans = by_key(run_plan(model_dir, "--gpus", f"1x{gpu}"))
    assert plans["lora", "ddp"]["fits"] and plans["qlora", "ddp"]["fits"]
    assert not any(plan["fits"] for (mode, _), plan in plans.items() if mode == "full")
    assert plans["lora", "ddp"]["bf16"] and plans["lora", "ddp"]["attn"] == "flash_attention_2"


def test_4x_rtx8000_fits_the_original_docvqa_lora_run(model_dir: Path) -> None:
    # original_recipe.md: 4 GPUs, --batch_size 64, micro-batch 1, 2443 tokens at num_crops 16.
    args = ["--gpus", "4xRTX8000", "--tokens_per_sample", "2443", "--batch_size", "64"]
    report = run_plan(model_dir, *args, "--batch_size_per_gpu", "1")
    lora = by_key(report)["lora", "ddp"]
    assert lora["fits"] and lora["batch_size_per_gpu"] == 1 and not lora["bf16"]
    assert "--use_lora" in lora["command"] and "--batch_size 64" in lora["command"]


@pytest.mark.parametrize(
    "spec",
    ["8V100", "0xH100", "2xFOO", "1xV100", "2xcustom:48", "2xcustom:48GiB:fp16:flash:312",
     "2xcustom:lots:bf16:flash:312", "2xcustom:48GiB:bf16:flash:inf"],
)  # fmt: skip
def test_bad_gpus_spec_is_one_line(model_dir: Path, spec: str) -> None:
    result = CliRunner().invoke(
        plan_command, ["--model_name_or_path", str(model_dir), "--gpus", spec]
    )
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        plan_command, ["--model_name_or_path", str(tmp_path), "--gpus", "1xH100"]
    )
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no config.json" in result.output


def test_gpus_spec_parses_table_names_and_custom_cards() -> None:
    spec = parse_gpus("8xV100-32GB")
    assert (spec.count, spec.gpu.name, spec.gpu.bf16, spec.gpu.flash) == (
        8,
        "V100-32GB",
        False,
        False,
    )
    assert parse_gpus("1xH100").gpu.name == "H100-80GB"
    custom = parse_gpus("2xcustom:48GiB:bf16:flash:312")
    assert (custom.count, custom.gpu.memory_gib, custom.gpu.bf16, custom.gpu.flash) == (
        2, 48.0, True, True,
    )  # fmt: skip
    assert custom.gpu.dense_tflops == 312
    assert parse_gpus("1xcustom:48GB:fp16:sdpa:65").gpu.memory_gib == pytest.approx(44.7, abs=0.01)


def test_json_schema_and_best_plan(model_dir: Path) -> None:
    report = run_plan(model_dir, "--gpus", "1xH100")
    keys = {"mode", "engine", "peak_gib", "fits", "bf16", "attn", "batch_size_per_gpu"}
    keys |= {"img_per_s", "command"}
    assert all(set(plan) == keys for plan in report["plans"])
    assert {(p["mode"], p["engine"]) for p in report["plans"]} >= {
        ("qlora", "ddp"),
        ("full", "zero3"),
    }
    assert ("qlora", "zero2") not in by_key(report)  # the trainer refuses DeepSpeed with QLoRA
    best = report["plans"][report["best"]]
    fitting = [plan for plan in report["plans"] if plan["fits"]]
    assert best["fits"] and best["img_per_s"] == max(plan["img_per_s"] for plan in fitting)
    for plan, details in zip(report["plans"], report["details"], strict=True):
        assert plan["fits"] == (plan["peak_gib"] <= 79.6 + 0.05)
        assert details["max_batch_size_per_gpu"] >= (
            plan["batch_size_per_gpu"] if plan["fits"] else 0
        )


@pytest.mark.parametrize("gpus", ["2xcustom:48GiB:bf16:flash:312", "8xV100-32GB"])
def test_every_command_parses_with_the_trainer_cli(model_dir: Path, gpus: str) -> None:
    for plan in run_plan(model_dir, "--gpus", gpus)["plans"]:
        argv = shlex.split(plan["command"])
        assert argv[:4] == ["torchrun", argv[1], "--no-python", "phi3v-train"]
        ctx = train_command.make_context("phi3v-train", argv[4:])
        config = build_config(ctx, ctx.params)
        assert config.batch_size_per_gpu == plan["batch_size_per_gpu"]
        assert config.bf16 == plan["bf16"] and config.gradient_checkpointing
        assert config.use_flash_attention == (plan["attn"] == "flash_attention_2")
        deepspeed = plan["engine"] if plan["engine"].startswith("zero") else None
        assert config.deepspeed == deepspeed
        assert getattr(config, "fsdp", False) == (plan["engine"] == "fsdp")
        assert config.use_qlora == (plan["mode"] == "qlora")
        assert config.lora == (plan["mode"] in ("lora", "qlora"))
        assert config.freeze_vision_model == (plan["mode"] == "frozen-vision")
        gpus_count = int(argv[1].split("=")[1])
        assert config.batch_size % (gpus_count * config.batch_size_per_gpu) == 0


def test_fsdp_rows_only_where_the_trainer_has_it_and_bf16(model_dir: Path) -> None:
    a100 = by_key(run_plan(model_dir, "--gpus", "8xA100-80GB"))
    v100 = by_key(run_plan(model_dir, "--gpus", "8xV100-32GB"))
    assert ("full", "fsdp") in a100 if trainer_has_fsdp() else ("full", "fsdp") not in a100
    assert not any(engine == "fsdp" for _, engine in v100)  # fp16 GPU: FSDP would train in fp32
    assert ("qlora", "fsdp") not in a100
    if trainer_has_fsdp():
        # sharding fp32 weights, gradients and AdamW over 8 GPUs: far below DDP's copy
        assert a100["full", "fsdp"]["fits"] and not a100["full", "ddp"]["fits"]
        assert a100["full", "fsdp"]["peak_gib"] < a100["full", "zero2"]["peak_gib"]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_dir_sizes_memory_for_the_longest_record(model_dir: Path, tmp_path: Path) -> None:
    turn = {"user": "What is shown?", "assistant": "a page", "images": []}
    rows = [
        {"id": "small", "source": "t", "conversations": [{**turn, "images": ["small.png"]}]},
        {"id": "page", "source": "t", "conversations": [{**turn, "images": ["page.png"]}]},
    ]
    images = {"small.png": _png(320, 240), "page.png": _png(1700, 2200)}
    data = write_dataset(tmp_path / "toy", {"train": rows}, images=images)
    report = run_plan(model_dir, "--gpus", "1xA100-80GB", "--data_dir", str(data))
    memory, speed = report["sample"]["memory"], report["sample"]["speed"]
    assert memory["seq_len"] > speed["seq_len"] > 0
    assert memory["crops"] >= 13  # a letter page at num_crops 16
    assert f"--data_dir {data}" in report["plans"][0]["command"]
    heavier = run_plan(model_dir, "--gpus", "1xA100-80GB", "--tokens_per_sample", "8000")
    assert by_key(heavier)["lora", "ddp"]["peak_gib"] > by_key(report)["lora", "ddp"]["peak_gib"]
