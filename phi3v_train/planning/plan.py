"""``phi3v-train plan``: what fits on my GPUs, how fast, and the exact command.

For every mode (full, frozen-vision, LoRA, QLoRA) and engine (DDP, ZeRO-2, ZeRO-3; QLoRA only
under DDP, as the trainer refuses DeepSpeed with a 4-bit base) it estimates the peak memory per
GPU (:mod:`~phi3v_train.planning.memory`), the precision and attention the GPU allows, the largest
micro-batch that fits, the images per second (:mod:`~phi3v_train.planning.throughput`) and the
``torchrun`` command (:mod:`~phi3v_train.planning.command`). The fastest plan that fits is the
best. Only ``config.json`` is read: no weights, no download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from phi3v_data.schema import DEFAULT_NUM_CROPS, MAX_NUM_CROPS
from phi3v_train.planning.command import Launch, global_batch, torchrun_command
from phi3v_train.planning.gpus import SPEC_HELP, GpuSpec, parse_gpus
from phi3v_train.planning.memory import ENGINES, MODES, Engine, Memory, Mode, Setup, estimate
from phi3v_train.planning.sample import Load, SampleError, default_load, from_dataset
from phi3v_train.planning.sizes import ConfigError, ModelSizes, model_sizes
from phi3v_train.planning.throughput import MEASURED_MAX_MICRO_BATCH, images_per_second, mfu

#: Largest micro-batch searched for "the largest that fits".
MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class Plan:
    """One mode x engine on the given GPUs."""

    setup: Setup
    memory: Memory
    fits: bool
    max_micro_batch: int  # largest that fits, 0 when none does
    flash: bool
    global_batch: int
    img_per_s: float
    mfu: float
    command: str

    def to_json(self) -> dict[str, Any]:
        """The issue's fixed keys."""
        return {
            "mode": self.setup.mode,
            "engine": self.setup.engine,
            "peak_gib": round(self.memory.peak, 1),
            "fits": self.fits,
            "bf16": self.setup.bf16,
            "attn": "flash_attention_2" if self.flash else "sdpa",
            "batch_size_per_gpu": self.setup.micro_batch,
            "img_per_s": round(self.img_per_s, 2),
            "command": self.command,
        }

    def details(self) -> dict[str, Any]:
        return {
            "memory_gib": self.memory.to_json(),
            "max_batch_size_per_gpu": self.max_micro_batch,
            "batch_size": self.global_batch,
            "mfu": round(self.mfu, 3),
        }


@dataclass(frozen=True)
class Request:
    """What the user asked for."""

    model: str
    gpus: GpuSpec
    load: Load
    data_dir: str | None
    micro_batch: int | None
    batch_size: int
    num_crops: int | None


def trainer_has_fsdp() -> bool:
    """Whether this trainer has ``--fsdp`` (FSDP2)."""
    from phi3v_train.training.config import TrainConfig

    return "fsdp" in TrainConfig.model_fields


def combinations(bf16: bool) -> list[tuple[Mode, Engine]]:
    """Every mode x engine the trainer accepts: QLoRA only under DDP (its 4-bit base cannot be
    sharded); FSDP only with bf16 (without it the trainer's FSDP trains in plain fp32)."""
    fsdp = bf16 and trainer_has_fsdp()
    return [
        (mode, engine)
        for mode in MODES
        for engine in ENGINES
        if (mode != "qlora" or engine == "ddp") and (engine != "fsdp" or fsdp)
    ]


def _setup(request: Request, mode: Mode, engine: Engine, micro_batch: int) -> Setup:
    return Setup(mode, engine, request.gpus.count, request.gpus.gpu.bf16, micro_batch)


def largest_micro_batch(sizes: ModelSizes, request: Request, mode: Mode, engine: Engine) -> int:
    """The largest micro-batch whose peak fits the GPU (0 when not even 1 does)."""
    limit = request.gpus.gpu.memory_gib
    best = 0
    for micro_batch in range(1, MAX_MICRO_BATCH + 1):
        memory = estimate(sizes, _setup(request, mode, engine, micro_batch), request.load.memory)
        if memory.peak > limit:
            break
        best = micro_batch
    return best


def choose_micro_batch(request: Request, largest: int) -> int:
    """The user's, else the largest that fits up to the largest measured (4), preferring one that
    keeps the requested global batch exact."""
    if request.micro_batch is not None:
        return request.micro_batch
    cap = max(1, min(largest, MEASURED_MAX_MICRO_BATCH))
    for micro_batch in range(cap, 0, -1):
        if request.batch_size % (request.gpus.count * micro_batch) == 0:
            return micro_batch
    return cap


def make_plan(sizes: ModelSizes, request: Request, mode: Mode, engine: Engine) -> Plan:
    gpu, n = request.gpus.gpu, request.gpus.count
    largest = largest_micro_batch(sizes, request, mode, engine)
    micro_batch = choose_micro_batch(request, largest)
    setup = _setup(request, mode, engine, micro_batch)
    memory = estimate(sizes, setup, request.load.memory)
    flash = gpu.flash and gpu.bf16
    batch = global_batch(request.batch_size, n, micro_batch)
    launch = Launch(
        n, request.model, request.data_dir, mode, engine, gpu.bf16, flash, batch, micro_batch,
        request.num_crops,
    )  # fmt: skip
    speed = images_per_second(
        sizes.dims, mode, request.load.speed, micro_batch, n, gpu.dense_tflops, engine
    )
    return Plan(
        setup=setup,
        memory=memory,
        fits=memory.peak <= gpu.memory_gib,
        max_micro_batch=largest,
        flash=flash,
        global_batch=batch,
        img_per_s=speed,
        mfu=mfu(mode, micro_batch, engine),
        command=torchrun_command(launch),
    )


def make_plans(sizes: ModelSizes, request: Request) -> list[Plan]:
    pairs = combinations(request.gpus.gpu.bf16)
    return [make_plan(sizes, request, mode, engine) for mode, engine in pairs]


def best_index(plans: list[Plan]) -> int | None:
    """The fastest plan that fits; None when nothing fits.

    Communication is not in the speed model, so on a tie the simpler engine wins (DDP, then
    ZeRO-2, then ZeRO-3, which gathers every weight in each forward and backward), then the
    smaller peak.
    """
    fitting = [i for i, plan in enumerate(plans) if plan.fits]
    if not fitting:
        return None

    def key(i: int) -> tuple[float, int, float]:
        plan = plans[i]
        return (round(plan.img_per_s, 3), -ENGINES.index(plan.setup.engine), -plan.memory.peak)

    return max(fitting, key=key)


def to_json(sizes: ModelSizes, request: Request, plans: list[Plan]) -> dict[str, Any]:
    best = best_index(plans)
    gpu = request.gpus.gpu
    return {
        "plans": [plan.to_json() for plan in plans],
        "best": best,
        "details": [plan.details() for plan in plans],
        "gpus": {"count": request.gpus.count, **gpu.__dict__},
        "model": {
            "config": str(Path(request.model) / "config.json"),
            "params": {"vision": sizes.vision, "projector": sizes.projector, "llm": sizes.llm},
            "lora_params_r64": sizes.lora(),
        },
        "sample": {
            "source": request.load.source,
            "memory": request.load.memory.__dict__,
            "speed": request.load.speed.__dict__,
        },
    }


def _millions(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M"


def format_text(sizes: ModelSizes, request: Request, plans: list[Plan]) -> str:
    best = best_index(plans)
    gpu = request.gpus.gpu
    precision = "bf16" if gpu.bf16 else "fp16 (no bf16 on this GPU)"
    lines = [
        f"model: {_millions(sizes.total)} parameters (vision {_millions(sizes.vision)}, projector "
        f"{_millions(sizes.projector)}, llm {_millions(sizes.llm)}) from {request.model}/config.json",
        f"gpus: {request.gpus} ({gpu.memory_gib:g} GiB, {precision}, "
        f"{'flash attention 2' if gpu.flash and gpu.bf16 else 'SDPA'}, {gpu.dense_tflops:g} "
        "dense TFLOP/s)",
        f"sample: {request.load.source}",
        "",
        "  mode           engine  peak GiB  fits  micro-batch (max)  img/s",
    ]
    for index, plan in enumerate(plans):
        mark = "*" if index == best else " "
        lines.append(
            f"{mark} {plan.setup.mode:<14} {plan.setup.engine:<7} {plan.memory.peak:>8.1f}  "
            f"{'yes' if plan.fits else 'no':<4}  {plan.setup.micro_batch:>4} ({plan.max_micro_batch:>2})"
            f"          {plan.img_per_s:>6.2f}"
        )
    if best is None:
        lines += ["", "nothing fits: more GPUs, a larger GPU or fewer tokens per sample"]
    else:
        lines += ["", f"best (*): {plans[best].command}"]
    return "\n".join(lines)


def build_request(
    model: str,
    gpus: str,
    data_dir: Path | None,
    tokens: int | None,
    micro_batch: int | None,
    batch_size: int | None,
    num_crops: int | None,
) -> Request:
    """Check the options; :class:`ValueError` with one line when they are wrong."""
    from phi3v_train.training.config import TrainConfig

    spec = parse_gpus(gpus)
    if data_dir is not None and tokens is not None:
        raise ValueError("--data_dir and --tokens_per_sample exclude each other: give one")
    if data_dir is not None:
        split = TrainConfig.model_fields["train_split"].default
        load = from_dataset(data_dir, Path(model), split, num_crops)
    else:
        load = default_load(tokens, num_crops)
    batch = batch_size or TrainConfig.model_fields["batch_size"].default
    return Request(
        model, spec, load, str(data_dir) if data_dir else None, micro_batch, batch, num_crops
    )


@click.command("plan")
@click.option("--model_name_or_path", required=True, help="Model directory (its config.json only).")
@click.option("--gpus", required=True, help=f"GPUs: {SPEC_HELP}.")
@click.option(
    "--data_dir", type=click.Path(path_type=Path), help="Dataset: tokens from its records."
)
@click.option("--tokens_per_sample", type=click.IntRange(1), help="Tokens per sample (no dataset).")
@click.option(
    "--num_crops",
    type=click.IntRange(1, MAX_NUM_CROPS),
    help=f"Max HD crops per image (default: dataset.json's num_crops, else {DEFAULT_NUM_CROPS}).",
)
@click.option("--batch_size_per_gpu", type=click.IntRange(1), help="Micro-batch (default: best).")
@click.option("--batch_size", type=click.IntRange(1), help="Global batch (default: the trainer's).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def plan_command(
    model_name_or_path: str,
    gpus: str,
    data_dir: Path | None,
    tokens_per_sample: int | None,
    num_crops: int | None,
    batch_size_per_gpu: int | None,
    batch_size: int | None,
    fmt: str,
) -> None:
    """What fits on your GPUs, how fast, and the torchrun command (from config.json alone)."""
    try:
        parse_gpus(gpus)  # the cheapest check first
        sizes = model_sizes(str(Path(model_name_or_path).expanduser().resolve()))
        request = build_request(
            model_name_or_path, gpus, data_dir, tokens_per_sample, batch_size_per_gpu,
            batch_size, num_crops,
        )  # fmt: skip
    except (ValueError, SampleError, ConfigError, OSError) as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    plans = make_plans(sizes, request)
    if fmt == "json":
        click.echo(json.dumps(to_json(sizes, request, plans), indent=2))
    else:
        click.echo(format_text(sizes, request, plans))
