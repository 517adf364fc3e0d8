"""``TrainConfig``: every flag of ``phi3v-train`` declared once.

The fields shared with ``eval`` (model, data, output, num_crops, attention, precision, seed,
generation) come from :class:`phi3v_train.options.SharedOptions`. The click options of
``phi3v-train train`` are generated from the fields (name, type,
default, help), so the command line, ``--config FILE.yaml`` and the resolved
``OUT/train_config.yaml`` all use the same keys. Precedence: field default < YAML < command line.

The original recipe's flag names and meanings are kept (``--batch_size`` is the *global* batch,
``--no-tqdm``, ``--use_qlora`` turns LoRA on, ``lora_alpha = round(rank * lora_alpha_ratio)``).
Cross-field rules live in :meth:`TrainConfig._check_combinations` and fail before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from phi3v_train.options import (
    DEFAULT_NUM_CROPS,
    MAX_NUM_CROPS,
    AttnImpl,
    SharedOptions,
    add_param,
    click_options,
    command_line_values,
    format_validation_error,
)
from phi3v_train.training.reporting import ReportTarget, parse_report_to

__all__ = ["DEFAULT_NUM_CROPS", "MAX_NUM_CROPS", "AttnImpl", "TrainConfig", "build_config"]

FreezePart = Literal["vision", "projector", "llm"]
DEEPSPEED_PRESETS = ("zero2", "zero3")


class TrainConfig(SharedOptions):
    """The configuration of one training run (the shared options, then training's own)."""

    # --- data and model --------------------------------------------------------------------
    train_split: str = Field(default="train", description="Split trained on.")
    eval_split: str | None = Field(
        default=None,
        description="Split evaluated before and after training (default: the first labelled one "
        "of val, dev, dev_seen, test; `none` disables).",
    )
    max_seq_len: int | None = Field(
        default=None,
        description="Longest training sequence. Longer samples are cut from the right when the cut "
        "keeps every image token and at least one answer token; otherwise the sample is skipped "
        "(listed before training). Default: no limit.",
    )
    num_workers: int = Field(default=4, ge=0, description="DataLoader worker processes.")
    # --- batch and schedule ----------------------------------------------------------------
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Global batch size; gradient accumulation = batch_size / (world size x "
        "batch_size_per_gpu), which must divide exactly.",
    )
    batch_size_per_gpu: int = Field(default=1, ge=1, description="Micro-batch per process.")
    packing: bool = Field(
        default=False,
        description="Concatenate each micro-batch's samples into one row without padding "
        "(attention and LongRoPE stay per sample); the same samples and losses as padded.",
    )
    max_tokens_per_batch: int | None = Field(
        default=None,
        ge=1,
        description="Form micro-batches by a token budget instead of --batch_size_per_gpu: "
        "samples grouped by length, as many per micro-batch as fit in N tokens (padded length x "
        "samples, or the real sum with --packing); deterministic and resumable. An optimizer "
        "step is still batch_size / (world size x batch_size_per_gpu) micro-batches per process.",
    )
    num_train_epochs: int = Field(default=1, ge=1, description="Epochs over the train split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(default=4.0e-5, gt=0, description="Peak learning rate.")
    vision_lr: float | None = Field(
        default=None, gt=0, description="Learning rate of the CLIP tower (default: learning_rate)."
    )
    projector_lr: float | None = Field(
        default=None,
        gt=0,
        description="Learning rate of img_projection, glb_GN and sub_GN (default: learning_rate).",
    )
    wd: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases, norms).")
    warmup_steps: int = Field(
        default=50,
        ge=0,
        description="Linear warm-up steps, capped at 10% of the total optimizer steps so that "
        "short runs reach the peak learning rate.",
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    # --- strategy --------------------------------------------------------------------------
    use_lora: bool | None = Field(
        default=None,
        description="Train LoRA adapters (LLM qkv/o/gate_up/down/lm_head; CLIP q/k/v/out/fc1/fc2 "
        "and img_projection.0/.2 unless frozen). --use_qlora and --use_dora turn it on.",
    )
    use_qlora: bool = Field(default=False, description="LoRA over a 4-bit nf4 base (bitsandbytes).")
    use_dora: bool = Field(default=False, description="DoRA (weight-decomposed LoRA).")
    lora_rank: int = Field(default=64, ge=1, description="LoRA rank r.")
    lora_alpha_ratio: float = Field(
        default=2.0, gt=0, description="lora_alpha = round(lora_rank x lora_alpha_ratio)."
    )
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    freeze_vision_model: bool = Field(
        default=False,
        description="The original's flag: same as --freeze vision (CLIP frozen; projector, "
        "separators and text embeddings stay trainable).",
    )
    freeze: list[FreezePart] = Field(
        default_factory=list,
        description="Freeze parts, combinable: vision (CLIP), projector (img_projection, glb_GN, "
        "sub_GN), llm (embeddings, decoder, lm_head).",
    )
    freeze_text_embeddings_with_vision: bool = Field(
        default=False,
        description="Reproduce the original's frozen-vision run exactly: freezing vision also "
        "freezes the projector, separators and the text token embeddings.",
    )
    gradient_checkpointing: bool = Field(
        default=True, description="Non-reentrant gradient checkpointing."
    )
    # --- precision, attention, distribution ---------------------------------------------------
    use_flash_attention: bool = Field(
        default=False,
        description="flash_attention_2 when the flash_attn package is installed, else SDPA "
        "(needs --bf16).",
    )
    bf16_weights: bool = Field(
        default=False,
        description="With --bf16 (plain / DDP): the model's weights in bf16 and fp32 master copies "
        "held by the optimizer, instead of fp32 weights under bf16 autocast.",
    )
    liger_kernel: bool = Field(
        default=False,
        description="Liger Kernel's fused Triton kernels for the decoder's RMSNorm and SwiGLU MLP "
        "(CUDA only; pip install 'phi3v[gpu]').",
    )
    compile: bool | None = Field(
        default=None,
        description="torch.compile each decoder and CLIP layer during training (the first steps "
        "compile). Default: on for full and frozen-vision fine-tuning on CUDA with the plain or "
        "DDP engine (2.0x the img/s of eager, benchmarks/RESULTS.md), off elsewhere.",
    )
    deepspeed: str | None = Field(
        default=None,
        description="DeepSpeed ZeRO: zero2 (the original's settings), zero3, or a JSON file.",
    )
    fsdp: bool = Field(
        default=False,
        description="FSDP2: torch's fully_shard per decoder and CLIP layer, then the root "
        "(bf16 parameters and reductions with --bf16, else fp32); sharded checkpoints.",
    )
    # --- checkpoints ---------------------------------------------------------------------------
    save_steps: int | None = Field(
        default=None, ge=1, description="Write a complete checkpoint every N optimizer steps."
    )
    save_total_limit: int | None = Field(
        default=None, ge=1, description="Keep only the newest N checkpoints."
    )
    resume: str | None = Field(
        default=None,
        description="Resume: `auto` (newest complete checkpoint in output_dir, if any) or a "
        "checkpoint directory.",
    )
    overwrite: bool = Field(
        default=False,
        description="Start afresh in an output_dir that holds a previous run's outputs: the "
        "files the trainer writes there are removed first (nothing else). Without it (or "
        "--resume) such an output_dir is refused.",
    )
    # --- evaluation and logging ------------------------------------------------------------
    skip_eval_before: bool = Field(
        default=False, description="Skip the evaluation before training."
    )
    skip_eval_after: bool = Field(default=False, description="Skip the evaluation after training.")
    logging_steps: int = Field(default=10, ge=1, description="Log the loss every N steps.")
    report_to: list[ReportTarget] = Field(
        default=["tensorboard"],
        description="Trackers besides the console: tensorboard, wandb, mlflow or none; repeat "
        "the flag for several (wandb / mlflow need the extras: pip install 'phi3v[wandb,mlflow]').",
    )
    tqdm: bool = Field(default=True, description="Progress bar (--no-tqdm turns it off).")

    # ------------------------------------------------------------------------------------------
    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> list[str]:
        """A name, a comma list (YAML) or a list; ``none`` alone means no tracker."""
        return parse_report_to(value)

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.use_lora is False and self.use_qlora:
            raise ValueError(
                "use_qlora: QLoRA trains LoRA adapters on a 4-bit base; it cannot run with "
                "--no-use_lora"
            )
        if self.use_lora is False and self.use_dora:
            raise ValueError("use_dora: DoRA is a LoRA variant; it cannot run with --no-use_lora")
        if (self.use_flash_attention or self.attn == "flash_attention_2") and not self.bf16:
            raise ValueError(
                "use_flash_attention: flash attention does not run in fp16 (the original's known "
                "issue); add --bf16 or choose --attn sdpa"
            )
        if self.overwrite and self.resume is not None:
            raise ValueError("overwrite: --overwrite starts afresh; it cannot run with --resume")
        if self.fsdp and (self.deepspeed or self.use_qlora):
            other = "--deepspeed" if self.deepspeed else "--use_qlora"
            raise ValueError(f"fsdp: --fsdp cannot run with {other} (choose one way to shard)")
        if self.bf16_weights and not self.bf16:
            raise ValueError("bf16_weights: bf16 weights with fp32 master copies need --bf16")
        if self.bf16_weights and (self.deepspeed or self.fsdp):
            raise ValueError(
                "bf16_weights: DeepSpeed and FSDP already keep fp32 master weights under --bf16; "
                "drop --bf16_weights"
            )
        if self.deepspeed and self.use_qlora:
            raise ValueError("deepspeed: DeepSpeed ZeRO cannot shard a 4-bit QLoRA base model")
        if (
            self.deepspeed
            and self.deepspeed not in DEEPSPEED_PRESETS
            and not Path(self.deepspeed).is_file()
        ):
            raise ValueError(
                f"deepspeed: {self.deepspeed!r} is neither zero2, zero3 nor an existing file"
            )
        if self.freeze_text_embeddings_with_vision and "vision" not in self.frozen_parts:
            raise ValueError(
                "freeze_text_embeddings_with_vision: only meaningful with --freeze_vision_model "
                "(or --freeze vision)"
            )
        trainable = {"vision", "projector", "llm"} - self.frozen_parts
        if not trainable:
            raise ValueError(
                "freeze: vision, projector and llm are all frozen; nothing would train"
            )
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def lora(self) -> bool:
        """LoRA is on: asked for, or implied by QLoRA / DoRA (as the original does for QLoRA)."""
        return bool(self.use_lora or self.use_qlora or self.use_dora)

    @property
    def frozen_parts(self) -> set[str]:
        parts = set(self.freeze)
        if self.freeze_vision_model:
            parts.add("vision")
        return parts

    @property
    def lora_alpha(self) -> int:
        return round(self.lora_rank * self.lora_alpha_ratio)

    def to_yaml(self) -> str:
        """The resolved configuration (derived LoRA switch written out explicitly)."""
        data = self.model_dump(mode="json", exclude={"overwrite"})  # never replayed by --config
        data["use_lora"] = self.lora
        return yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# click options generated from the model
# ------------------------------------------------------------------------------------------------

#: Options declared outside TrainConfig's fields (they do not belong in a resolved config).
CONFIG_OPTION = "config"


def config_options(func: Any) -> Any:
    """Decorator: one click option per TrainConfig field, plus ``--config FILE.yaml``."""
    func = click_options(TrainConfig)(func)
    config = click.Option(
        [f"--{CONFIG_OPTION}"],
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="YAML file with the same keys as these options; command-line values override it.",
    )
    return add_param(func, config)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a ``--config`` YAML file; a clear ``click.UsageError`` for anything wrong with it."""
    if not path.is_file():
        raise click.UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise click.UsageError(
            f"{where}: invalid YAML: {getattr(error, 'problem', error)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.UsageError(f"{path}: a mapping of option names to values is expected")
    unknown = sorted(set(data) - set(TrainConfig.model_fields))
    if unknown:
        raise click.UsageError(f"{path}: {unknown[0]}: unknown option (see phi3v-train --help)")
    return data


def build_config(ctx: click.Context, params: dict[str, Any]) -> TrainConfig:
    """Merge defaults < YAML < command line into a validated :class:`TrainConfig`."""
    values: dict[str, Any] = {}
    source = "command line"
    yaml_path = params.get(CONFIG_OPTION)
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
        source = f"{yaml_path} + command line"
    values.update(command_line_values(ctx, params, TrainConfig))
    if isinstance(values.get("eval_split"), str) and values["eval_split"].lower() == "none":
        values["eval_split"] = "none"
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise click.UsageError(format_validation_error(error, source)) from None
