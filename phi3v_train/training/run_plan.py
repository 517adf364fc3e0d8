"""The run plan: every value a training run resolves, in one object, resolved in one place.

:func:`resolve_plan` turns a :class:`TrainConfig`, the opened dataset and the world size into a
:class:`RunPlan` (eval split, num_crops, attention, gradient accumulation, precision, engine,
LoRA and its alpha, learning rates); :meth:`RunPlan.with_schedule` adds what needs the number of
training records (steps per epoch, total steps, the warm-up actually used). The public
``resolve_*`` functions are the rules themselves, for ``eval`` and ``plan`` too.

``OUT/train_config.yaml`` is :meth:`RunPlan.to_yaml`: the configuration with every resolved value
written out (no null for anything the run resolved), so ``phi3v-train --config
OUT/train_config.yaml --output_dir NEW`` repeats the run; values that are not options (world size,
accumulation, precision, engine) are listed in its header comment.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from typing import Any

import yaml

from phi3v_data.schema import DatasetInfo
from phi3v_train.options import DEFAULT_NUM_CROPS
from phi3v_train.training.config import TrainConfig

#: Splits evaluated when --eval_split is not given, in order of preference; unlabeled ones are
#: skipped (converters write val, dev (NLVR2), dev_seen (Hateful Memes) and test).
DEFAULT_EVAL_SPLITS = ("val", "dev", "dev_seen", "test")
#: Keys resolved only once the training records are counted: a restart compares without them.
SCHEDULE_KEYS = ("max_steps", "warmup_steps")


class TrainingError(Exception):
    """A problem found before or during set-up, reported as one line with exit status 2."""


class PlanError(TrainingError):
    """A configuration that cannot run here; ``str()`` is one line."""


def resolve_num_crops(given: int | None, info: DatasetInfo | None) -> int:
    """The command line's num_crops, else dataset.json's, else :data:`DEFAULT_NUM_CROPS`."""
    return given or (info.num_crops if info is not None else None) or DEFAULT_NUM_CROPS


def resolve_attention(attn: str | None, use_flash_attention: bool = False) -> str:
    """``--attn``, else flash_attention_2 when asked for and installed, else sdpa."""
    if attn is not None:
        return attn
    if use_flash_attention and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def resolve_eval_split(given: str | None, splits: Any, info: DatasetInfo) -> str | None:
    """``--eval_split`` (``none``: no evaluation), else the first labelled default split."""
    if given == "none":
        return None
    if given is not None:
        if given not in splits:
            raise PlanError(f"--eval_split: no split {given!r}")
        return given
    labelled = [split for split in DEFAULT_EVAL_SPLITS if split not in info.unlabeled_splits]
    return next((split for split in labelled if split in splits), None)


def resolve_accumulation(batch_size: int, batch_size_per_gpu: int, world_size: int) -> int:
    """Gradient accumulation = global batch / (world size x micro-batch), which must divide."""
    per_step = world_size * batch_size_per_gpu
    if batch_size % per_step:
        raise PlanError(
            f"batch_size: {batch_size} is not divisible by world size {world_size} x "
            f"batch_size_per_gpu {batch_size_per_gpu} = {per_step}"
        )
    return batch_size // per_step


def resolve_engine(config: TrainConfig, world_size: int) -> str:
    """plain, ddp, deepspeed or fsdp: chosen once, from the flags and the world size."""
    if config.deepspeed:
        return "deepspeed"
    if config.fsdp:
        return "fsdp"
    return "ddp" if world_size > 1 else "plain"


def resolve_precision(config: TrainConfig, engine: str, cuda: bool) -> str:
    """bf16, fp16 (autocast + GradScaler, CUDA without DeepSpeed/FSDP) or fp32."""
    if config.bf16:
        return "bf16"
    if cuda and engine in ("plain", "ddp"):
        return "fp16"
    if cuda and engine == "deepspeed":
        return "fp16-deepspeed"
    return "fp32"


def resolve_compile(config: TrainConfig, engine: str, cuda: bool) -> bool:
    """``--compile``, else on where it was measured to pay: full / frozen-vision fine-tuning on
    CUDA under the plain or DDP engine (LoRA, QLoRA, DeepSpeed, FSDP: not measured; CPU: the
    compile time outweighs the gain)."""
    if config.compile is not None:
        return config.compile
    return cuda and engine in ("plain", "ddp") and not config.lora


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up capped at 10 % of the run, so that short runs reach the peak learning rate."""
    return min(warmup_steps, total_steps // 10)


@dataclass(frozen=True)
class RunPlan:
    """Every resolved value of one run (``config`` holds them too, written out)."""

    config: TrainConfig
    eval_split: str | None
    num_crops: int
    attn: str
    world_size: int
    accumulation: int
    engine: str
    precision: str
    lora: bool
    lora_alpha: int
    records: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    num_epochs: int = 0
    warmup: int = 0

    def with_schedule(self, records: int, batches: int | None = None) -> RunPlan:
        """The plan once the training records are counted (after over-long ones are dropped);
        ``batches``: micro-batches per rank and epoch when not ``batch_size_per_gpu`` samples
        each (``--max_tokens_per_batch``)."""
        if batches is None:
            per_rank = math.ceil(records / self.world_size)
            batches = math.ceil(per_rank / self.config.batch_size_per_gpu)
        steps_per_epoch = math.ceil(batches / self.accumulation)
        total = self.config.max_steps or steps_per_epoch * self.config.num_train_epochs
        warmup = effective_warmup(self.config.warmup_steps, total)
        config = self.config.model_copy(update={"max_steps": total, "warmup_steps": warmup})
        return replace(
            self,
            config=config,
            records=records,
            batches_per_epoch=batches,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            num_epochs=math.ceil(total / steps_per_epoch),
            warmup=warmup,
        )

    def replay_values(self) -> dict[str, Any]:
        """The options that repeat this run (``resume`` and ``overwrite`` are never replayed)."""
        data = self.config.model_dump(mode="json", exclude={"overwrite", "resume"})
        data["use_lora"] = self.lora
        return data

    def to_yaml(self) -> str:
        header = (
            f"# phi3v-train run plan: world_size {self.world_size}, gradient accumulation "
            f"{self.accumulation}, engine {self.engine}, precision {self.precision}, "
            f"lora_alpha {self.lora_alpha}, {self.records} training records, "
            f"{self.steps_per_epoch} steps per epoch\n"
            "# phi3v-train --config THIS_FILE --output_dir NEW_DIR repeats the run\n"
        )
        return header + yaml.safe_dump(self.replay_values(), sort_keys=False)


def resolve_plan(
    config: TrainConfig, info: DatasetInfo, splits: Any, world_size: int, *, cuda: bool
) -> RunPlan:
    """Resolve everything that needs no model: raises :class:`PlanError` (one line)."""
    if config.train_split not in splits:
        known = ", ".join(sorted(splits))
        raise PlanError(f"--train_split: no split {config.train_split!r} (found: {known})")
    accumulation = resolve_accumulation(config.batch_size, config.batch_size_per_gpu, world_size)
    eval_split = resolve_eval_split(config.eval_split, splits, info)
    num_crops = resolve_num_crops(config.num_crops, info)
    attn = resolve_attention(config.attn, config.use_flash_attention)
    engine = resolve_engine(config, world_size)
    resolved = config.model_copy(
        update={
            "compile": resolve_compile(config, engine, cuda),
            "eval_split": eval_split or "none",
            "num_crops": num_crops,
            "attn": attn,
            "use_lora": config.lora,
            "vision_lr": config.vision_lr or config.learning_rate,
            "projector_lr": config.projector_lr or config.learning_rate,
        }
    )
    return RunPlan(
        config=resolved,
        eval_split=eval_split,
        num_crops=num_crops,
        attn=attn,
        world_size=world_size,
        accumulation=accumulation,
        engine=engine,
        precision=resolve_precision(config, engine, cuda),
        lora=config.lora,
        lora_alpha=config.lora_alpha,
    )
