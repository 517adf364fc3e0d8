"""Serving hand-off without a GPU (issue 14 item 6): a merged folder is checked against what vLLM's
Phi-3-V loader requires (vllm/model_executor/models/phi3v.py, digest in ../shared/docs/peers.md):
the architecture and remote-code entries, the config fields it reads and asserts, the key prefixes
its weight mapper handles (fused qkv_proj / gate_up_proj), the image token id, no adapter keys.
A merge of the tiny preset passes; each deliberately broken variant fails with its reason."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from phi3v_train.merge import checkpoint_shapes, merge_adapter
from phi3v_train.model.tiny import make_tiny
from phi3v_train.training.config import TrainConfig
from phi3v_train.training.strategies import apply_lora

VLLM_IMAGE_TOKEN_ID = 32044  # vLLM's Phi-3-V always uses this id for "<|image|>"
LAYER_KEY = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj)"
    r"|input_layernorm|post_attention_layernorm)\.weight"
)
VISION_PREFIXES = (
    "model.vision_embed_tokens.wte.",  # optional alias of model.embed_tokens
    "model.vision_embed_tokens.img_processor.",
    "model.vision_embed_tokens.img_projection.0.",
    "model.vision_embed_tokens.img_projection.2.",
)
EXACT_KEYS = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.vision_embed_tokens.glb_GN",
    "model.vision_embed_tokens.sub_GN",
}
AUTO_MAP = {
    "config.json": {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    },
    "processor_config.json": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
}


def config_problems(config: dict) -> list[str]:
    """What vLLM's Phi3VForCausalLM / its Llama-style language model would refuse in config.json."""
    problems = []
    if config.get("architectures") != ["Phi3VForCausalLM"]:
        problems.append(f"architectures is {config.get('architectures')}")
    if config.get("model_type") != "phi3_v":
        problems.append(f"model_type is {config.get('model_type')!r}")
    if "AutoConfig" not in config.get("auto_map", {}):
        problems.append("config.json has no auto_map.AutoConfig (vLLM loads it as remote code)")
    img = config.get("img_processor") or {}
    problems += [
        f"img_processor.{k} missing" for k in ("image_dim_out", "num_img_tokens") if k not in img
    ]
    if img.get("type_feature", "patch") != "patch" or not isinstance(img.get("layer_idx", -2), int):
        problems.append("img_processor.type_feature/layer_idx not what vLLM supports")
    embd = config.get("embd_layer") or {}
    for key, value in (
        ("use_hd_transform", True),
        ("with_learnable_separator", True),
        ("hd_transform_order", "sub_glb"),
    ):
        if embd.get(key) != value:
            problems.append(f"embd_layer.{key} is {embd.get(key)!r}, vLLM asserts {value!r}")
    for key in (
        "hidden_size",
        "vocab_size",
        "original_max_position_embeddings",
        "max_position_embeddings",
        "sliding_window",
        "rope_scaling",
    ):
        if key not in config:
            problems.append(f"{key} missing")
    rope = config.get("rope_scaling") or {}
    if rope.get("type", rope.get("rope_type")) not in ("su", "longrope") or not all(
        isinstance(rope.get(k), list) for k in ("short_factor", "long_factor")
    ):
        problems.append("rope_scaling is not su/longrope with short_factor and long_factor")
    return problems


def weight_problems(keys: set[str]) -> list[str]:
    """Keys vLLM's weight mapper would not place, required keys it would miss, adapter keys."""
    problems = []
    adapter = sorted(k for k in keys if re.search(r"lora_|base_layer|magnitude_vector", k))
    if adapter:
        problems.append(f"adapter keys left (vLLM has no LoRA for Phi-3-V): {adapter[0]}")
    unknown = sorted(
        k
        for k in keys - EXACT_KEYS
        if not (LAYER_KEY.fullmatch(k) or k.startswith(VISION_PREFIXES)) and k not in adapter
    )
    if unknown:
        problems.append(f"keys vLLM's mapper does not handle: {unknown[0]}")
    missing = sorted(k for k in EXACT_KEYS - keys if k != "model.embed_tokens.weight")
    if (
        "model.embed_tokens.weight" not in keys
        and "model.vision_embed_tokens.wte.weight" not in keys
    ):
        missing.insert(0, "model.embed_tokens.weight")
    if missing:
        problems.append(f"missing keys: {missing[0]}")
    return problems


def vllm_problems(model_dir: Path, image_token_id: int = VLLM_IMAGE_TOKEN_ID) -> list[str]:
    """Every reason vLLM's Phi-3-V loader would refuse (or mis-serve) ``model_dir``; [] = ready."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    problems = config_problems(config)
    for name in AUTO_MAP:
        path = model_dir / name
        entries = json.loads(path.read_text()).get("auto_map", {}) if path.is_file() else {}
        for target in entries.values():
            module = (target[-1] if isinstance(target, list) else target).split(".")[0]
            if not (model_dir / f"{module}.py").is_file():
                problems.append(f"{name} auto_map names {module}.py, which is not in the folder")
    if (model_dir / "adapter_config.json").exists():
        problems.append("adapter_config.json present: merge the adapter first")
    token = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|image|>")
    if token != image_token_id or config.get("vocab_size", 0) <= image_token_id:
        problems.append(f"<|image|> is id {token}, vLLM uses {image_token_id}")
    return problems + weight_problems(set(checkpoint_shapes(model_dir)))


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handoff")
    base = make_tiny(root / "base", seed=0)
    for name, entries in AUTO_MAP.items():  # dressed like the official download
        data = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**data, "auto_map": entries}))
    for module in ("configuration_phi3_v", "modeling_phi3_v", "processing_phi3_v"):
        (base / f"{module}.py").write_text("# the official remote code would be here\n")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = apply_lora(model, TrainConfig(use_lora=True, lora_rank=4))
    peft_model.save_pretrained(root / "adapter")
    return merge_adapter(base, root / "adapter", root / "merged")


def tiny_image_id(model_dir: Path) -> int:
    return AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|image|>")


def test_merged_tiny_folder_is_what_vllm_loads(merged: Path) -> None:
    assert vllm_problems(merged, image_token_id=tiny_image_id(merged)) == []
    # The tiny tokenizer's <|image|> is not 32044: the real id check is active by default.
    assert vllm_problems(merged) == [f"<|image|> is id {tiny_image_id(merged)}, vLLM uses 32044"]


def _break_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        elif key == "embd_layer":
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def _with_lora_leftover(weights: dict) -> dict:
    return {
        **weights,
        "model.layers.0.self_attn.qkv_proj.lora_A.default.weight": torch.zeros(4, 64),
    }


def _unfused_qkv(weights: dict) -> dict:
    out = {k: v for k, v in weights.items() if "qkv_proj" not in k}
    for key in [k for k in weights if "qkv_proj" in k]:
        for part, chunk in zip("qkv", weights[key].chunk(3), strict=True):
            out[key.replace("qkv_proj", f"{part}_proj")] = chunk.contiguous()
    return out


BREAKS = {
    "adapter key": (lambda f: _rewrite_weights(f, _with_lora_leftover), "adapter keys left"),
    "unfused q/k/v": (lambda f: _rewrite_weights(f, _unfused_qkv), "does not handle"),
    "hd order": (
        lambda f: _break_config(f, embd_layer={"hd_transform_order": "glb_sub"}),
        "embd_layer.hd_transform_order",
    ),
    "no sliding_window": (lambda f: _break_config(f, sliding_window=None), "sliding_window"),
    "architecture": (
        lambda f: _break_config(f, architectures=["Phi3ForCausalLM"]),
        "architectures",
    ),
    "remote code lost": (lambda f: (f / "processing_phi3_v.py").unlink(), "processing_phi3_v.py"),
    "adapter not merged": (
        lambda f: (f / "adapter_config.json").write_text("{}"),
        "adapter_config.json",
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_broken_merge_is_refused(merged: Path, tmp_path: Path, name: str) -> None:
    broken = shutil.copytree(merged, tmp_path / "broken")
    damage, reason = BREAKS[name]
    damage(broken)
    problems = vllm_problems(broken, image_token_id=tiny_image_id(broken))
    assert any(reason in problem for problem in problems), problems
