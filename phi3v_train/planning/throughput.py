"""Images per second of a plan: the model FLOPs of a sample and the MFU we measured.

``img/s = GPUs × MFU × dense peak ÷ model FLOPs per sample``. The MFU is the one measured
(benchmarks/RESULTS.md, "Training throughput": trainer precision, SDPA, checkpointing on every
layer) at micro-batch 1 and 4, interpolated geometrically in between and held beyond 4. Full
fine-tuning: 1×H200 with the trainer's default ``--compile`` (29.5 % at micro-batch 1; 32.5 % at 4,
measured with --bf16_weights --liger_kernel, which are within 1 % of compile alone at 1).
Frozen-vision fine-tuning (also compiled by default) is assumed to gain what full fine-tuning
gained from compiling (29.5 / 14.6) over its eager 1×H100 figure. LoRA / QLoRA: 1×H100, eager.
Assumed, not measured: the same MFU on other GPUs and under DeepSpeed, no communication cost
(perfect scaling over GPUs).
"""

from __future__ import annotations

import math

from phi3v_train.planning.flops import ModelDims, SampleShape, Training, training_flops
from phi3v_train.planning.memory import Mode

#: Eager MFU at micro-batch 1 and 4, 1×H100 (RESULTS.md, 2026-11-23; full and frozen-vision at 4
#: from the all-bf16 run's gain, 22.8 % / 14.2 %): DeepSpeed, FSDP, LoRA and QLoRA run eager.
_MB4_GAIN_FULL = 22.8 / 14.2
EAGER_MFU: dict[str, tuple[float, float]] = {
    "full": (0.142, 0.142 * _MB4_GAIN_FULL),
    "frozen-vision": (0.116, 0.116 * _MB4_GAIN_FULL),
    "lora": (0.089, 0.133),
    "qlora": (0.063, 0.121),
}
#: Full fine-tuning compiled (the trainer's default under DDP / one process), 1×H200, micro-batch
#: 1 and 4 (RESULTS.md, 2026-11-30); frozen-vision assumed to gain the same (module docstring).
_FULL_COMPILED = (0.295, 0.325)
_FULL_EAGER_H200 = 0.146  # the same run uncompiled, micro-batch 1
COMPILED_MFU: dict[str, tuple[float, float]] = {
    "full": _FULL_COMPILED,
    "frozen-vision": (
        EAGER_MFU["frozen-vision"][0] * _FULL_COMPILED[0] / _FULL_EAGER_H200,
        EAGER_MFU["frozen-vision"][0] * _FULL_COMPILED[1] / _FULL_EAGER_H200,
    ),
}
#: Largest micro-batch measured: the MFU is held beyond it.
MEASURED_MAX_MICRO_BATCH = 4

TRAINING: dict[str, Training] = {
    "full": Training("full", "full", "full", "full"),
    "frozen-vision": Training("frozen", "full", "full", "full"),
    "lora": Training("lora", "lora", "lora", "lora"),
    "qlora": Training("lora", "lora", "lora", "lora"),
}


def mfu(mode: Mode, micro_batch: int, engine: str = "ddp") -> float:
    """Model FLOPs utilisation expected at ``micro_batch`` (see the module docstring): compiled
    where the trainer compiles by default (full / frozen-vision under DDP), else eager."""
    compiled = engine == "ddp" and mode in COMPILED_MFU
    at_1, at_4 = (COMPILED_MFU if compiled else EAGER_MFU)[mode]
    b = min(max(micro_batch, 1), MEASURED_MAX_MICRO_BATCH)
    return at_1 * (at_4 / at_1) ** (math.log(b) / math.log(MEASURED_MAX_MICRO_BATCH))


def sample_flops(dims: ModelDims, mode: Mode, sample: SampleShape) -> float:
    """Model FLOPs of one training sample in ``mode`` (QLoRA counts as LoRA)."""
    return training_flops(dims, TRAINING[mode], [sample]).total


def images_per_second(
    dims: ModelDims,
    mode: Mode,
    sample: SampleShape,
    micro_batch: int,
    gpus: int,
    tflops: float,
    engine: str = "ddp",
) -> float:
    """Training samples (one image each, or one image set) per second over all GPUs."""
    return gpus * mfu(mode, micro_batch, engine) * tflops * 1e12 / sample_flops(dims, mode, sample)
