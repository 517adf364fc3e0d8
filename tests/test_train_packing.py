"""`--packing`, the step-level loss and `--max_tokens_per_batch` in the trainer (issue 14).

- packed and padded training give the same loss at every step and the same weights (<= 1e-4) on
  batches mixing one-image, two-turn and text-only records, under sdpa and eager, also when the
  packed rows are longer than LongRoPE's `original_max_position_embeddings` (4096) while every
  sample is shorter (the short factors must follow each sample, not the row);
- the loss is the mean over the step's supervised tokens: splitting the same step into other
  micro-batches changes nothing;
- token-budget micro-batches train every sample once per epoch and say so in the log;
- packed and token-budget runs killed between checkpoints and resumed end bit-identical.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import (
    assert_resume_is_bit_identical,
    tiny_model,
    train_in_process,
    write_dataset,
)


def largest_difference(weights: dict, reference: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    return max(float((weights[k] - reference[k]).abs().max()) for k in reference)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_training_equals_padded(tiny_model_dir: Path, tmp_path: Path, attn: str) -> None:
    data = write_dataset(tmp_path / "data", train=8, multi_turn_every=3)
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing_{packing}"
        losses = train_in_process(
            tiny_model_dir, data, out, packing=packing, batch_size=4, max_steps=4, attn=attn
        )
        runs[packing] = (losses, load_file(out / "model.safetensors"))
    (padded, padded_weights), (packed, packed_weights) = runs[False], runs[True]
    assert len(packed) == 4
    assert packed == pytest.approx(padded, abs=1e-5)
    assert largest_difference(packed_weights, padded_weights) <= 1e-4


def test_packed_resume_is_bit_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=8, multi_turn_every=3)
    options = dict(
        batch_size=4,
        batch_size_per_gpu=2,
        max_steps=4,
        save_steps=2,
        num_workers=0,
        seed=3,
        packing=True,
    )
    losses = assert_resume_is_bit_identical(tiny_model_dir, data, tmp_path, options, kill_after=3)
    assert len(losses) == 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_longer_than_the_short_rope_window_equal_padded(
    tiny_model_dir: Path, tmp_path: Path, attn: str, capsys: pytest.CaptureFixture
) -> None:
    # num_crops 4 and two images per record: ~1,600 tokens per sample, rows of three ~4,800
    data = write_dataset(tmp_path / "data", train=3, text_only_every=0, multi_turn_every=1)
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing_{packing}"
        options = dict(packing=packing, batch_size=3, batch_size_per_gpu=3, num_crops=4)
        losses = train_in_process(
            tiny_model_dir, data, out, max_steps=1, attn=attn, logging_steps=1, **options
        )
        runs[packing] = (losses, load_file(out / "model.safetensors"))
        log = capsys.readouterr().err  # after the loop: the packed run's log
    row_tokens = [int(n) for n in re.findall(r"tokens (\d+) \(padding 0.0 %\)", log)]
    assert row_tokens and min(row_tokens) > 4096, log[-2000:]
    (padded, padded_weights), (packed, packed_weights) = runs[False], runs[True]
    assert packed == pytest.approx(padded, abs=1e-5)
    assert largest_difference(packed_weights, padded_weights) <= 1e-4


def test_step_loss_is_the_token_mean_whatever_the_micro_batches(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # two-turn records supervise twice the tokens of one-turn ones: a mean of per-micro-batch
    # means would weight them differently in the two splits below
    data = write_dataset(tmp_path / "data", train=8, multi_turn_every=3)
    runs = {}
    for per_gpu in (4, 1):
        out = tmp_path / f"mb_{per_gpu}"
        losses = train_in_process(
            tiny_model_dir, data, out, batch_size=4, batch_size_per_gpu=per_gpu, max_steps=2
        )
        runs[per_gpu] = (losses, load_file(out / "model.safetensors"))
    (whole, whole_weights), (split, split_weights) = runs[4], runs[1]
    assert split == pytest.approx(whole, abs=1e-5)
    assert largest_difference(split_weights, whole_weights) <= 1e-4


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_batches_cover_the_epoch_and_report_tokens(
    tiny_model_dir: Path, tmp_path: Path, packing: bool, capsys: pytest.CaptureFixture
) -> None:
    data = write_dataset(tmp_path / "data", train=8, multi_turn_every=3)
    out = tmp_path / "out"
    # lengths 675 (two turns), 340 (one image) and 20 (text only): 8 samples, 2,750 tokens
    options = dict(
        batch_size=2,
        batch_size_per_gpu=1,
        max_tokens_per_batch=1400,
        logging_steps=1,
        max_steps=None,
    )
    train_in_process(tiny_model_dir, data, out, packing=packing, num_train_epochs=1, **options)
    log = capsys.readouterr().err
    reports = re.findall(
        r"step (\d+)/(\d+) loss \S+ lr \S+ tokens (\d+) \(padding ([\d.]+) %\)", log
    )
    assert reports, log[-2000:]
    assert sum(int(tokens) for _, _, tokens, _ in reports) == 2750  # every sample exactly once
    steps = {int(total) for _, total, _, _ in reports}
    assert len(steps) == 1 and steps.pop() == len(reports) < 8  # several samples per micro-batch
    shares = [float(share) for *_, share in reports]
    assert (max(shares) == 0.0) if packing else (max(shares) > 0.0)


def test_token_budget_resume_is_bit_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=12, multi_turn_every=3)
    options = dict(
        batch_size=2,
        batch_size_per_gpu=1,
        max_tokens_per_batch=1000,
        num_train_epochs=2,
        save_steps=2,
        num_workers=0,
        seed=4,
        packing=True,
    )
    # 12 samples of 20-675 tokens in 1,000-token rows: 2 x 3 steps; killed in the second epoch
    losses = assert_resume_is_bit_identical(tiny_model_dir, data, tmp_path, options, kill_after=5)
    assert len(losses) == 6
