"""Parity of the image processor, the processor's prompt ids and the tokenizer with the official
implementation (../shared/reference/phi35v: processor_cases, prompt_cases, official/ tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

import phi3v_train  # noqa: F401  (registers phi3_v with the Auto classes)
from phi3v_train.model.image_processing_phi3_v import Phi3VImageProcessor, hd_size, num_image_tokens


def expand_rle(pairs: list[list[int]]) -> list[int]:
    return [value for value, count in pairs for _ in range(count)]


@pytest.fixture(scope="module")
def processor_cases(reference_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cases = json.loads((reference_dir / "processor_cases.json").read_text())["cases"]
    return cases, load_file(reference_dir / "processor_cases.safetensors")


@pytest.fixture(scope="module")
def prompt_cases(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "prompt_cases.json").read_text())


@pytest.fixture(scope="module")
def official_processor(reference_dir: Path):
    return AutoProcessor.from_pretrained(reference_dir / "official")


def test_image_processor_all_cases_bit_exact(reference_dir: Path, processor_cases) -> None:
    cases, subsamples = processor_cases
    assert len(cases) == 50
    processor = Phi3VImageProcessor()
    for case in cases:
        key = case["key"]
        image = Image.open(reference_dir / case["image"])
        out = processor(image, num_crops=case["num_crops"])
        pixel_values = out["pixel_values"]
        assert list(pixel_values.shape) == case["pixel_values_shape"], key
        assert out["image_sizes"].tolist() == case["image_sizes"], key
        assert out["num_img_tokens"].tolist() == case["num_img_tokens"], key
        height, width = case["image_sizes"][0]
        assert [height // 336, width // 336] == case["hd_grid_rows_cols"], key
        assert [list(hd_size(case["image_width"], case["image_height"], case["num_crops"]))] == (
            case["image_sizes"]
        ), key
        assert num_image_tokens(height, width) == case["num_img_tokens"][0], key

        sub = pixel_values[:, :, :, ::6, ::6]
        reference = subsamples[key]
        assert (sub[:, 0] - reference[:, 0]).abs().max().item() <= 1e-5, key  # global (bicubic)
        assert (sub[:, 1:] - reference[:, 1:]).abs().max().item() <= 1e-6, key  # crops + padding
        assert not pixel_values[0, case["num_used_crops"] :].any(), key

        sums = pixel_values[0].double().sum(dim=(1, 2, 3))
        abs_sums = pixel_values[0].double().abs().sum(dim=(1, 2, 3))
        for ours, theirs in zip(sums.tolist(), case["crop_sums_f64"], strict=True):
            assert abs(ours - theirs) <= 1e-6 * max(abs(theirs), 1.0), key
        for ours, theirs in zip(abs_sums.tolist(), case["crop_abs_sums_f64"], strict=True):
            assert abs(ours - theirs) <= 1e-6 * max(abs(theirs), 1.0), key
        assert abs(pixel_values.double().sum().item() - case["total_sum_f64"]) <= 1e-6 * max(
            abs(case["total_sum_f64"]), 1.0
        ), key


def test_official_directory_loads_our_processor(reference_dir: Path, official_processor) -> None:
    assert type(official_processor).__name__ == "Phi3VProcessor"
    assert official_processor.image_processor.num_crops == 4
    assert official_processor.tokenizer.pad_token_id == 32000
    sixteen = AutoProcessor.from_pretrained(reference_dir / "official", num_crops=16)
    assert sixteen.image_processor.num_crops == 16


def test_special_token_ids(official_processor, prompt_cases) -> None:
    tokenizer = official_processor.tokenizer
    for token, token_id in prompt_cases["special_token_ids"].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token


def test_prompt_ids_of_every_turn(reference_dir: Path, official_processor, prompt_cases) -> None:
    """Chat template output, then prompt string + images -> ids (BOS at every chunk, -k runs)."""
    tokenizer = official_processor.tokenizer
    for case in prompt_cases["cases"]:
        for turn in case["turns"]:
            message = [{"role": "user", "content": turn["user_content"]}]
            prompt = tokenizer.apply_chat_template(
                message, tokenize=False, add_generation_prompt=True
            )
            assert prompt == turn["chat_template_output"], case["name"]
            images = [Image.open(reference_dir / path) for path in turn["images"]]
            out = official_processor(prompt, images=images or None, num_crops=case["num_crops"])
            assert out["input_ids"][0].tolist() == expand_rle(turn["prompt_ids_rle"]), case["name"]
            assert out["attention_mask"].all()
            if images:
                assert out["image_sizes"].tolist() == turn["image_sizes"], case["name"]
                assert list(out["pixel_values"].shape) == turn["pixel_values_shape"]
            answer = tokenizer(turn["answer_string"], add_special_tokens=False).input_ids
            assert answer == turn["answer_ids"], case["name"]


def test_tokenizer_cases(official_processor, prompt_cases) -> None:
    tokenizer = official_processor.tokenizer
    assert len(prompt_cases["tokenizer_cases"]) == 40
    for case in prompt_cases["tokenizer_cases"]:
        ids = tokenizer(case["text"], add_special_tokens=case["add_special_tokens"]).input_ids
        assert ids == case["ids"], case["text"]
        assert tokenizer.convert_ids_to_tokens(ids) == case["tokens"], case["text"]
        assert tokenizer.decode(ids) == case["decoded"], case["text"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]


def test_batch_of_prompts_consumes_images_in_order(reference_dir: Path, official_processor):
    """A list of prompts equals the single-prompt outputs, padded with the pad id."""
    images = [
        Image.open(reference_dir / "images" / name)
        for name in ("rgb_320x240.png", "rgb_1000x300.png")
    ]
    prompts = [
        "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n",
        "<|user|>\nNo image here<|end|>\n<|assistant|>\n",
        "<|user|>\n<|image_1|>\nAnd here?<|end|>\n<|assistant|>\n",
    ]
    singles = [
        official_processor(prompts[0], images=[images[0]]),
        official_processor(prompts[1]),
        official_processor(prompts[2], images=[images[1]]),
    ]
    pad = official_processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = official_processor(prompts, images=images, padding_side=side)
        length = batch["input_ids"].shape[1]
        assert length == max(single["input_ids"].shape[1] for single in singles)
        for row, single in enumerate(singles):
            ids = single["input_ids"][0]
            n = ids.shape[0]
            span = slice(0, n) if side == "right" else slice(length - n, length)
            rest = torch.ones(length, dtype=torch.bool)
            rest[span] = False
            assert torch.equal(batch["input_ids"][row, span], ids)
            assert (batch["input_ids"][row, rest] == pad).all()
            assert batch["attention_mask"][row, span].all()
            assert not batch["attention_mask"][row, rest].any()
        expected_pixels = torch.cat([singles[0]["pixel_values"], singles[2]["pixel_values"]])
        assert torch.equal(batch["pixel_values"], expected_pixels)
        assert batch["image_sizes"].tolist() == [[672, 672], [336, 1008]]


@pytest.mark.parametrize(
    ("prompt", "count", "message"),
    [
        ("<|image_2|>\nx", 1, "each once and in order"),
        ("<|image_1|><|image_1|>\nx", 2, "each once and in order"),
        ("<|image_1|>\nx", 2, "image tags but 2 images"),
    ],
)
def test_bad_image_tags_are_clear_errors(
    reference_dir: Path, official_processor, prompt, count, message
):
    image = Image.open(reference_dir / "images" / "rgb_8x8.png")
    with pytest.raises(ValueError, match=message):
        official_processor(prompt, images=[image] * count)
