"""Token-budget batches (issue 14, `--max_tokens_per_batch`): within budget, length-grouped,
deterministic from (seed, epoch), resumable, every sample once per epoch, equal counts per rank."""

from __future__ import annotations

import random

import pytest

from phi3v_train.training.batching import (
    TokenBudgetBatchSampler,
    batch_cost,
    step_token_report,
    token_budget_batches,
)

_RNG = random.Random(0)
LENGTHS = [_RNG.choice([60, 300, 800, 2500]) + i % 37 for i in range(403)]


@pytest.mark.parametrize("packing", [False, True])
def test_budget_is_kept_and_every_sample_appears_once(packing: bool) -> None:
    batches = token_budget_batches(LENGTHS, 4096, seed=1, epoch=0, packing=packing)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(batch_cost([LENGTHS[i] for i in b], packing) <= 4096 for b in batches)


def test_length_grouping_reduces_padding() -> None:
    grouped = token_budget_batches(LENGTHS, 4096, seed=1, epoch=0, packing=False)
    report = step_token_report([[LENGTHS[i] for i in b] for b in grouped], packing=False)
    shuffled = list(range(len(LENGTHS)))
    random.Random(3).shuffle(shuffled)
    naive = [shuffled[i : i + 2] for i in range(0, len(shuffled), 2)]
    naive_report = step_token_report([[LENGTHS[i] for i in b] for b in naive], packing=False)
    assert report.padding_share < 0.05 < naive_report.padding_share


def test_deterministic_per_seed_and_epoch() -> None:
    def make(seed: int, epoch: int) -> list[list[int]]:
        return token_budget_batches(LENGTHS, 4096, seed=seed, epoch=epoch, packing=True)

    assert make(1, 0) == make(1, 0)
    assert make(1, 0) != make(1, 1)
    assert make(1, 0) != make(2, 0)


def test_ranks_get_equal_counts_and_disjoint_samples() -> None:
    for world in (2, 3, 4):
        samplers = [
            TokenBudgetBatchSampler(LENGTHS, 3000, seed=5, rank=r, world_size=world)
            for r in range(world)
        ]
        counts = {len(s) for s in samplers}
        assert len(counts) == 1
        flat = [i for s in samplers for batch in s for i in batch]
        assert sorted(flat) == list(range(len(LENGTHS)))


def test_too_few_samples_for_the_ranks_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="cannot fill the same number of batches on 4 ranks"):
        token_budget_batches([10, 10, 10], 100, seed=0, epoch=0, packing=True, world_size=4)


def test_resume_skips_exactly_the_done_batches() -> None:
    sampler = TokenBudgetBatchSampler(LENGTHS, 4096, seed=7, epoch=2, packing=True)
    full = list(sampler)
    resumed = TokenBudgetBatchSampler(LENGTHS, 4096, seed=7, packing=True)
    resumed.set_epoch(2, skip=5)
    assert list(resumed) == full[5:]
    assert len(resumed) == len(full) - 5


def test_sample_over_budget_forms_its_own_batch() -> None:
    batches = token_budget_batches([50, 5000, 40], 1000, seed=0, epoch=0, packing=False)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


def test_token_report() -> None:
    padded = step_token_report([[100, 300], [200]], packing=False)
    assert (padded.real_tokens, padded.slot_tokens) == (600, 800)
    assert padded.padding_share == pytest.approx(0.25)
    assert "padding 25.0 %" in padded.describe()
    assert step_token_report([[100, 300], [200]], packing=True).padding_share == 0.0
