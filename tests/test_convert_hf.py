"""``phi3v-data convert hf``: parquet shards and ``save_to_disk`` folders (written with pyarrow), the
cauldron, messages and question/answer layouts, through validate and one tiny training step."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_converter_helpers import (
    assert_converted,
    assert_valid,
    convert,
    image_bytes,
    read_json,
    read_jsonl,
    tree_bytes,
    write_image,
)
from train_helpers import tiny_model, train_in_process

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TEXT = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])


def _image(seed: int, fmt: str = "PNG") -> dict:
    return {"bytes": image_bytes(fmt, seed=seed), "path": None}


def _cauldron(rows: list[tuple[list, list]]) -> pa.Table:
    images = [images for images, _ in rows]
    texts = [[{"user": u, "assistant": a, "source": "toy"} for u, a in turns] for _, turns in rows]
    return pa.table(
        {"images": pa.array(images, pa.list_(IMAGE)), "texts": pa.array(texts, pa.list_(TEXT))}
    )


def test_cauldron_parquet_shards_convert_validate_and_train(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    src = tmp_path / "ai2d"
    src.mkdir()
    shared = _image(1)
    pq.write_table(
        _cauldron(
            [
                ([shared], [("What is it?", "a leaf"), ("Colour?", "green")]),
                ([_image(2, "JPEG"), shared], [("Which differs?", "the first")]),
            ]
        ),
        src / "train-00000-of-00002.parquet",
        row_group_size=1,
    )
    pq.write_table(
        _cauldron([([], [("No image here?", "none")]), ([_image(3)], [("Bad?", "")])]),
        src / "train-00001-of-00002.parquet",
    )
    out = tmp_path / "out"

    assert_converted(convert("hf", src, out))
    assert_valid(out)
    records = read_jsonl(out / "hf_train.jsonl")
    assert [r["id"] for r in records] == [
        "train-00000-of-00002-0",
        "train-00000-of-00002-1",
        "train-00001-of-00002-0",
    ]
    first = records[0]["conversations"]
    assert len(first) == 2 and first[1]["images"] == []
    assert first[0]["user"] == "What is it?" and "inline_images" not in first[0]
    [path] = first[0]["images"]
    assert path.startswith("train/_embedded/") and path.endswith(".png")
    second = records[1]["conversations"][0]["images"]
    assert second[0].endswith(".jpg") and second[1] == path  # the same bytes are stored once
    assert (out / "images" / path).read_bytes() == shared["bytes"]
    [skip] = read_json(out / "convert_report.json")["skipped"]
    assert skip["input"] == "train-00001-of-00002.parquet: row 1"
    assert "empty answer" in skip["reason"]

    losses = train_in_process(tiny_model(tmp_path_factory), out, tmp_path / "run", max_steps=1)
    assert len(losses) == 1


def _write_stream(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


def _save_to_disk(folder: Path, table: pa.Table) -> Path:
    """The files ``datasets.Dataset.save_to_disk`` writes: an Arrow stream, state and info."""
    folder.mkdir(parents=True)
    name = "data-00000-of-00001.arrow"
    _write_stream(folder / name, table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    # a cache file beside the data is not part of the dataset
    _write_stream(folder / "cache-123.arrow", pa.table({"junk": pa.array([1], pa.int8())}))
    return folder


def test_save_to_disk_messages_with_blocks_tags_and_system(tmp_path: Path):
    block = pa.struct([("type", pa.string()), ("text", pa.string()), ("index", pa.int64())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(block))])
    rows = [
        (
            [_image(1)],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look: ", "index": None},
                        {"type": "image", "text": None, "index": 0},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a box", "index": None}],
                },
            ],
        ),
        (
            [_image(2), _image(3)],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None, "index": 0},
                        {"type": "text", "text": "Which?", "index": None},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "left", "index": None}]},
            ],
        ),  # two images, one block: skipped
    ]
    table = pa.table(
        {
            "images": pa.array([r[0] for r in rows], pa.list_(IMAGE)),
            "messages": pa.array([r[1] for r in rows], pa.list_(message)),
            "system": ["Answer in two words.", None],
        }
    )
    src = _save_to_disk(tmp_path / "saved", table)
    out = tmp_path / "out"

    assert_converted(convert("hf", src, out))
    assert_valid(out)
    [record] = read_jsonl(out / "hf_train.jsonl")
    assert record["system"] == "Answer in two words."
    turn = record["conversations"][0]
    assert turn["inline_images"] is True and turn["user"] == "Look: <image>"
    [skip] = read_json(out / "convert_report.json")["skipped"]
    assert skip["input"] == "data-00000-of-00001.arrow: row 1"
    assert "1 <image> tag(s) but 2 images" in skip["reason"]

    rerun = tmp_path / "rerun"
    assert_converted(convert("hf", src, rerun, "--workers", "2"))
    assert tree_bytes(out) == tree_bytes(rerun)


def test_question_answer_columns_paths_and_escapes(tmp_path: Path):
    src = tmp_path / "vqa"
    write_image(src / "imgs/a.png", seed=7)
    write_image(tmp_path / "secret.png")
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": None, "path": "imgs/a.png"},
                    {"bytes": None, "path": "../secret.png"},
                    {"bytes": image_bytes(seed=8), "path": "ignored.png"},
                    {"bytes": None, "path": None},
                ],
                IMAGE,
            ),
            "question": ["What is <image> here?", "Escape?", "Answers?", "Nothing?"],
            "answer": [["a", "A"], ["b"], ["yes", "Yes", "yes."], ["c"]],
        }
    )
    pq.write_table(table, src / "validation.parquet")
    out = tmp_path / "out"

    args = ["--user_column", "question", "--assistant_column", "answer", "--split", "validation"]
    assert_converted(convert("hf", src, out, *args))
    assert_valid(out)
    records = read_jsonl(out / "hf_validation.jsonl")
    assert [r["id"] for r in records] == ["validation-0", "validation-2"]
    assert records[0]["conversations"][0] == {
        "images": ["validation/imgs/a.png"],
        "inline_images": True,
        "user": "What is <image> here?",
        "assistant": "a",
    }
    assert records[0]["answers"] == ["a", "A"]
    reasons = {e["input"]: e["reason"] for e in read_json(out / "convert_report.json")["skipped"]}
    assert "inside the image folder" in reasons["validation.parquet: row 1"]
    assert "no image bytes and no path" in reasons["validation.parquet: row 3"]

    bad = convert("hf", src, tmp_path / "bad", "--messages_column", "nope")
    assert bad.exit_code == 2 and "no such column" in bad.output
