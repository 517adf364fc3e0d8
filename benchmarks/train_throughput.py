"""Training throughput of Phi-3.5-vision per training mode x attention implementation.

Reproduces the original recipe's speed table (DocVQA-like load: one document image per sample,
num_crops 16, about 2443 tokens per sample, micro-batch 1, gradient checkpointing on) on our stack:

    python benchmarks/train_throughput.py --out gpu_out/throughput.md
    python benchmarks/train_throughput.py --modes full,lora --attn sdpa --steps 12
    python benchmarks/train_throughput.py --tiny          # the same code, tiny model, CPU (CI)
    python benchmarks/train_throughput.py --attn sdpa --variants \
        full,full+bf16-weights,full+liger,full+bf16-weights+liger+compile,best@4,lora,qlora

For every mode (full fine-tuning, frozen vision, LoRA r64, QLoRA nf4) and attention implementation
(eager, sdpa, flash_attention_2 when importable) it reports img/s, tokens/s, model TFLOP/s, MFU
against the GPU's dense bf16 peak and the peak GPU memory (torch.cuda.max_memory_allocated), with
the warm-up steps excluded from the timing. Model FLOPs are counted by `phi3v_train.planning.flops` (6·N per
token for trained weights, 4·N for frozen weights inside the gradient path, 2·N for frozen weights
before it, plus attention; no recomputation): about 77 TFLOP per full fine-tuning sample.

What runs:
- the model is the full-size Phi-3.5-vision architecture built from its official configuration
  (embedded below; `--config config.json` reads another file) with random weights created
  directly on the device; nothing is downloaded and ../shared is not needed;
- precision is the trainer's under `--bf16`: fp32 master weights with bf16 autocast for full and
  frozen-vision training, bf16 bases for LoRA and QLoRA; `--precision bf16` makes every weight
  bf16 (half the memory of full fine-tuning, no casts); on CPU everything is fp32;
- the samples are synthetic document pages (letter and A4 portrait pages, a landscape page) run
  through the project's real data path: `Phi3VProcessor` (the tiny preset's offline tokenizer,
  which has the official special tokens) and `encode_for_training` + `TrainCollator`; they are
  prepared once, moved to the device before timing, and reused in a fixed cycle (data loading is
  not part of the measurement);
- a training step is forward, backward, gradient clipping at 1.0 and an AdamW step, with the
  modes set up by the trainer's own code (`phi3v_train.training.strategies`);
- the trainer's speed options (issue 14) are measured as the trainer builds them:
  `--bf16-weights` (TrainConfig.bf16_weights: bf16 weights, fp32 masters in the optimizer),
  `--liger` (liger_kernel: Liger's RMSNorm / SwiGLU, CUDA only) and `--compile` (compile: each
  decoder / CLIP layer); the optimizer comes from `phi3v_train.training.optimizer.build_optimizer`
  (plain engine: fused AdamW on CUDA) and the kernels from
  `phi3v_train.training.kernels.apply_kernels`; a row whose module or package is missing says
  "not available" / "skipped" and the others still run. `--variants` lists rows as
  MODE[+OPTION...][@MICRO_BATCH] in priority order (`best@4`: the fastest full row so far, rerun
  at micro-batch 4); each row records its options, micro-batch, optimizer and kernels. Under
  `--compile` the warm-up covers every batch shape, so recompilation is not timed;
- every mode x attention combination runs in its own subprocess (`--isolate`, the default on GPU)
  so that an out-of-memory error, a missing bitsandbytes CUDA kernel or a crash becomes a row of
  the table with its error and the other rows still run.

Output: a markdown table on stdout; `--out FILE.md` also writes FILE.md and FILE.json (the rows
with every figure, the machine and the versions) and keeps one log per run in FILE_logs/.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import click
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from phi3v_data.schema import Record
from phi3v_train.data import TrainCollator, encode_for_training
from phi3v_train.loading import load_config, load_processor, training_dtype
from phi3v_train.model.configuration_phi3_v import (
    DEFAULT_EMBD_LAYER,
    DEFAULT_IMG_PROCESSOR,
    Phi3VConfig,
)
from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM
from phi3v_train.model.tiny import make_tiny
from phi3v_train.planning.flops import ModelDims, SampleShape, Training, training_flops
from phi3v_train.training.config import TrainConfig
from phi3v_train.training.strategies import (
    apply_freezing,
    apply_lora,
    param_groups,
    quantization_config,
)

MODES = ("full", "frozen-vision", "lora", "qlora")
# The trainer's speed options a row can use (TrainConfig.bf16_weights, liger_kernel, compile).
OPTIONS = ("bf16-weights", "liger", "compile")
NEEDS_CUDA = ("liger",)  # Liger's kernels are Triton: no CPU build
MIN_RUN_S = 20.0  # under --time-limit, no run starts with less time left
ATTENTIONS = ("eager", "sdpa", "flash_attention_2")
GIB = 1024**3

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name;
# the first match wins, so the specific names come before the generic ones.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)

# The original recipe's published figures (8xA100-80GB, flash attention, bf16, DocVQA-like load),
# per GPU, for the comparison column of the table.
# Peak memory of the original's LoRA / QLoRA runs (micro-batch 1), the targets of issue 14.
MEMORY_TARGET_GB = {"lora": 16, "qlora": 10}
ORIGINAL_PER_GPU = {
    "full": "1.08 img/s, ~36 GB",
    "frozen-vision": "3.96 img/s",
    "lora": "1.51 img/s, ~16 GB",
    "qlora": "1.31 img/s, ~10 GB",
}

# ---------------------------------------------------------------------------------------------
# Model configurations
# ---------------------------------------------------------------------------------------------


def _ramp(first: float, last: float, n: int = 48) -> list[float]:
    return [first + (last - first) * i / (n - 1) for i in range(n)]


def official_config() -> Phi3VConfig:
    """Phi-3.5-vision-instruct's architecture (original_recipe.md §9.1).

    The LongRoPE factor lists have the official length (48) and end points but are linear ramps in
    between: the factors change the rotary angles, not the amount of work, so speed is unaffected.
    Pass the real config.json with --config to use the exact values.
    """
    return Phi3VConfig(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "type": "su",
            "short_factor": _ramp(1.08, 9.0),
            "long_factor": _ramp(1.08, 64.84),
        },
        rope_theta=10000.0,
        sliding_window=262144,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
        attention_dropout=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        tie_word_embeddings=False,
        embd_layer=dict(DEFAULT_EMBD_LAYER),
        img_processor=dict(DEFAULT_IMG_PROCESSOR),  # CLIP ViT-L/14-336, 144 tokens per crop
    )


def resolve_config(config_file: str | None, tiny_dir: Path, tiny: bool) -> Phi3VConfig:
    """--config FILE, else the tiny preset (--tiny), else the official architecture."""
    if config_file:
        return Phi3VConfig.from_json_file(config_file)
    return load_config(tiny_dir) if tiny else official_config()


# ---------------------------------------------------------------------------------------------
# Synthetic DocVQA-like samples
# ---------------------------------------------------------------------------------------------

# (width, height) of document scans at 150 dpi. The cycle gives 2413 image tokens per sample on
# average at num_crops 16 (letter pages: 4x4 crops, 2509 tokens; A4: 4x3, 1933 tokens), which with
# a DocVQA question and answer lands at the original's 2443 tokens per sample.
PAGES = (
    ("letter", (1275, 1650)),
    ("letter", (1275, 1650)),
    ("a4", (1240, 1754)),
    ("letter", (1275, 1650)),
    ("letter-landscape", (1650, 1275)),
    ("letter", (1275, 1650)),
)
QUESTIONS = (
    ("What is the date mentioned in this letter?", "March 14, 1986"),
    ("To whom is this memorandum addressed?", "Dr. R. A. Hunter"),
    ("What is the total amount shown in the invoice?", "$1,250.00"),
    ("Which company name appears in the letterhead?", "Lorillard"),
    ("What is the title of the table on this page?", "Sales summary"),
    ("What is the page number at the bottom?", "12"),
)


def document_page(size: tuple[int, int], seed: int) -> Image.Image:
    """A white page with a header block, text lines and a small table drawn in grey."""
    generator = torch.Generator().manual_seed(seed)
    width, height = size
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    margin = width // 12
    draw.rectangle([margin, margin, width // 2, margin + height // 30], fill=(40, 40, 40))
    y = margin + height // 15
    line_height = max(height // 60, 4)
    while y < height - margin:
        length = int(torch.randint(width // 3, width - 2 * margin, (1,), generator=generator))
        draw.rectangle([margin, y, margin + length, y + line_height // 2], fill=(90, 90, 90))
        y += line_height
    for row in range(4):
        for col in range(3):
            x0 = margin + col * (width - 2 * margin) // 3
            y0 = height // 2 + row * line_height * 2
            draw.rectangle([x0, y0, x0 + width // 4, y0 + line_height * 2], outline=(0, 0, 0))
    return page


@dataclass
class Batch:
    """One collated micro-batch (CPU until moved) and the shapes of its samples."""

    inputs: dict[str, torch.Tensor]
    shapes: list[SampleShape]

    @property
    def tokens(self) -> int:
        return sum(shape.seq_len for shape in self.shapes)

    @property
    def images(self) -> int:
        return int(self.inputs["image_sizes"].shape[0])


def save_batches(batches: list[Batch], path: Path) -> None:
    """Tensors to ``path`` (safetensors), sample shapes beside it as JSON: no pickle."""
    tensors = {
        f"{i}.{key}": value for i, b in enumerate(batches) for key, value in b.inputs.items()
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    shapes = [[asdict(shape) for shape in b.shapes] for b in batches]
    path.with_suffix(".json").write_text(json.dumps(shapes))


def load_batches(path: Path) -> list[Batch]:
    """The batches :func:`save_batches` wrote."""
    tensors = load_file(str(path))
    shapes = json.loads(path.with_suffix(".json").read_text())
    return [
        Batch(
            inputs={
                key.split(".", 1)[1]: value
                for key, value in tensors.items()
                if key.split(".", 1)[0] == str(i)
            },
            shapes=[SampleShape(**shape) for shape in batch_shapes],
        )
        for i, batch_shapes in enumerate(shapes)
    ]


def sample_shape(example: dict[str, Any], crop_size: int) -> SampleShape:
    sizes = example["image_sizes"].tolist()
    crops = sum(1 + (h // crop_size) * (w // crop_size) for h, w in sizes)
    ids = example["input_ids"]
    return SampleShape(seq_len=ids.numel(), crops=crops, image_tokens=int((ids < 0).sum()))


def synthetic_batches(
    processor: Any, images_dir: Path, micro_batch: int, crop_size: int
) -> list[Batch]:
    """One pass over PAGES, encoded exactly as the trainer encodes a dataset record."""
    images_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for index, (_, size) in enumerate(PAGES):
        name = f"page{index}.png"
        document_page(size, seed=index).save(images_dir / name)
        question, answer = QUESTIONS[index % len(QUESTIONS)]
        turn = {"images": [name], "user": f"{question}\nAnswer briefly.", "assistant": answer}
        record = Record.model_validate(
            {"id": f"bench-{index}", "source": "synthetic-docvqa", "conversations": [turn]}
        )
        examples.append(encode_for_training(record, processor, images_dir))
    collate = TrainCollator(pad_token_id=processor.pad_token_id)
    return [
        Batch(
            inputs=collate(examples[start : start + micro_batch]),
            shapes=[sample_shape(ex, crop_size) for ex in examples[start : start + micro_batch]],
        )
        for start in range(0, len(examples), micro_batch)
    ]


# ---------------------------------------------------------------------------------------------
# One measurement: one mode with one attention implementation
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    mode: str
    attn: str
    device: str
    precision: str
    steps: int
    warmup: int
    micro_batch: int
    num_crops: int
    lora_rank: int
    config_dir: str
    peak_tflops: float | None
    clip_on_padding: bool = False
    checkpoint_every: int = 1
    profile_dir: str | None = None
    seed: int = 0
    bf16_weights: bool = False  # bf16 weights, fp32 masters in the optimizer (--bf16_weights)
    liger: bool = False  # Liger's RMSNorm / SwiGLU kernels (--liger_kernel)
    compile: bool = False  # torch.compile of each decoder / CLIP layer (--compile)

    @property
    def options(self) -> list[str]:
        """The trainer options this run uses, in OPTIONS order."""
        chosen = {"bf16-weights": self.bf16_weights, "liger": self.liger, "compile": self.compile}
        return [name for name in OPTIONS if chosen[name]]

    @property
    def stem(self) -> str:
        """File-name stem of this run's log and profile: mode, options, micro-batch, attention."""
        parts = [self.mode, *self.options] + ([f"mb{self.micro_batch}"] * (self.micro_batch > 1))
        return "_".join([*parts, self.attn])


@dataclass
class RunResult:
    mode: str
    attn: str
    status: str = "ok"
    error: str | None = None
    weights: str | None = None
    img_per_s: float | None = None
    tokens_per_s: float | None = None
    tflops_per_s: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    step_s_mean: float | None = None
    step_s_max: float | None = None
    cpu_s_per_step: float | None = None  # process CPU time: steadier than wall time on a busy CPU
    tokens_per_sample: float | None = None
    tflop_per_sample: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    training: dict[str, str] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)  # mean seconds per step phase
    options: list[str] = field(default_factory=list)  # trainer options used (OPTIONS)
    micro_batch: int | None = None
    kernels: list[str] = field(default_factory=list)  # what apply_kernels changed
    optimizer: str | None = None  # e.g. "MasterWeightAdamW (fused)"
    warmup_steps: int | None = None
    warmup_s: float | None = None  # untimed warm-up (torch.compile's compilation lands here)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def detect_peak_tflops(device: str) -> tuple[str, float | None]:
    """(device name, dense bf16 peak TFLOP/s or None when unknown)."""
    if not device.startswith("cuda"):
        return f"CPU ({platform.processor() or platform.machine()})", None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return name, peak
    return name, None


def trainer_config(spec: RunSpec) -> TrainConfig:
    """The trainer's configuration for this mode's flags (--bf16 on a GPU)."""
    flags = {
        "full": {},
        "frozen-vision": {"freeze_vision_model": True},
        "lora": {"use_lora": True, "lora_rank": spec.lora_rank},
        "qlora": {"use_qlora": True, "lora_rank": spec.lora_rank},
    }[spec.mode]
    return TrainConfig(
        # --bf16_weights needs --bf16; on CPU too, so that the tiny run exercises its optimizer.
        bf16=spec.device.startswith("cuda") or spec.bf16_weights,
        bf16_weights=spec.bf16_weights,
        liger_kernel=spec.liger,
        compile=spec.compile,
        **flags,
    )


def weights_dtype(spec: RunSpec, train_config: TrainConfig) -> torch.dtype:
    """The trainer's rule (phi3v_train.loading.training_dtype); --precision bf16 makes every
    weight bf16 (pure bf16 training: half the memory, no casts); so does --bf16-weights (whose
    optimizer keeps fp32 masters)."""
    if train_config.bf16 and (spec.precision == "bf16" or train_config.bf16_weights):
        return torch.bfloat16
    return training_dtype(train_config)


def build_model(config: Phi3VConfig, spec: RunSpec, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights created directly on the device."""
    with torch.device(spec.device):
        model = Phi3VForCausalLM._from_config(config, dtype=dtype, attn_implementation=spec.attn)
    model.model.vision_embed_tokens.skip_padding_crops = not spec.clip_on_padding
    return model


def quantize_nf4(model: torch.nn.Module, quantization: Any) -> None:
    """Swap every linear layer but the skipped ones (lm_head, too narrow) for a 4-bit one, in place.

    The same layers and settings `from_pretrained(..., quantization_config=...)` gives the trainer
    (transformers keeps the output embedding unquantized), without writing the random weights to
    disk to load them again.
    """
    import bitsandbytes as bnb

    skip = set(quantization.llm_int8_skip_modules)
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name in skip:
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=quantization.bnb_4bit_compute_dtype,
            compress_statistics=quantization.bnb_4bit_use_double_quant,
            quant_type=quantization.bnb_4bit_quant_type,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data,
            requires_grad=False,
            compress_statistics=quantization.bnb_4bit_use_double_quant,
            quant_type=quantization.bnb_4bit_quant_type,
            module=quantized,
        ).to(module.weight.device)
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
    model.is_loaded_in_4bit = True  # PEFT then wraps the 4-bit layers with its QLoRA adapters


def apply_mode(model: torch.nn.Module, spec: RunSpec, train_config: TrainConfig):
    """Freeze / LoRA / QLoRA with the trainer's own code; the model is PEFT-wrapped under LoRA."""
    if train_config.use_qlora:
        device = torch.device(spec.device)
        quantize_nf4(model, quantization_config(train_config, device, model.config))
    if train_config.lora:
        return apply_lora(model, train_config)
    apply_freezing(model, train_config)
    return model


def observed_training(model: torch.nn.Module, lora_rank: int) -> Training:
    """How each part of the model trains, read from the parameters' requires_grad flags."""
    parts = {
        "vision": "img_processor.",
        "projector": "img_projection.",
        "language": ".layers.",
        "lm_head": "lm_head",
    }
    found: dict[str, str] = {}
    for part, marker in parts.items():
        trainable = [n for n, p in model.named_parameters() if marker in n and p.requires_grad]
        if any("lora_" in name for name in trainable):
            found[part] = "lora"
        else:
            found[part] = "full" if trainable else "frozen"
    return Training(**found, lora_rank=lora_rank)


def move(inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Unavailable(RuntimeError):
    """A row's option cannot be measured here (its module or package is missing)."""


def train_step(model, optimizer, params, inputs, autocast, device: str, phases: list) -> float:
    """Forward, backward, clipping and AdamW step; appends (forward, backward, optimizer) seconds
    (with a device synchronisation between the phases) to `phases`; returns the loss.

    Clipping acts where the trainer's engine clips: on the fp32 masters' gradients under
    --bf16-weights (MasterWeightAdamW.master_grads), else on the parameters' own."""
    marks = [time.perf_counter()]
    with autocast:
        loss = model(**inputs).loss
    synchronize(device)
    marks.append(time.perf_counter())
    loss.backward()
    synchronize(device)
    marks.append(time.perf_counter())
    master_grads = getattr(optimizer, "master_grads", None)
    torch.nn.utils.clip_grad_norm_(master_grads() if master_grads else params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    marks.append(time.perf_counter())
    phases.append(tuple(b - a for a, b in zip(marks, marks[1:], strict=False)))
    return loss.item()


def write_profile(spec: RunSpec, step) -> None:
    """One extra (untimed) step under torch.profiler: the top operators by device time.

    A profiler that cannot run (no CUPTI, ...) leaves its error in the file, not in the row."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = spec.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    try:
        with profile(activities=activities) as prof:
            step()
        text = prof.key_averages().table(sort_by=sort_by, row_limit=25)
    except Exception as exc:  # the measurement is done; a profile is a bonus
        text = f"profiling failed: {describe_exception(exc)}"
    path = Path(spec.profile_dir) / f"{spec.stem}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    title = " + ".join([spec.mode, *spec.options]) + f" / {spec.attn}, mb {spec.micro_batch}"
    path.write_text(f"{title}, one training step, sorted by {sort_by}\n{text}\n")


def build_optimizer_for(model, train_config: TrainConfig, spec: RunSpec) -> torch.optim.Optimizer:
    """The trainer's optimizer (phi3v_train.training.optimizer.build_optimizer, plain engine:
    fused AdamW on CUDA, fp32 masters under --bf16-weights). Without that module, rows that do
    not need it get the same AdamW built here; a --bf16-weights row is unavailable."""
    try:
        from phi3v_train.training.optimizer import build_optimizer
    except ImportError as exc:
        if train_config.bf16_weights:
            raise Unavailable(f"phi3v_train.training.optimizer: {exc}") from None
        return torch.optim.AdamW(
            param_groups(model, train_config),
            lr=train_config.learning_rate,
            betas=(0.9, 0.95),
            eps=1e-7,
            fused=spec.device.startswith("cuda"),
        )
    return build_optimizer(model, train_config, torch.device(spec.device), "plain")


def apply_run_kernels(model, train_config: TrainConfig, spec: RunSpec) -> list[str]:
    """The trainer's --liger_kernel / --compile (phi3v_train.training.kernels.apply_kernels)."""
    if not (train_config.liger_kernel or train_config.compile):
        return []
    try:
        from phi3v_train.training.kernels import apply_kernels, check_kernels
    except ImportError as exc:
        raise Unavailable(f"phi3v_train.training.kernels: {exc}") from None
    try:
        check_kernels(train_config, torch.device(spec.device))
    except Exception as exc:  # PlanError: one line saying why (no CUDA, no liger_kernel)
        raise Unavailable(str(exc)) from None
    return apply_kernels(model, train_config)


def training_model(config, spec: RunSpec, train_config: TrainConfig, dtype: torch.dtype):
    """The model in this mode, with the trainer's activation checkpointing, in training mode,
    then the trainer's kernels (after checkpointing, as the trainer); returns (model, kernels)."""
    model = apply_mode(build_model(config, spec, dtype), spec, train_config)
    if spec.checkpoint_every:  # 1 = every layer, as the recipe and the trainer
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False},
            every_n_layers=spec.checkpoint_every,
        )
    model.config.use_cache = False
    model.train()
    return model, apply_run_kernels(model, train_config, spec)


def warmup_steps(spec: RunSpec, batch_count: int) -> int:
    """Untimed steps: under --compile at least one pass over every batch shape, so that no
    recompilation (the second shape marks the graphs dynamic) falls into the timed steps."""
    return max(spec.warmup, batch_count + 1) if spec.compile else spec.warmup


@dataclass
class Timings:
    step_s: list[float]
    cpu_s: list[float]
    phases: list[tuple[float, ...]]
    warmup: int
    warmup_s: float


def timed_steps(spec: RunSpec, step, inputs: list) -> Timings:
    """Wall and CPU seconds of each timed step, and its phases (warm-up steps untimed)."""
    warmup = warmup_steps(spec, len(inputs))
    timings = Timings([], [], [], warmup, 0.0)
    for index in range(warmup + spec.steps):
        synchronize(spec.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(inputs=inputs[index % len(inputs)], phases=timings.phases)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {index}")
        if index >= warmup:
            timings.step_s.append(time.perf_counter() - start)
            timings.cpu_s.append(time.process_time() - cpu_start)
        else:
            synchronize(spec.device)
            timings.warmup_s += time.perf_counter() - start
            timings.phases.clear()
    return timings


def measure(spec: RunSpec, batches: list[Batch]) -> RunResult:
    """Build, set up and train the model; time `steps` steps after the warm-up ones."""
    torch.manual_seed(spec.seed)
    config = load_config(spec.config_dir)
    train_config = trainer_config(spec)
    dtype = weights_dtype(spec, train_config)
    model, kernels = training_model(config, spec, train_config, dtype)
    autocast = torch.autocast(
        device_type=torch.device(spec.device).type,
        dtype=torch.bfloat16,
        enabled=train_config.bf16,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer_for(model, train_config, spec)
    device_batches = [(move(b.inputs, spec.device), b) for b in batches]
    # Peak memory of training only: the bf16 copy QLoRA quantizes from is gone by now.
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(spec.device)

    step = partial(train_step, model, optimizer, params, autocast=autocast, device=spec.device)
    timings = timed_steps(spec, step, [i for i, _ in device_batches])
    if spec.profile_dir:
        inputs = device_batches[0][0]
        write_profile(
            spec, partial(train_step, model, optimizer, params, inputs, autocast, spec.device, [])
        )
    timed = [
        device_batches[s % len(device_batches)][1]
        for s in range(timings.warmup, timings.warmup + spec.steps)
    ]
    result = result_row(spec, config, model, timed, timings)
    result.weights = describe_weights(dtype, train_config)
    result.kernels = kernels
    result.optimizer = describe_optimizer(optimizer)
    result.trainable_params = sum(p.numel() for p in params)
    del model, optimizer, params, device_batches
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def result_row(spec: RunSpec, config, model, timed: list[Batch], timings: Timings) -> RunResult:
    """The figures of the timed steps (FLOPs by phi3v_train.planning.flops, peak memory)."""
    elapsed = sum(timings.step_s)
    training = observed_training(model, spec.lora_rank)
    shapes = [shape for batch in timed for shape in batch.shapes]
    flops = training_flops(ModelDims.from_config(config), training, shapes)
    _, detected_peak = detect_peak_tflops(spec.device)
    peak = spec.peak_tflops or detected_peak
    tflops_per_s = flops.total / elapsed / 1e12
    phases = timings.phases
    return RunResult(
        mode=spec.mode,
        attn=spec.attn,
        options=spec.options,
        micro_batch=spec.micro_batch,
        img_per_s=sum(batch.images for batch in timed) / elapsed,
        tokens_per_s=sum(batch.tokens for batch in timed) / elapsed,
        tflops_per_s=tflops_per_s,
        mfu=tflops_per_s / peak if peak else None,
        peak_mem_gib=(
            torch.cuda.max_memory_allocated(spec.device) / GIB
            if spec.device.startswith("cuda")
            else None
        ),
        step_s_mean=elapsed / len(timings.step_s),
        step_s_max=max(timings.step_s),
        cpu_s_per_step=sum(timings.cpu_s) / len(timings.cpu_s),
        phase_s={
            name: sum(p[i] for p in phases) / len(phases)
            for i, name in enumerate(("forward", "backward", "optimizer"))
        },
        tokens_per_sample=sum(s.seq_len for s in shapes) / len(shapes),
        tflop_per_sample=flops.total / len(shapes) / 1e12,
        total_params=sum(p.numel() for p in model.parameters()),
        training={k: v for k, v in asdict(training).items() if k != "lora_rank"},
        warmup_steps=timings.warmup,
        warmup_s=timings.warmup_s,
    )


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    fused = any(group.get("fused") for group in optimizer.param_groups)
    return f"{type(optimizer).__name__} ({'fused' if fused else 'foreach'})"


def describe_weights(dtype: torch.dtype, train_config: TrainConfig) -> str:
    base = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    if train_config.use_qlora:
        base = f"nf4+{base}"
    if train_config.bf16_weights:
        base = f"{base}+fp32 masters"
    return f"{base}, bf16 autocast" if train_config.bf16 else base


def error_row(spec: RunSpec, status: str, error: str) -> RunResult:
    """A row that was not measured, with the options and micro-batch it would have used."""
    return RunResult(
        mode=spec.mode,
        attn=spec.attn,
        status=status,
        error=" ".join(error.split())[:300],
        options=spec.options,
        micro_batch=spec.micro_batch,
    )


def describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def run_in_process(spec: RunSpec, batches: list[Batch]) -> RunResult:
    try:
        return measure(spec, batches)
    except Unavailable as exc:  # the option's module or package is missing: say so, no trace
        return error_row(spec, "not available", str(exc))
    except Exception as exc:  # a failing mode is a row of the table, never the end of the run
        traceback.print_exc()
        gc.collect()
        if spec.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return error_row(spec, "error", describe_exception(exc))


def run_isolated(spec: RunSpec, batches_file: Path, log_file: Path, timeout: float) -> RunResult:
    """Run one measurement in a fresh Python process; crashes and timeouts become error rows."""
    result_file = log_file.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps({"spec": asdict(spec), "batches": str(batches_file), "out": str(result_file)}),
    ]
    with log_file.open("w") as log:
        try:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return error_row(spec, "timeout", f"no result after {timeout:.0f} s")
    if result_file.is_file():
        return RunResult(**json.loads(result_file.read_text()))
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return error_row(spec, "crash", f"exit code {proc.returncode}: {last}")


def worker(payload: str) -> None:
    """`--worker` entry: one measurement, its result written as JSON."""
    job = json.loads(payload)
    spec = RunSpec(**job["spec"])
    batches = load_batches(Path(job["batches"]))
    result = run_in_process(spec, batches)
    Path(job["out"]).write_text(json.dumps(asdict(result)))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    """Fixed digits, or three significant ones for small figures (the tiny CPU run)."""
    if value is None:
        return "–"
    return f"{value:.3g}" if 0 < abs(value) < 10 ** (2 - digits) else f"{value:.{digits}f}"


def format_table(rows: list[RunResult]) -> str:
    header = (
        "| mode | options | mb | attention | weights | img/s | tokens/s | TFLOP/s | MFU | "
        "peak GiB | s/step | fwd / bwd / opt s | warm-up s | "
        "tokens/sample | TFLOP/sample | trainable params | original (A100, per GPU) | status |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    for row in rows:
        status = row.status if row.status == "ok" else f"{row.status}: {row.error}"
        phases = " / ".join(
            _fmt(row.phase_s.get(k), 3) for k in ("forward", "backward", "optimizer")
        )
        cells = [
            row.mode,
            " + ".join(row.options) or "–",
            "–" if row.micro_batch is None else str(row.micro_batch),
            row.attn,
            row.weights or "–",
            _fmt(row.img_per_s, 3),
            _fmt(row.tokens_per_s, 0),
            _fmt(row.tflops_per_s, 1),
            "–" if row.mfu is None else f"{100 * row.mfu:.1f} %",
            _fmt(row.peak_mem_gib, 1),
            _fmt(row.step_s_mean, 3),
            phases if row.phase_s else "–",
            _fmt(row.warmup_s, 1),
            _fmt(row.tokens_per_sample, 0),
            _fmt(row.tflop_per_sample, 1),
            "–" if row.trainable_params is None else f"{row.trainable_params / 1e6:.3g} M",
            ORIGINAL_PER_GPU.get(row.mode, ""),
            status.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup_notes(rows: list[RunResult]) -> list[str]:
    """How each measured row was built: its optimizer and the kernels the trainer's code applied."""
    notes = []
    for row in rows:
        if row.status != "ok":
            continue
        name = " + ".join([row.mode, *row.options]) + f" @ mb {row.micro_batch} / {row.attn}"
        kernels = "; ".join(row.kernels) if row.kernels else "none"
        notes.append(f"- {name}: optimizer {row.optimizer}, kernels: {kernels}")
    return notes


def memory_notes(rows: list[RunResult]) -> list[str]:
    """LoRA / QLoRA at micro-batch 1 against the original's per-GPU memory (16 GB / 10 GB)."""
    notes = []
    for row in rows:
        target = MEMORY_TARGET_GB.get(row.mode)
        if target is None or row.peak_mem_gib is None or row.micro_batch != 1:
            continue
        gigabytes = row.peak_mem_gib * GIB / 1e9
        verdict = "met" if gigabytes <= target else "NOT met"
        notes.append(
            f"- {row.mode} / {row.attn}, mb 1: peak {gigabytes:.1f} GB "
            f"({row.peak_mem_gib:.1f} GiB), target <= {target} GB: {verdict}"
        )
    return notes


def environment(device: str, peak: float | None) -> dict[str, Any]:
    import peft
    import transformers

    name, detected = detect_peak_tflops(device)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "peak_bf16_tflops": peak or detected,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "flash_attn": _version("flash_attn"),
        "liger_kernel": _version("liger_kernel", "liger-kernel"),
        "triton": _version("triton"),
        "command": " ".join(["python", *sys.argv]),
    }


def _version(package: str, distribution: str | None = None) -> str | None:
    """The installed version (without importing when the distribution name is known)."""
    if distribution is not None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        return importlib.import_module(package).__version__
    except Exception:
        return None


def _split(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise click.BadParameter(f"{what} must be among {', '.join(allowed)} (got {value!r})")
    return chosen


# ---------------------------------------------------------------------------------------------
# The plan: rows as mode + trainer options @ micro-batch
# ---------------------------------------------------------------------------------------------

OPTION_ALIASES = {"bf16w": "bf16-weights", "bf16_weights": "bf16-weights", "liger_kernel": "liger"}


@dataclass(frozen=True)
class Variant:
    """One planned row: a mode with trainer options at a micro-batch (None: --micro-batch).

    `best` stands for the fastest full fine-tuning row measured before it (same attention),
    rerun with that row's options at this variant's micro-batch."""

    mode: str
    options: tuple[str, ...] = ()
    micro_batch: int | None = None
    best: bool = False


def parse_variants(text: str) -> list[Variant]:
    """'full,full+bf16-weights+liger,best@4,lora@1' -> variants: MODE[+OPTION...][@MICRO_BATCH],
    OPTION among OPTIONS (aliases bf16w, liger_kernel), MODE among MODES or 'best'."""
    variants = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        body, _, batch = item.partition("@")
        mode, *options = body.split("+")
        options = [OPTION_ALIASES.get(option, option) for option in options]
        bad = [o for o in options if o not in OPTIONS]
        if mode not in (*MODES, "best") or bad or (batch and not batch.isdigit()) or batch == "0":
            raise click.BadParameter(
                f"{item!r}: expected MODE[+OPTION...][@MICRO_BATCH] with MODE among "
                f"{', '.join(MODES)} or best, OPTION among {', '.join(OPTIONS)}"
            )
        ordered = tuple(o for o in OPTIONS if o in options)
        variants.append(Variant(mode, ordered, int(batch) if batch else None, mode == "best"))
    if not variants:
        raise click.BadParameter(f"no variant in {text!r}")
    return variants


def resolve_variant(variant: Variant, attn: str, rows: list[RunResult]) -> Variant | str:
    """The variant itself, or for `best` the fastest measured full row's options (same attention);
    a string says why there is none."""
    if not variant.best:
        return variant
    measured = [r for r in rows if r.status == "ok" and r.mode == "full" and r.attn == attn]
    if not measured:
        return "no full fine-tuning row was measured to pick the best of"
    fastest = max(measured, key=lambda r: r.tokens_per_s or 0.0)
    return Variant("full", tuple(fastest.options), variant.micro_batch)


def spec_for(base: RunSpec, variant: Variant, attn: str) -> RunSpec:
    """`base` (the command line's settings) for this variant and attention."""
    options = set(variant.options) | set(base.options)
    return replace(
        base,
        mode=variant.mode,
        attn=attn,
        micro_batch=variant.micro_batch or base.micro_batch,
        bf16_weights="bf16-weights" in options,
        liger="liger" in options,
        compile="compile" in options,
    )


class BatchStore:
    """The synthetic batches at each micro-batch, made once (and saved for isolated runs)."""

    def __init__(self, processor: Any, work: Path, crop_size: int, isolate: bool) -> None:
        self.processor, self.work, self.crop_size, self.isolate = (
            processor,
            work,
            crop_size,
            isolate,
        )
        self.made: dict[int, tuple[list[Batch], Path]] = {}

    def get(self, micro_batch: int) -> tuple[list[Batch], Path]:
        if micro_batch not in self.made:
            batches = synthetic_batches(
                self.processor, self.work / "images", micro_batch, self.crop_size
            )
            path = self.work / f"batches_mb{micro_batch}.safetensors"
            if self.isolate:
                save_batches(batches, path)
            self.made[micro_batch] = (batches, path)
        return self.made[micro_batch]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--modes", default=",".join(MODES), show_default=True, help="Comma-separated.")
@click.option(
    "--variants",
    default=None,
    help="Rows in this order instead of --modes: MODE[+OPTION...][@MICRO_BATCH], comma-separated "
    "(OPTION: bf16-weights, liger, compile); 'best@4' reruns the fastest full row so far at "
    "micro-batch 4. Example: full,full+bf16-weights,full+bf16-weights+liger,best@4,lora,qlora",
)
@click.option("--attn", default=",".join(ATTENTIONS), show_default=True, help="Comma-separated.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Timed steps [12; tiny 1].")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Untimed steps [3; tiny 1].")
@click.option("--micro-batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--num-crops", type=click.IntRange(1, 16), default=None, help="[16; tiny 2]")
@click.option("--lora-rank", type=click.IntRange(1), default=None, help="[64; tiny 8]")
@click.option(
    "--peak-tflops", type=float, default=None, help="Dense bf16 peak for MFU [detected from GPU]."
)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--tiny", is_flag=True, help="Tiny preset on CPU in fp32: exercises the code in CI.")
@click.option("--device", default=None, help="[cuda when available, else cpu]")
@click.option("--isolate/--no-isolate", default=None, help="One subprocess per run [on for GPU].")
@click.option(
    "--timeout",
    type=float,
    default=300,
    show_default=True,
    help="Per isolated run, s (twice that for --compile rows).",
)
@click.option(
    "--budget", type=float, default=None, help="Start no new run after this many seconds."
)
@click.option(
    "--time-limit",
    type=float,
    default=None,
    help="Hard end, s from the start: a run's timeout is cut to the time left, and no run starts "
    f"with less than {MIN_RUN_S:.0f} s left.",
)
@click.option("--bf16-weights", is_flag=True, help="Every row: TrainConfig.bf16_weights.")
@click.option("--liger", is_flag=True, help="Every row: TrainConfig.liger_kernel (CUDA only).")
@click.option("--compile", "compile_", is_flag=True, help="Every row: TrainConfig.compile.")
@click.option(
    "--clip-on-padding",
    is_flag=True,
    help="Run CLIP on the zero-padded crops as the official code.",
)
@click.option(
    "--precision",
    type=click.Choice(["trainer", "bf16"]),
    default="trainer",
    show_default=True,
    help="trainer: fp32 master weights for full/frozen-vision, bf16 LoRA bases (phi3v-train "
    "--bf16); bf16: every weight bf16. On CPU both mean fp32.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Gradient checkpointing of every n-th layer (1: all, as the recipe; 0: off).",
)
@click.option(
    "--profile-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Profile one extra step per run; top operators to DIR/<mode>[_<option>...]_<attn>.txt.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--worker", "worker_payload", hidden=True, default=None)
def main(worker_payload: str | None, **options: Any) -> None:
    """Training throughput per mode x attention; prints a markdown table (see module docstring)."""
    if worker_payload is not None:
        worker(worker_payload)
        return
    settings = Settings.from_options(options)
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-") as tmp:
        rows = run_plan(settings, Path(tmp))
    report(rows, settings.base.device, settings.base.peak_tflops, settings.out, echo=True)


@dataclass
class Settings:
    """The command line, resolved: the base run, the planned rows and the run limits."""

    base: RunSpec
    variants: list[Variant]
    attns: list[str]
    config_file: str | None
    tiny: bool
    isolate: bool
    timeout: float
    budget: float | None
    time_limit: float | None
    out: Path | None

    @classmethod
    def from_options(cls, o: dict[str, Any]) -> Settings:
        tiny = o["tiny"]
        device = o["device"] or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
        base = RunSpec(
            mode="full",
            attn="sdpa",
            device=device,
            precision=o["precision"],
            checkpoint_every=o["checkpoint_every"],
            profile_dir=str(o["profile_dir"]) if o["profile_dir"] else None,
            steps=o["steps"] or (1 if tiny else 12),
            warmup=o["warmup"] if o["warmup"] is not None else (1 if tiny else 3),
            micro_batch=o["micro_batch"],
            num_crops=o["num_crops"] or (2 if tiny else 16),
            lora_rank=o["lora_rank"] or (8 if tiny else 64),
            config_dir="",
            peak_tflops=o["peak_tflops"],
            clip_on_padding=o["clip_on_padding"],
            bf16_weights=o["bf16_weights"],
            liger=o["liger"],
            compile=o["compile_"],
        )
        if o["variants"]:
            variants = parse_variants(o["variants"])
        else:
            variants = [Variant(mode) for mode in _split(o["modes"], MODES, "--modes")]
        isolate = device.startswith("cuda") if o["isolate"] is None else o["isolate"]
        return cls(
            base=base,
            variants=variants,
            attns=_split(o["attn"], ATTENTIONS, "--attn"),
            config_file=o["config_file"],
            tiny=tiny,
            isolate=isolate,
            timeout=o["timeout"],
            budget=o["budget"],
            time_limit=o["time_limit"],
            out=o["out"],
        )


def run_plan(settings: Settings, work: Path) -> list[RunResult]:
    """Every planned row (attention-major, variants in order), the report rewritten after each."""
    started = time.monotonic()
    tiny_dir = make_tiny(work / "tiny")
    config = resolve_config(settings.config_file, tiny_dir, settings.tiny)
    config.save_pretrained(work / "config")
    base = replace(settings.base, config_dir=str(work / "config"))
    processor = load_processor(tiny_dir, base.num_crops)
    store = BatchStore(processor, work, config.vision_config.image_size, settings.isolate)
    logs_dir = None
    if settings.isolate:
        out = settings.out
        logs_dir = out.with_name(out.stem + "_logs") if out else work / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
    rows: list[RunResult] = []
    # Attention-major: with a --budget, the implementations listed last are the ones cut.
    for attention in settings.attns:
        for variant in settings.variants:
            chosen = resolve_variant(variant, attention, rows)
            if isinstance(chosen, str):
                spec = spec_for(base, Variant("full", (), variant.micro_batch), attention)
                rows.append(error_row(spec, "skipped", f"best: {chosen}"))
                continue
            spec = spec_for(base, chosen, attention)
            batches, batches_file = store.get(spec.micro_batch)
            limits = RunLimits(settings.timeout, settings.budget, settings.time_limit, started)
            rows.append(run_one(spec, batches, batches_file, logs_dir, limits))
            report(rows, base.device, base.peak_tflops, settings.out, echo=False)
    return rows


@dataclass
class RunLimits:
    """Per-run timeout (doubled under --compile), --budget and --time-limit, from `started`."""

    timeout: float
    budget: float | None = None
    time_limit: float | None = None
    started: float = field(default_factory=time.monotonic)

    def refusal(self) -> str | None:
        """Why no run may start now, or None."""
        elapsed = time.monotonic() - self.started
        if self.budget is not None and elapsed > self.budget:
            return f"time budget of {self.budget:.0f} s spent"
        if self.time_limit is not None and self.time_limit - elapsed < MIN_RUN_S:
            return f"less than {MIN_RUN_S:.0f} s left of the {self.time_limit:.0f} s limit"
        return None

    def run_timeout(self, spec: RunSpec) -> float:
        timeout = self.timeout * (2 if spec.compile else 1)
        if self.time_limit is not None:
            timeout = min(timeout, self.time_limit - (time.monotonic() - self.started))
        return timeout


def precheck(spec: RunSpec) -> str | None:
    """Why this row cannot run on this machine (a 'skipped' row), or None."""
    on_gpu = spec.device.startswith("cuda")
    if spec.attn == "flash_attention_2" and not flash_attn_available():
        return "flash_attn is not installed"
    if not on_gpu and any(getattr(spec, option) for option in NEEDS_CUDA):
        return "needs CUDA (Liger's kernels are Triton)"
    if spec.liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    if spec.mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def run_one(
    spec: RunSpec,
    batches: list[Batch],
    batches_file: Path,
    logs_dir: Path | None,
    limits: RunLimits,
) -> RunResult:
    """One row: skipped when it cannot run here or the time is spent, else measured."""
    name = " + ".join([spec.mode, *spec.options]) + f" @ mb {spec.micro_batch} / {spec.attn}"
    why = precheck(spec) or limits.refusal()
    if why is not None:
        click.echo(f"[bench] {name}: skipped: {why}", err=True)
        return error_row(spec, "skipped", why)
    click.echo(f"[bench] {name} ...", err=True)
    if logs_dir is not None:
        row = run_isolated(
            spec, batches_file, logs_dir / f"{spec.stem}.log", limits.run_timeout(spec)
        )
    else:
        row = run_in_process(spec, batches)
    click.echo(f"[bench] {name}: {row.status} {row.error or ''}", err=True)
    return row


def report(
    rows: list[RunResult], device: str, peak: float | None, out: Path | None, echo: bool
) -> None:
    """The table on stdout (echo) and, with --out, FILE.md and FILE.json (rewritten per row)."""
    table = format_table(rows)
    notes = memory_notes(rows)
    if notes:
        table += "\n\nMemory targets (the original's LoRA / QLoRA per GPU):\n" + "\n".join(notes)
    setups = setup_notes(rows)
    if setups:
        table += "\n\nSet-up of each measured row:\n" + "\n".join(setups)
    if echo:
        click.echo(table)
    if out is None:
        return
    env = environment(device, peak)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"Device: {env['device']} (dense bf16 peak {env['peak_bf16_tflops']} TFLOP/s); "
        f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, "
        f"flash_attn {env['flash_attn']}, liger_kernel {env['liger_kernel']}; {env['date']}\n\n"
        f"Command: `{env['command']}`\n\n"
    )
    _write_atomic(out, header + table + "\n")
    payload = {"environment": env, "rows": [asdict(row) for row in rows]}
    _write_atomic(out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()
