"""Configuration of the native Phi-3 / Phi-3.5-vision model (`model_type: "phi3_v"`).

`Phi3VConfig` is transformers' `Phi3Config` (the language model) plus the two vision fields of the
official `config.json`: `embd_layer` (HD transform, learnable separators, MLP projector) and
`img_processor` (the CLIP tower: `image_dim_out`, `num_img_tokens`, optional `layer_idx`).

It reads the official file unchanged: the legacy `rope_scaling: {"type": "su", ...}` becomes
transformers' "longrope" rope parameters. The CLIP tower defaults to ViT-L/14-336 as in the
official model; `img_processor["vision_config"]` (CLIPVisionConfig fields) overrides it, which is
how smaller towers (the tiny preset) are declared. The resolved tower config is kept as the
sub-config `vision_config`, so the attention implementation chosen at load time reaches CLIP too.

`save_pretrained` writes the official layout: `model_type: "phi3_v"`, `architectures:
["Phi3VForCausalLM"]`, the vision tower folded back into `img_processor["vision_config"]` (only the
fields that differ from ViT-L/14-336), and a `rope_scaling` dict that vLLM's native Phi-3-V reads.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import is_flash_attn_2_available

# The vision tower of every released Phi-3(.5)-vision checkpoint (hard-coded in the official code).
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}

# Keys of a serialized CLIPVisionConfig that are bookkeeping, not architecture.
_VISION_META_KEYS = {"model_type", "transformers_version", "architectures", "dtype", "torch_dtype"}


def vision_config_from_img_processor(img_processor: dict[str, Any]) -> CLIPVisionConfig:
    """The CLIP tower config: ViT-L/14-336 overridden by `img_processor["vision_config"]`."""
    overrides = dict(img_processor.get("vision_config") or {})
    for key in _VISION_META_KEYS:
        overrides.pop(key, None)
    return CLIPVisionConfig(**{**CLIP_VIT_L_14_336, **overrides})


@strict
class Phi3VConfig(Phi3Config):
    """Phi3Config + `embd_layer` + `img_processor`; the CLIP tower config is `vision_config`."""

    model_type = "phi3_v"
    # Built in __post_init__ from img_processor; declared so the attention choice reaches CLIP.
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L_14_336)
    }

    embd_layer: dict | str | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        if self.embd_layer is None or self.embd_layer == "default":
            self.embd_layer = dict(DEFAULT_EMBD_LAYER)
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        if isinstance(self.vision_config, dict):
            self.img_processor["vision_config"] = self.vision_config
        if not isinstance(self.vision_config, CLIPVisionConfig):
            self.vision_config = vision_config_from_img_processor(self.img_processor)
        self.img_processor.pop("vision_config", None)
        # The official config.json stores `_attn_implementation: flash_attention_2`: a preference,
        # honoured only where flash-attn can run (an explicit request still fails loudly).
        stored = kwargs.pop("_attn_implementation", None)
        usable = stored != "flash_attention_2" or is_flash_attn_2_available()
        if stored and usable and "attn_implementation" not in kwargs:
            kwargs["attn_implementation"] = stored
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, default_theta: float = 10_000.0, **kwargs):
        """Accept the official `rope_scaling: {"type": "su", ...}` (and our own saved form)."""
        rope_scaling = kwargs.pop("rope_scaling", None)
        parameters = dict(self.rope_parameters or rope_scaling or {})
        legacy_type = parameters.pop("type", None)
        rope_type = parameters.get("rope_type", legacy_type) or "default"
        if rope_type in ("su", "yarn"):
            rope_type = "longrope"
        parameters["rope_type"] = rope_type
        parameters.setdefault("rope_theta", kwargs.pop("rope_theta", default_theta))
        kwargs.pop("rope_theta", None)
        parameters.setdefault("partial_rotary_factor", kwargs.get("partial_rotary_factor", 1.0))
        if rope_type == "longrope":
            original = self.original_max_position_embeddings
            parameters["original_max_position_embeddings"] = original
            # The official scaling ratio, stated explicitly (transformers warns when it is implicit).
            parameters.setdefault("factor", self.max_position_embeddings / original)
        self.rope_parameters = parameters
        self.standardize_rope_params()
        return kwargs

    @property
    def image_dim_out(self) -> int:
        return int(self.img_processor["image_dim_out"])

    @property
    def num_img_tokens(self) -> int:
        return int(self.img_processor.get("num_img_tokens", 144))

    @property
    def vision_feature_layer(self) -> int:
        """Index into CLIP's hidden-state list (entry 0 = embeddings); -2 = penultimate layer."""
        return int(self.img_processor.get("layer_idx", -2))

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        vision = output.pop("vision_config", None)
        if isinstance(vision, dict):
            default = CLIPVisionConfig(**CLIP_VIT_L_14_336).to_dict()
            changed = {
                key: value
                for key, value in vision.items()
                if key not in _VISION_META_KEYS and default.get(key) != value
            }
            img_processor = dict(output.get("img_processor") or {})
            if changed:
                img_processor["vision_config"] = changed
            output["img_processor"] = img_processor
        rope = output.get("rope_parameters") or {}
        if rope.get("rope_type") == "longrope":
            # vLLM's native Phi-3-V (and older transformers) read the legacy `rope_scaling` key.
            output["rope_scaling"] = {
                "type": "longrope",
                "rope_type": "longrope",
                "short_factor": list(rope["short_factor"]),
                "long_factor": list(rope["long_factor"]),
            }
        if not output.get("architectures"):
            output["architectures"] = ["Phi3VForCausalLM"]
        # The official auto_map points at remote code that a saved directory does not carry.
        output.pop("auto_map", None)
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        full = self.to_dict()
        for key in ("img_processor", "embd_layer", "rope_scaling", "model_type", "architectures"):
            if key in full:
                output[key] = full[key]
        output.pop("vision_config", None)
        if output.get("dtype") is not None:
            output["torch_dtype"] = output["dtype"]  # the key readers older than transformers 5 use
        return output


__all__ = ["Phi3VConfig", "CLIP_VIT_L_14_336", "vision_config_from_img_processor"]
