"""Batched evaluation against the original's one-example-at-a-time generation (issue 6).

The original recipe evaluates DocVQA, Hateful Memes and NLVR2 with batch size 1. ``evaluate_split``
left-pads a batch and generates it in one call. This script runs ``evaluate_split`` on the same
records with several batch sizes side by side in one run and prints examples/s (wall and per
CPU-second), the speed-up over batch 1, and whether the predictions are identical.

    python benchmarks/eval_batching.py                          # tiny preset, CPU
    python benchmarks/eval_batching.py --model DIR --device cuda --num_crops 16 --records 64

Records are synthetic single-image questions (random-colour 640x480 pictures, a short question);
the model is the tiny preset unless ``--model`` names a model directory.
"""

from __future__ import annotations

import json
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import click
import torch
from PIL import Image

from phi3v_train.evaluation.evaluate import evaluate_split
from phi3v_train.loading import inference_dtype, load_for_inference
from phi3v_train.model.tiny import make_tiny


def synthesize(data_dir: Path, records: int, seed: int) -> None:
    """A one-split dataset (``bench_val.jsonl``) of single-image questions of varying length."""
    rng = random.Random(seed)
    (data_dir / "images").mkdir(parents=True)
    lines = []
    for index in range(records):
        name = f"{index:05d}.png"
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (640, 480), colour).save(data_dir / "images" / name)
        words = " ".join(
            rng.choice(["red", "green", "blue", "dark", "light"]) for _ in range(1 + index % 7)
        )
        turn = {
            "images": [name],
            "user": f"Is the picture {words}? Answer yes or no.",
            "assistant": "yes",
        }
        record = {"id": f"q{index}", "source": "bench", "conversations": [turn]}
        lines.append(json.dumps(record) + "\n")
    (data_dir / "bench_val.jsonl").write_text("".join(lines))
    (data_dir / "dataset.json").write_text(json.dumps({"name": "bench", "metrics": ["accuracy"]}))


@click.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--records", type=int, default=32, show_default=True)
@click.option("--batch_sizes", default="1,8,32", show_default=True)
@click.option("--max_new_tokens", type=int, default=64, show_default=True)
@click.option("--num_crops", type=int, default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(
    model_dir: Path | None,
    records: int,
    batch_sizes: str,
    max_new_tokens: int,
    num_crops: int,
    device: str,
    threads: int,
    seed: int,
) -> None:
    torch.set_num_threads(threads)
    sizes = [int(size) for size in batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model_dir = model_dir or make_tiny(scratch_dir / "tiny", seed=seed)
        synthesize(scratch_dir / "data", records, seed)
        dtype = inference_dtype("auto", torch.device(device))
        model, processor = load_for_inference(
            model_dir, num_crops=num_crops, dtype=dtype, device=device
        )
        evaluate_split(model, processor, scratch_dir / "data", "val", max_samples=2)  # warm-up
        rows = []
        for size in sizes:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            result = evaluate_split(
                model,
                processor,
                scratch_dir / "data",
                "val",
                batch_size=size,
                max_new_tokens=max_new_tokens,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append((size, wall, cpu, [example.prediction for example in result.examples]))

    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, device {device}, threads {threads}, {records} records, "
        f"max_new_tokens {max_new_tokens}, num_crops {num_crops}, model {model_dir.name}"
    )
    print(
        "| batch | wall s | examples/s | CPU s | examples per CPU-s | speed-up (wall) | same predictions as batch 1 |"
    )
    print("|---|---|---|---|---|---|---|")
    base_wall, base_predictions = rows[0][1], rows[0][3]
    for size, wall, cpu, predictions in rows:
        same = "yes" if predictions == base_predictions else "no"
        print(
            f"| {size} | {wall:.2f} | {records / wall:.1f} | {cpu:.2f} | {records / cpu:.1f} "
            f"| {base_wall / wall:.2f}x | {same} |"
        )


if __name__ == "__main__":
    main()
