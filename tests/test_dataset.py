"""The dataset reading API used by the trainer and the converters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataset_files import record, write_dataset, write_jsonl

from phi3v_data.dataset import (
    DatasetError,
    find_splits,
    images_root,
    iter_dataset,
    iter_records,
    line_chunks,
    load_info,
    read_lines,
    read_split,
    scan_splits,
)


@pytest.mark.parametrize(
    ("folder", "files", "info", "splits"),
    [
        ("docvqa", ["docvqa_train", "docvqa_val"], None, {"train", "val"}),
        (
            "data",
            ["hm_train", "hm_dev_seen", "hm_dev_unseen"],
            None,
            {"train", "dev_seen", "dev_unseen"},
        ),
        ("data", ["hm_dev_seen", "hm_dev_unseen"], None, {"dev_seen", "dev_unseen"}),
        ("data", ["my_set_train"], None, {"train"}),
        ("data", ["my_set_a", "my_set_b"], {"name": "my_set"}, {"a", "b"}),
        ("nlvr2", ["nlvr2_train", "nlvr2_test1", "nlvr2_test2"], None, {"train", "test1", "test2"}),
    ],
)
def test_split_names(tmp_path: Path, folder: str, files: list[str], info, splits: set) -> None:
    dataset = write_dataset(tmp_path / folder, {}, info=info)
    for stem in files:
        write_jsonl(dataset / f"{stem}.jsonl", [record(stem)])
    found = find_splits(dataset)
    assert set(found) == splits
    assert all(path.parent == dataset and path.suffix == ".jsonl" for path in found.values())


def test_misnamed_file_is_an_error(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "toy", {"train": [record("a")]})
    write_jsonl(dataset / "notes.jsonl", [record("b")])
    assert scan_splits(dataset).misnamed == [dataset / "notes.jsonl"]
    with pytest.raises(DatasetError, match=r"notes.jsonl:0: \(file name\): .*toy_<split>.jsonl"):
        find_splits(dataset)


def test_iter_records_gives_line_numbers_and_stops_at_the_first_bad_line(tmp_path: Path) -> None:
    dataset = write_dataset(
        tmp_path / "toy", {"train": [record("a"), record("b"), "{", record("c")]}
    )
    records = iter_records(dataset / "toy_train.jsonl")
    assert [(line, item.id) for line, item in (next(records), next(records))] == [
        (1, "a"),
        (2, "b"),
    ]
    with pytest.raises(DatasetError) as error:
        next(records)
    assert (error.value.line, error.value.field) == (3, "(json)")
    assert str(error.value).startswith(f"{dataset / 'toy_train.jsonl'}:3: (json): invalid JSON")


def test_unlabeled_split_comes_from_dataset_json(tmp_path: Path) -> None:
    rows = [record("a", assistant="")]
    dataset = write_dataset(
        tmp_path / "toy", {"test": rows, "train": rows}, info={"unlabeled_splits": ["test"]}
    )
    assert [item.id for item in read_split(dataset, "test")] == ["a"]
    with pytest.raises(
        DatasetError, match="toy_train.jsonl:1: conversations.0.assistant: is empty"
    ):
        read_split(dataset, "train")
    with pytest.raises(DatasetError, match="no split 'val' \\(found: test, train\\)"):
        read_split(dataset, "val")
    assert images_root(dataset) == dataset / "images"


def test_load_info(tmp_path: Path) -> None:
    assert load_info(tmp_path).metrics == ["accuracy"]
    (tmp_path / "dataset.json").write_text(json.dumps({"metrics": ["anls"], "num_crops": 4}))
    assert load_info(tmp_path).num_crops == 4
    (tmp_path / "dataset.json").write_text('{\n  "metrics": ["anls"],\n  "num_crop": 4\n}')
    with pytest.raises(DatasetError, match=r"dataset.json:3: num_crop: unknown key"):
        load_info(tmp_path)


def test_read_lines_and_chunks_cover_a_file_exactly(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    lines = [b'{"n": %d, "pad": "%s"}' % (index, b"x" * (index % 13)) for index in range(300)]
    path.write_bytes(b"\n".join(lines))  # no final newline
    chunks = line_chunks(path, 500)
    assert len(chunks) > 5 and chunks[0][0] == 0 and chunks[-1][1] == path.stat().st_size
    assert all(stop == start for (_, stop), (start, _) in zip(chunks, chunks[1:], strict=False))
    read = [
        data for start, stop in chunks for _, data, _ in read_lines(path, start=start, stop=stop)
    ]
    assert read == lines
    assert line_chunks(tmp_path / "x.jsonl", 10**9) == [(0, path.stat().st_size)]


def test_read_lines_skips_a_huge_line_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"{}\n" + b"y" * 5000 + b"\n{}\n")
    got = list(read_lines(path, max_line_bytes=100))
    assert got == [
        (1, b"{}", None),
        (2, None, ("(line)", "line longer than 100 bytes; skipped")),
        (3, b"{}", None),
    ]


def test_iter_dataset_walks_every_split(tmp_path: Path) -> None:
    dataset = write_dataset(
        tmp_path / "toy", {"train": [record("a"), record("b")], "test": [record("c")]}
    )
    walked = [(split, line, item.id) for split, line, item in iter_dataset(dataset)]
    assert walked == [("test", 1, "c"), ("train", 1, "a"), ("train", 2, "b")]
