"""The ``torchrun`` command that runs a plan, with the trainer's own flag names.

Flags: ``--freeze_vision_model`` / ``--use_lora`` / ``--use_qlora`` pick the mode,
``--deepspeed zero2|zero3`` or ``--fsdp`` the engine (DDP is torchrun's default), ``--bf16`` and
``--use_flash_attention`` the precision and attention, ``--batch_size`` (global) and
``--batch_size_per_gpu`` the batch, ``--gradient_checkpointing`` the memory the plan assumed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from phi3v_train.planning.memory import Engine, Mode

MODE_FLAGS: dict[str, tuple[str, ...]] = {
    "full": (),
    "frozen-vision": ("--freeze_vision_model",),
    "lora": ("--use_lora",),
    "qlora": ("--use_qlora",),
}
#: Placeholder written when the plan was made without ``--data_dir``.
DATA_PLACEHOLDER = "DATA_DIR"


@dataclass(frozen=True)
class Launch:
    """Everything the command line says."""

    gpus: int
    model: str
    data_dir: str | None
    mode: Mode
    engine: Engine
    bf16: bool
    flash: bool
    batch_size: int
    batch_size_per_gpu: int
    num_crops: int | None = None


def trainer_args(launch: Launch) -> list[str]:
    """The arguments after ``phi3v-train`` (what the trainer's CLI parses)."""
    args = ["--data_dir", launch.data_dir or DATA_PLACEHOLDER]
    args += ["--model_name_or_path", launch.model, *MODE_FLAGS[launch.mode]]
    if launch.engine == "fsdp":
        args.append("--fsdp")
    elif launch.engine != "ddp":
        args += ["--deepspeed", launch.engine]
    if launch.bf16:
        args.append("--bf16")
    if launch.flash:
        args.append("--use_flash_attention")
    if launch.num_crops is not None:
        args += ["--num_crops", str(launch.num_crops)]
    args += ["--batch_size", str(launch.batch_size)]
    args += ["--batch_size_per_gpu", str(launch.batch_size_per_gpu), "--gradient_checkpointing"]
    return args


def torchrun_command(launch: Launch) -> str:
    """``torchrun --nproc_per_node=N --no-python phi3v-train ...``, shell-quoted."""
    head = ["torchrun", f"--nproc_per_node={launch.gpus}", "--no-python", "phi3v-train"]
    return shlex.join(head + trainer_args(launch))


def global_batch(requested: int, gpus: int, micro_batch: int) -> int:
    """The global batch: ``requested`` when GPUs x micro-batch divides it, else the next multiple."""
    step = gpus * micro_batch
    return -(-requested // step) * step
