"""Helpers of the trainer tests: a tiny model (built once per session) and toy datasets on disk.

The toy task is learnable in a few steps: the answer is the colour of a flat image (``red`` /
``blue``), and text-only records answer a fixed question. Records mix one image, two images on
two turns, and no image, so every batch shape the trainer must handle occurs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def write_dataset(
    root: Path,
    *,
    name: str = "toy",
    train: int = 8,
    val: int = 2,
    text_only_every: int = 4,
    multi_turn_every: int = 0,
    only_text: bool = False,
) -> Path:
    """Write ``root/images/*.png``, ``<name>_train.jsonl`` and ``<name>_val.jsonl``; return root."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # separate files: validate refuses images shared with val
        for colour, rgb in COLOURS.items():
            Image.new("RGB", (336, 336), rgb).save(images / f"{split}_{colour}.png")
    colours = list(COLOURS)
    for split, count in (("train", train), ("val", val)):
        lines = []
        for index in range(count):
            colour = colours[index % 2]
            if only_text or (text_only_every and index % text_only_every == text_only_every - 1):
                turns = [{"images": [], "user": "Say the word yes.", "assistant": "yes"}]
            else:
                turns = [
                    {
                        "images": [f"{split}_{colour}.png"],
                        "user": "What colour is it?",
                        "assistant": colour,
                    }
                ]
                if multi_turn_every and index % multi_turn_every == 0:
                    other = colours[(index + 1) % 2]
                    turns.append(
                        {
                            "images": [f"{split}_{other}.png"],
                            "user": "And this one?",
                            "assistant": other,
                        }
                    )
            record = {"id": f"{split}-{index}", "source": "toy", "conversations": turns}
            lines.append(json.dumps(record))
        (root / f"{name}_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run_cli(args: list[str], *, env: dict | None = None, timeout: int = 600, launcher=None):
    """Run ``phi3v-train ARGS`` (or ``launcher + ARGS``) in a subprocess; return CompletedProcess."""
    command = launcher if launcher is not None else [sys.executable, "-m", "phi3v_train"]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO_ROOT,
    )


def train_in_process(model_dir: Path, data: Path, out: Path, **overrides: object) -> list[float]:
    """Train in this process with fast CPU defaults (no eval, no workers, no tensorboard, no
    checkpointing of activations) and ``overrides``; return the logged loss of every step."""
    from phi3v_train.training.config import TrainConfig
    from phi3v_train.training.train import train

    options: dict = dict(
        model_name_or_path=str(model_dir),
        data_dir=data,
        output_dir=out,
        num_crops=1,
        batch_size=2,
        batch_size_per_gpu=2,
        max_steps=6,
        learning_rate=3e-3,
        num_workers=0,
        report_to="none",
        tqdm=False,
        skip_eval_before=True,
        skip_eval_after=True,
        gradient_checkpointing=False,
        seed=0,
    )
    options.update(overrides)
    train(TrainConfig(**options))
    return [loss for _, loss in logged_losses(out)]


def logged_losses(out: Path) -> list[list[float]]:
    """The ``[step, loss]`` pairs a finished run wrote to ``trainer_state.json``."""
    return json.loads((out / "trainer_state.json").read_text())["losses"]


def assert_resume_is_bit_identical(
    model_dir: Path,
    data: Path,
    root: Path,
    options: dict,
    *,
    kill_after: int,
    weights: str = "model.safetensors",
) -> list[list[float]]:
    """Train ``options`` straight through, then again SIGKILLed after step ``kill_after`` and
    resumed: the weights must be byte-identical and the losses equal. Returns the losses."""
    straight, killed = root / "straight", root / "killed"
    done = run_cli(base_args(model_dir, data, straight, **options))
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = run_cli(
        base_args(model_dir, data, killed, **options),
        env={"PHI3V_TRAIN_KILL_AFTER_STEP": str(kill_after)},
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    resumed = run_cli([*base_args(model_dir, data, killed, **options), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert (killed / weights).read_bytes() == (straight / weights).read_bytes()
    assert logged_losses(killed) == logged_losses(straight)
    return logged_losses(straight)


def base_args(model_dir: Path, data_dir: Path, out_dir: Path, **overrides: object) -> list[str]:
    """A fast CPU run: num_crops 1, no workers, no eval, no tensorboard, no progress bar."""
    options: dict[str, object] = {
        "model_name_or_path": model_dir,
        "data_dir": data_dir,
        "output_dir": out_dir,
        "num_crops": 1,
        "batch_size": 2,
        "batch_size_per_gpu": 2,
        "learning_rate": 1e-3,
        "num_workers": 0,
        "report_to": "none",
        "seed": 0,
    }
    options.update(overrides)
    args = ["--no-tqdm", "--skip_eval_before", "--skip_eval_after"]
    for key, value in options.items():
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--no-{key}")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


_TINY_CACHE: dict[str, Path] = {}


def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, written once per test process (call it from a module's fixture)."""
    if "dir" not in _TINY_CACHE:
        from phi3v_train.model.tiny import make_tiny

        _TINY_CACHE["dir"] = make_tiny(tmp_path_factory.mktemp("tiny") / "model")
    return _TINY_CACHE["dir"]
