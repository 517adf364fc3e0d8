"""Model FLOPs of one Phi-3-V training sample, for throughput and MFU figures.

The count follows the usual "6·N·tokens" convention, made exact per part of the model:

- a weight matrix of shape (in, out) applied to t tokens costs 2·t·in·out FLOPs forward;
- backward, the gradient with respect to its input costs the same again and is needed whenever
  gradients flow through the part (some trainable parameter sits in this part or before it in the
  graph); the gradient with respect to the weight costs the same again and is needed only when the
  weight itself trains. So a trained part costs 6·N·t, a frozen part inside the gradient path
  4·N·t (LoRA's frozen base weights) and a frozen part before every trainable one 2·N·t (the CLIP
  tower when the vision model is frozen);
- a LoRA adapter of rank r on an (in, out) matrix adds 2·t·r·(in + out) forward and twice that
  backward;
- attention scores and the weighted sum of values cost 2·2·t²·d forward for the bidirectional CLIP
  tower and half of that, 2·t·(t + 1)·d, for the causal language model (only the pairs the mask
  keeps); backward costs twice the forward;
- element-wise work (norms, activations, softmax, rotary embeddings, the embedding lookup) is not
  counted, and neither is the recomputation of gradient checkpointing: these are model FLOPs, not
  hardware FLOPs;
- only useful work counts: the CLIP layers the output depends on (all but the last, the model
  takes the penultimate hidden state), real crops only (not the zero padding up to num_crops + 1)
  and real tokens only (no padding of a batch).

Full fine-tuning of one DocVQA-like sample of Phi-3.5-vision (2443 tokens, a 4×4 crop grid)
costs about 76 TFLOP this way, the figure the original speed table implies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

PartTraining = Literal["full", "frozen", "lora"]


@dataclass(frozen=True)
class ModelDims:
    """The sizes the FLOP count needs; the defaults are Phi-3.5-vision-instruct's."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_num_layers: int = 24
    vision_layer_idx: int = -2
    patch_size: int = 14
    image_size: int = 336

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers whose output reaches the projector (23 of 24 for layer_idx -2)."""
        if self.vision_layer_idx < 0:
            return self.vision_num_layers + self.vision_layer_idx + 1
        return self.vision_layer_idx

    @property
    def patches_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """Reads a ``Phi3VConfig`` (its CLIP tower is the sub-config ``vision_config``)."""
        vision = config.vision_config
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_num_layers=vision.num_hidden_layers,
            vision_layer_idx=config.vision_feature_layer,
            patch_size=vision.patch_size,
            image_size=vision.image_size,
        )


@dataclass(frozen=True)
class Training:
    """How each part of the model trains: fully, frozen, or through LoRA adapters of lora_rank."""

    vision: PartTraining
    projector: PartTraining
    language: PartTraining
    lm_head: PartTraining
    lora_rank: int = 64


@dataclass(frozen=True)
class SampleShape:
    """One sample as the model sees it.

    seq_len: real tokens of the language-model sequence (text and image placeholders);
    crops: real CLIP crops (per image one global view plus h_crop·w_crop local crops);
    image_tokens: rows the projector maps (the sum of the images' num_img_tokens).
    """

    seq_len: int
    crops: int
    image_tokens: int


@dataclass
class Flops:
    """FLOPs of a training step, split into forward and backward and by part of the model."""

    forward: float = 0.0
    backward: float = 0.0
    by_part: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class _Matrix:
    d_in: int
    d_out: int
    lora_target: bool = True


@dataclass(frozen=True)
class _Block:
    part: str
    matrices: tuple[_Matrix, ...]
    tokens: int
    attention_forward: float = 0.0


def _blocks(dims: ModelDims, sample: SampleShape) -> list[_Block]:
    """The model's blocks in graph order, each with the tokens that pass through it."""
    d, v = dims.vision_hidden_size, dims.vision_intermediate_size
    patches = dims.patches_per_crop
    crop_tokens = patches + 1  # the CLS token rides along through the encoder
    vision_tokens = sample.crops * crop_tokens
    head_dim = dims.hidden_size // dims.num_attention_heads
    kv = dims.num_key_value_heads * head_dim
    h, t = dims.hidden_size, sample.seq_len
    patch_embedding = _Block(
        "vision",
        (_Matrix(3 * dims.patch_size**2, d, lora_target=False),),
        sample.crops * patches,
    )
    vision_layer = _Block(
        "vision",
        (_Matrix(d, d), _Matrix(d, d), _Matrix(d, d), _Matrix(d, d), _Matrix(d, v), _Matrix(v, d)),
        vision_tokens,
        attention_forward=sample.crops * 2 * 2 * crop_tokens**2 * d,
    )
    projector = _Block(
        "projector", (_Matrix(4 * d, h), _Matrix(h, h)), sample.image_tokens if sample.crops else 0
    )
    decoder_layer = _Block(
        "language",
        (
            _Matrix(h, h + 2 * kv),
            _Matrix(h, h),
            _Matrix(h, 2 * dims.intermediate_size),
            _Matrix(dims.intermediate_size, h),
        ),
        t,
        attention_forward=2 * t * (t + 1) * h,
    )
    lm_head = _Block("lm_head", (_Matrix(h, dims.vocab_size),), t)
    return [
        patch_embedding,
        *[vision_layer] * dims.vision_layers_used,
        projector,
        *[decoder_layer] * dims.num_hidden_layers,
        lm_head,
    ]


def training_flops(dims: ModelDims, training: Training, samples: Iterable[SampleShape]) -> Flops:
    """Model FLOPs of one forward and backward pass over ``samples`` (see the module docstring)."""
    flops = Flops()
    r = training.lora_rank
    for sample in samples:
        grad_flows = False
        for block in _blocks(dims, sample):
            how: PartTraining = getattr(training, block.part)
            grad_flows = grad_flows or how != "frozen"
            dense = sum(2 * block.tokens * m.d_in * m.d_out for m in block.matrices)
            lora = 0.0
            if how == "lora":
                lora = sum(
                    2 * block.tokens * r * (m.d_in + m.d_out)
                    for m in block.matrices
                    if m.lora_target
                )
            forward = dense + block.attention_forward + lora
            backward = 0.0
            if grad_flows:
                backward += dense + 2 * block.attention_forward + 2 * lora
            if how == "full":
                backward += dense
            flops.forward += forward
            flops.backward += backward
            flops.by_part[block.part] = flops.by_part.get(block.part, 0.0) + forward + backward
    return flops
