"""torchrun with 2 CPU processes (gloo): both launch forms, mixed text-only / image batches,
DDP and DeepSpeed ZeRO-2 (CPU, 2 processes) giving the same weights.

The mixed dataset has two records, one with images on two turns and one text-only, and a global
batch of 2 on 2 processes: at every step one rank trains on text only. Without the trainer's
zero-weighted parameter term DDP stops with "Expected to have finished reduction"; without the
dummy image row ZeRO-2 silently reduces mismatched gradient buckets (its weights then differ from
DDP's).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    REPO_ROOT,
    base_args,
    logged_losses,
    run_cli,
    tiny_model,
    write_dataset,
)

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


def _env() -> dict[str, str]:
    import os

    return {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _mixed_run(tmp_path: Path, model_dir: Path, name: str, **extra: object) -> dict:
    """Train on the mixed dataset with torchrun (2 processes); return the final weights."""
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, train=2, text_only_every=2, multi_turn_every=2)
    out = tmp_path / name
    options = dict(batch_size=2, batch_size_per_gpu=1, num_train_epochs=3, learning_rate=1e-3)
    result = run_cli(
        base_args(model_dir, data, out, **options, **extra),
        launcher=[*TORCHRUN, "--no-python", "phi3v-train"],
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr
    assert len(logged_losses(out)) == 3 and all(math.isfinite(v) for _, v in logged_losses(out))
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    return _mixed_run(tmp_path_factory.mktemp("ddp"), tiny_model_dir, "ddp")


def test_mixed_batches_under_ddp(ddp_weights: dict, tiny_model_dir: Path) -> None:
    """One rank trains on text only at every step; DDP neither hangs nor crashes, and trains."""
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert base.keys() == ddp_weights.keys()
    assert not torch.equal(base["lm_head.weight"], ddp_weights["lm_head.weight"])
    clip = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(base[clip], ddp_weights[clip])  # the image rank's gradients arrived


def test_mixed_batches_under_zero2_match_ddp(
    ddp_weights: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """DeepSpeed ZeRO-2 on 2 CPU processes (its first use on a machine compiles DeepSpeed's
    shared-memory op, minutes) gives DDP's weights on the same mixed batches."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    zero2 = _mixed_run(tmp_path, tiny_model_dir, "zero2", deepspeed="zero2")
    assert zero2.keys() == ddp_weights.keys()
    for key, value in ddp_weights.items():
        torch.testing.assert_close(zero2[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_documented_torchrun_line_from_a_checkout(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`torchrun --nproc_per_node=2 phi3v-train ...` runs the repository's launcher script; LoRA
    under DDP, with the evaluations before and after training sharded over both ranks."""
    data = write_dataset(tmp_path / "data", train=4, text_only_every=2)
    out = tmp_path / "out"
    args = base_args(
        tiny_model_dir, data, out, batch_size=4, batch_size_per_gpu=1, use_lora=True, lora_rank=4
    )
    args.remove("--skip_eval_after")
    args.remove("--skip_eval_before")
    result = run_cli(
        [*args, "--eval_max_samples", "2", "--max_new_tokens", "4"],
        launcher=[*TORCHRUN, "phi3v-train"],
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (REPO_ROOT / "phi3v-train").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    for name in ("eval_before.json", "eval_after.json"):
        assert "accuracy" in json.loads((out / name).read_text())["metrics"]


def test_documented_torchrun_line_on_a_converted_dataset(tmp_path: Path, tiny_model_dir: Path):
    """The README's literal line trains on a dataset made by `phi3v-data synth` + `convert`.

    With more than 256 distinct images the up-front validation checks them on worker processes
    (spawn, since torch is loaded), and a spawned child re-imports the launcher script as
    __main__: the script must not start training again there (it did before its __main__ guard).
    """
    raw, data, out = tmp_path / "raw", tmp_path / "data", tmp_path / "out"
    data_cli = str(BIN / "phi3v-data")
    synth = [data_cli, "synth", "ucf101", "--out", str(raw), "--classes", "2", "--groups", "3"]
    convert = [data_cli, "convert", "ucf101", str(raw), "--out_dir", str(data)]
    for command in ([*synth, "--clips", "6"], [*convert, "--num_frames", "8"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert sum(1 for _ in (data / "images").rglob("*.jpg")) > 256

    args = base_args(tiny_model_dir, data, out, batch_size=2, batch_size_per_gpu=1, max_steps=2)
    result = run_cli(args, launcher=[*TORCHRUN, "phi3v-train"], env=_env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("training: ") == 1, result.stderr[-4000:]
    assert len(logged_losses(out)) == 2
    assert (out / "model.safetensors").is_file()
