"""Processor of Phi-3 / Phi-3.5-vision: prompt text with `<|image_k|>` tags + images -> model inputs.

Exactly the official placeholder procedure (../shared/reference/phi35v/README.md §3.2): the prompt
string is split at every `<|image_k|>` tag, every chunk is tokenized separately *with* BOS, and tag k
becomes the value -k repeated num_img_tokens(k) times; so BOS starts the prompt and follows every
image run. A prompt without tags is tokenized in one piece (a single BOS).

Beyond the official processor (which takes one string): a list of prompts gives a padded batch
(`padding_side` "right" or "left", pad id = the tokenizer's pad id, attention_mask 0 on pads); the
flat image list is consumed in prompt order, `<|image_k|>` numbering restarting at 1 in every prompt.
`num_crops` can be overridden at load time (`from_pretrained(dir, num_crops=16)`) or per call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


class Phi3VProcessor(ProcessorMixin):
    """`Phi3VImageProcessor` + the (fast) tokenizer carrying the Phi-3 chat template."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, num_crops=None, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if num_crops is not None:
            processor.image_processor.num_crops = int(num_crops)
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The processor files plus `preprocessor_config.json`, as official directories have."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return result

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def prompt_ids(self, prompt: str, num_img_tokens: Sequence[int]) -> list[int]:
        """Token ids of one prompt whose k-th tag stands for an image of num_img_tokens[k-1]."""
        tags = [int(number) for number in IMAGE_TAG.findall(prompt)]
        if tags != list(range(1, len(tags) + 1)):
            raise ValueError(
                f"image tags must be <|image_1|> ... <|image_n|>, each once and in order; got {tags}"
            )
        if len(tags) != len(num_img_tokens):
            raise ValueError(f"prompt has {len(tags)} image tags but {len(num_img_tokens)} images")
        if not tags:
            return list(self.tokenizer(prompt).input_ids)
        chunks = IMAGE_TAG.split(prompt)[::2]
        ids: list[int] = list(self.tokenizer(chunks[0]).input_ids)
        for number, chunk in zip(tags, chunks[1:], strict=True):
            ids.extend([-number] * int(num_img_tokens[number - 1]))
            ids.extend(self.tokenizer(chunk).input_ids)
        return ids

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Image.Image | Sequence[Image.Image] | None = None,
        return_tensors: str | None = "pt",
        padding_side: str = "right",
        num_crops: int | None = None,
        padding: bool | str = True,
    ) -> BatchFeature:
        """Prompt(s) + the flat image list -> input_ids, attention_mask (+ pixel_values,
        image_sizes). Tensors are PyTorch; a list of prompts is padded to its longest prompt.
        There is no truncation: cutting through an image run would break the placeholders, so
        length limits belong to the data pipeline."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"Phi3VProcessor returns PyTorch tensors only, not {return_tensors!r}")
        if padding not in (True, False, "longest"):
            raise ValueError(
                f"padding must be True/'longest' (to the longest prompt), got {padding!r}"
            )
        if text is None:
            raise ValueError("Phi3VProcessor needs text (a prompt or a list of prompts)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        prompts = [text] if isinstance(text, str) else list(text)
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images or [])
        counts = [len(IMAGE_TAG.findall(prompt)) for prompt in prompts]
        if sum(counts) != len(images):
            raise ValueError(f"the prompts have {sum(counts)} image tags but {len(images)} images")

        data: dict[str, torch.Tensor] = {}
        tokens: list[int] = []
        if images:
            image_inputs = self.image_processor(images, num_crops=num_crops)
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
            tokens = image_inputs["num_img_tokens"].tolist()

        sequences, start = [], 0
        for prompt, count in zip(prompts, counts, strict=True):
            sequences.append(self.prompt_ids(prompt, tokens[start : start + count]))
            start += count
        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), None)
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask, **data}
        return BatchFeature(data=data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


__all__ = ["Phi3VProcessor", "IMAGE_TAG"]
