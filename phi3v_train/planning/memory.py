"""Peak GPU memory of one training process, from parameter counts and the sample's shape.

The dtype rules are the trainer's (``phi3v_train/training/train.py``):

- **without DeepSpeed**, full and frozen-vision fine-tuning keep fp32 weights (4 B) under bf16 or
  fp16 autocast; LoRA bases are bf16 under ``--bf16``, else fp32; QLoRA stores its linear layers
  in nf4 (0.5625 B) and the rest in bf16 (fp32 without ``--bf16``). Trained weights (LoRA adapters
  too: PEFT keeps them fp32) get an fp32 gradient (4 B) and AdamW's fp32 m and v (8 B). The
  trainer's AdamW is ``fused=True`` on CUDA (:mod:`phi3v_train.training.optimizer`): no scratch.
  PyTorch's default *foreach* kernels (``Setup(fused_adamw=False)``) allocate one fp32 scratch
  tensor per parameter of the group being stepped (``_foreach_sqrt`` of v): 4 B per parameter of
  the largest group at the optimizer step. DDP (more than one GPU) keeps its own gradient
  buckets, a second fp32 copy of every gradient;
- **DeepSpeed** casts the whole module to bf16 (fp16 without ``--bf16``): 2 B per weight.
  ZeRO-2 keeps 2 B gradients of every trained weight and shards fp32 master, m, v and fp32
  gradient partitions (16 B) over the GPUs; ZeRO-3 also shards the 2 B weights and gathers the
  largest module whole (DeepSpeed's own estimate, ``estimate_zero{2,3}_model_states_mem_needs``),
  plus the reduce / all-gather buckets of our presets (5e8 elements each, 2 B);
- **FSDP2** (``--fsdp``, planned with ``--bf16`` only) shards the weights as loaded (the dtype
  rules above), their fp32 gradients, m, v and the foreach scratch (FSDP's AdamW is not fused)
  over the GPUs; the bf16 mixed-precision policy gathers whole layers in bf16 (the root unit, the
  running layer, the prefetched one and the reduce-scatter of a layer's gradients).

Activations, per sample, with non-reentrant checkpointing on every layer: the saved input of each
decoder layer (t·h) and, when gradients flow through CLIP, of each CLIP layer it uses
(crops·577·d), in the residual stream's dtype (fp32 beside fp32 weights, else 16-bit); the logits
and their fp32 loss copies (t·vocab·10 B); the working set of the one layer being recomputed
(decoder (7h + 3i)·t·4 B, CLIP (8d + 2i)·crops·577·4 B). The peak is the static memory plus the
larger of the activations and the optimizer's scratch. CUDA context (:data:`CUDA_CONTEXT_GIB`)
and the caching allocator's slack (:data:`ALLOCATOR_SLACK`) come on top of the allocated peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from phi3v_train.planning.flops import ModelDims, SampleShape
from phi3v_train.planning.sizes import NF4_BYTES_PER_PARAM, ModelSizes

Mode = Literal["full", "frozen-vision", "lora", "qlora"]
Engine = Literal["ddp", "zero2", "zero3", "fsdp"]
MODES: tuple[Mode, ...] = ("full", "frozen-vision", "lora", "qlora")
ENGINES: tuple[Engine, ...] = ("ddp", "zero2", "zero3", "fsdp")

GIB = 2**30
#: CUDA context, cuBLAS / cuDNN workspaces: present on the GPU, outside PyTorch's allocator.
CUDA_CONTEXT_GIB = 0.75
#: Reserved-but-unallocated share of the caching allocator (fragmentation) over the allocated peak.
ALLOCATOR_SLACK = 0.05
#: Elements in each DeepSpeed bucket of our presets (reduce_bucket_size, allgather_bucket_size).
ZERO_BUCKET = 5e8
#: Bytes per logit: bf16/fp16 logits (2) plus the fp32 copy and its gradient in the loss (8).
LOGIT_BYTES = 10
#: The trainer's AdamW (plain / DDP) is ``fused=True`` on CUDA: see the module docstring.
TRAINER_FUSED_ADAMW = True


@dataclass(frozen=True)
class Setup:
    """One way to train: mode, engine, number of GPUs, 16-bit type, micro-batch."""

    mode: Mode
    engine: Engine
    world_size: int
    bf16: bool
    micro_batch: int
    fused_adamw: bool = TRAINER_FUSED_ADAMW


@dataclass(frozen=True)
class Memory:
    """Peak bytes of one process by kind, in GiB."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    optimizer_scratch: float
    buffers: float  # DDP gradient buckets or ZeRO buckets and gathered modules

    @property
    def allocated(self) -> float:
        """What ``torch.cuda.max_memory_allocated`` would report."""
        static = self.weights + self.gradients + self.optimizer + self.buffers
        return static + max(self.activations, self.optimizer_scratch)

    @property
    def peak(self) -> float:
        """What the GPU must hold: the allocated peak, the allocator's slack, the CUDA context."""
        return self.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB

    def to_json(self) -> dict[str, float]:
        data = {key: round(value, 2) for key, value in asdict(self).items()}
        return {**data, "allocated": round(self.allocated, 2), "peak": round(self.peak, 2)}


def trained_params(sizes: ModelSizes, mode: Mode) -> int:
    if mode == "full":
        return sizes.total
    if mode == "frozen-vision":
        return sizes.projector + sizes.llm
    return sizes.lora()


def _vision_trains(mode: Mode) -> bool:
    return mode in ("full", "lora", "qlora")


def _base_weight_bytes(sizes: ModelSizes, setup: Setup) -> float:
    """Bytes of the model's own weights (adapters apart) on one GPU."""
    if setup.engine == "fsdp":
        return _ddp_weight_bytes(sizes, setup) / setup.world_size
    if setup.engine != "ddp":
        per_gpu = sizes.total / setup.world_size if setup.engine == "zero3" else sizes.total
        return 2.0 * per_gpu
    return _ddp_weight_bytes(sizes, setup)


def _ddp_weight_bytes(sizes: ModelSizes, setup: Setup) -> float:
    if setup.mode == "qlora":
        rest = 2.0 if setup.bf16 else 4.0
        return sizes.quantized * NF4_BYTES_PER_PARAM + (sizes.total - sizes.quantized) * rest
    if setup.mode == "lora" and setup.bf16:
        return 2.0 * sizes.total
    return 4.0 * sizes.total


def activation_bytes(dims: ModelDims, sample: SampleShape, mode: Mode, residual: int) -> float:
    """Activations of one sample at the peak (see the module docstring); residual: 2 or 4 B."""
    t, h = sample.seq_len, dims.hidden_size
    crop_tokens = sample.crops * (dims.patches_per_crop + 1)
    d, i_vision = dims.vision_hidden_size, dims.vision_intermediate_size
    saved = dims.num_hidden_layers * t * h * residual
    if _vision_trains(mode):
        saved += dims.vision_layers_used * crop_tokens * d * residual
    logits = t * dims.vocab_size * LOGIT_BYTES
    decoder_work = t * (7 * h + 3 * dims.intermediate_size) * 4
    clip_work = crop_tokens * (8 * d + 2 * i_vision) * 4
    return saved + logits + max(decoder_work, clip_work)


def estimate(sizes: ModelSizes, setup: Setup, sample: SampleShape) -> Memory:
    """Peak memory of one process of ``setup`` training on samples shaped like ``sample``."""
    n, mode = setup.world_size, setup.mode
    trained = trained_params(sizes, mode)
    adapters = mode in ("lora", "qlora")
    weights = _base_weight_bytes(sizes, setup)
    scratch = 0.0
    if setup.engine in ("ddp", "fsdp"):
        shards = n if setup.engine == "fsdp" else 1
        weights += 4.0 * trained / shards if adapters else 0.0
        gradients, optimizer = 4.0 * trained / shards, 8.0 * trained / shards
        if setup.engine == "fsdp" or not setup.fused_adamw:
            scratch = 4.0 * _largest_group(sizes, mode) / shards
        if setup.engine == "fsdp":
            root = sizes.total - sizes.layers
            buffers = 2.0 * (root + 3 * sizes.largest_layer)
            residual = 2 if setup.bf16 else 4
        else:
            buffers = 4.0 * trained if n > 1 else 0.0
            residual = 2 if (adapters and setup.bf16) else 4
    else:
        gradients = 2.0 * trained if setup.engine == "zero2" else 2.0 * trained / n
        optimizer = 16.0 * trained / n
        buckets = 2.0 * min(ZERO_BUCKET, trained) * 2
        gathered = 4.0 * sizes.largest_module if setup.engine == "zero3" else 0.0
        buffers = buckets + gathered
        residual = 2
    activations = setup.micro_batch * activation_bytes(sizes.dims, sample, mode, residual)
    return Memory(
        weights=weights / GIB,
        gradients=gradients / GIB,
        optimizer=optimizer / GIB,
        activations=activations / GIB,
        optimizer_scratch=scratch / GIB,
        buffers=buffers / GIB,
    )


def _largest_group(sizes: ModelSizes, mode: Mode) -> int:
    if mode == "full":
        return sizes.largest_group_full
    if mode == "frozen-vision":
        return sizes.largest_group_frozen_vision
    return max(sizes.lora_llm, sizes.lora_vision, sizes.lora_projector)
