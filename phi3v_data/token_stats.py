"""Tokens per record at ``num_crops`` K, without loading a model: what sizes GPU memory and packing.

A record's length is that of its training example (:func:`phi3v_train.data.encode_for_training`):
every turn's prompt plus its answer.

- **Image tokens** are exact: the processor's own formula
  (:func:`phi3v_train.model.image_processing_phi3_v.num_image_tokens` of
  :func:`~phi3v_train.model.image_processing_phi3_v.hd_size`), fed with the width and height read from
  each image's header (no decode, once per distinct path).
- **Text tokens** are exact when a tokenizer is given: each turn's prompt is rendered by the
  tokenizer's chat template exactly as in training (system prompt on the first turn, ``<|image_k|>``
  tags where the record places them), cut at the tags, every piece tokenized with BOS as the
  processor does, plus the answer and ``<|end|>\\n<|endoftext|>``.
- Without a tokenizer they are **estimated**: the fixed template tokens of the Phi-3 layout
  (:data:`TURN_TOKENS` per turn, :data:`SYSTEM_TOKENS` for a system prompt, one BOS after every
  image run, two for the newline after leading image tags) plus one token per
  :data:`CHARS_PER_TOKEN` characters of text, rounded up per text. English prose runs 4 to 5
  characters per Llama token, so the estimate is usually a little high; digits, code and non-Latin
  scripts take more tokens per character and may be underestimated. Pass ``--tokenizer`` for exact
  counts.

Percentiles are nearest-rank (``p95`` is the smallest count that at least 95 % of records do not
exceed). Records whose line is invalid or whose image cannot be read are counted as ``skipped``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from phi3v_data.dataset import (
    images_root,
    read_info,
    read_lines,
    record_context,
    scan_splits,
    split_of,
)
from phi3v_data.images import ImageError, image_file
from phi3v_data.safe_io import open_regular
from phi3v_data.schema import MAX_NUM_CROPS, Record

#: Characters of text per token in the estimate without a tokenizer.
CHARS_PER_TOKEN = 4
#: Template tokens of one turn: BOS, <|user|>, "\n" (2), <|end|>, "\n" (2), <|assistant|> in the
#: prompt; <|end|>, "\n" (2), <|endoftext|> after the answer.
TURN_TOKENS = 12
#: <|system|>, "\n" (2), <|end|>, "\n" (2) around a system prompt.
SYSTEM_TOKENS = 5


def load_tokenizer(path: Path) -> Any:
    """The tokenizer (with its chat template) of a model folder, loaded offline as training does.

    Give the model folder itself (with its ``config.json``): a folder holding only the tokenizer
    files may be loaded as another tokenizer class that splits newlines differently.
    """
    from transformers import AutoTokenizer

    from phi3v_train.model.registration import register_auto_classes

    register_auto_classes()
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@dataclass(frozen=True, slots=True)
class RecordTokens:
    """Token counts of one record's training example."""

    image: int
    text: int
    exact: bool

    @property
    def total(self) -> int:
        return self.image + self.text


class TokenCounter:
    """Counts the tokens of records of one dataset at ``num_crops`` (images under ``root``)."""

    def __init__(self, root: Path, num_crops: int, tokenizer: Any | None = None) -> None:
        from phi3v_train.model.image_processing_phi3_v import hd_size, num_image_tokens

        if not 1 <= num_crops <= MAX_NUM_CROPS:
            raise ValueError(f"num_crops must be 1..16, got {num_crops}")
        self.root = Path(os.path.realpath(root))
        self.num_crops = num_crops
        self.tokenizer = tokenizer
        self._formula = lambda width, height: num_image_tokens(*hd_size(width, height, num_crops))
        self._cache: dict[str, int] = {}

    def image_tokens(self, relative: str) -> int:
        """Placeholder tokens of one image; :class:`ImageError` when its header cannot be read."""
        if relative not in self._cache:
            path = image_file(self.root, relative)
            try:
                with open_regular(path) as handle, Image.open(handle) as image:
                    width, height = image.size
            except (OSError, SyntaxError, ValueError) as exc:
                raise ImageError(relative, f"cannot be read ({type(exc).__name__})") from None
            self._cache[relative] = self._formula(width, height)
        return self._cache[relative]

    def count(self, record: Record) -> RecordTokens:
        """Image and text tokens of ``record`` (text exact with a tokenizer, else estimated)."""
        image = sum(self.image_tokens(path) for path in record.images)
        if self.tokenizer is None:
            return RecordTokens(image, estimate_text_tokens(record), exact=False)
        return RecordTokens(image, self._text_tokens(record), exact=True)

    def _text_tokens(self, record: Record) -> int:
        from phi3v_train.data import ANSWER_SUFFIX, turn_chat
        from phi3v_train.model.processing_phi3_v import IMAGE_TAG

        tokenizer, total = self.tokenizer, 0
        for index, turn in enumerate(record.conversations):
            chat = turn_chat(turn, record.system if index == 0 else None)
            prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            pieces = IMAGE_TAG.split(prompt)[::2]  # the processor tokenizes each with BOS
            total += sum(len(tokenizer(piece).input_ids) for piece in pieces)
            answer = tokenizer(turn.assistant + ANSWER_SUFFIX, add_special_tokens=False)
            total += len(answer.input_ids)
        return total


def _chars(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_text_tokens(record: Record) -> int:
    """Text tokens of ``record`` without a tokenizer (see the module docstring)."""
    total = SYSTEM_TOKENS + _chars(record.system) if record.system else 0
    for turn in record.conversations:
        total += TURN_TOKENS + len(turn.images) + _chars(turn.assistant)
        if turn.inline_images:
            total += sum(_chars(piece) for piece in turn.user.split("<image>"))
        else:
            total += _chars(turn.user) + (2 if turn.images else 0)
    return total


@dataclass
class SplitTokens:
    """Token counts of the records of one split."""

    split: str
    totals: list[int] = field(default_factory=list)
    image: int = 0
    skipped: int = 0

    def add(self, tokens: RecordTokens) -> None:
        self.totals.append(tokens.total)
        self.image += tokens.image

    def to_json(self) -> dict[str, Any]:
        counts = sorted(self.totals)
        if not counts:
            return {"records": 0, "skipped": self.skipped}
        total = sum(counts)
        return {
            "records": len(counts),
            "skipped": self.skipped,
            "min": counts[0],
            "mean": round(total / len(counts), 1),
            "p95": counts[max(0, math.ceil(0.95 * len(counts)) - 1)],
            "max": counts[-1],
            "image_share": round(self.image / total, 3) if total else 0.0,
        }

    def __str__(self) -> str:
        data = self.to_json()
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        if not data["records"]:
            return f"{self.split}: no countable record{skipped}"
        return (
            f"{self.split}: {data['records']} records{skipped}: min {data['min']}, "
            f"mean {data['mean']}, p95 {data['p95']}, max {data['max']} "
            f"({data['image_share']:.0%} image tokens)"
        )


@dataclass
class TokenReport:
    """Token statistics of every split of a dataset."""

    num_crops: int
    exact: bool
    splits: list[SplitTokens]

    def to_json(self) -> dict[str, Any]:
        return {
            "num_crops": self.num_crops,
            "text_tokens": "tokenizer" if self.exact else f"estimated ({CHARS_PER_TOKEN} chars)",
            "splits": {split.split: split.to_json() for split in self.splits},
        }

    def format_text(self) -> str:
        how = (
            "text tokens from the tokenizer"
            if self.exact
            else f"text tokens estimated at {CHARS_PER_TOKEN} characters each; "
            "--tokenizer DIR counts them exactly"
        )
        lines = [f"tokens per record at num_crops={self.num_crops} ({how}):"]
        return "\n".join(lines + [f"  {split}" for split in self.splits])


def iter_split_records(path: Path, context: dict) -> Iterator[tuple[int, Record | None]]:
    """``(line, Record)`` for every line of a jsonl file; ``(line, None)`` for an invalid one."""
    for number, data, problem in read_lines(path):
        if problem is not None and problem[0] == "(encoding)" and number == 1:
            continue  # a byte order mark: the rest of the line follows
        if problem is not None or data is None:
            yield number, None
            continue
        try:
            yield number, Record.model_validate_json(data, context=context)
        except ValueError:
            yield number, None


def split_files(data_dir: Path) -> tuple[list[tuple[str, Path]], Any]:
    """``[(split, jsonl path)]`` of a dataset folder (or of one jsonl file) and its info."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        info, _ = read_info(data_dir.parent)
        return [(split_of(data_dir, info) or data_dir.stem, data_dir)], info
    info, _ = read_info(data_dir)
    return sorted(scan_splits(data_dir, info).splits.items()), info


def count_records(
    counter: TokenCounter, split: str, records: Iterable[Record | None]
) -> SplitTokens:
    """The token statistics of one split's records (``None``: an invalid line, skipped)."""
    stats = SplitTokens(split)
    for record in records:
        if record is None:
            stats.skipped += 1
            continue
        try:
            stats.add(counter.count(record))
        except ImageError:
            stats.skipped += 1
    return stats


def dataset_token_stats(
    data_dir: Path, num_crops: int, tokenizer: Any | None = None
) -> TokenReport:
    """Token statistics of every split of a dataset folder (or of one jsonl file)."""
    files, info = split_files(data_dir)
    root = images_root(Path(data_dir).parent if Path(data_dir).is_file() else Path(data_dir))
    counter = TokenCounter(root, num_crops, tokenizer)
    splits = []
    for split, path in files:
        records = (record for _, record in iter_split_records(path, record_context(info, split)))
        try:
            splits.append(count_records(counter, split, records))
        except OSError:  # not a regular file: validate reports it
            splits.append(SplitTokens(split))
    return TokenReport(num_crops, tokenizer is not None, splits)
