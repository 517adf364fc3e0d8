"""``TrainConfig``: every flag of ``phi3v-train`` declared once.

The click options of ``phi3v-train train`` are generated from the fields below (name, type,
default, help), so the command line, ``--config FILE.yaml`` and the resolved
``OUT/train_config.yaml`` all use the same keys. Precedence: field default < YAML < command line.

The original recipe's flag names and meanings are kept (``--batch_size`` is the *global* batch,
``--no-tqdm``, ``--use_qlora`` turns LoRA on, ``lora_alpha = round(rank * lora_alpha_ratio)``).
Cross-field rules live in :meth:`TrainConfig._check_combinations` and fail before any model loads.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import click
import yaml
from click.core import ParameterSource
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FreezePart = Literal["vision", "projector", "llm"]
AttnImpl = Literal["sdpa", "flash_attention_2", "eager"]
DEEPSPEED_PRESETS = ("zero2", "zero3")
DEFAULT_NUM_CROPS = 16
MAX_NUM_CROPS = 16


class TrainConfig(BaseModel):
    """The resolved configuration of one training run."""

    # allow_inf_nan=False: every float option refuses inf / nan (a NaN model would be saved).
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    # --- data and model --------------------------------------------------------------------
    data_dir: Path | None = Field(
        default=None,
        description="Dataset directory (conversations-jsonl; checked with `phi3v-data validate` "
        "before any model is loaded). Required.",
    )
    model_name_or_path: str = Field(
        default="microsoft/Phi-3.5-vision-instruct",
        description="Model directory (or hub id) in the official Phi-3.5-vision layout.",
    )
    output_dir: Path = Field(default=Path("./output/"), description="Where everything is written.")
    train_split: str = Field(default="train", description="Split trained on.")
    eval_split: str | None = Field(
        default=None,
        description="Split evaluated before and after training (default: the first labelled one "
        "of val, dev, dev_seen, test; `none` disables).",
    )
    num_crops: int | None = Field(
        default=None,
        description=f"Max HD crops per image (1..{MAX_NUM_CROPS}; default: dataset.json's "
        f"num_crops, else {DEFAULT_NUM_CROPS}).",
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
    seed: int = Field(
        default=42,
        ge=0,
        le=2**32 - 1,
        description="Seed of weights init, data order and dropout (0..2**32-1).",
    )
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
    bf16: bool = Field(
        default=False,
        description="bf16 mixed precision. Without it: fp16 autocast with fp32 master weights and "
        "a GradScaler on CUDA, plain fp32 on CPU.",
    )
    use_flash_attention: bool = Field(
        default=False,
        description="flash_attention_2 when the flash_attn package is installed, else SDPA "
        "(needs --bf16).",
    )
    attn: AttnImpl | None = Field(
        default=None,
        description="Attention implementation (default: sdpa, or what --use_flash_attention picks).",
    )
    deepspeed: str | None = Field(
        default=None,
        description="DeepSpeed ZeRO: zero2 (the original's settings), zero3, or a JSON file.",
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
    eval_max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many samples of the eval split."
    )
    eval_batch_size: int = Field(default=8, ge=1, description="Generation batch per process.")
    max_new_tokens: int = Field(default=64, ge=1, description="Generation length in evaluation.")
    logging_steps: int = Field(default=10, ge=1, description="Log the loss every N steps.")
    report_to: Literal["tensorboard", "none"] = Field(
        default="tensorboard", description="Where metrics go besides the console."
    )
    tqdm: bool = Field(default=True, description="Progress bar (--no-tqdm turns it off).")

    # ------------------------------------------------------------------------------------------
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
        if self.num_crops is not None and not 1 <= self.num_crops <= MAX_NUM_CROPS:
            raise ValueError(f"num_crops: must be between 1 and {MAX_NUM_CROPS}")
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


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _click_option(name: str, field: Any) -> click.Option:
    annotation = _unwrap_optional(field.annotation)
    default = field.get_default(call_default_factory=True)
    help_text = field.description or ""
    if default not in (None, [], False):
        help_text += f"  [default: {default}]"
    flag = f"--{name}"
    if annotation is bool:
        return click.Option(
            [f"{flag}/--no-{name}"], default=None, help=help_text, show_default=False
        )
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        choices = list(typing.get_args(item))
        return click.Option(
            [flag], type=click.Choice(choices), multiple=True, default=None, help=help_text
        )
    if typing.get_origin(annotation) is Literal:
        return click.Option(
            [flag],
            type=click.Choice(list(typing.get_args(annotation))),
            default=None,
            help=help_text,
        )
    if name == "resume":
        # `--resume` alone means auto; `--resume PATH` names a checkpoint.
        return click.Option(
            [flag], type=str, default=None, is_flag=False, flag_value="auto", help=help_text
        )
    click_type = {int: int, float: float, Path: click.Path(path_type=Path)}.get(annotation, str)
    return click.Option([flag], type=click_type, default=None, help=help_text)


def config_options(func: Any) -> Any:
    """Decorator: one click option per TrainConfig field, plus ``--config FILE.yaml``."""
    for name, field in reversed(list(TrainConfig.model_fields.items())):
        func = _add_param(func, _click_option(name, field))
    config = click.Option(
        [f"--{CONFIG_OPTION}"],
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="YAML file with the same keys as these options; command-line values override it.",
    )
    return _add_param(func, config)


def _add_param(func: Any, param: click.Parameter) -> Any:
    if not hasattr(func, "__click_params__"):
        func.__click_params__ = []
    func.__click_params__.append(param)
    return func


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {field}: {message}" if item["loc"] else f"{source}: {message}")
    return "\n".join(lines)


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
    for name in TrainConfig.model_fields:
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            value = params[name]
            values[name] = list(value) if isinstance(value, tuple) else value
    if isinstance(values.get("eval_split"), str) and values["eval_split"].lower() == "none":
        values["eval_split"] = "none"
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise click.UsageError(_format_validation_error(error, source)) from None
