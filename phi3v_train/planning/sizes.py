"""Parameter counts of a Phi-3-V model from its ``config.json`` alone (no weights, no download).

The model is built on PyTorch's ``meta`` device (shapes only, no memory), then counted with the
trainer's own rules (:mod:`phi3v_train.training.strategies`): the parts vision / projector / llm,
the LoRA adapters on the trainer's target modules, the linear layers QLoRA quantizes to nf4, and
the largest AdamW parameter group of full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi3v_train.planning.flops import ModelDims

#: The modules the trainer's FSDP2 engine shards one by one (phi3v_train/training/fsdp.py).
LAYER_CLASSES = ("Phi3DecoderLayer", "CLIPEncoderLayer")
#: bitsandbytes nf4: half a byte per weight plus one fp32 absmax per 64-weight block (no double
#: quantization, as the trainer's quantization config).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64


class ConfigError(ValueError):
    """The model directory has no readable Phi-3-V ``config.json``."""


@dataclass(frozen=True)
class ModelSizes:
    """What the memory model needs to know about one model, in parameters."""

    vision: int
    projector: int
    llm: int
    lora_vision: int
    lora_projector: int
    lora_llm: int
    quantized: int  # weights QLoRA stores in nf4
    largest_group_full: int  # largest AdamW group of full fine-tuning (foreach scratch)
    largest_group_frozen_vision: int
    largest_module: int  # largest single module (ZeRO-3 gathers it whole)
    largest_layer: int  # largest decoder / CLIP layer (an FSDP unit)
    layers: int  # parameters inside decoder and CLIP layers (the rest is FSDP's root unit)
    dims: ModelDims

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm

    def lora(self, vision: bool = True) -> int:
        """Adapter parameters (CLIP adapters only when the vision tower is not frozen)."""
        return self.lora_llm + self.lora_projector + (self.lora_vision if vision else 0)


def load_model_config(model_dir: str | Path) -> Any:
    """The model's configuration through :func:`phi3v_train.loading.load_config`, from a local
    folder only (a hub id would be a download)."""
    from phi3v_train.loading import LoadingError, load_config

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{model_dir}: --model_name_or_path: no config.json in this directory")
    try:
        config = load_config(path)
    except LoadingError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    if getattr(config, "model_type", None) != "phi3_v":
        raise ConfigError(
            f"{model_dir}: --model_name_or_path: model_type {config.model_type!r}, not phi3_v"
        )
    return config


@lru_cache(maxsize=8)
def model_sizes(model_dir: str) -> ModelSizes:
    """Counts of the model in ``model_dir`` (cached: the meta build takes a moment)."""
    return sizes_from_config(load_model_config(model_dir))


def sizes_from_config(model_config: Any) -> ModelSizes:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from phi3v_train.training.config import TrainConfig
    from phi3v_train.training.strategies import (
        NEVER_QUANTIZED,
        NF4_BLOCK_SIZE,
        apply_freezing,
        lora_target_modules,
        param_groups,
        part_of,
    )

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    parts = {"vision": 0, "projector": 0, "llm": 0}
    for name, param in model.named_parameters():
        parts[part_of(name)] += param.numel()
    lora = {"vision": 0, "projector": 0, "llm": 0}
    rank = TrainConfig.model_fields["lora_rank"].default
    modules = dict(model.named_modules())
    for name in lora_target_modules(model, TrainConfig(use_lora=True)):
        module = modules[name]
        lora[part_of(name)] += rank * (module.in_features + module.out_features)
    quantized = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.in_features % NF4_BLOCK_SIZE == 0
        and not any(name.endswith(skip) for skip in NEVER_QUANTIZED)
    )
    largest = {}
    for key, config in (
        ("full", TrainConfig()),
        ("frozen_vision", TrainConfig(freeze_vision_model=True)),
    ):
        apply_freezing(model, config)
        groups = param_groups(model, config)
        largest[key] = max(sum(p.numel() for p in group["params"]) for group in groups)
    largest_module = max(
        sum(p.numel() for p in module.parameters(recurse=False)) for module in modules.values()
    )
    layer_sizes = [
        sum(p.numel() for p in module.parameters())
        for module in modules.values()
        if type(module).__name__ in LAYER_CLASSES
    ]
    return ModelSizes(
        vision=parts["vision"],
        projector=parts["projector"],
        llm=parts["llm"],
        lora_vision=lora["vision"],
        lora_projector=lora["projector"],
        lora_llm=lora["llm"],
        quantized=quantized,
        largest_group_full=largest["full"],
        largest_group_frozen_vision=largest["frozen_vision"],
        largest_module=largest_module,
        largest_layer=max(layer_sizes),
        layers=sum(layer_sizes),
        dims=ModelDims.from_config(model_config),
    )
