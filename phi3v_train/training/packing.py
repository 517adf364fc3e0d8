"""Padding-free packing (`--packing`) and the step-level loss normalisation.

A packed micro-batch is ONE row: the samples' ids concatenated with no padding, `position_ids`
restarting at 0 for each sample and no attention mask. From those position ids the model builds a
block-diagonal causal mask (eager / sdpa) or cu_seqlens (flash_attention_2), and picks LongRoPE's
short or long factors per sample from the sample's own length
(`phi3v_train.model.modeling_phi3_v.packed_sample_lengths`). Images keep their sample order, so
the placeholders (filled in row-major order) stay aligned with their features.

Labels: each sample's first label is -100, so the last token of a sample never predicts the first
token of the next one (the causal-LM loss shifts labels by one).

Loss: `step_scaled_loss` divides a micro-batch's summed token loss by the supervised-token count
of the whole optimizer step (all micro-batches, all ranks), so the step's gradient is that of the
mean over every supervised token of the step, with or without packing and whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from phi3v_train.data import IGNORE_INDEX, _batch_images
from phi3v_train.distributed import all_reduce_sums


def pack_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Examples (1-D ``input_ids`` / ``labels``, optional images) -> one packed row [1, N]."""
    if not examples:
        raise ValueError("cannot pack an empty micro-batch")
    labels = []
    for example in examples:
        sample_labels = example["labels"].clone()
        sample_labels[0] = IGNORE_INDEX  # no token predicts across a sample boundary
        labels.append(sample_labels)
    positions = [torch.arange(ex["input_ids"].numel()) for ex in examples]
    return {
        "input_ids": torch.cat([ex["input_ids"] for ex in examples]).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
        "position_ids": torch.cat(positions).unsqueeze(0),
        **_batch_images(examples),
    }


@dataclass
class PackingCollator:
    """The `--packing` counterpart of `phi3v_train.data.TrainCollator`: one row per micro-batch,
    no padding and no ``attention_mask`` (its absence is what marks the row as packed)."""

    pad_token_id: int  # unused (nothing is padded); kept so both collators are built alike

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pack_examples(examples)


def is_packed(batch: dict[str, Any]) -> bool:
    """A packed row is marked by having no ``attention_mask`` (see `PackingCollator`)."""
    return "attention_mask" not in batch


def sample_lengths(batch: dict[str, Any]) -> list[int]:
    """Real lengths of the samples of a packed or padded batch (for logs and benchmarks)."""
    if not is_packed(batch):
        return [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], batch["position_ids"].shape[-1]]
    return [end - start for start, end in zip(starts, ends, strict=True)]


def add_dummy_image_sample(batch: dict[str, Any], dummy: dict[str, Any]) -> dict[str, Any]:
    """Packed counterpart of `phi3v_train.data.add_dummy_image_row`: append ``dummy`` (all labels
    -100) as one more sample of the row, so the vision tower runs on a batch without images."""
    lengths = sample_lengths(batch)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    samples = [
        {
            "input_ids": batch["input_ids"][0, start : start + length],
            "labels": batch["labels"][0, start : start + length],
        }
        for start, length in zip(starts, lengths, strict=True)
    ]
    if batch.get("pixel_values") is not None:  # the batch's own images go first, as before
        samples[0] = {**samples[0], "pixel_values": batch["pixel_values"]}
        samples[0]["image_sizes"] = batch["image_sizes"]
    return pack_examples([*samples, dummy])


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that enter the causal-LM loss: labels after the one-position shift, not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (float32) of the next-token cross-entropy over the supervised tokens of a batch."""
    shifted = labels[..., 1:].reshape(-1).to(logits.device)
    flat = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum")


def sum_over_ranks(value: int) -> int:
    """Sum of an integer over the ranks (the value itself when not distributed)."""
    return round(all_reduce_sums([value])[0])


def step_token_count(
    micro_batches: Iterable[dict[str, Any]],
    reduce: Callable[[int], int] = sum_over_ranks,
) -> int:
    """Supervised tokens of one optimizer step: all its micro-batches, summed over the ranks."""
    return reduce(sum(supervised_tokens(batch["labels"]) for batch in micro_batches))


def step_scaled_loss(loss_sum: torch.Tensor, step_tokens: int, world_size: int = 1) -> torch.Tensor:
    """What to backpropagate for one micro-batch: its token-loss sum over the step's token count,
    times the world size because DDP / DeepSpeed average the gradients over the ranks."""
    return loss_sum * world_size / max(step_tokens, 1)


def step_loss_sum_and_count(
    model: Any,
    micro_batches: Sequence[dict[str, Any]],
    *,
    world_size: int = 1,
    reduce: Callable[[int], int] = sum_over_ranks,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[float, int]:
    """Forward + backward of every micro-batch of one optimizer step with the step-level mean.

    Returns this rank's (loss sum, supervised-token count); the step's loss is the sum of the
    sums over the ranks divided by the sum of the counts. ``backward`` is
    ``engine.backward`` under DeepSpeed.
    """
    step_tokens = step_token_count(micro_batches, reduce)
    total, count = 0.0, 0
    for batch in micro_batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss_sum = token_loss_sum(logits, batch["labels"])
        backward(step_scaled_loss(loss_sum, step_tokens, world_size))
        total += float(loss_sum.detach())
        count += supervised_tokens(batch["labels"])
    return total, count
