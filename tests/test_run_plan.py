"""The run plan: one resolution of every value, written to train_config.yaml with no null for
anything the run resolved, and ``--config OUT/train_config.yaml`` repeating the run exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from train_helpers import base_args, logged_losses, run_cli, tiny_model, write_dataset

from phi3v_data.schema import DatasetInfo
from phi3v_train.options import DEFAULT_NUM_CROPS
from phi3v_train.training.config import TrainConfig
from phi3v_train.training.run_plan import (
    PlanError,
    resolve_attention,
    resolve_compile,
    resolve_eval_split,
    resolve_num_crops,
    resolve_plan,
)

RESOLVED = ("eval_split", "num_crops", "attn", "use_lora", "vision_lr", "projector_lr")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


def test_resolution_rules() -> None:
    assert resolve_num_crops(None, None) == DEFAULT_NUM_CROPS
    assert resolve_num_crops(None, DatasetInfo(num_crops=4)) == 4
    assert resolve_num_crops(2, DatasetInfo(num_crops=4)) == 2
    assert resolve_attention(None) == "sdpa" and resolve_attention("eager", True) == "eager"
    info = DatasetInfo(unlabeled_splits=["test"])
    assert resolve_eval_split(None, {"train": 1, "test": 2}, info) is None
    assert resolve_eval_split(None, {"train": 1, "dev": 2, "test": 3}, info) == "dev"
    assert resolve_eval_split("none", {"val": 1}, info) is None
    with pytest.raises(PlanError, match="no split 'x'"):
        resolve_eval_split("x", {"val": 1}, info)


def test_plan_resolves_every_value_and_the_schedule() -> None:
    config = TrainConfig(batch_size=8, batch_size_per_gpu=2, warmup_steps=50, use_dora=True)
    plan = resolve_plan(config, DatasetInfo(num_crops=4), {"train": 1, "val": 2}, 2, cuda=False)
    assert (plan.accumulation, plan.engine, plan.precision) == (2, "ddp", "fp32")
    assert (plan.num_crops, plan.attn, plan.eval_split, plan.lora) == (4, "sdpa", "val", True)
    plan = plan.with_schedule(records=37)  # 19 per rank, 10 micro-batches, 5 steps per epoch
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (10, 5, 5)
    assert plan.warmup == 0 and plan.config.max_steps == 5 and plan.config.warmup_steps == 0
    written = yaml.safe_load(plan.to_yaml())
    assert all(written[key] is not None for key in (*RESOLVED, "max_steps", "warmup_steps"))
    with pytest.raises(PlanError, match="not divisible by world size 3"):
        resolve_plan(config, DatasetInfo(), {"train": 1}, 3, cuda=False)


def test_rerun_from_train_config_yaml_repeats_the_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_dataset(tmp_path / "data", train=6)
    first, again = tmp_path / "first", tmp_path / "again"
    args = base_args(tiny_model_dir, data, first, num_train_epochs=2, warmup_steps=3)
    done = run_cli([*args, "--no-gradient_checkpointing"])
    assert done.returncode == 0, done.stderr[-3000:]
    written = yaml.safe_load((first / "train_config.yaml").read_text())
    assert all(written[key] is not None for key in (*RESOLVED, "max_steps", "warmup_steps"))
    assert (written["num_crops"], written["attn"], written["eval_split"]) == (1, "sdpa", "val")
    assert (written["max_steps"], written["warmup_steps"]) == (6, 0)
    repeat = run_cli(
        ["--config", str(first / "train_config.yaml"), "--output_dir", str(again), "--no-tqdm"]
    )
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    assert logged_losses(again) == logged_losses(first)
    assert yaml.safe_load((again / "train_config.yaml").read_text()) == {
        **written,
        "output_dir": str(again),
    }


def test_compile_default_follows_the_measurement() -> None:
    full = TrainConfig(data_dir="d")
    assert resolve_compile(full, "plain", cuda=True) and resolve_compile(full, "ddp", cuda=True)
    assert not resolve_compile(full, "plain", cuda=False)  # CPU: compile time outweighs the gain
    assert not resolve_compile(full, "deepspeed", cuda=True)  # not measured compiled
    assert not resolve_compile(full, "fsdp", cuda=True)
    assert not resolve_compile(TrainConfig(data_dir="d", use_lora=True), "ddp", cuda=True)
    assert not resolve_compile(TrainConfig(data_dir="d", compile=False), "ddp", cuda=True)
    assert resolve_compile(TrainConfig(data_dir="d", compile=True), "plain", cuda=False)
