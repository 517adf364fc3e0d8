"""phi3v_train.data: training examples exactly as the original recipe, padding, --max_seq_len.

The reference test rebuilds every case of ../shared/reference/phi35v/prompt_cases.json (real
Phi-3.5-vision tokenizer, reference images) from a Record and compares ids and labels exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from phi3v_data.schema import Record
from phi3v_train.data import (
    ANSWER_SUFFIX,
    IGNORE_INDEX,
    GenerationCollator,
    TrainCollator,
    TrainDataset,
    encode_for_generation,
    encode_for_training,
    fit_to_length,
)


def _expand(rle: list[list[int]]) -> list[int]:
    return [value for value, count in rle for _ in range(count)]


def _official_processor(reference_dir: Path, num_crops: int):
    from transformers import PreTrainedTokenizerFast

    from phi3v_train.model.image_processing_phi3_v import Phi3VImageProcessor
    from phi3v_train.model.processing_phi3_v import Phi3VProcessor

    official = reference_dir / "official"
    settings = json.loads((official / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(official / "tokenizer.json"),
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = settings["chat_template"]
    return Phi3VProcessor(
        image_processor=Phi3VImageProcessor(num_crops=num_crops), tokenizer=tokenizer
    )


def _case_record(case: dict) -> Record:
    turns = []
    for turn in case["turns"]:
        user = turn["user_content"]
        if turn["images"]:
            user = user.split("\n", 1)[1]  # drop "<|image_1|>...<|image_k|>\n": encoding adds it
        assert turn["answer_string"].endswith(ANSWER_SUFFIX)
        answer = turn["answer_string"].removesuffix(ANSWER_SUFFIX)
        turns.append({"images": turn["images"], "user": user, "assistant": answer})
    return Record(id=case["name"], source="reference", conversations=turns)


def test_every_reference_prompt_case_exactly(reference_dir: Path) -> None:
    cases = json.loads((reference_dir / "prompt_cases.json").read_text(encoding="utf-8"))["cases"]
    assert len(cases) >= 8
    processors: dict[int, object] = {}
    for case in cases:
        processor = processors.setdefault(
            case["num_crops"], _official_processor(reference_dir, case["num_crops"])
        )
        example = encode_for_training(_case_record(case), processor, reference_dir)
        assert example["input_ids"].tolist() == _expand(case["input_ids_rle"]), case["name"]
        assert example["labels"].tolist() == _expand(case["labels_rle"]), case["name"]
        if case.get("pixel_values_shape"):
            assert list(example["pixel_values"].shape) == case["pixel_values_shape"], case["name"]
            assert example["image_sizes"].tolist() == case["image_sizes"], case["name"]
        else:
            assert example["pixel_values"] is None


def test_generation_prompt_is_the_training_prefix(reference_dir: Path) -> None:
    cases = json.loads((reference_dir / "prompt_cases.json").read_text(encoding="utf-8"))["cases"]
    case = next(c for c in cases if c["name"].startswith("d_video_two_turns"))
    processor = _official_processor(reference_dir, case["num_crops"])
    record = _case_record(case)
    train = encode_for_training(record, processor, reference_dir)
    prompt = encode_for_generation(record, processor, reference_dir)
    last_answer = len(case["turns"][-1]["answer_ids"])
    assert prompt["input_ids"].tolist() == train["input_ids"][:-last_answer].tolist()
    assert prompt["input_ids"][-1].item() == 32001  # <|assistant|>
    assert prompt["pixel_values"].shape[0] == 8


# --- batching and length policy (tiny synthetic processor-free inputs) ---------------------------


def _example(ids: list[int], labels: list[int], images: int = 0) -> dict:
    pixel = torch.randn(images, 2, 3, 4, 4) if images else None
    sizes = torch.full((images, 2), 336) if images else None
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": pixel,
        "image_sizes": sizes,
    }


def test_train_collator_pads_right_and_concatenates_images_in_order() -> None:
    first = _example([1, -1, -1, 5, 6], [IGNORE_INDEX] * 3 + [5, 6], images=1)
    text_only = _example([1, 7], [IGNORE_INDEX, 7])
    third = _example([1, -1, 8, 9, 10, 11], [IGNORE_INDEX] * 2 + [8, 9, 10, 11], images=2)
    batch = TrainCollator(pad_token_id=32000)([first, text_only, third])
    assert batch["input_ids"].tolist()[1] == [1, 7, 32000, 32000, 32000, 32000]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX, 7] + [IGNORE_INDEX] * 4
    assert batch["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]
    assert batch["attention_mask"].tolist()[2] == [1] * 6
    assert batch["pixel_values"].shape[0] == 3
    assert torch.equal(batch["pixel_values"][0], first["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1:], third["pixel_values"])


def test_collators_without_images_give_none() -> None:
    batch = TrainCollator(pad_token_id=0)([_example([1, 2], [IGNORE_INDEX, 2])])
    assert batch["pixel_values"] is None and batch["image_sizes"] is None


def test_generation_collator_pads_left() -> None:
    batch = GenerationCollator(pad_token_id=32000)(
        [
            {"input_ids": torch.tensor([1, 2, 3]), "id": "a", "references": ["x"]},
            {"input_ids": torch.tensor([4]), "id": "b", "references": ["y"]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [32000, 32000, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["id"] == ["a", "b"] and batch["references"] == [["x"], ["y"]]


def test_max_seq_len_cuts_text_but_never_an_image_run() -> None:
    example = _example([1, -1, -1, -1, 4, 5, 6, 7, 8], [IGNORE_INDEX] * 6 + [6, 7, 8], images=1)
    cut = fit_to_length(example, 7)
    assert cut["input_ids"].tolist() == [1, -1, -1, -1, 4, 5, 6]
    assert cut["labels"].tolist()[-1] == 6
    assert fit_to_length(example, 3) is None  # would cut the image run
    assert fit_to_length(example, 6) is None  # no answer token left
    assert fit_to_length(example, 9) is example


def test_dataset_drops_overlong_records(tmp_path: Path, reference_dir: Path) -> None:
    processor = _official_processor(reference_dir, 1)
    Image.new("RGB", (336, 336), "white").save(tmp_path / "a.png")
    records = [
        Record(
            id="img",
            source="t",
            conversations=[{"images": ["a.png"], "user": "what?", "assistant": "white"}],
        ),
        Record(id="txt", source="t", conversations=[{"user": "say hi", "assistant": "hi " * 150}]),
    ]
    dataset = TrainDataset(records, processor, tmp_path, max_seq_len=100)
    assert dataset.drop_overlong() == ["img"]  # 313 image tokens do not fit in 100
    assert len(dataset) == 1
    assert dataset[0]["input_ids"].numel() == 100
