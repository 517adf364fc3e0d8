"""Images per second of a plan: the model FLOPs of a sample and the MFU we measured.

``img/s = GPUs × MFU × dense peak ÷ model FLOPs per sample``. The MFU is the one measured on
1×H100 (benchmarks/RESULTS.md, "Training throughput": trainer precision, SDPA, checkpointing on
every layer) at micro-batch 1 and 4, interpolated geometrically in between and held beyond 4.
Full and frozen-vision fine-tuning were measured at micro-batch 4 only with all-bf16 weights; their
micro-batch-4 MFU applies that run's gain (22.8 % / 14.2 %). Assumed, not measured: the same MFU on
other GPUs and under DeepSpeed, no communication cost (perfect scaling over GPUs).
"""

from __future__ import annotations

import math

from phi3v_train.planning.flops import ModelDims, SampleShape, Training, training_flops
from phi3v_train.planning.memory import Mode

#: Measured gain of micro-batch 4 over 1 (full fine-tuning, all-bf16, H100): 22.8 % / 14.2 %.
_MB4_GAIN_FULL = 22.8 / 14.2
#: MFU measured on 1×H100 at micro-batch 1 and 4 (RESULTS.md).
MEASURED_MFU: dict[str, tuple[float, float]] = {
    "full": (0.142, 0.142 * _MB4_GAIN_FULL),
    "frozen-vision": (0.116, 0.116 * _MB4_GAIN_FULL),
    "lora": (0.089, 0.133),
    "qlora": (0.063, 0.121),
}
#: Largest micro-batch measured: the MFU is held beyond it.
MEASURED_MAX_MICRO_BATCH = 4

TRAINING: dict[str, Training] = {
    "full": Training("full", "full", "full", "full"),
    "frozen-vision": Training("frozen", "full", "full", "full"),
    "lora": Training("lora", "lora", "lora", "lora"),
    "qlora": Training("lora", "lora", "lora", "lora"),
}


def mfu(mode: Mode, micro_batch: int) -> float:
    """Model FLOPs utilisation expected at ``micro_batch`` (see the module docstring)."""
    at_1, at_4 = MEASURED_MFU[mode]
    b = min(max(micro_batch, 1), MEASURED_MAX_MICRO_BATCH)
    return at_1 * (at_4 / at_1) ** (math.log(b) / math.log(MEASURED_MAX_MICRO_BATCH))


def sample_flops(dims: ModelDims, mode: Mode, sample: SampleShape) -> float:
    """Model FLOPs of one training sample in ``mode`` (QLoRA counts as LoRA)."""
    return training_flops(dims, TRAINING[mode], [sample]).total


def images_per_second(
    dims: ModelDims, mode: Mode, sample: SampleShape, micro_batch: int, gpus: int, tflops: float
) -> float:
    """Training samples (one image each, or one image set) per second over all GPUs."""
    return gpus * mfu(mode, micro_batch) * tflops * 1e12 / sample_flops(dims, mode, sample)
