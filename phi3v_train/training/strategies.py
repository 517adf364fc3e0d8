"""What trains: freezing, LoRA / QLoRA / DoRA, and parameter groups with their own learning rates.

The model has three parts, named after the official state-dict keys:

- ``vision``: the CLIP tower ``model.vision_embed_tokens.img_processor``;
- ``projector``: ``img_projection`` and the learnable separators ``glb_GN`` / ``sub_GN``;
- ``llm``: everything else (token embeddings, decoder layers, final norm, ``lm_head``).

Frozen vision keeps the projector, the separators and the text embeddings trainable. The
original's ``requires_grad_(False)`` on all of ``vision_embed_tokens`` also froze the projector, the
separators and (through the shared ``wte`` module) the token embeddings; that behaviour is
available as ``--freeze_text_embeddings_with_vision``.

LoRA targets are the original's (original_recipe.md §1.3): LLM ``qkv_proj o_proj gate_up_proj
down_proj lm_head``; CLIP ``q_proj k_proj v_proj out_proj fc1 fc2`` and ``img_projection.0/.2``,
each group only when its part is not frozen (``--freeze_vision_model`` drops the CLIP adapters;
the original also dropped the projector's, which ``--freeze projector`` does here). Targets are passed to PEFT as full
module names, so a CLIP ``q_proj`` can never be confused with anything in the language model. As
in the original, LoRA freezes every base weight (separators and embeddings included). CLIP layers
after the feature layer never run and get no adapters (the original deleted them for LoRA).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from phi3v_train.training.config import TrainConfig

VISION, PROJECTOR, LLM = "vision", "projector", "llm"
PARTS = (VISION, PROJECTOR, LLM)

LLM_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR_LORA_TARGETS = ("img_projection.0", "img_projection.2")


def part_of(name: str) -> str:
    """The part a parameter or module belongs to, from its (possibly PEFT-prefixed) name."""
    if "vision_embed_tokens.img_processor" in name:
        return VISION
    if "img_projection" in name or "glb_GN" in name or "sub_GN" in name:
        return PROJECTOR
    return LLM


def apply_freezing(model: nn.Module, config: TrainConfig) -> None:
    """Set ``requires_grad`` by part for full fine-tuning (LoRA freezes the base itself)."""
    frozen = set(config.frozen_parts)
    if config.freeze_text_embeddings_with_vision:
        frozen.add(PROJECTOR)
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) not in frozen)
    if config.freeze_text_embeddings_with_vision:
        model.get_input_embeddings().weight.requires_grad_(False)


def lora_target_modules(model: nn.Module, config: TrainConfig) -> list[str]:
    """Full names of the linear layers that receive adapters."""
    frozen = config.frozen_parts
    wanted = {
        VISION: CLIP_LORA_TARGETS,
        PROJECTOR: PROJECTOR_LORA_TARGETS,
        LLM: LLM_LORA_TARGETS,
    }
    dead = _unused_vision_layers(model)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and type(module).__name__ != "Linear4bit":
            continue
        part = part_of(name)
        if part in frozen or any(prefix in name + "." for prefix in dead):
            continue
        if any(name == t or name.endswith("." + t) for t in wanted[part]):
            targets.append(name)
    return targets


def _unused_vision_layers(model: nn.Module) -> list[str]:
    """Name prefixes of the CLIP layers after the feature layer (they never run: no adapters)."""
    prefixes = []
    for name, module in model.named_modules():
        used = getattr(module, "num_layers_used", None)
        if used is None or not hasattr(module, "vision_model"):
            continue
        layers = module.vision_model.encoder.layers
        prefixes += [f"{name}.vision_model.encoder.layers.{i}." for i in range(used, len(layers))]
    return prefixes


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap the model with PEFT adapters (LoRA or DoRA, gaussian init); only adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, config)
    if not targets:
        raise ValueError("LoRA: no target module left after freezing")
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
        use_dora=config.use_dora,
    )
    with warnings.catch_warnings():
        # peft reads the model's deprecated `is_gradient_checkpointing` (transformers 5.24 warns);
        # the check is peft's own, so its warning is not the user's to act on.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return get_peft_model(model, lora_config)


#: bitsandbytes' 4-bit block size: a linear layer is packed in blocks of this many input weights.
NF4_BLOCK_SIZE = 64
#: Never quantized (transformers' own default: the output embedding stays in full precision).
NEVER_QUANTIZED = ("lm_head",)


def unquantizable_linears(model_config: Any) -> list[str]:
    """Names of the linear layers too narrow for 4-bit blocks (input width not a multiple of
    :data:`NF4_BLOCK_SIZE`): bitsandbytes' CPU kernels cannot reshape their block scales, so such
    layers (the tiny preset's 32-wide CLIP) stay unquantized. Built on the meta device: no memory.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.in_features % NF4_BLOCK_SIZE
    ]


def quantization_config(config: TrainConfig, device: torch.device, model_config: Any) -> Any:
    """The original's QLoRA quantization: 4-bit nf4, no double quantization; linear layers too
    narrow for nf4 blocks (of ``model_config``'s model) and ``lm_head`` stay unquantized."""
    from transformers import BitsAndBytesConfig

    if device.type == "cpu":
        compute_dtype = torch.bfloat16 if config.bf16 else torch.float32
    else:
        compute_dtype = torch.bfloat16 if config.bf16 else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=[*NEVER_QUANTIZED, *unquantizable_linears(model_config)],
    )


def _no_decay(name: str, module_names: dict[str, str]) -> bool:
    owner = name.rsplit(".", 1)[0]
    return name.endswith("bias") or "norm" in module_names.get(owner, "").lower()


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (part, decay): each part gets its own learning rate.

    Weight decay skips biases and the weights of normalisation layers.
    """
    lrs = {
        VISION: config.vision_lr or config.learning_rate,
        PROJECTOR: config.projector_lr or config.learning_rate,
        LLM: config.learning_rate,
    }
    module_names = {name: type(module).__name__ for name, module in model.named_modules()}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((part_of(name), _no_decay(name, module_names)), []).append(param)
    return [
        {
            "params": params,
            "lr": lrs[part],
            "weight_decay": 0.0 if no_decay else config.wd,
            "name": f"{part}{'_no_decay' if no_decay else ''}",
        }
        for (part, no_decay), params in sorted(groups.items())
    ]


def trainable_summary(model: nn.Module) -> str:
    """``vision 0/1.2M, projector 0.3M/0.3M, llm 4.1M/4.1M trainable`` style line."""
    total: Counter[str] = Counter()
    trainable: Counter[str] = Counter()
    for name, param in model.named_parameters():
        part = part_of(name)
        total[part] += param.numel()
        if param.requires_grad:
            trainable[part] += param.numel()
    return (
        ", ".join(f"{part} {_count(trainable[part])}/{_count(total[part])}" for part in PARTS)
        + " trainable"
    )


def _count(value: int) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}K"
    return str(value)
