"""``phi3v-data convert nlvr2``: official JSON-lines files, image pairs, real excerpts and traps."""

from __future__ import annotations

import io
import json
from pathlib import Path

from image_converter_helpers import (
    assert_converted,
    assert_valid,
    convert,
    images_under,
    read_json,
    read_jsonl,
    report_reasons,
    run_cli,
    tree_bytes,
    write_image,
    write_jsonl,
)
from PIL import Image


def _pair(identifier: str) -> str:
    return identifier.rsplit("-", 1)[0]


def _row(identifier: str, sentence: str, label: str, **extra) -> dict:
    return {"identifier": identifier, "sentence": sentence, "label": label, **extra}


def _write_pairs(folder: Path, rows: list[dict], *, fmt_right: str = "PNG") -> None:
    """Both images of every pair, named ``*.png`` whatever their real format."""
    for index, row in enumerate(rows):
        pair = _pair(row["identifier"])
        write_image(folder / f"{pair}-img0.png", seed=2 * index)
        write_image(folder / f"{pair}-img1.png", fmt=fmt_right, seed=2 * index + 1)


def test_real_excerpts_with_nested_train(shared_dir: Path, tmp_path: Path):
    """Real dev/test1/test2 lines, flat split folders; train nested by ``directory``."""
    src = tmp_path / "nlvr"
    raw = shared_dir / "fixtures/raw/nlvr2"
    splits = {}
    for split in ("dev", "test1", "test2"):
        text = (raw / f"{split}.json").read_text()
        (src / "nlvr2/data").mkdir(parents=True, exist_ok=True)
        (src / "nlvr2/data" / f"{split}.json").write_text(text)
        splits[split] = [json.loads(line) for line in text.splitlines()]
        _write_pairs(src / split, splits[split], fmt_right="JPEG")  # .png files holding JPEG
    train = [
        _row("train-10171-0-0", "Two dogs are lying down.", "True", directory=11),
        _row("train-10171-0-1", "There is one cat.", "False", directory=11),
        _row("train-77-3-0", "A bottle stands left.", "False", directory=0),
    ]
    write_jsonl(src / "nlvr2/data/train.json", train)
    _write_pairs(src / "images/train/11", train[:2])
    _write_pairs(src / "images/train/0", train[2:])
    out = tmp_path / "out"

    assert_converted(run_cli("convert", "nlvr2", src, "--out_dir", out))
    validated = run_cli("validate", out)
    assert validated.returncode == 0, validated.stdout + validated.stderr

    for split, rows in splits.items():
        records = read_jsonl(out / f"nlvr2_{split}.jsonl")
        # records come grouped by image pair (each pair is written once), pairs in file order
        pairs = list(dict.fromkeys(_pair(row["identifier"]) for row in rows))
        rows = sorted(rows, key=lambda row: pairs.index(_pair(row["identifier"])))
        assert [r["id"] for r in records] == [row["identifier"] for row in rows]
        for record, row in zip(records, rows, strict=True):
            turn = record["conversations"][0]
            pair = _pair(row["identifier"])
            assert turn["images"] == [f"{split}/{pair}-img0.png", f"{split}/{pair}-img1.jpg"]
            assert row["sentence"] in turn["user"]
            assert turn["assistant"] == {"True": "yes", "False": "no"}[row["label"]]
            assert record["label"] == int(row["label"] == "True")
            split_name, set_id, _, sentence_id = row["identifier"].split("-")
            assert record["group"] == f"{split_name}-{set_id}--{sentence_id}"
    dev = read_jsonl(out / "nlvr2_dev.jsonl")
    # one group per sentence written for an image set: shared by that sentence's 4 pairs
    groups = {r["group"]: r["conversations"][0]["user"] for r in dev}
    assert len(groups) < len(dev)
    for record in dev:
        assert record["conversations"][0]["user"] == groups[record["group"]]
    assert (out / "images/dev/dev-850-0-img1.jpg").read_bytes() == (
        src / "dev/dev-850-0-img1.png"
    ).read_bytes()  # a JPEG named .png is kept byte for byte under its real suffix
    train_out = read_jsonl(out / "nlvr2_train.jsonl")
    assert train_out[0]["conversations"][0]["images"] == [
        "train/11/train-10171-0-img0.png",
        "train/11/train-10171-0-img1.png",
    ]
    assert train_out[0]["conversations"][0]["images"] == train_out[1]["conversations"][0]["images"]
    info = read_json(out / "dataset.json")
    assert info["metrics"] == ["accuracy", "consistency"]
    assert info["answer_words"] == {"0": "no", "1": "yes"}
    assert info["unlabeled_splits"] == []


def test_pairs_written_once_and_order_left_right(tmp_path: Path):
    rows = [
        _row("dev-1-0-0", "The left image has more dogs.", "True"),
        _row("dev-1-0-1", "Both images show snow.", "False"),
    ]
    src = tmp_path / "src"
    write_jsonl(src / "dev.json", rows)
    left = write_image(src / "dev/dev-1-0-img0.png", seed=1)
    right = write_image(src / "dev/dev-1-0-img1.png", seed=2)
    out = tmp_path / "out"

    assert_converted(convert("nlvr2", src, out))
    assert images_under(out) == ["dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png"]
    assert (out / "images/dev/dev-1-0-img0.png").read_bytes() == left
    assert (out / "images/dev/dev-1-0-img1.png").read_bytes() == right
    first = read_jsonl(out / "nlvr2_dev.jsonl")[0]["conversations"][0]
    assert first["user"] == (
        "The first image is the left image and the second image is the right image.\n"
        "Statement: The left image has more dogs.\n"
        "Is the statement true? Answer yes or no."
    )


def test_missing_and_non_image_files_are_reported(tmp_path: Path):
    rows = [
        _row("dev-1-0-0", "Fine pair.", "True"),
        _row("dev-2-0-0", "The right image is missing.", "False"),
        _row("dev-3-0-0", "The left image is a text file.", "True"),
        _row("dev-4-0-0", "The right image is a GIF named .png.", "True"),
        _row("dev-5-0-0", "A label that is neither.", "maybe"),
        _row("dev-6-0-0", "No label at all, in a labelled file.", None),
        _row("dev-7-0", "A malformed identifier.", "True"),
    ]
    src = tmp_path / "src"
    write_jsonl(src / "dev.json", [{k: v for k, v in r.items() if v is not None} for r in rows])
    (src / "dev.json").open("a").write("{not json\n")
    _write_pairs(src / "dev", rows[:1] + rows[2:6])
    write_image(src / "dev/dev-2-0-img0.png")
    (src / "dev/dev-3-0-img0.png").write_text("<html>404</html>")
    write_image(src / "dev/dev-4-0-img1.png", fmt="GIF", seed=9)
    out = tmp_path / "out"

    assert_converted(convert("nlvr2", src, out))
    assert_valid(out)
    records = read_jsonl(out / "nlvr2_dev.jsonl")
    assert [r["id"] for r in records] == ["dev-1-0-0", "dev-4-0-0"]
    assert records[1]["conversations"][0]["images"][1] == "dev/dev-4-0-img1.png"
    with Image.open(io.BytesIO((out / "images/dev/dev-4-0-img1.png").read_bytes())) as image:
        assert (image.format, image.mode) == ("PNG", "RGB")  # GIF re-encoded as RGB PNG
    reasons = report_reasons(out)
    assert len(reasons) == 6
    joined = "\n".join(reasons)
    assert "image: missing dev-2-0-img1.png (dev-2-0-0)" in joined
    assert "dev-3-0-img0.png: not an image" in joined
    assert "label: 'maybe' is not True or False" in joined
    assert "label: missing, in a labelled split" in joined
    assert "identifier: 'dev-7-0' is not <split>-<set>-<pair>-<sentence>" in joined
    assert "malformed JSON" in joined
    assert any(
        e["input"] == f"{src / 'dev.json'}:8"
        for e in read_json(out / "convert_report.json")["skipped"]
    )


def test_flat_train_layout_images_dir_and_answer_words(tmp_path: Path):
    """``download_images.py`` output: one flat folder per split, elsewhere (``--images_dir``)."""
    rows = [
        _row("train-5-1-0", "Exactly two bottles.", "True", directory=42),
        _row("train-5-1-1", "No bottles.", "False", directory=42),
    ]
    src = tmp_path / "annotations"
    write_jsonl(src / "train.json", rows)
    images = tmp_path / "downloaded"
    _write_pairs(images / "train", rows[:1])
    out = tmp_path / "out"

    result = convert("nlvr2", src, out, "--images_dir", str(images), "--answer_words", "false,true")
    assert_converted(result)
    assert_valid(out)
    records = read_jsonl(out / "nlvr2_train.jsonl")
    assert [r["conversations"][0]["assistant"] for r in records] == ["true", "false"]
    assert records[0]["conversations"][0]["user"].endswith("Answer true or false.")
    assert records[0]["conversations"][0]["images"][0] == "train/42/train-5-1-img0.png"
    assert read_json(out / "dataset.json")["answer_words"] == {"0": "false", "1": "true"}


def test_bad_answer_words_is_a_usage_error(tmp_path: Path):
    src = tmp_path / "src"
    write_jsonl(src / "dev.json", [_row("dev-1-0-0", "x", "True")])
    for value in ("yes", "yes,yes", "a,b,c"):
        result = convert("nlvr2", src, tmp_path / "out", "--answer_words", value)
        assert result.exit_code == 2, value
        assert "--answer_words" in result.output and "Traceback" not in result.output


def test_same_bytes_with_two_workers_and_on_rerun(tmp_path: Path):
    rows = [
        _row(f"dev-{i}-{p}-{s}", f"Sentence {i} {s}.", "True")
        for i in range(4)
        for p in range(2)
        for s in range(2)
    ]
    src = tmp_path / "src"
    write_jsonl(src / "dev.json", rows)
    _write_pairs(src / "dev", rows)
    assert_converted(convert("nlvr2", src, tmp_path / "one"))
    assert_converted(convert("nlvr2", src, tmp_path / "two", "--workers", "2"))
    one = tree_bytes(tmp_path / "one")
    assert one == tree_bytes(tmp_path / "two")  # --workers is not part of the output
    assert len(read_jsonl(tmp_path / "one/nlvr2_dev.jsonl")) == 16
    assert_converted(convert("nlvr2", src, tmp_path / "one"))  # finished: a no-op
    assert tree_bytes(tmp_path / "one") == one
