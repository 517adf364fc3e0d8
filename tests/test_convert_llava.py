"""``phi3v-data convert llava``: the real LLaVA excerpt and written variants, through validate and
one tiny training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_converter_helpers import (
    assert_converted,
    assert_valid,
    convert,
    read_json,
    read_jsonl,
    tree_bytes,
    write_image,
)
from train_helpers import tiny_model, train_in_process
from ucf101_helpers import write_counting_video


def _images_for(records: list[dict], folder: Path) -> None:
    for index, record in enumerate(records):
        image = record.get("image")
        for name in image if isinstance(image, list) else [image] if image else []:
            if not (folder / name).exists():
                write_image(folder / name, seed=index)


def _turns(human: str, gpt: str = "B") -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def test_real_excerpt_converts_validates_and_trains(
    shared_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    src = shared_dir / "fixtures/raw/llava/llava_test_CQM-A.json"
    records = json.loads(src.read_text())
    folder = tmp_path / "images"
    _images_for(records, folder)
    out = tmp_path / "out"

    assert_converted(convert("llava", src, out, "--image_folder", str(folder)))
    assert_valid(out)
    converted = read_jsonl(out / "llava_train.jsonl")
    assert [r["id"] for r in converted] == [r["id"] for r in records]
    for record, raw in zip(converted, records, strict=True):
        turn = record["conversations"][0]
        human = raw["conversations"][0]["value"]
        if "image" in raw:  # "<image>\n..." opens the text: the old images-first form
            assert turn["images"] == [f"train/{raw['image']}"]
            assert "inline_images" not in turn
            assert turn["user"] == human.replace("<image>", "").strip()
        else:
            assert turn == {
                "images": [],
                "user": human.strip(),
                "assistant": raw["conversations"][1]["value"],
            }
    assert read_json(out / "convert_report.json")["skipped_total"] == 0

    losses = train_in_process(tiny_model(tmp_path_factory), out, tmp_path / "run", max_steps=1)
    assert len(losses) == 1 and losses[0] == losses[0]  # one finite step


def test_variants_placement_lists_video_and_jsonl(tmp_path: Path):
    src = tmp_path / "src"
    rows = [
        {
            "id": "a",
            "image": ["x/1.png", "x/2.png"],
            "conversations": _turns("Compare <image> with <image>."),
        },
        {"id": "b", "image": "x/1.png", "conversations": _turns("What is shown?\n<image>")},
        {
            "id": "c",
            "image": "x/2.png",
            "conversations": _turns("<image>Colour?", "red") + _turns("Sure?", "yes"),
        },
        {
            "id": "d",
            "video": "clip.avi",
            "conversations": _turns("<image>\nWhat happens?", "a wave"),
        },
        {"id": "e", "conversations": _turns("Only text.", "ok")},
    ]
    (src / "x").mkdir(parents=True)
    write_image(src / "x/1.png", seed=1)
    write_image(src / "x/2.png", fmt="JPEG", seed=2)  # a JPEG named .png
    write_counting_video(src / "clip.avi", 9)
    (src / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"

    assert_converted(convert("llava", src, out, "--num_frames", "3"))
    assert_valid(out)
    got = {r["id"]: r["conversations"] for r in read_jsonl(out / "llava_train.jsonl")}
    assert got["a"][0] == {
        "images": ["train/x/1.png", "train/x/2.png.jpg"],
        "inline_images": True,
        "user": "Compare <image> with <image>.",
        "assistant": "B",
    }
    assert got["b"][0]["inline_images"] is True
    assert got["b"][0]["user"] == "What is shown?\n<image>"
    assert got["c"][0] == {"images": ["train/x/2.png.jpg"], "user": "Colour?", "assistant": "red"}
    assert got["c"][1] == {"images": [], "user": "Sure?", "assistant": "yes"}
    assert got["d"][0]["images"] == [f"train/clip.avi.{k}.jpg" for k in range(3)]
    assert got["d"][0]["user"] == "What happens?"
    assert got["e"][0]["images"] == []


def test_bad_rows_are_reported_with_their_line_and_escapes_refused(tmp_path: Path):
    src = tmp_path / "src"
    outside = tmp_path / "secret.png"
    write_image(outside)
    write_image(src / "ok.png")
    (src / "link").symlink_to(tmp_path)  # a symlink that leads out of the image folder
    rows = [
        {"id": "ok", "image": "ok.png", "conversations": _turns("<image>Fine?")},
        {"id": "missing", "image": "nope.png", "conversations": _turns("<image>Where?")},
        {"id": "count", "image": "ok.png", "conversations": _turns("<image><image>Two?")},
        {
            "id": "order",
            "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}],
        },
        {"id": "empty", "conversations": _turns("Q?", " ")},
        {"id": "dotdot", "image": "../secret.png", "conversations": _turns("<image>Q?")},
        {"id": "link", "image": "link/secret.png", "conversations": _turns("<image>Q?")},
        {"id": "abs", "image": str(outside), "conversations": _turns("<image>Q?")},
        {"id": "url", "image": "http://example.com/a.png", "conversations": _turns("<image>Q?")},
    ]
    annotation = src / "data.json"
    annotation.write_text(json.dumps(rows))
    out = tmp_path / "out"

    assert_converted(convert("llava", annotation, out))
    assert_valid(out)
    assert [r["id"] for r in read_jsonl(out / "llava_train.jsonl")] == ["ok"]
    skipped = {e["input"]: e["reason"] for e in read_json(out / "convert_report.json")["skipped"]}
    assert set(skipped) == {f"data.json: record {i}" for i in range(1, 9)}
    assert "missing nope.png" in skipped["data.json: record 1"]
    assert "2 <image> tag(s) but 1 images" in skipped["data.json: record 2"]
    assert "turns out of order" in skipped["data.json: record 3"]
    assert "empty answer" in skipped["data.json: record 4"]
    for index in (5, 6, 7):
        assert "inside the image folder" in skipped[f"data.json: record {index}"]
    assert "never fetched" in skipped["data.json: record 8"]
    assert not (out / "images/train/secret.png").exists()


def test_val_size_keeps_shared_images_together_and_reruns_are_identical(tmp_path: Path):
    src = tmp_path / "src"
    rows = []
    for index in range(12):
        image = f"img{index // 3}.png"  # three records per image
        write_image(src / image, seed=index // 3)
        rows.append(
            {"id": str(index), "image": image, "conversations": _turns("<image>Q?", str(index))}
        )
    rows.append({"id": "dup", "conversations": _turns("Text only.")})
    rows.append({"id": "dup", "conversations": _turns("Same id again.")})
    (src / "data.json").write_text(json.dumps(rows))
    first, second = tmp_path / "one", tmp_path / "two"

    assert_converted(convert("llava", src, first, "--val_size", "0.25"))
    assert_converted(convert("llava", src, second, "--val_size", "0.25", "--workers", "2"))
    assert_valid(first)
    train = read_jsonl(first / "llava_train.jsonl")
    val = read_jsonl(first / "llava_val.jsonl")
    assert len(val) >= 3 and len(train) + len(val) == 14
    split_of = {}
    for split, records in (("train", train), ("val", val)):
        for record in records:
            for path in record["conversations"][0]["images"]:
                split_of.setdefault(path.split("/", 1)[1], set()).add(split)
    assert all(len(splits) == 1 for splits in split_of.values())
    ids = [r["id"] for r in train + val]
    assert "dup" in ids and "data-13" in ids  # a repeated id gets a positional one
    assert tree_bytes(first) == tree_bytes(second)  # --workers does not change a byte


def test_bad_val_size_is_a_usage_error(tmp_path: Path):
    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"id": "1", "conversations": _turns("Q?")}]))
    result = convert("llava", src, tmp_path / "out", "--val_size", "1.5")
    assert result.exit_code == 2 and "--val_size" in result.output
    result = convert("llava", src, tmp_path / "out2", "--val_size", "1")
    assert result.exit_code == 2 and "none left" in result.output
