"""The sample a plan sizes memory and speed for: tokens and CLIP crops.

- ``--data_dir``: the token statistics of ``phi3v-data validate`` (:mod:`phi3v_data.token_stats`)
  of the train split, text tokens exact with the model folder's tokenizer when it has one. Memory
  is sized for the **longest** record (an out-of-memory error at one long record ends the run);
  speed uses the **mean**.
- ``--tokens_per_sample T``: one image of up to ``num_crops + 1`` crops filling the tokens.
- neither: the DocVQA load measured in benchmarks/RESULTS.md (2,455 tokens, one 4×4 page).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3v_data.schema import DEFAULT_NUM_CROPS
from phi3v_train.planning.flops import SampleShape

#: Placeholder tokens per CLIP crop after the 2×2 merge (the formula's leading term).
TOKENS_PER_CROP = 144
#: The load of RESULTS.md's throughput table: DocVQA-like pages at num_crops 16.
MEASURED_TOKENS = 2455


class SampleError(ValueError):
    """The data directory cannot give token statistics."""


@dataclass(frozen=True)
class Load:
    """The sample for memory (the largest), the one for speed (typical), and where they came from."""

    memory: SampleShape
    speed: SampleShape
    source: str


def shape(tokens: int, image_tokens: int) -> SampleShape:
    """A sample of ``tokens`` of which ``image_tokens`` are image placeholders."""
    image_tokens = min(image_tokens, tokens)
    crops = image_tokens // TOKENS_PER_CROP
    return SampleShape(seq_len=tokens, crops=crops, image_tokens=image_tokens)


def from_tokens(tokens: int, num_crops: int) -> SampleShape:
    """One image of up to ``num_crops + 1`` crops, the rest text."""
    crops = max(1, min(num_crops + 1, tokens // TOKENS_PER_CROP))
    return shape(tokens, crops * TOKENS_PER_CROP)


def default_load(tokens: int | None, num_crops: int | None) -> Load:
    crops = num_crops or DEFAULT_NUM_CROPS
    if tokens is None:
        sample = from_tokens(MEASURED_TOKENS, crops)
        return Load(sample, sample, f"{MEASURED_TOKENS} tokens (the measured DocVQA load)")
    sample = from_tokens(tokens, crops)
    return Load(sample, sample, f"{tokens} tokens (--tokens_per_sample)")


def _tokenizer(model_dir: Path):
    from phi3v_data.token_stats import load_tokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        return load_tokenizer(model_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def from_dataset(data_dir: Path, model_dir: Path, split: str, num_crops: int | None) -> Load:
    """Token statistics of ``split`` of the dataset at ``num_crops`` (dataset.json's, else 16)."""
    from phi3v_data.dataset import read_info
    from phi3v_data.token_stats import dataset_token_stats

    if not data_dir.is_dir():
        raise SampleError(f"{data_dir}: --data_dir: not a directory")
    info, _ = read_info(data_dir)
    crops = num_crops or info.num_crops or DEFAULT_NUM_CROPS
    tokenizer = _tokenizer(model_dir)
    report = dataset_token_stats(data_dir, crops, tokenizer)
    stats = {s.split: s.to_json() for s in report.splits}.get(split)
    if not stats or not stats.get("records"):
        raise SampleError(f"{data_dir}: --data_dir: no countable record in split {split!r}")
    share = stats["image_share"]
    largest = shape(stats["max"], round(stats["max"] * share))
    typical = shape(round(stats["mean"]), round(stats["mean"] * share))
    text = "tokenizer" if report.exact else "estimated text tokens"
    source = (
        f"{split} split at num_crops={crops}: max {stats['max']} tokens for memory, mean "
        f"{stats['mean']} for speed ({stats['records']} records, {text})"
    )
    return Load(largest, typical, source)
