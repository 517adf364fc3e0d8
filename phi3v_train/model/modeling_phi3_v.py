"""Native Phi-3 / Phi-3.5-vision on transformers 5: `Phi3VForCausalLM`, `Phi3VModel`, the HD image
embedding `Phi3VImageEmbedding` and the LongRoPE rotary embedding that switches factors per batch.

Built from transformers' own pieces: `Phi3DecoderLayer` / `Phi3RMSNorm` (decoder), `CLIPVisionModel`
(vision tower), the attention interface (eager / sdpa / flash_attention_2, applied to CLIP too),
`GradientCheckpointingLayer`, the Cache API and `GenerationMixin`. The state-dict names are the
official ones (`model.embed_tokens`, `model.vision_embed_tokens.{glb_GN, sub_GN, img_projection.*,
img_processor.vision_model.*}`, `model.layers.*`, `model.norm`, `lm_head`), so official checkpoints
load without `trust_remote_code`; the official `model.vision_embed_tokens.wte.weight` alias of the
token embedding is not stored and is ignored on load.

Forward semantics (see ../shared/reference/phi35v/README.md §4.3):
- placeholders are ids with -1e9 < id < 0; the projected image features of all images (in
  `pixel_values` order) fill them in row-major (batch, sequence) order;
- image features: CLIP penultimate layer without CLS, 2x2 patch merge, crops tiled row-major,
  `sub_GN` after every feature row, then `glb_GN`, then the global view, then Linear-GELU-Linear;
- LongRoPE: the long factors are used iff the key/value length (padded batch length + cache) exceeds
  `original_max_position_embeddings`, once per batch; cached generation re-encodes the whole
  sequence once when it crosses that boundary.
- packed rows (no attention_mask, no cache, `position_ids` restarting at 0 for each sample, see
  `phi3v_train.training.packing`): attention stays inside each sample (block-diagonal causal mask
  for eager/sdpa, cu_seqlens from the position ids for flash_attention_2) and the LongRoPE choice
  is made per sample from its own length, as if it ran alone.
Difference from the official code: CLIP runs only on the real crops of each image (1 + rows*cols,
from `image_sizes`), not on the zero padding up to num_crops+1, and stops at the feature layer
(the last CLIP layer's output was never used); the outputs are identical.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.models.phi3.modeling_phi3 import (
    Phi3Attention,
    Phi3DecoderLayer,
    Phi3RMSNorm,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from phi3v_train.model.configuration_phi3_v import Phi3VConfig

# Ids below this are not placeholders (the official MAX_INPUT_ID).
MAX_INPUT_ID = int(1e9)


def image_placeholder_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """True where `input_ids` holds an image placeholder (-1e9 < id < 0)."""
    return (input_ids < 0) & (input_ids > -MAX_INPUT_ID)


def packed_sample_lengths(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, L] length of each token's own sample when rows are packed (position ids restart at 0
    inside a row), else None. A sample is a run of consecutive positions 0, 1, ..., n-1."""
    if position_ids.shape[-1] == 0 or not bool((position_ids[..., 0] == 0).all()):
        return None
    segments = find_packed_sequence_indices(position_ids)
    if segments is None:
        return None
    lengths = torch.zeros_like(position_ids).scatter_reduce(
        -1, segments, position_ids + 1, reduce="amax"
    )
    return lengths.gather(-1, segments)


class Phi3VRotaryEmbedding(nn.Module):
    """LongRoPE ("su") cos/sin tables with the short/long choice made by the caller per batch.

    transformers' `Phi3RotaryEmbedding` picks the factors from max(position_ids) + 1; the official
    model picks them from the key/value length (padded batch length + cache), which differs with
    left padding, so the choice is an explicit argument here. Everything is float32.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.original_max_position_embeddings = config.original_max_position_embeddings
        short, long, scaling = self.compute_inv_freqs(config)
        self.attention_scaling = scaling
        self.short_inv_freq = nn.Buffer(short, persistent=False)
        self.long_inv_freq = nn.Buffer(long, persistent=False)

    @staticmethod
    def compute_inv_freqs(config: Phi3VConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(short inv_freq, long inv_freq, attention scaling); both equal without LongRoPE."""
        rope_type = config.rope_parameters["rope_type"]
        if rope_type == "longrope":
            fn = ROPE_INIT_FUNCTIONS["longrope"]
            short, scaling = fn(config, None)
            long, _ = fn(config, None, seq_len=config.original_max_position_embeddings + 1)
            return short, long, float(scaling)
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported by Phi-3-V")
        base = config.rope_parameters["rope_theta"]
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, inv_freq.clone(), 1.0

    def use_long_factors(self, kv_length: int) -> bool:
        return self.rope_type == "longrope" and kv_length > self.original_max_position_embeddings

    def long_tokens(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Per token: True where its own sample is longer than original_max_position_embeddings."""
        if self.rope_type != "longrope":
            return torch.zeros_like(sample_lengths, dtype=torch.bool)
        return sample_lengths > self.original_max_position_embeddings

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        kv_length: int,
        long_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `position_ids`; the factors follow `kv_length` (one choice per batch) or,
        for packed rows, `long_tokens` ([B, L] bool: each token's own sample is long)."""
        if long_tokens is None:
            inv_freq = (
                self.long_inv_freq if self.use_long_factors(kv_length) else self.short_inv_freq
            )
        else:
            long, short = self.long_inv_freq, self.short_inv_freq
            inv_freq = torch.where(long_tokens[..., None].to(long.device), long, short)
        inv_freq = inv_freq.to(device=x.device, dtype=torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class Phi3VVisionTower(nn.Module):
    """Holds the CLIP vision model as `vision_model` (official key prefix
    `img_processor.vision_model.*`) and returns the patch features of the configured layer."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config.vision_config)
        num_layers = config.vision_config.num_hidden_layers
        layer_idx = config.vision_feature_layer
        # hidden_states[k] is the output after k encoder layers (entry 0 = embeddings).
        self.num_layers_used = layer_idx if layer_idx >= 0 else num_layers + 1 + layer_idx
        if not 0 <= self.num_layers_used <= num_layers:
            raise ValueError(f"img_processor.layer_idx {layer_idx} is outside the CLIP tower")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] crops -> [n, patches, hidden] features (CLS dropped)."""
        clip = self.vision_model
        hidden = clip.embeddings(pixel_values)
        hidden = clip.pre_layrnorm(hidden)
        for layer in clip.encoder.layers[: self.num_layers_used]:
            hidden = layer(hidden, None)
        return hidden[:, 1:]


class Phi3VImageEmbedding(nn.Module):
    """CLIP features -> HD token sequence (sub-grid + `sub_GN` rows, `glb_GN`, global view) ->
    MLP projector. `skip_padding_crops` (default on) runs CLIP only on each image's real crops."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        embd = config.embd_layer if isinstance(config.embd_layer, dict) else {}
        if not embd.get("use_hd_transform", True) or embd.get("hd_transform_order", "sub_glb") != (
            "sub_glb"
        ):
            raise ValueError("embd_layer: only the HD transform with order 'sub_glb' is supported")
        if embd.get("projection_cls", "mlp") != "mlp":
            raise ValueError("embd_layer.projection_cls: only 'mlp' is supported")
        self.image_dim_out = config.image_dim_out
        self.crop_size = config.vision_config.image_size
        patches_per_side = config.vision_config.image_size // config.vision_config.patch_size
        if patches_per_side % 2:
            raise ValueError("the CLIP patch grid must have an even side for the 2x2 merge")
        self.merged_side = patches_per_side // 2
        merged_dim = 4 * self.image_dim_out
        self.img_processor = Phi3VVisionTower(config)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(merged_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.skip_padding_crops = True

    def grids(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """(rows, cols) of each image's crop grid from its padded HD size [h, w]."""
        return [
            (int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()
        ]

    def patch_features(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> list:
        """Per image: CLIP features [1 + rows*cols, patches, dim] of its used crops."""
        used = [1 + rows * cols for rows, cols in grids]
        dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
        num_images, num_crops = pixel_values.shape[:2]
        if self.skip_padding_crops and any(n < num_crops for n in used):
            crops = torch.cat([pixel_values[i, :n] for i, n in enumerate(used)])
            return list(self.img_processor(crops.to(dtype)).split(used))
        features = self.img_processor(pixel_values.flatten(0, 1).to(dtype))
        features = features.view(num_images, num_crops, *features.shape[1:])
        return [features[i, :n] for i, n in enumerate(used)]

    def merge_2x2(self, features: torch.Tensor) -> torch.Tensor:
        """[n, 4*s*s, d] -> [n, s, s, 4d]: each cell concatenates TL, TR, BL, BR patches."""
        n, _, dim = features.shape
        side = self.merged_side
        features = features.view(n, side, 2, side, 2, dim).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(n, side, side, 4 * dim)

    def with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """[H, W, c] -> [H * (W + 1), c] with `sub_GN` appended to every row."""
        newline = self.sub_GN[0].to(grid.dtype).expand(grid.shape[0], 1, grid.shape[-1])
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def image_sequence(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[1 + rows*cols, s, s, c] merged crops -> the image's [num_img_tokens, c] sequence."""
        side, channels = self.merged_side, merged.shape[-1]
        local = merged[1:].view(rows, cols, side, side, channels).permute(0, 2, 1, 3, 4)
        local = local.reshape(rows * side, cols * side, channels)
        separator = self.glb_GN[0].to(merged.dtype)
        return torch.cat(
            [self.with_row_separators(local), separator, self.with_row_separators(merged[0])]
        )

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """[num_images, num_crops+1, 3, H, W] + [num_images, 2] -> [sum num_img_tokens, hidden]."""
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must be [num_images, num_crops+1, 3, H, W], got {tuple(pixel_values.shape)}"
            )
        if image_sizes.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"image_sizes has {image_sizes.shape[0]} rows for {pixel_values.shape[0]} images"
            )
        grids = self.grids(image_sizes)
        features = self.patch_features(pixel_values, grids)
        target_dtype = self.img_projection[0].bias.dtype
        sequences = [
            self.image_sequence(self.merge_2x2(feats).to(target_dtype), rows, cols)
            for feats, (rows, cols) in zip(features, grids, strict=True)
        ]
        return self.img_projection(torch.cat(sequences))


class Phi3VPreTrainedModel(PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": Phi3DecoderLayer, "attentions": Phi3Attention}
    # The official checkpoint may carry the token-embedding alias and CLIP's position_ids buffer.
    _keys_to_ignore_on_load_unexpected = [
        r"model\.vision_embed_tokens\.wte\.weight",
        r"vision_model\.embeddings\.position_ids",
    ]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Phi3VImageEmbedding):
            init.normal_(module.glb_GN, mean=0.0, std=std)
            init.normal_(module.sub_GN, mean=0.0, std=std)
        elif isinstance(module, Phi3VRotaryEmbedding):
            short, long, _ = module.compute_inv_freqs(module.config)
            init.copy_(module.short_inv_freq, short)
            init.copy_(module.long_inv_freq, long)


class Phi3VModel(Phi3VPreTrainedModel):
    """Token + image embedding, Phi-3 decoder layers, final norm."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.layers = nn.ModuleList(
            [Phi3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Phi3VRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image features written into the placeholder positions."""
        placeholders = image_placeholder_mask(input_ids)
        inputs_embeds = self.embed_tokens(input_ids.clamp(min=0))  # placeholders look up row 0
        num_positions = int(placeholders.sum())
        if num_positions == 0:
            return inputs_embeds
        if pixel_values is None or image_sizes is None:
            raise ValueError(
                f"input_ids hold {num_positions} image placeholders but no pixel_values/image_sizes"
            )
        image_embeds = self.vision_embed_tokens(pixel_values, image_sizes)
        if image_embeds.shape[0] != num_positions:
            raise ValueError(
                f"input_ids hold {num_positions} image placeholders but the images give "
                f"{image_embeds.shape[0]} features (check num_crops and the image order)"
            )
        mask = placeholders.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_embeds.to(inputs_embeds.dtype))

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        packed = None
        if cache is None and attention_mask is None and position_ids is not None:
            packed = packed_sample_lengths(position_ids)
        if packed is not None:
            use_cache = False  # packed rows are for training; the mask needs cache=None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (position_ids + past_seen).unsqueeze(0)

        mask_function = (
            create_causal_mask
            if self.config.sliding_window is None
            else create_sliding_window_causal_mask
        )
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        kv_length = past_seen + inputs_embeds.shape[1]
        long_tokens = self.rotary_emb.long_tokens(packed) if packed is not None else None
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids, kv_length, long_tokens)

        hidden_states = inputs_embeds
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
        )


class Phi3VForCausalLM(Phi3VPreTrainedModel, GenerationMixin):
    """Phi-3(.5)-vision: `Phi3VModel` + `lm_head`, loss (token-level mean) and `generate()`."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        else:
            keep = logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # The LongRoPE factors switch once the sequence passes original_max_position_embeddings:
        # the cache built with the short factors is then dropped and everything (images included)
        # is re-encoded once, as the official implementation does.
        boundary = self.config.original_max_position_embeddings
        if (
            cache is not None
            and self.model.rotary_emb.rope_type == "longrope"
            and input_ids.shape[1] > boundary
            and 0 < cache.get_seq_length() <= boundary
        ):
            cache = DynamicCache(config=self.config)
            kwargs["next_sequence_length"] = None
            is_first_iteration = True
        return super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )


__all__ = [
    "Phi3VForCausalLM",
    "Phi3VModel",
    "Phi3VImageEmbedding",
    "Phi3VPreTrainedModel",
    "Phi3VRotaryEmbedding",
    "image_placeholder_mask",
    "packed_sample_lengths",
]
