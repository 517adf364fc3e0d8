"""Token-budget micro-batches (`--max_tokens_per_batch N`) and the tokens-per-step report.

`TokenBudgetBatchSampler` forms micro-batches whose cost stays within N tokens: the padded cost
(longest sample x samples) without packing, the real token sum with packing. Samples are grouped
by length so that padded batches waste little: a seeded shuffle, cut into windows of
`GROUP_WINDOW` batches' worth of samples, each window sorted by length and cut greedily. The
batches are formed once per seed (so every epoch has the same number of batches and the schedule
is known before training) and each epoch visits them in its own seeded order. Everything follows
from (seed, epoch): the same pair gives the same batches on every rank and after a restart, so a
resumed run skips its first k batches (`skip`) and continues exactly. Every sample is in exactly one batch per epoch; when
the number of batches does not divide by the world size, the largest batches are halved until it
does, so every rank runs the same number of batches (their order is the same on every rank, and
rank r takes batches r, r + W, r + 2W, ...). A sample longer than N forms a batch of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

GROUP_WINDOW = 64  # batches' worth of samples sorted together: length grouping vs randomness


def batch_cost(lengths: Sequence[int], packing: bool) -> int:
    """Tokens a micro-batch occupies: the real sum when packed, longest x count when padded."""
    return sum(lengths) if packing else max(lengths, default=0) * len(lengths)


def _permutation(count: int, seed: int, epoch: int, salt: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + salt)
    return torch.randperm(count, generator=generator).tolist()


def _greedy(order: list[int], lengths: Sequence[int], budget: int, packing: bool) -> list[list]:
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = [lengths[i] for i in current] + [lengths[index]]
        if current and batch_cost(candidate, packing) > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _equalise(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """Halve the largest batches (first one on ties) until the count divides by world_size."""
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[largest]
        if len(batch) < 2:
            raise ValueError(
                f"{sum(map(len, batches))} samples cannot fill the same number of batches on "
                f"{world_size} ranks; raise --max_tokens_per_batch"
            )
        half = len(batch) // 2
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    return batches


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    seed: int,
    epoch: int,
    packing: bool,
    world_size: int = 1,
) -> list[list[int]]:
    """All batches of one epoch, in the order shared by every rank (see the module docstring)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens}")
    order = _permutation(len(lengths), seed, 0, salt=0)  # the same batches in every epoch
    typical = max(1, max_tokens // max(1, max(lengths, default=1)))
    window = GROUP_WINDOW * typical
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (lengths[i], i))
        batches += _greedy(chunk, lengths, max_tokens, packing)
    shuffle = _permutation(len(batches), seed, epoch, salt=1)
    return _equalise([batches[i] for i in shuffle], world_size)


@dataclass
class TokenBudgetBatchSampler:
    """A `batch_sampler` for the DataLoader: this rank's token-budget batches of one epoch,
    after skipping its first `skip` batches (resume). `set_epoch` moves to another epoch."""

    lengths: Sequence[int]
    max_tokens: int
    seed: int
    epoch: int = 0
    packing: bool = False
    rank: int = 0
    world_size: int = 1
    skip: int = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def all_batches(self) -> list[list[int]]:
        batches = token_budget_batches(
            self.lengths,
            self.max_tokens,
            seed=self.seed,
            epoch=self.epoch,
            packing=self.packing,
            world_size=self.world_size,
        )
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.all_batches()[self.skip :]

    def __len__(self) -> int:
        return max(0, len(self.all_batches()) - self.skip)


@dataclass(frozen=True)
class TokenReport:
    """Tokens of one optimizer step: real ones, the slots they occupied, the padding share."""

    real_tokens: int
    slot_tokens: int

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.slot_tokens if self.slot_tokens else 0.0

    def describe(self) -> str:
        return f"tokens {self.real_tokens} (padding {100 * self.padding_share:.1f} %)"


def step_token_report(batches_lengths: Sequence[Sequence[int]], packing: bool) -> TokenReport:
    """`TokenReport` of the micro-batches of one step, given each one's sample lengths."""
    real = sum(sum(lengths) for lengths in batches_lengths)
    slots = sum(batch_cost(lengths, packing) for lengths in batches_lengths)
    return TokenReport(real_tokens=real, slot_tokens=slots)
