"""The GPUs ``phi3v-train plan`` knows, and the ``--gpus`` spec that names them.

A spec is ``NxNAME`` (``8xV100-32GB``, ``1xH100``, case-insensitive; a name may be an unambiguous
prefix of one in :data:`GPUS`) or ``Nxcustom:MEMORY:PRECISION:ATTENTION:TFLOPS`` for a card not in
the table, e.g. ``2xcustom:48GiB:bf16:flash:312`` (memory in GiB or GB, ``bf16`` or ``fp16``,
``flash`` or ``sdpa``, dense 16-bit tensor-core TFLOP/s).

Memory is what ``torch.cuda.get_device_properties(...).total_memory`` reports, in GiB. Peaks are
dense (no sparsity) 16-bit tensor-core TFLOP/s with fp32 accumulation, the precision PyTorch
uses: bf16 where the card has it, else fp16. bf16 and flash attention 2 need Ampere or newer
(compute capability 8.0+); Volta (V100) and Turing (T4, RTX 8000) get fp16 and SDPA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One GPU model: memory (GiB), bf16 and flash-attention support, dense 16-bit peak."""

    name: str
    memory_gib: float
    bf16: bool
    flash: bool
    dense_tflops: float


GPUS: tuple[Gpu, ...] = (
    Gpu("H200", 139.8, True, True, 989.0),
    Gpu("H100-80GB", 79.6, True, True, 989.0),  # SXM; the PCIe card peaks at 756
    Gpu("A100-80GB", 79.3, True, True, 312.0),
    Gpu("A100-40GB", 39.4, True, True, 312.0),
    Gpu("L40S", 44.4, True, True, 362.0),
    Gpu("A10G", 22.5, True, True, 70.0),
    Gpu("RTX4090", 23.6, True, True, 165.2),
    Gpu("RTX3090", 23.7, True, True, 71.0),
    Gpu("RTX8000", 47.5, False, False, 130.5),
    Gpu("V100-32GB", 31.7, False, False, 125.0),
    Gpu("V100-16GB", 15.8, False, False, 125.0),
    Gpu("T4", 14.6, False, False, 65.0),
)

_SPEC = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\S+)\s*$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(GiB|GB)$", re.IGNORECASE)
SPEC_HELP = "NxNAME (e.g. 8xV100-32GB, 1xH100) or Nxcustom:MEMORY:bf16|fp16:flash|sdpa:TFLOPS"


@dataclass(frozen=True)
class GpuSpec:
    """``count`` GPUs of one model."""

    count: int
    gpu: Gpu

    def __str__(self) -> str:
        return f"{self.count}x{self.gpu.name}"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_gpu(name: str) -> Gpu:
    """The table entry called ``name`` (dashes, spaces and case ignored; unique prefixes too)."""
    key = _key(name)
    exact = [gpu for gpu in GPUS if _key(gpu.name) == key]
    if exact:
        return exact[0]
    matches = [gpu for gpu in GPUS if key and _key(gpu.name).startswith(key)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(gpu.name for gpu in GPUS)
    if matches:
        names = ", ".join(gpu.name for gpu in matches)
        raise ValueError(f"GPU {name!r} is ambiguous: {names}")
    raise ValueError(f"unknown GPU {name!r}; known: {known}; or custom:MEMORY:bf16:flash:TFLOPS")


def _custom(text: str) -> Gpu:
    fields = text.split(":")
    if len(fields) != 5:
        raise ValueError(f"custom GPU {text!r}: expected custom:MEMORY:bf16|fp16:flash|sdpa:TFLOPS")
    _, memory, precision, attention, tflops = (field.strip() for field in fields)
    match = _MEMORY.match(memory)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"custom GPU memory {memory!r}: expected e.g. 48GiB or 48GB")
    size = float(match.group(1))
    memory_gib = size if match.group(2).lower() == "gib" else size * GB / GIB
    if precision.lower() not in ("bf16", "fp16"):
        raise ValueError(f"custom GPU precision {precision!r}: expected bf16 or fp16")
    if attention.lower() not in ("flash", "sdpa"):
        raise ValueError(f"custom GPU attention {attention!r}: expected flash or sdpa")
    bf16 = precision.lower() == "bf16"
    if attention.lower() == "flash" and not bf16:
        raise ValueError("custom GPU: flash attention needs bf16 (it does not run in fp16)")
    try:
        peak = float(tflops)
    except ValueError:
        peak = float("nan")
    if not peak > 0 or peak == float("inf"):
        raise ValueError(f"custom GPU TFLOPS {tflops!r}: expected a positive number")
    return Gpu(f"custom-{memory}", round(memory_gib, 2), bf16, attention.lower() == "flash", peak)


def parse_gpus(spec: str) -> GpuSpec:
    """Parse a ``--gpus`` spec; :class:`ValueError` with a one-line reason when it is wrong."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"--gpus {spec!r}: expected {SPEC_HELP}")
    count = int(match.group(1))
    if not 1 <= count <= 4096:
        raise ValueError(f"--gpus {spec!r}: the GPU count must be between 1 and 4096")
    name = match.group(2)
    gpu = _custom(name) if name.lower().startswith("custom:") else find_gpu(name)
    return GpuSpec(count, gpu)
