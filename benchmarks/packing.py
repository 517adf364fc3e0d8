"""Packed vs padded training side by side (issue 14): tokens/s, real-token share, peak memory and
the step losses of both, on the same samples in the same order, in one run.

    python benchmarks/packing.py                       # tiny preset on CPU (the CI-sized run)
    python benchmarks/packing.py --model full --device cuda --out gpu_out/packing.md

Loads (synthetic, through the real data path: `Phi3VProcessor` + `encode_for_training`):
- `docvqa`: one document page per sample at num_crops 16 (about 1,900-2,600 tokens), short
  question and answer;
- `short-mix`: UCF-101-like samples of 1-3 video frames (320x240) at num_crops 4 plus memes-like
  samples of one picture of varied aspect ratio with a caption, short answers.

A step is forward + backward of one micro-batch with the step-level token-mean loss
(`phi3v_train.training.packing.step_loss_sum_and_count`) and an AdamW step; packed micro-batches
come from `PackingCollator`, padded ones from `TrainCollator`. The first step is a warm-up and is
not timed. On CPU each (load, mode) runs in its own fresh Python process whose peak RSS
(ru_maxrss from wait4) is reported; on CUDA the peak is torch.cuda.max_memory_allocated.
`--model full` builds the Phi-3.5-vision architecture with random bf16 weights directly on the
device (gradient checkpointing on, fused AdamW on CUDA); the default is the tiny preset in float32.
Micro-batches: docvqa 4, short-mix 8 (issue 14's target: packed >= 1.5x the padded tokens/s on the
short-answer mix, with the same losses; the report says whether it is met). With `--out` the
table is rewritten after every (load, mode), so a run stopped at a time limit keeps what finished;
on CUDA the samples are encoded once per load and shared by both modes.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import document_page, official_config  # noqa: E402

from phi3v_data.schema import Record  # noqa: E402
from phi3v_train.data import TrainCollator, encode_for_training  # noqa: E402
from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM  # noqa: E402
from phi3v_train.model.processing_phi3_v import Phi3VProcessor  # noqa: E402
from phi3v_train.model.tiny import make_tiny  # noqa: E402
from phi3v_train.training.packing import (  # noqa: E402
    PackingCollator,
    sample_lengths,
    step_loss_sum_and_count,
)

LOADS = {"docvqa": (16, 4), "short-mix": (4, 8)}  # name -> (num_crops, micro-batch)


@dataclass
class ModeResult:
    load: str
    mode: str
    steps: int
    micro_batch: int = 0
    real_tokens: int = 0
    slot_tokens: int = 0
    seconds: float = 0.0
    peak_mib: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else 0.0

    @property
    def real_share(self) -> float:
        return self.real_tokens / self.slot_tokens if self.slot_tokens else 0.0


def docvqa_records(images: Path, count: int, rng: random.Random) -> list[Record]:
    sizes = [(612, 792), (595, 842), (842, 595)]
    records = []
    for i in range(count):
        document_page(rng.choice(sizes), seed=i).save(images / f"page{i}.png")
        turn = {"images": [f"page{i}.png"], "user": "What is the total?", "assistant": "42"}
        records.append(Record(id=f"doc{i}", source="bench", conversations=[turn]))
    return records


def short_mix_records(images: Path, count: int, rng: random.Random) -> list[Record]:
    records = []
    for i in range(count):
        if i % 2 == 0:
            frames = [f"v{i}_{k}.png" for k in range(rng.randint(1, 3))]
            for k, name in enumerate(frames):
                Image.new("RGB", (320, 240), (30 * k, 90, 160)).save(images / name)
            turn = {"images": frames, "user": "Which action is shown?", "assistant": "rowing"}
        else:
            size = rng.choice([(500, 400), (300, 600), (800, 300), (336, 336)])
            Image.new("RGB", size, (200, 40 * (i % 5), 90)).save(images / f"m{i}.png")
            user = "Is this meme hateful? Caption: " + "words " * rng.randint(2, 30)
            turn = {"images": [f"m{i}.png"], "user": user, "assistant": "no"}
        records.append(Record(id=f"s{i}", source="bench", conversations=[turn]))
    return records


def build_examples(load: str, tiny_dir: Path, work: Path, count: int) -> list[dict[str, Any]]:
    num_crops, _ = LOADS[load]
    processor = Phi3VProcessor.from_pretrained(tiny_dir)
    processor.image_processor.num_crops = num_crops
    images = work / load
    images.mkdir(parents=True, exist_ok=True)
    make = docvqa_records if load == "docvqa" else short_mix_records
    records = make(images, count, random.Random(0))
    return [encode_for_training(record, processor, images) for record in records]


def build_model(kind: str, tiny_dir: Path, device: str, attn: str) -> Phi3VForCausalLM:
    """The tiny preset in fp32, or the full-size architecture with random bf16 weights made
    directly on the device (no fp32 copy first) and gradient checkpointing on."""
    torch.manual_seed(0)
    if kind == "tiny":
        model = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn)
        return model.to(device).train()
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(
            official_config(), dtype=torch.bfloat16, attn_implementation=attn
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def run_mode(model, batches: list[list[dict]], packing: bool, device: str, result: ModeResult):
    """Train on `batches` (same samples and order for both modes); fill `result`."""
    collator = PackingCollator(0) if packing else TrainCollator(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    for index, examples in enumerate(batches):
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(examples).items()
        }
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total, count = step_loss_sum_and_count(model, [batch], reduce=lambda n: n)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        result.losses.append(total / count)
        if index == 0:
            continue  # warm-up
        result.seconds += time.perf_counter() - start
        lengths = sample_lengths(batch)
        result.real_tokens += sum(lengths)
        result.slot_tokens += batch["input_ids"].numel()


@functools.cache
def cached_examples(load: str, tiny_dir: Path, work: Path, count: int) -> list[dict[str, Any]]:
    """The encoded samples of a load, made once per process (padded and packed share them)."""
    return build_examples(load, tiny_dir, work, count)


def measure_here(load, mode, kind, tiny_dir, work, steps, device, attn) -> ModeResult:
    """One (load, mode) in this process: same samples and order for both modes."""
    micro = LOADS[load][1]
    examples = cached_examples(load, tiny_dir, work, micro * steps)
    batches = [examples[i : i + micro] for i in range(0, len(examples), micro)]
    result = ModeResult(load=load, mode=mode, steps=len(batches) - 1, micro_batch=micro)
    if device == "cuda":
        gc.collect()  # the previous (load, mode)'s model and optimizer are gone before the reset
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(kind, tiny_dir, device, attn)
    run_mode(model, batches, mode == "packed", device, result)
    if device == "cuda":
        result.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    del model
    return result


def measure_isolated(load, mode, kind, tiny_dir, work, steps, device, attn) -> ModeResult:
    """The same in a fresh process (CPU): its own peak RSS, read with wait4."""
    command = [sys.executable, __file__, "--worker", f"{load}:{mode}", "--work", str(work)]
    command += ["--model", kind, "--device", device, "--attn", attn, "--steps", str(steps)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    payload = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = status  # reaped here: keep Popen from waiting again
    if status or not payload.strip():
        raise click.ClickException(f"{load}/{mode}: the measuring process failed ({status})")
    result = ModeResult(**json.loads(payload.strip().splitlines()[-1]))
    result.peak_mib = usage.ru_maxrss / 1024  # kB on Linux
    return result


def format_table(rows: list[ModeResult]) -> str:
    lines = [
        "| load | mode | micro-batch | timed steps | real tokens | tokens/s | real-token share | "
        "peak MiB | loss per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        losses = ", ".join(f"{loss:.6f}" for loss in row.losses)
        lines.append(
            f"| {row.load} | {row.mode} | {row.micro_batch} | {row.steps} | {row.real_tokens} | "
            f"{row.tokens_per_s:,.0f} | {100 * row.real_share:.1f} % | {row.peak_mib:,.0f} | "
            f"{losses} |"
        )
    return "\n".join(lines)


# Issue 14's target: packing the short-answer mix at micro-batch 8 trains >= 1.5x the tokens/s.
TARGET_SPEEDUP = {"short-mix": 1.5}


def speedups(rows: list[ModeResult]) -> list[str]:
    """Per load with both modes measured: the tokens/s ratio and the largest loss difference."""
    out = []
    for load in dict.fromkeys(row.load for row in rows):
        pair = {r.mode: r for r in rows if r.load == load}
        if set(pair) != {"padded", "packed"}:
            continue
        padded, packed = pair["padded"], pair["packed"]
        diffs = [abs(a - b) for a, b in zip(padded.losses, packed.losses, strict=True)]
        worst = max(diffs, default=0.0)
        relative = max(
            (d / abs(a) for d, a in zip(diffs, padded.losses, strict=True) if a), default=0.0
        )
        ratio = packed.tokens_per_s / padded.tokens_per_s if padded.tokens_per_s else 0.0
        line = (
            f"- {load} (micro-batch {padded.micro_batch}): packed/padded tokens/s {ratio:.2f}x; "
            f"max |loss difference| {worst:.2e} (relative {relative:.2e})"
        )
        target = TARGET_SPEEDUP.get(load)
        if target is not None:
            line += f"; target >= {target}x: {'met' if ratio >= target else 'NOT met'}"
        out.append(line)
    return out


def environment(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(["python", *sys.argv]),
    }


@click.command()
@click.option("--loads", default="docvqa,short-mix", show_default=True, help="In this order.")
@click.option("--model", "kind", type=click.Choice(["tiny", "full"]), default="tiny")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--attn", default="sdpa", show_default=True)
@click.option("--steps", default=4, show_default=True, help="Steps per mode, the first untimed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--worker", default=None, hidden=True, help="LOAD:MODE (internal: one isolated run)")
@click.option("--work", type=click.Path(path_type=Path), default=None, hidden=True)
def main(
    loads: str,
    kind: str,
    device: str,
    attn: str,
    steps: int,
    out: Path | None,
    worker: str | None,
    work: Path | None,
) -> None:
    if worker is not None:
        load, mode = worker.split(":")
        result = measure_here(load, mode, kind, work / "tiny", work, steps, device, attn)
        print(json.dumps(asdict(result)))
        return
    unknown = [load for load in loads.split(",") if load not in LOADS]
    if unknown:
        raise click.BadParameter(f"unknown load {unknown[0]!r}; known: {', '.join(LOADS)}")
    measure = measure_here if device == "cuda" else measure_isolated
    rows: list[ModeResult] = []
    env = environment(device)
    with tempfile.TemporaryDirectory() as work_dir:
        tiny_dir = make_tiny(Path(work_dir) / "tiny", seed=0)
        for load in loads.split(","):
            for mode in ("padded", "packed"):
                rows.append(
                    measure(load, mode, kind, tiny_dir, Path(work_dir), steps, device, attn)
                )
                click.echo(format_table(rows[-1:]).splitlines()[-1], err=True)
                write_report(rows, env, out)  # a run cut short keeps its finished rows
    click.echo(f"{render(rows)}\n\n{json.dumps(env)}")


def render(rows: list[ModeResult]) -> str:
    return "\n".join([format_table(rows), "", *speedups(rows)])


def write_report(rows: list[ModeResult], env: dict[str, Any], out: Path | None) -> None:
    """OUT.md (the table and the ratios) and OUT.json (every figure and the environment)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows) + "\n")
    rows_json = [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows]
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows_json}, indent=1))


if __name__ == "__main__":
    main()
