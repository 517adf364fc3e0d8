"""The training loop: data order, one micro-batch, one optimizer step. No engine branches.

:func:`train_loop` walks epochs and optimizer steps; :func:`step_windows` groups the loader's
micro-batches by optimizer step; :func:`micro_step` is the whole batch -> loss -> backward path;
:func:`optimizer_step` reduces the step's loss and token counts over ranks, stops on a non-finite
loss, and lets the engine step. ``on_step`` (logging, checkpoints, fault injection) is called
after every optimizer step with a :class:`StepResult`.

Loss: the mean over every supervised token of the optimizer step, across its micro-batches and
ranks, whatever the micro-batches hold (padded, packed, token-budget batches): each micro-batch
backpropagates its summed token loss over the step's supervised-token count
(`phi3v_train.training.packing.step_scaled_loss`), counted before the first backward.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from phi3v_train.distributed import all_reduce_sums
from phi3v_train.training.batching import TokenBudgetBatchSampler, TokenReport, step_token_report
from phi3v_train.training.checkpointing import TrainerState
from phi3v_train.training.engines import Engine
from phi3v_train.training.packing import (
    is_packed,
    sample_lengths,
    step_scaled_loss,
    step_token_count,
)
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


def epoch_batch_sampler(
    dataset: Any, plan: RunPlan, epoch: int, rank: int, skip: int = 0
) -> TokenBudgetBatchSampler:
    """`--max_tokens_per_batch`: this rank's token-budget micro-batches of ``epoch``."""
    config = plan.config
    return TokenBudgetBatchSampler(
        dataset.token_lengths(),
        config.max_tokens_per_batch,
        seed=config.seed,
        epoch=epoch,
        packing=config.packing,
        rank=rank,
        world_size=plan.world_size,
        skip=skip,
    )


def make_loader(dataset: Any, collator: Any, plan: RunPlan, state: TrainerState, rank: int):
    """The DataLoader of ``state.epoch`` from the micro-batch where ``state`` stands."""
    config = plan.config
    if config.max_tokens_per_batch:
        batching: dict[str, Any] = {
            "batch_sampler": epoch_batch_sampler(
                dataset, plan, state.epoch, rank, skip=state.batches_done
            )
        }
    else:
        sampler = EpochSampler(
            len(dataset),
            seed=config.seed,
            epoch=state.epoch,
            rank=rank,
            world_size=plan.world_size,
            skip=state.batches_done * config.batch_size_per_gpu,
        )
        batching = {"batch_size": config.batch_size_per_gpu, "sampler": sampler}
    return DataLoader(
        dataset,
        **batching,
        collate_fn=collator,
        num_workers=config.num_workers,
        prefetch_factor=2 if config.num_workers else None,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(config.seed * 100_003 + state.epoch),
        pin_memory=torch.cuda.is_available(),
    )


def step_windows(loader: Any, plan: RunPlan, done: int) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of each optimizer step, from micro-batch ``done`` of the epoch on (a
    step boundary); the epoch's last window may be shorter than the accumulation."""
    batches = iter(loader)
    while done < plan.batches_per_epoch:
        size = min(plan.accumulation, plan.batches_per_epoch - done)
        window = list(itertools.islice(batches, size))
        if len(window) < size:
            raise RuntimeError(f"the loader ended after {done + len(window)} micro-batches")
        yield window
        done += size


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, over all ranks: the token-mean loss and the tokens it trained on."""

    loss: float
    tokens: TokenReport


def micro_step(engine: Engine, batch: dict[str, Any], step_tokens: int, boundary: bool) -> float:
    """Forward and backward of one micro-batch; its summed token loss (this rank's)."""
    batch = engine.prepare(batch)
    with engine.accumulate(boundary):
        with engine.autocast():
            # num_items_in_batch=1: the model returns the SUM of its token losses
            loss_sum = engine.model(**batch, num_items_in_batch=1).loss
        engine.backward(step_scaled_loss(loss_sum, step_tokens, engine.dist.world_size))
    return float(loss_sum.detach())


def optimizer_step(
    engine: Engine, state: TrainerState, loss_sum: float, step_tokens: int, report: TokenReport
) -> StepResult:
    """The step's token-mean loss over ranks (``step_tokens``: already summed over them); the
    engine's step unless it is not finite."""
    sums = [loss_sum, report.real_tokens, report.slot_tokens]
    loss_sum, real, slots = all_reduce_sums(sums, engine.dist.device)
    step_loss = loss_sum / step_tokens if step_tokens else math.nan
    if not math.isfinite(step_loss):  # same value on every rank: all stop together
        raise TrainingError(
            f"step {state.global_step + 1}: the training loss is {step_loss}; stopped before the "
            "optimizer step, nothing of this step was saved (lower --learning_rate, try --bf16 "
            "or check the data)"
        )
    engine.step()
    state.global_step += 1
    state.losses.append([state.global_step, step_loss])
    return StepResult(step_loss, TokenReport(real_tokens=round(real), slot_tokens=round(slots)))


def train_window(engine: Engine, state: TrainerState, window: list[dict[str, Any]]) -> StepResult:
    """Every micro-batch of one optimizer step, then the step."""
    lengths = [sample_lengths(batch) for batch in window]
    report = step_token_report(lengths, packing=is_packed(window[0]))
    step_tokens = step_token_count(window)  # summed over the ranks, before any backward
    loss_sum = 0.0
    for index, batch in enumerate(window):
        state.batches_done += 1
        loss_sum += micro_step(engine, batch, step_tokens, boundary=index == len(window) - 1)
    return optimizer_step(engine, state, loss_sum, step_tokens, report)


def train_loop(
    engine: Engine,
    plan: RunPlan,
    dataset: Any,
    collator: Any,
    state: TrainerState,
    on_step: Callable[[TrainerState, StepResult], None],
) -> None:
    """Train from ``state`` to ``plan.total_steps`` (exactly resumable at any step)."""
    engine.model.train()
    while state.global_step < plan.total_steps and state.epoch < plan.num_epochs:
        loader = make_loader(dataset, collator, plan, state, engine.dist.rank)
        for window in step_windows(loader, plan, state.batches_done):
            result = train_window(engine, state, window)
            if state.batches_done >= plan.batches_per_epoch:
                state.epoch += 1
                state.batches_done = 0
            on_step(state, result)
            if state.global_step >= plan.total_steps or state.epoch >= plan.num_epochs:
                return
            if state.batches_done == 0:
                break  # the epoch ended with this step: rebuild the loader for the next one
