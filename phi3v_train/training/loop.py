"""The training loop: data order, one micro-batch, one optimizer step. No engine branches.

:func:`train_loop` walks epochs and micro-batches; :func:`micro_step` is the whole batch -> loss ->
backward path (extend it there, e.g. for packing); :func:`optimizer_step` averages the window's
loss over ranks, stops on a non-finite one, and lets the engine step. ``on_step`` (logging,
checkpoints, fault injection) is called after every optimizer step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from phi3v_train.distributed import all_reduce_mean
from phi3v_train.training.checkpointing import TrainerState
from phi3v_train.training.engines import Engine
from phi3v_train.training.run_plan import RunPlan, TrainingError


class EpochSampler(Sampler[int]):
    """This rank's share of a (seed, epoch) permutation, from micro-batch ``skip_batches`` on.

    The permutation is padded (wrapping around) to a multiple of the world size so that every rank
    sees the same number of batches; rank r takes positions r, r + world, ...
    """

    def __init__(
        self, size: int, *, seed: int, epoch: int, rank: int, world_size: int, skip: int = 0
    ) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(size, generator=generator).tolist()
        padded = math.ceil(size / world_size) * world_size
        while len(order) < padded:  # fewer records than processes: wrap around again
            order += order[: padded - len(order)]
        self.indices = order[rank::world_size][skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Any, collator: Any, plan: RunPlan, state: TrainerState, rank: int):
    """The DataLoader of ``state.epoch`` from the micro-batch where ``state`` stands."""
    config = plan.config
    sampler = EpochSampler(
        len(dataset),
        seed=config.seed,
        epoch=state.epoch,
        rank=rank,
        world_size=plan.world_size,
        skip=state.batches_done * config.batch_size_per_gpu,
    )
    return DataLoader(
        dataset,
        batch_size=config.batch_size_per_gpu,
        sampler=sampler,
        collate_fn=collator,
        num_workers=config.num_workers,
        prefetch_factor=2 if config.num_workers else None,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(config.seed * 100_003 + state.epoch),
        pin_memory=torch.cuda.is_available(),
    )


def micro_step(engine: Engine, batch: dict[str, Any], window: int, boundary: bool) -> float:
    """Forward and backward of one micro-batch (loss / window); return its unscaled loss."""
    batch = engine.prepare(batch)
    with engine.accumulate(boundary):
        with engine.autocast():
            loss = engine.model(**batch).loss
        engine.backward(loss / window)
    return float(loss.detach())


def optimizer_step(engine: Engine, state: TrainerState, window_losses: list[float]) -> float:
    """The window's mean loss over ranks; the engine's step unless it is not finite."""
    step_loss = all_reduce_mean(sum(window_losses) / len(window_losses), engine.dist.device)
    if not math.isfinite(step_loss):  # same value on every rank: all stop together
        raise TrainingError(
            f"step {state.global_step + 1}: the training loss is {step_loss}; stopped before the "
            "optimizer step, nothing of this step was saved (lower --learning_rate, try --bf16 "
            "or check the data)"
        )
    engine.step()
    state.global_step += 1
    state.losses.append([state.global_step, step_loss])
    return step_loss


def train_loop(
    engine: Engine,
    plan: RunPlan,
    dataset: Any,
    collator: Any,
    state: TrainerState,
    on_step: Callable[[TrainerState, float], None],
) -> None:
    """Train from ``state`` to ``plan.total_steps`` (exactly resumable at any step)."""
    engine.model.train()
    while state.global_step < plan.total_steps and state.epoch < plan.num_epochs:
        window_losses: list[float] = []
        for batch in make_loader(dataset, collator, plan, state, engine.dist.rank):
            window_start = state.batches_done - state.batches_done % plan.accumulation
            window = min(plan.accumulation, plan.batches_per_epoch - window_start)
            state.batches_done += 1
            boundary = state.batches_done == window_start + window
            window_losses.append(micro_step(engine, batch, window, boundary))
            if not boundary:
                continue
            step_loss = optimizer_step(engine, state, window_losses)
            window_losses = []
            if state.batches_done >= plan.batches_per_epoch:
                state.epoch += 1
                state.batches_done = 0
            on_step(state, step_loss)
            if state.global_step >= plan.total_steps or state.epoch >= plan.num_epochs:
                break
            if state.batches_done == 0:
                break  # the epoch ended with this step: rebuild the loader for the next one
