"""The main job on an embedded default: ``make demo`` (``python -m tools.demo``).

Runs the whole product offline on this machine, each step as the real command a user would type:

1. ``phi3v-data synth ucf101``   — a synthetic video set in the official UCF-101 layout;
2. ``phi3v-data convert ucf101`` — frames sampled into the conversations-jsonl format;
3. ``phi3v-data validate``       — every record and image checked;
4. ``phi3v-train make-tiny``     — a tiny Phi-3-V initialised from scratch, with a tokenizer built
   offline (no hub);
5. ``phi3v-train``               — fine-tuning, with task accuracy on the held-out test split
   before and after training.

Why these sizes (see README "The demo"): 4 classes that differ in colour, shape and direction of
motion; 2 frames per video with ``num_crops=1`` (each frame is one 336×336 global view plus one
crop: 313 image tokens) keep a sample near 680 tokens; the randomly initialised CLIP tower is frozen
(its random features still separate colours and shapes), so only its forward pass is paid; 8 clips
per group give the tiny language model enough variety to spell the class names on unseen groups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run; :data:`FULL` is ``make demo``, :data:`QUICK` the CI test."""

    classes: int = 4
    groups: int = 6
    clips: int = 8
    frames: int = 2
    max_steps: int = 150
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0


FULL = DemoSettings()
QUICK = DemoSettings(max_steps=90)  # the CI test (tests/test_demo.py)


def _bin(name: str) -> str:
    """The console script installed next to this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _run(step: str, command: list[str], log_dir: Path) -> float:
    """Run one step, streaming its output; stop the demo with the step's log on failure."""
    click.secho(f"\n==> {step}", bold=True)
    click.echo("    $ " + " ".join(command))
    started = time.perf_counter()
    log_path = log_dir / f"{step.split()[0].lower()}.log"
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            click.echo("    " + line.rstrip("\n"))
        code = process.wait()
    elapsed = time.perf_counter() - started
    if code != 0:
        click.secho(f"{step} failed (exit {code}); full log: {log_path}", fg="red", err=True)
        sys.exit(code)
    return elapsed


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _accuracy(path: Path) -> float | None:
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8")).get("metrics", {})
    value = metrics.get("accuracy")
    return None if value is None else float(value)


def run_demo(out: Path, settings: DemoSettings = FULL) -> dict[str, object]:
    """Run the pipeline into ``out`` and return the report (also written to ``out/report.json``)."""
    if out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    raw, data, model, run = out / "raw", out / "data", out / "tiny_model", out / "run"
    data_cli, train_cli = _bin("phi3v-data"), _bin("phi3v-train")
    timings = {}
    started = time.perf_counter()
    timings["synth"] = _run(
        "Synthesize raw videos (official UCF-101 layout)",
        [
            data_cli, "synth", "ucf101", "--out", str(raw),
            "--classes", str(settings.classes), "--groups", str(settings.groups),
            "--clips", str(settings.clips), "--seed", str(settings.seed),
        ],
        logs,
    )  # fmt: skip
    timings["convert"] = _run(
        "Convert with the ucf101 converter",
        [
            data_cli, "convert", "ucf101", str(raw), "--out_dir", str(data),
            "--num_frames", str(settings.frames), "--seed", str(settings.seed), "--workers", "2",
        ],
        logs,
    )  # fmt: skip
    timings["validate"] = _run("Validate the dataset", [data_cli, "validate", str(data)], logs)
    timings["make-tiny"] = _run(
        "Make-tiny model from scratch",
        [train_cli, "make-tiny", str(model), "--seed", str(settings.seed)],
        logs,
    )
    timings["train"] = _run(
        "Train and evaluate before/after",
        [
            train_cli, "--data_dir", str(data), "--model_name_or_path", str(model),
            "--output_dir", str(run), "--num_crops", "1",
            "--batch_size", str(settings.batch_size),
            "--batch_size_per_gpu", str(settings.batch_size),
            "--learning_rate", str(settings.learning_rate), "--max_steps", str(settings.max_steps),
            "--seed", str(settings.seed), "--eval_split", "test", "--max_new_tokens", "16",
            "--freeze", "vision", "--no-gradient_checkpointing", "--num_workers", "1",
            "--report_to", "none", "--logging_steps", "10", "--no-tqdm",
        ],
        logs,
    )  # fmt: skip
    splits = {
        path.stem.rsplit("_", 1)[-1]: _count_lines(path) for path in sorted(data.glob("*.jsonl"))
    }
    report = {
        "dataset": str(data),
        "records_per_split": splits,
        "steps": settings.max_steps,
        "seconds": {name: round(value, 1) for name, value in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "accuracy_before": _accuracy(run / "eval_before.json"),
        "accuracy_after": _accuracy(run / "eval_after.json"),
        "output_dir": str(run),
        "loss_curve": str(run / "loss_curve.png"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


@click.command()
@click.option(
    "--output_dir",
    type=click.Path(path_type=Path),
    default=Path("demo_output"),
    show_default=True,
    help="Where every step writes (the trainer's name for an output folder).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), hidden=True, help="Deprecated: --output_dir."
)
@click.option("--quick", is_flag=True, help="The reduced pipeline the test suite runs.")
def main(output_dir: Path, out: Path | None, quick: bool) -> None:
    """Synthesize → convert → validate → train a tiny Phi-3-V → evaluate, offline."""
    if out is not None:
        click.echo("note: --out is deprecated; use --output_dir", err=True)
        output_dir = out
    report = run_demo(output_dir, QUICK if quick else FULL)
    click.secho("\n==> Report", bold=True)
    sizes = ", ".join(f"{split} {count}" for split, count in report["records_per_split"].items())
    click.echo(f"    records          {sizes}")
    click.echo(f"    training steps   {report['steps']}")
    click.echo(f"    wall time        {report['total_seconds']} s  {report['seconds']}")
    click.echo(f"    accuracy before  {report['accuracy_before']}")
    click.echo(f"    accuracy after   {report['accuracy_after']}")
    click.echo(f"    outputs          {report['output_dir']} (loss_curve.png, eval_*.json)")


if __name__ == "__main__":
    main()
