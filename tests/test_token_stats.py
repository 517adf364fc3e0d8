"""Tokens per record without a model: exact against the real processor, estimated without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from dataset_files import write_dataset
from test_data import _official_processor

from phi3v_data.schema import Record
from phi3v_data.token_stats import TokenCounter, dataset_token_stats, estimate_text_tokens
from phi3v_data.validate import validate_command
from phi3v_train.data import encode_for_training

PICTURES = ["rgb_320x240.png", "rgb_37x901.png", "gray_400x300.png", "rgb_1000x300.png"]


def _turn(user: str, images: list[str], answer: str = "a red square", inline: bool = False):
    turn = {"images": images, "user": user, "assistant": answer}
    return {**turn, "inline_images": True} if inline else turn


ROWS = [
    {"id": "one", "source": "t", "conversations": [_turn("What is shown?", ["rgb_320x240.png"])]},
    {
        "id": "inline-system",
        "source": "t",
        "system": "Answer in five words or fewer.",
        "conversations": [
            _turn("Compare <image> with <image> please.", PICTURES[1:3], "the grey one", True),
            _turn("And now?<image>", ["rgb_1000x300.png"], "wider than tall", True),
        ],
    },
    {"id": "text", "source": "t", "conversations": [_turn("Say hello in French.", [], "Bonjour")]},
    {"id": "two", "source": "t", "conversations": [_turn("Same picture twice?", PICTURES[:2])]},
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, reference_dir: Path) -> Path:
    images = {name: (reference_dir / "images" / name).read_bytes() for name in PICTURES}
    root = tmp_path_factory.mktemp("tokens") / "toy"
    write_dataset(root, {"train": ROWS, "val": ROWS[:1] + ["{not json"]}, images=images)
    return root


@pytest.mark.parametrize("num_crops", [1, 4])
def test_counts_equal_the_processor_built_examples(
    dataset: Path, reference_dir: Path, num_crops: int
) -> None:
    processor = _official_processor(reference_dir, num_crops)
    counter = TokenCounter(dataset / "images", num_crops, processor.tokenizer)
    estimate = TokenCounter(dataset / "images", num_crops)
    for row in ROWS:
        record = Record.model_validate(row)
        ids = encode_for_training(record, processor, dataset / "images")["input_ids"]
        exact = counter.count(record)
        assert exact.exact and exact.total == len(ids), record.id
        assert exact.image == int((ids < 0).sum()), record.id
        guess = estimate.count(record)
        assert not guess.exact and guess.image == exact.image
        # The estimate of the text is close on English text (see the module docstring).
        assert abs(guess.text - exact.text) <= max(4, 0.25 * exact.text), (record.id, guess, exact)


def test_estimate_counts_the_template_tokens_exactly_for_tiny_texts() -> None:
    record = Record.model_validate({"id": "r", "source": "t", "conversations": [_turn("a", [])]})
    # BOS <|user|> \n a <|end|> \n <|assistant|> | answer tokens <|end|> \n <|endoftext|>
    assert estimate_text_tokens(record) == 12 + 1 + 3


def test_split_statistics_and_the_validate_option(dataset: Path) -> None:
    report = dataset_token_stats(dataset, num_crops=4)
    train, val = report.to_json()["splits"]["train"], report.to_json()["splits"]["val"]
    counter = TokenCounter(dataset / "images", 4)
    totals = sorted(counter.count(Record.model_validate(row)).total for row in ROWS)
    assert train["records"] == 4 and train["skipped"] == 0
    assert (train["min"], train["max"], train["p95"]) == (totals[0], totals[-1], totals[-1])
    assert train["mean"] == round(sum(totals) / 4, 1)
    assert val["records"] == 1 and val["skipped"] == 1
    result = CliRunner().invoke(validate_command, [str(dataset), "--num_crops", "4", "--jobs", "1"])
    assert result.exit_code == 1  # the broken val line is a problem
    assert "tokens per record at num_crops=4 (text tokens estimated" in result.output
    assert f"train: 4 records: min {totals[0]}, mean {train['mean']}" in result.output
    assert "val: 1 records, 1 skipped" in result.output
    result = CliRunner().invoke(
        validate_command, [str(dataset), "--num_crops", "1", "--format", "json", "--jobs", "1"]
    )
    assert json.loads(result.output)["tokens"]["splits"]["train"]["records"] == 4


def test_model_folder_tokenizer_gives_exact_counts(dataset: Path, reference_dir: Path) -> None:
    folder = reference_dir / "official"  # a model folder, as given to training
    result = CliRunner().invoke(
        validate_command,
        [str(dataset / "toy_train.jsonl"), "--num_crops", "4", "--tokenizer", str(folder)],
    )
    assert result.exit_code == 0, result.output
    processor = _official_processor(reference_dir, 4)
    exact = TokenCounter(dataset / "images", 4, processor.tokenizer)
    top = max(exact.count(Record.model_validate(row)).total for row in ROWS)
    assert "text tokens from the tokenizer" in result.output and f"max {top} " in result.output
