"""A run SIGKILLed between checkpoints and resumed ends bit-identical to an uninterrupted run.

Each case trains 6 optimizer steps (gradient accumulation 2, so 2 epochs of 4 micro-batch pairs
cross an epoch boundary) with a checkpoint every 2 steps. The second run kills itself with SIGKILL
right after step 3 (fault injection through PHI3V_TRAIN_KILL_AFTER_STEP), is resumed with
``--resume`` (auto) from checkpoint-2, and its final weights must equal the first run's byte for
byte. LoRA with dropout also proves that the RNG states are restored; a DataLoader worker is
used. The full fine-tuning case is marked slow (same code path, all weights trainable).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from train_helpers import base_args, logged_losses, run_cli, tiny_model, write_dataset


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.mark.parametrize(
    ("overrides", "weights"),
    [
        pytest.param(
            {"use_lora": True, "lora_rank": 4, "lora_dropout": 0.2, "learning_rate": 1e-2},
            "adapter_model.safetensors",
            id="lora_dropout",
        ),
        pytest.param({}, "model.safetensors", id="full", marks=pytest.mark.slow),
    ],
)
def test_sigkill_and_resume_is_bit_identical(
    overrides: dict, weights: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = write_dataset(tmp_path / "data", train=8, multi_turn_every=3)
    common = dict(
        batch_size=2,
        batch_size_per_gpu=1,
        max_steps=6,
        save_steps=2,
        num_workers=1,
        seed=3,
        **overrides,
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    done = run_cli(base_args(tiny_model_dir, data, straight, **common))
    assert done.returncode == 0, done.stderr[-3000:]

    crashed = run_cli(
        base_args(tiny_model_dir, data, killed, **common),
        env={"PHI3V_TRAIN_KILL_AFTER_STEP": "3"},
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert (killed / "checkpoint-2").is_dir()
    assert not (killed / "checkpoint-4").exists()
    assert not (killed / weights).exists()

    # a run killed while saving leaves checkpoint-N.tmp: never resumed from, removed
    (killed / "checkpoint-9.tmp").mkdir()
    (killed / "checkpoint-9.tmp" / "trainer_state.json").write_text("{}")
    resumed = run_cli([*base_args(tiny_model_dir, data, killed, **common), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoint-2'} at step 2" in resumed.stderr
    assert not (killed / "checkpoint-9.tmp").exists()

    assert (killed / weights).read_bytes() == (straight / weights).read_bytes()
    losses_straight = logged_losses(straight)
    losses_resumed = logged_losses(killed)
    assert losses_resumed == losses_straight
    assert len(losses_straight) == 6


@pytest.mark.parametrize(("size", "world"), [(1, 4), (5, 2), (8, 2), (9, 3)])
def test_epoch_sampler_shards_evenly_and_skips_exactly(size: int, world: int) -> None:
    """Every rank gets as many samples, all samples are covered, the order depends only on
    (seed, epoch), and a resumed sampler is the suffix of the uninterrupted one."""
    from phi3v_train.training.train import EpochSampler

    def shard(rank: int, epoch: int = 0, skip: int = 0) -> list[int]:
        return list(EpochSampler(size, seed=5, epoch=epoch, rank=rank, world_size=world, skip=skip))

    shards = [shard(rank) for rank in range(world)]
    assert len({len(part) for part in shards}) == 1
    assert set().union(*shards) == set(range(size))
    assert shards == [shard(rank) for rank in range(world)]
    assert shard(0, skip=1) == shards[0][1:]
    if size > 4:
        assert shard(0, epoch=1) != shards[0]


def test_state_trees_round_trip_exactly_without_pickle(tmp_path: Path) -> None:
    """Optimizer, scheduler, GradScaler and RNG states (a CUDA-like list of generator states
    included) come back equal from JSON + safetensors, and the generators continue identically."""
    import random

    import numpy as np
    import torch

    from phi3v_train.training.checkpointing import (
        capture_rng_state,
        load_tree,
        restore_rng_state,
        save_tree,
    )

    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.95))
    param.grad = torch.randn(3, 2)
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trees = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "cuda_like": {"cuda": [torch.get_rng_state(), torch.get_rng_state()], "t": (1, None)},
    }
    for name, tree in trees.items():
        save_tree(tmp_path, name, tree)
        loaded = load_tree(tmp_path, name)
        assert repr(loaded) == repr(tree), name

    random.random(), np.random.rand(), torch.rand(1)
    save_tree(tmp_path, "rng", capture_rng_state())
    expected = (random.random(), np.random.normal(), torch.rand(3).tolist())
    restore_rng_state(load_tree(tmp_path, "rng"), tmp_path / "rng.json")
    assert (random.random(), np.random.normal(), torch.rand(3).tolist()) == expected
    assert not list(tmp_path.glob("*.pt"))
