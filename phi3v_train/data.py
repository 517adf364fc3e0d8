"""Records -> model inputs, exactly as the original recipe builds them.

Training example (original_recipe.md §1.8, §4, §5): every turn is its *own* single-message chat
``<|user|>\\n{content}<|end|>\\n<|assistant|>\\n`` run through the processor (so every turn starts
with BOS and image tags restart at ``<|image_1|>``), followed by the answer
``{assistant}<|end|>\\n<|endoftext|>`` tokenized without special tokens. Turns are concatenated;
labels are -100 on every prompt position and the answer ids on the answer. ``content`` is
``<|image_1|>...<|image_k|>\\n{user}`` for a turn with k images (tags without separators) and the
bare user text for a text-only turn. Images of all turns are concatenated in order.

A turn with ``inline_images`` puts the k-th image's ``<|image_k|>`` tag where the k-th ``<image>``
placeholder stands in its user text, and nothing else (no tags first, no added newline). A record's
``system`` prompt becomes a system message of the **first** turn's chat, rendered by the official
chat template: ``<|system|>\\n{system}<|end|>\\n<|user|>\\n...``; later turns have none.

Generation prompt: the earlier turns exactly as in training (prompt + answer) and the last turn's
prompt, so that evaluation sees the same token layout the model was trained on.

``--max_seq_len`` policy: a longer example is cut from the right when the cut keeps every image
token and at least one supervised answer token; otherwise the example is skipped, and the trainer
lists the skipped ids before training starts. An image run is never cut in half.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from phi3v_data.dataset import RecordError
from phi3v_data.images import ImageError, load_image
from phi3v_data.schema import IMAGE_PLACEHOLDER, Record, Turn

IGNORE_INDEX = -100
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"


def image_tags(count: int) -> str:
    """``<|image_1|>...<|image_k|>`` without separators, as the recipe writes them."""
    return "".join(f"<|image_{k}|>" for k in range(1, count + 1))


def turn_content(turn: Turn) -> str:
    """The user message of one turn: image tags, a newline and the text (no tags when no image).

    With ``inline_images``, each ``<image>`` placeholder becomes the next ``<|image_k|>`` tag.
    """
    if turn.inline_images:
        pieces = turn.user.split(IMAGE_PLACEHOLDER)
        tags = [f"<|image_{k}|>" for k in range(1, len(pieces))]
        return "".join(piece + tag for piece, tag in zip(pieces, [*tags, ""], strict=True))
    return f"{image_tags(len(turn.images))}\n{turn.user}" if turn.images else turn.user


def turn_chat(turn: Turn, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages of one turn's prompt: the system prompt (when given), then the user."""
    chat = [{"role": "system", "content": system}] if system is not None else []
    return [*chat, {"role": "user", "content": turn_content(turn)}]


def _turn_prompt(
    turn: Turn, processor: Any, images_root: Path, system: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Prompt ids (1-D, image runs negative), pixel_values and image_sizes of one turn."""
    prompt = processor.tokenizer.apply_chat_template(
        turn_chat(turn, system), tokenize=False, add_generation_prompt=True
    )
    images = [load_image(images_root, path) for path in turn.images]
    inputs = processor(prompt, images=images or None, return_tensors="pt")
    input_ids = torch.as_tensor(inputs["input_ids"])[0].to(torch.long)
    if not images:
        return input_ids, None, None
    return input_ids, inputs["pixel_values"], torch.as_tensor(inputs["image_sizes"])


def _answer_ids(turn: Turn, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(turn.assistant + ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _join_images(
    pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor]
) -> dict[str, torch.Tensor | None]:
    if not pixel_values:
        return {"pixel_values": None, "image_sizes": None}
    return {"pixel_values": torch.cat(pixel_values), "image_sizes": torch.cat(image_sizes)}


def encode_for_training(record: Record, processor: Any, images_root: Path) -> dict[str, Any]:
    """``input_ids``, ``labels`` (1-D), ``pixel_values`` / ``image_sizes`` (None when text-only)."""
    ids, labels, pixels, sizes = [], [], [], []
    for index, turn in enumerate(record.conversations):
        system = record.system if index == 0 else None
        prompt_ids, pixel_values, image_sizes = _turn_prompt(turn, processor, images_root, system)
        answer_ids = _answer_ids(turn, processor.tokenizer)
        ids += [prompt_ids, answer_ids]
        labels += [torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]
        if pixel_values is not None:
            pixels.append(pixel_values)
            sizes.append(image_sizes)
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), **_join_images(pixels, sizes)}


def encode_for_generation(record: Record, processor: Any, images_root: Path) -> dict[str, Any]:
    """Earlier turns with their answers, then the last turn's prompt ending in ``<|assistant|>``."""
    ids, pixels, sizes = [], [], []
    turns = record.conversations
    for index, turn in enumerate(turns):
        system = record.system if index == 0 else None
        prompt_ids, pixel_values, image_sizes = _turn_prompt(turn, processor, images_root, system)
        ids.append(prompt_ids)
        if index < len(turns) - 1:
            ids.append(_answer_ids(turn, processor.tokenizer))
        if pixel_values is not None:
            pixels.append(pixel_values)
            sizes.append(image_sizes)
    return {"input_ids": torch.cat(ids), **_join_images(pixels, sizes)}


def fit_to_length(example: dict[str, Any], max_seq_len: int) -> dict[str, Any] | None:
    """Apply the ``--max_seq_len`` policy: cut from the right, or None when the example must go."""
    length = example["input_ids"].numel()
    if length <= max_seq_len:
        return example
    image_positions = (example["input_ids"] < 0).nonzero()
    if image_positions.numel() and int(image_positions.max()) >= max_seq_len:
        return None
    labels = example["labels"][:max_seq_len]
    if not bool((labels[1:] != IGNORE_INDEX).any()):
        return None
    return {**example, "input_ids": example["input_ids"][:max_seq_len], "labels": labels}


def pad_sequences(sequences: Sequence[torch.Tensor], value: int, side: str) -> torch.Tensor:
    """Stack 1-D tensors into [B, L], padding with ``value`` on the ``right`` or ``left``."""
    length = max(seq.numel() for seq in sequences)
    out = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : seq.numel()] = seq
        else:
            out[row, length - seq.numel() :] = seq
    return out


def _batch_images(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    with_images = [ex for ex in examples if ex.get("pixel_values") is not None]
    return _join_images(
        [ex["pixel_values"] for ex in with_images], [ex["image_sizes"] for ex in with_images]
    )


def _attention_mask(lengths: list[int], width: int, side: str) -> torch.Tensor:
    positions = torch.arange(width).unsqueeze(0)
    lengths_t = torch.tensor(lengths).unsqueeze(1)
    if side == "right":
        return (positions < lengths_t).long()
    return (positions >= width - lengths_t).long()


@dataclass
class TrainCollator:
    """Right padding (pad id for ids, -100 for labels); images concatenated in sample order.

    The attention mask comes from the true lengths, so the final ``<|endoftext|>`` of an answer
    stays visible although it equals the pad id.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        input_ids = pad_sequences([ex["input_ids"] for ex in examples], self.pad_token_id, "right")
        lengths = [ex["input_ids"].numel() for ex in examples]
        return {
            "input_ids": input_ids,
            "attention_mask": _attention_mask(lengths, input_ids.shape[1], "right"),
            "labels": pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX, "right"),
            **_batch_images(examples),
        }


@dataclass
class GenerationCollator:
    """Left padding for batched generation; keeps ``ids`` and ``references`` when present."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        input_ids = pad_sequences([ex["input_ids"] for ex in examples], self.pad_token_id, "left")
        lengths = [ex["input_ids"].numel() for ex in examples]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": _attention_mask(lengths, input_ids.shape[1], "left"),
            **_batch_images(examples),
        }
        for key in ("id", "references"):
            if all(key in ex for ex in examples):
                batch[key] = [ex[key] for ex in examples]
        return batch


def dummy_image_example(processor: Any) -> dict[str, Any]:
    """One white 336x336 image whose every label is -100: contributes nothing to the loss."""
    image = Image.new("RGB", (336, 336), "white")
    inputs = processor("<|image_1|>", images=[image], return_tensors="pt")
    input_ids = torch.as_tensor(inputs["input_ids"])[0].to(torch.long)
    return {
        "input_ids": input_ids,
        "labels": torch.full_like(input_ids, IGNORE_INDEX),
        "pixel_values": inputs["pixel_values"],
        "image_sizes": torch.as_tensor(inputs["image_sizes"]),
    }


def add_dummy_image_row(batch: dict[str, Any], dummy: dict[str, Any], pad_token_id: int) -> dict:
    """Append ``dummy`` as an extra row of a batch that has no image.

    The vision tower then runs, in the same place of the graph, on every rank, and its
    parameters get (zero) gradients in the same order everywhere; DeepSpeed ZeRO reduces gradient
    buckets in arrival order, so ranks must agree on it. The row is fully masked out of the loss.
    """
    rows = [
        {"input_ids": ids[mask.bool()], "labels": labels[mask.bool()]}
        for ids, labels, mask in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        )
    ]
    merged = TrainCollator(pad_token_id)([*rows, dummy])
    return {**batch, **merged}


class _RecordsDataset(Dataset):
    """Records plus where each came from, so that an image failing on access (in a DataLoader
    worker too) stops the run with one line naming the split file, line, record and image.

    ``source`` / ``lines`` default to those of a :class:`phi3v_data.dataset.SplitRecords`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: Any,
        images_root: Path,
        *,
        source: Path | None = None,
        lines: Sequence[int] | None = None,
    ) -> None:
        self.records = list(records)
        self.processor = processor
        self.images_root = Path(images_root)
        self.source = source if source is not None else getattr(records, "path", None)
        lines = lines if lines is not None else getattr(records, "lines", None)
        self.lines = list(lines) if lines is not None else [0] * len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, index: int, encoder: Any) -> dict[str, Any]:
        """``encoder(record, processor, images_root)``; an :class:`ImageError` becomes a picklable
        :class:`RecordError` naming file, line, field, image and record id."""
        record = self.records[index]
        try:
            return encoder(record, self.processor, self.images_root)
        except ImageError as error:
            field = next(
                f"conversations.{turn_index}.images.{image_index}"
                for turn_index, turn in enumerate(record.conversations)
                for image_index, image in enumerate(turn.images)
                if image == error.image
            )
            source = self.source if self.source is not None else self.images_root.parent
            message = f"{error} (record {record.id!r})"
            raise RecordError(source, self.lines[index], field, message) from None


class TrainDataset(_RecordsDataset):
    """Records encoded for training on access (images are decoded in the DataLoader workers)."""

    def __init__(
        self,
        records: Sequence[Record],
        processor: Any,
        images_root: Path,
        *,
        max_seq_len: int | None = None,
        source: Path | None = None,
        lines: Sequence[int] | None = None,
    ) -> None:
        super().__init__(records, processor, images_root, source=source, lines=lines)
        self.max_seq_len = max_seq_len
        self._token_lengths: list[int] | None = None

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.encode(index, encode_for_training)
        if self.max_seq_len is not None:
            fitted = fit_to_length(example, self.max_seq_len)
            if fitted is None:  # drop_overlong() removes these before training
                raise ValueError(f"record {self.records[index].id}: longer than max_seq_len")
            example = fitted
        return example

    def token_lengths(self) -> list[int]:
        """Each example's length in tokens, from the image headers and the tokenizer (no image is
        decoded; `phi3v_data.token_stats.TokenCounter`, exact), capped at ``max_seq_len``."""
        if self._token_lengths is None:
            from phi3v_data.token_stats import TokenCounter

            num_crops = self.processor.image_processor.num_crops
            counter = TokenCounter(self.images_root, num_crops, self.processor.tokenizer)

            def count(record: Record, *_: Any) -> int:
                return counter.count(record).total

            limit = self.max_seq_len or sys.maxsize
            self._token_lengths = [min(self.encode(i, count), limit) for i in range(len(self))]
        return self._token_lengths

    def drop_overlong(self) -> list[str]:
        """Remove the records ``--max_seq_len`` cannot keep; return their ids (in order)."""
        if self.max_seq_len is None:
            return []
        kept, kept_lines, dropped = [], [], []
        for index, record in enumerate(self.records):
            if fit_to_length(self.encode(index, encode_for_training), self.max_seq_len) is None:
                dropped.append(record)
            else:
                kept.append(record)
                kept_lines.append(self.lines[index])
        self.records, self.lines = kept, kept_lines
        self._token_lengths = None
        return [record.id for record in dropped]


class GenerationDataset(_RecordsDataset):
    """Records encoded as generation prompts, with their ids and reference answers."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        example = self.encode(index, encode_for_generation)
        return {**example, "id": record.id, "references": record.references}
