"""The record format: pydantic models, their published JSON Schema, and the drift check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from phi3v_data.schema import CTX_MAX_IMAGES, CTX_UNLABELED, DatasetInfo, Record

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "id": "docvqa-val-1",
    "source": "docvqa",
    "conversations": [
        {"images": ["pages/a.png"], "user": "What is the date?", "assistant": "1 May"},
        {"images": [], "user": "And the year?", "assistant": "1999"},
    ],
    "answers": ["1999", "in 1999"],
    "label": 1,
    "group": "sentence-7",
    "meta": {"anything": [1, 2]},
}
BAD = [
    {**GOOD, "conversations": []},
    {**GOOD, "id": ""},
    {**GOOD, "assitant": "typo"},
    {**GOOD, "label": 2},
    {key: value for key, value in GOOD.items() if key != "source"},
    {**GOOD, "conversations": [{"images": ["/etc/passwd"], "user": "u", "assistant": "a"}]},
    {**GOOD, "conversations": [{"images": ["a/../../b.jpg"], "user": "u", "assistant": "a"}]},
    {**GOOD, "conversations": [{"images": ["a\\b.jpg"], "user": "u", "assistant": "a"}]},
    {**GOOD, "conversations": [{"images": [], "user": "u"}]},
]


def test_good_record_and_its_views() -> None:
    record = Record.model_validate(GOOD)
    assert record.images == ["pages/a.png"]
    assert record.references == ["1999", "in 1999"]
    plain = Record.model_validate({**GOOD, "answers": None})
    assert plain.references == ["1999"]
    assert Record.model_validate_json(json.dumps(GOOD)) == record


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_models_reject_bad_records(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Record.model_validate(bad)


def test_context_unlabeled_and_image_limit() -> None:
    unlabeled = {**GOOD, "conversations": [{"images": [], "user": "u", "assistant": " "}]}
    with pytest.raises(ValidationError, match="not declared unlabeled"):
        Record.model_validate(unlabeled)
    Record.model_validate(unlabeled, context={CTX_UNLABELED: True})
    many = {**GOOD, "conversations": [{"images": ["a.jpg"] * 3, "user": "u", "assistant": "a"}]}
    Record.model_validate(many, context={CTX_MAX_IMAGES: 3})
    with pytest.raises(ValidationError, match="3 images in one record, more than the 2 allowed"):
        Record.model_validate(many, context={CTX_MAX_IMAGES: 2})


def test_dataset_info_defaults_and_limits() -> None:
    info = DatasetInfo()
    assert info.metrics == ["accuracy"] and info.unlabeled_splits == []
    with pytest.raises(ValidationError):
        DatasetInfo.model_validate({"num_crops": 17})
    with pytest.raises(ValidationError):
        DatasetInfo.model_validate({"metric": ["anls"]})


def test_published_json_schema_agrees_with_the_models() -> None:
    schema = json.loads((REPO / "schemas" / "record.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(GOOD))
    for bad in BAD:
        assert list(validator.iter_errors(bad)), bad


def run_schema_command(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phi3v_data.schema", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_drift_check_passes_on_the_repo_and_fails_on_a_changed_copy(tmp_path: Path) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas", copy)
    assert run_schema_command("--check", copy).returncode == 0
    record_schema = copy / "record.schema.json"
    edited = json.loads(record_schema.read_text())
    edited["properties"]["id"]["minLength"] = 0
    record_schema.write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
    result = run_schema_command("--check", copy)
    assert result.returncode == 1 and "out of date" in result.stderr
    assert run_schema_command("--write", copy).returncode == 0
    assert run_schema_command("--check", copy).returncode == 0
    assert record_schema.read_text() == (REPO / "schemas" / "record.schema.json").read_text()
    assert run_schema_command("--bogus").returncode == 2


INLINE_TURN = {
    "images": ["a.jpg", "b.jpg"],
    "inline_images": True,
    "user": "Compare <image> with <image>.",
    "assistant": "same",
}


def test_system_prompt_and_inline_images_are_optional_and_round_trip() -> None:
    record = Record.model_validate({**GOOD, "system": "Be brief.", "conversations": [INLINE_TURN]})
    assert record.system == "Be brief." and record.conversations[0].inline_images
    dumped = record.model_dump(mode="json", exclude_none=True)
    assert dumped["system"] == "Be brief." and dumped["conversations"][0]["inline_images"] is True
    assert Record.model_validate(dumped) == record
    # Defaults never appear: a record without the new fields serialises exactly as it was read.
    plain = Record.model_validate(GOOD)
    assert plain.system is None and not plain.conversations[0].inline_images
    assert plain.model_dump(mode="json", exclude_none=True) == GOOD
    assert json.loads(plain.model_dump_json(exclude_none=True)) == GOOD
    # Without inline_images, '<image>' is literal text and needs no image.
    literal = {"images": [], "user": "What does <image> mean in HTML?", "assistant": "nothing"}
    Record.model_validate({**GOOD, "conversations": [literal]})


@pytest.mark.parametrize(
    ("turn", "words"),
    [
        ({**INLINE_TURN, "user": "Compare <image> with it."}, "has 1 <image> placeholder(s)"),
        ({**INLINE_TURN, "images": ["a.jpg"]}, "has 2 <image> placeholder(s) but the turn has 1"),
        ({**INLINE_TURN, "inline_images": "yes"}, "true or false"),
    ],
)
def test_inline_placeholder_count_must_match_the_images(turn: dict, words: str) -> None:
    from phi3v_data.messages import plain_errors

    with pytest.raises(ValidationError) as caught:
        Record.model_validate({**GOOD, "conversations": [turn]})
    [(field, message)] = plain_errors(caught.value)
    assert field.startswith("conversations.0.") and words in message


def test_blank_system_prompt_is_rejected() -> None:
    with pytest.raises(ValidationError, match="must not be blank"):
        Record.model_validate({**GOOD, "system": "  \n"})


def test_validate_reports_a_placeholder_count_mismatch_with_file_line_field(
    tmp_path: Path,
) -> None:
    from dataset_files import image_bytes, record, write_dataset

    from phi3v_data.validate import validate_dataset

    good = record("ok", ["a.jpg"], user="Who is <image>?")
    bad = record("bad", ["a.jpg", "a.jpg"], user="Who is <image>?")
    for row in (good, bad):
        row["conversations"][0]["inline_images"] = True
    root = write_dataset(
        tmp_path / "d", {"train": [good, bad]}, images={"a.jpg": image_bytes("JPEG")}
    )
    report = validate_dataset(root, jobs=1)
    assert [(Path(p.path).name, p.line, p.field) for p in report.problems] == [
        ("toy_train.jsonl", 2, "conversations.0.user")
    ], report.format_text()
    assert "has 1 <image> placeholder(s) but the turn has 2 image(s)" in report.problems[0].message
