"""FSDP2 (``--fsdp``) with torchrun, 2 CPU processes (gloo): the same losses as DDP, and a run
SIGKILLed between checkpoints and resumed from its sharded checkpoint ends bit-identical.

The dataset mixes text-only and image batches, so at some steps one rank has no image: FSDP then
gets the masked dummy image row (every rank runs the vision layers it all-gathers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from train_helpers import base_args, logged_losses, run_cli, tiny_model, write_dataset

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python"]
COMMON = dict(
    batch_size=4,
    batch_size_per_gpu=1,
    max_steps=4,
    learning_rate=1e-3,
    gradient_checkpointing=False,
    seed=1,
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("fsdp") / "data", train=6, text_only_every=3)


def _torchrun(args: list[str], env: dict | None = None):
    import os

    path = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return run_cli(args, launcher=[*TORCHRUN, "phi3v-train"], env={**path, **(env or {})})


def test_fsdp_losses_equal_ddp_and_resume_is_bit_identical(
    tmp_path: Path, tiny_model_dir: Path, data: Path
) -> None:
    ddp, fsdp, killed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "killed"
    done = _torchrun(base_args(tiny_model_dir, data, ddp, **COMMON))
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = _torchrun([*base_args(tiny_model_dir, data, fsdp, **COMMON), "--fsdp"])
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert "engine fsdp" in sharded.stderr and "engine ddp" in done.stderr
    ddp_losses, fsdp_losses = logged_losses(ddp), logged_losses(fsdp)
    assert len(fsdp_losses) == 4
    for (step_a, a), (step_b, b) in zip(ddp_losses, fsdp_losses, strict=True):
        assert step_a == step_b and abs(a - b) < 1e-4, (ddp_losses, fsdp_losses)
    assert (fsdp / "model.safetensors").is_file()

    args = [*base_args(tiny_model_dir, data, killed, save_steps=2, **COMMON), "--fsdp"]
    crashed = _torchrun(args, env={"PHI3V_TRAIN_KILL_AFTER_STEP": "3"})
    assert crashed.returncode != 0
    shards = killed / "checkpoint-2" / "shards"
    assert sorted(p.name for p in shards.iterdir() if p.suffix == ".safetensors") == [
        "optimizer_rank_0.safetensors",
        "optimizer_rank_1.safetensors",
        "rank_0.safetensors",
        "rank_1.safetensors",
    ]
    assert json.loads((shards / "rank_1.json").read_text())  # placements, plain JSON
    assert not [p for p in killed.rglob("*") if p.suffix in (".pt", ".bin", ".metadata")]
    resumed = _torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    assert logged_losses(killed) == fsdp_losses
    assert (killed / "model.safetensors").read_bytes() == (fsdp / "model.safetensors").read_bytes()


def test_fsdp_refused_with_deepspeed_or_qlora(tmp_path: Path, tiny_model_dir: Path) -> None:
    for extra in (["--deepspeed", "zero2"], ["--use_qlora"]):
        args = [*base_args(tiny_model_dir, tmp_path, tmp_path / "o"), "--fsdp", *extra]
        result = run_cli(args)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and "--fsdp cannot run with" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
