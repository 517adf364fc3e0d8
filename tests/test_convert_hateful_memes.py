"""``phi3v-data convert hateful_memes``: both id serialisations, real excerpts and traps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from image_converter_helpers import (
    assert_converted,
    assert_valid,
    convert,
    images_under,
    read_json,
    read_jsonl,
    report_reasons,
    run_cli,
    write_image,
    write_jsonl,
)

from phi3v_data.converters.hateful_memes import meme_id

SPLITS = ["train", "dev_seen", "dev_unseen", "test_seen", "test_unseen"]


def _copy_variant(shared_dir: Path, variant: str, dest: Path) -> dict[str, list[dict]]:
    """The real excerpt files of one variant plus a generated image for every ``img``."""
    rows = {}
    for path in sorted((shared_dir / "fixtures/raw/hateful_memes" / variant).glob("*.jsonl")):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / path.name)
        rows[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows[path.stem]:
            image = dest / row["img"]
            if not image.exists():
                write_image(image, seed=int(Path(row["img"]).stem))
    return rows


def test_real_excerpts_both_id_variants(shared_dir: Path, tmp_path: Path):
    """Int ids without leading zeros and zero-padded strings give the same records."""
    rows_int = _copy_variant(shared_dir, "variant_int_ids", tmp_path / "int")
    _copy_variant(shared_dir, "variant_str_ids", tmp_path / "str")
    assert any(isinstance(r["id"], int) and r["id"] < 10000 for r in rows_int["dev_seen"])

    for variant in ("int", "str"):
        assert_converted(
            run_cli(
                "convert",
                "hateful_memes",
                tmp_path / variant,
                "--out_dir",
                tmp_path / f"o_{variant}",
            )
        )
        validated = run_cli("validate", tmp_path / f"o_{variant}")
        assert validated.returncode == 0, validated.stdout + validated.stderr

    out_int, out_str = tmp_path / "o_int", tmp_path / "o_str"
    for split in ("train", "dev_seen", "dev_unseen"):
        text = (out_int / f"hateful_memes_{split}.jsonl").read_bytes()
        assert text == (out_str / f"hateful_memes_{split}.jsonl").read_bytes(), split
    dev_seen = read_jsonl(out_int / "hateful_memes_dev_seen.jsonl")
    first = dev_seen[0]
    assert first["id"] == "dev_seen-08291"  # the int variant's 8291 lost its leading zero
    assert first["conversations"][0]["images"] == ["dev_seen/08291.png"]
    assert first["conversations"][0]["user"] == (
        "Meme text: white people is this a shooting range\nIs this meme hateful? Answer yes or no."
    )
    assert first["conversations"][0]["assistant"] == "yes"
    assert first["label"] == 1
    for record, row in zip(dev_seen, rows_int["dev_seen"], strict=True):
        assert record["label"] == row["label"]
        assert record["conversations"][0]["assistant"] == ["no", "yes"][row["label"]]

    # the competition's test_unseen has no label: an unlabeled split, for inference only
    info_int = read_json(out_int / "dataset.json")
    assert info_int["unlabeled_splits"] == ["test_unseen"]
    assert info_int["metrics"] == ["auroc", "accuracy"]
    assert info_int["answer_words"] == {"0": "no", "1": "yes"}
    test_unseen = read_jsonl(out_int / "hateful_memes_test_unseen.jsonl")
    assert len(test_unseen) == 8
    assert all(r["conversations"][0]["assistant"] == "" and "label" not in r for r in test_unseen)
    # the HF-mirror variant labels both test files
    assert read_json(out_str / "dataset.json")["unlabeled_splits"] == []
    assert all("label" in r for r in read_jsonl(out_str / "hateful_memes_test_unseen.jsonl"))


def test_image_always_from_img_and_ids_unique_across_splits(tmp_path: Path):
    src = tmp_path / "hm"
    write_jsonl(
        src / "dev_seen.jsonl",
        [
            {"id": 42, "img": "img/90042.png", "label": 0, "text": "img and id disagree"},
            {"id": 8291, "img": "img/08291.png", "label": 1, "text": "shared with dev_unseen"},
        ],
    )
    write_jsonl(
        src / "dev_unseen.jsonl",
        [{"id": 8291, "img": "img/08291.png", "label": 1, "text": "shared with dev_unseen"}],
    )
    expected = write_image(src / "img/90042.png", seed=1)
    write_image(src / "img/08291.png", seed=2)
    write_image(src / "img/00042.png", seed=3)  # the file the id would point to: never used
    out = tmp_path / "out"

    assert_converted(convert("hateful_memes", src, out))
    assert_valid(out)  # no duplicate ids, no leaked image list
    dev_seen = read_jsonl(out / "hateful_memes_dev_seen.jsonl")
    assert dev_seen[0]["id"] == "dev_seen-00042"
    assert dev_seen[0]["conversations"][0]["images"] == ["dev_seen/90042.png"]
    assert (out / "images/dev_seen/90042.png").read_bytes() == expected
    assert read_jsonl(out / "hateful_memes_dev_unseen.jsonl")[0]["id"] == "dev_unseen-08291"
    assert images_under(out) == ["dev_seen/08291.png", "dev_seen/90042.png", "dev_unseen/08291.png"]


def test_unusable_rows_are_skipped_with_reasons(tmp_path: Path):
    src = tmp_path / "data"  # the competition zip unpacks to data/
    rows = [
        {"id": "01234", "img": "img/01234.png", "label": 0, "text": "fine"},
        {"id": "01235", "img": "img/01235.png", "text": "no label in a labelled file"},
        {"id": "01236", "img": "img/01236.png", "label": 2, "text": "label 2"},
        {"id": "01237", "img": "img/01237.png", "label": 1, "text": "image missing"},
        {"id": "01238", "label": 1, "text": "no img: never guessed from the id"},
        {"id": "01239", "img": "img/01239.png", "label": 1, "text": "a text file"},
        {"id": "01240", "img": "img/01240.png", "label": "1"},
    ]
    write_jsonl(src / "data/train.jsonl", rows)
    for row in rows:
        if "img" in row and row["id"] not in {"01237", "01239"}:
            write_image(src / "data" / row["img"], seed=int(row["id"]))
    write_image(src / "data/img/01238.png")
    (src / "data/img/01239.png").write_text("not an image")
    out = tmp_path / "out"

    assert_converted(convert("hateful_memes", src, out))
    assert_valid(out)
    records = read_jsonl(out / "hateful_memes_train.jsonl")
    assert [r["id"] for r in records] == ["train-01234", "train-01240"]
    assert records[1]["conversations"][0]["user"] == "Is this meme hateful? Answer yes or no."
    assert records[1]["label"] == 1
    reasons = "\n".join(report_reasons(out))
    assert "label: missing, in a labelled split" in reasons
    assert "label: 2 is not 0 or 1" in reasons
    assert "image: missing img/01237.png (id 01237)" in reasons
    assert "img: missing or empty (the image is never guessed from the id)" in reasons
    assert "01239.png: not an image" in reasons
    assert read_json(out / "convert_report.json")["splits"]["train"]["skipped"] == 5


def test_phase1_names_images_dir_and_answer_words(tmp_path: Path):
    src = tmp_path / "ann"
    write_jsonl(src / "dev.jsonl", [{"id": 5, "img": "img/00005.png", "label": 0, "text": "t"}])
    (src / "test.jsonl").write_text('{"id":6,"img":"img\\/00006.png","text":"u"}')  # no final \n
    images = tmp_path / "elsewhere"
    write_image(images / "00005.png")
    write_image(images / "00006.png", fmt="JPEG")
    out = tmp_path / "out"

    assert_converted(
        convert(
            "hateful_memes",
            src,
            out,
            "--images_dir",
            str(images),
            "--answer_words",
            "benign,hateful",
        )
    )
    assert_valid(out)
    dev = read_jsonl(out / "hateful_memes_dev.jsonl")[0]
    assert dev["conversations"][0]["assistant"] == "benign"
    assert dev["conversations"][0]["user"].endswith("Answer hateful or benign.")
    test = read_jsonl(out / "hateful_memes_test.jsonl")[0]
    assert test["conversations"][0]["images"] == ["test/00006.jpg"]  # real format wins
    info = read_json(out / "dataset.json")
    assert info["answer_words"] == {"0": "benign", "1": "hateful"}
    assert info["unlabeled_splits"] == ["test"]


def test_src_without_annotations_is_refused(tmp_path: Path):
    (tmp_path / "src/img").mkdir(parents=True)
    result = convert("hateful_memes", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 2
    assert "no annotation file found: expected one of train.jsonl" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(8291, "08291"), ("08291", "08291"), ("8291", "08291"), (46971, "46971"), (True, None)],
)
def test_meme_id(raw, expected):
    assert meme_id(raw) == expected
