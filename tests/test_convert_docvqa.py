"""``phi3v-data convert docvqa``: RRC JSON (both layouts) and HF parquet, on real excerpts and traps."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from image_converter_helpers import (
    PHI3V_DATA,
    assert_converted,
    assert_valid,
    convert,
    image_bytes,
    images_under,
    read_json,
    read_jsonl,
    report_reasons,
    run_cli,
    tree_bytes,
    write_image,
)
from PIL import Image

from phi3v_data.convert import convert_command
from phi3v_data.converters.docvqa import page_name, question_id


def _record(qid: int, doc: str, page: str, question: str, answers: list[str] | None) -> dict:
    record = {
        "questionId": qid,
        "question": question,
        "image": f"documents/{doc}_{page}.png",
        "docId": qid // 3,
        "ucsf_document_id": doc,
        "ucsf_document_page_no": page,
        "data_split": "val",
    }
    if answers is not None:
        record["answers"] = answers
    return record


#: Three questions on two pages: many questions share one page.
RECORDS = [
    _record(1, "abcd0001", "1", "What is the date?", ["1/8/93", "1/8/1993"]),
    _record(2, "abcd0001", "1", "Who signed it?", ["P. Carter"]),
    _record(3, "wxyz0002", "12", "What is the ‘total’?", ["$ 12", "12"]),
]


def _official(records: list[dict], split: str = "val") -> dict:
    return {
        "dataset_name": "docvqa",
        "dataset_version": "1.0",
        "dataset_split": split,
        "data": records,
    }


def _write_pages(folder: Path, records: list[dict]) -> dict[str, bytes]:
    pages = {}
    for index, record in enumerate(records):
        name = Path(record["image"]).name
        if name not in pages:
            pages[name] = write_image(folder / name, seed=index)
    return pages


def _rrc_2023(tmp_path: Path, records: list[dict]) -> Path:
    src = tmp_path / "rrc"
    (src / "spdocvqa_qas").mkdir(parents=True)
    (src / "spdocvqa_qas" / "val_v1.0_withQT.json").write_text(json.dumps(_official(records)))
    _write_pages(src / "spdocvqa_images", records)
    return src


def test_real_excerpt_in_official_object_with_unlabeled_test(shared_dir: Path, tmp_path: Path):
    """The real val records wrapped as the official file; the test file has no answers."""
    records = json.loads((shared_dir / "fixtures/raw/docvqa/val_v1.0.json").read_text())
    src = _rrc_2023(tmp_path, records)
    test = [{k: v for k, v in record.items() if k != "answers"} for record in records[:4]]
    (src / "spdocvqa_qas" / "test_v1.0.json").write_text(json.dumps(_official(test, "test")))
    out = tmp_path / "out"

    assert_converted(run_cli("convert", "docvqa", src, "--out_dir", out))
    validated = run_cli("validate", out)
    assert validated.returncode == 0, validated.stdout + validated.stderr

    val = read_jsonl(out / "docvqa_val.jsonl")
    assert [r["id"] for r in val] == [f"val-{r['questionId']}" for r in records]
    for record, raw in zip(val, records, strict=True):
        turn = record["conversations"][0]
        assert turn["user"] == f"{raw['question']}\nAnswer briefly."
        assert turn["assistant"] == raw["answers"][0]
        assert record["answers"] == raw["answers"]  # every reference kept for ANLS
        doc, page = raw["ucsf_document_id"], raw["ucsf_document_page_no"]
        assert turn["images"] == [f"val/{doc}_{page}.png"]
    test_records = read_jsonl(out / "docvqa_test.jsonl")
    assert [r["conversations"][0]["assistant"] for r in test_records] == [""] * 4
    assert all("answers" not in r for r in test_records)
    info = read_json(out / "dataset.json")
    assert info["metrics"] == ["anls"]
    assert info["num_crops"] == 16
    assert info["unlabeled_splits"] == ["test"]


def test_legacy_layout_bare_list_and_shared_pages(tmp_path: Path):
    """Legacy ``val/val_v1.0.json`` as a bare list with ``val/documents/``: one image per page."""
    src = tmp_path / "legacy"
    (src / "val").mkdir(parents=True)
    (src / "val" / "val_v1.0.json").write_text(json.dumps(RECORDS))
    pages = _write_pages(src / "val" / "documents", RECORDS)
    out = tmp_path / "out"

    assert_converted(convert("docvqa", src, out))
    assert_valid(out)
    assert images_under(out) == ["val/abcd0001_1.png", "val/wxyz0002_12.png"]
    assert (out / "images/val/abcd0001_1.png").read_bytes() == pages["abcd0001_1.png"]
    val = read_jsonl(out / "docvqa_val.jsonl")
    assert [r["conversations"][0]["images"] for r in val] == [
        ["val/abcd0001_1.png"],
        ["val/abcd0001_1.png"],
        ["val/wxyz0002_12.png"],
    ]
    assert val[2]["conversations"][0]["user"] == "What is the ‘total’?\nAnswer briefly."
    assert read_json(out / "dataset.json")["unlabeled_splits"] == []


def test_withqt_file_wins_over_the_plain_one(tmp_path: Path):
    src = _rrc_2023(tmp_path, RECORDS)
    (src / "spdocvqa_qas" / "val_v1.0.json").write_text(json.dumps(RECORDS[:1]))
    out = tmp_path / "out"
    assert_converted(convert("docvqa", src, out))
    assert len(read_jsonl(out / "docvqa_val.jsonl")) == 3


def test_unusable_questions_are_skipped_and_reported(tmp_path: Path):
    records = [
        *RECORDS,
        _record(4, "miss0001", "1", "Where is the page?", ["nowhere"]),  # image file missing
        _record(5, "abcd0001", "1", "No answer here?", None),  # no answers in a labelled split
        _record(6, "abcd0001", "1", "   ", ["x"]),  # blank question
        _record(1, "abcd0001", "1", "Same id again?", ["y"]),  # duplicate questionId
        _record(7, "text0001", "1", "A text file named .png?", ["z"]),
        "not an object",
    ]
    src = _rrc_2023(tmp_path, RECORDS)
    (src / "spdocvqa_qas" / "val_v1.0_withQT.json").write_text(json.dumps(_official(records)))
    (src / "spdocvqa_images" / "text0001_1.png").write_text("this is not an image")
    out = tmp_path / "out"

    assert_converted(convert("docvqa", src, out))
    assert_valid(out)
    assert [r["id"] for r in read_jsonl(out / "docvqa_val.jsonl")] == ["val-1", "val-2", "val-3"]
    reasons = "\n".join(report_reasons(out))
    assert "image: missing documents/miss0001_1.png" in reasons
    assert "answers: none, in a labelled split (questionId 5)" in reasons
    assert "question: missing or empty (questionId 6)" in reasons
    assert "id: duplicate val-1" in reasons
    assert "text0001_1.png: not an image" in reasons
    assert "expected an object, got a string" in reasons
    assert read_json(out / "convert_report.json")["splits"]["val"] == {"records": 3, "skipped": 6}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"data": [\n  {"questionId": 1,\n', ":3: (json): "),
        ('{"dataset_name": "docvqa"}', ": data: missing"),
        ('{"data": {"questionId": 1}}', ": data: expected a list of records, got an object"),
    ],
)
def test_broken_annotation_file_is_one_line_error(tmp_path: Path, content: str, expected: str):
    src = tmp_path / "rrc"
    (src / "val").mkdir(parents=True)
    (src / "val" / "val_v1.0.json").write_text(content)
    result = convert("docvqa", src, tmp_path / "out")
    assert result.exit_code == 2
    assert f"{src / 'val' / 'val_v1.0.json'}{expected}" in result.output
    assert "Traceback" not in result.output


def test_src_without_annotations_is_refused(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    result = convert("docvqa", tmp_path / "empty", tmp_path / "out")
    assert result.exit_code == 2
    assert "no DocVQA annotations" in result.output


# ----------------------------------------------------------------------------- HF parquet

HF_SCHEMA = pa.schema(
    [
        ("questionId", pa.int32()),
        ("question", pa.string()),
        ("question_types", pa.list_(pa.string())),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("docId", pa.int32()),
        ("ucsf_document_id", pa.string()),
        ("ucsf_document_page_no", pa.string()),
        ("answers", pa.list_(pa.string())),
    ]
)


def _write_parquet(path: Path, records: list[dict], pages: dict[str, bytes], **kwargs) -> None:
    rows = [
        {
            **{key: record.get(key) for key in HF_SCHEMA.names if key != "image"},
            "question_types": record.get("question_types"),
            "image": {"bytes": pages[Path(record["image"]).name], "path": None},
        }
        for record in records
    ]
    schema = kwargs.pop("schema", HF_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kwargs)


def test_hf_parquet_gives_the_same_dataset_as_the_rrc_json(tmp_path: Path):
    """HuggingFaceM4 shards (validation + an answerless test) == the RRC files, byte for byte."""
    pages = {Path(r["image"]).name: image_bytes(seed=i) for i, r in enumerate(RECORDS) if i != 1}
    hf = tmp_path / "hf"
    _write_parquet(hf / "data/validation-00000-of-00002.parquet", RECORDS[:2], pages)
    _write_parquet(hf / "data/validation-00001-of-00002.parquet", RECORDS[2:], pages)
    unlabeled = [{**r, "answers": None} for r in RECORDS]
    _write_parquet(hf / "data/test-00000-of-00001.parquet", unlabeled, pages, row_group_size=2)

    rrc = tmp_path / "rrc"
    (rrc / "spdocvqa_qas").mkdir(parents=True)
    (rrc / "spdocvqa_qas/val_v1.0_withQT.json").write_text(json.dumps(_official(RECORDS)))
    test = [{k: v for k, v in r.items() if k != "answers"} for r in RECORDS]
    (rrc / "spdocvqa_qas/test_v1.0.json").write_text(json.dumps(_official(test, "test")))
    for name, data in pages.items():
        (rrc / "spdocvqa_images").mkdir(exist_ok=True)
        (rrc / "spdocvqa_images" / name).write_bytes(data)

    assert_converted(convert("docvqa", hf, tmp_path / "out_hf", "--workers", "2"))
    assert_converted(convert("docvqa", rrc, tmp_path / "out_rrc"))
    assert_valid(tmp_path / "out_hf")
    from_hf, from_rrc = _dataset_files(tmp_path / "out_hf"), _dataset_files(tmp_path / "out_rrc")
    assert from_hf == from_rrc
    assert images_under(tmp_path / "out_hf") == [
        "test/abcd0001_1.png",
        "test/wxyz0002_12.png",
        "val/abcd0001_1.png",
        "val/wxyz0002_12.png",
    ]
    assert read_json(tmp_path / "out_hf/dataset.json")["unlabeled_splits"] == ["test"]


def _dataset_files(out: Path) -> dict[str, bytes]:
    """The jsonl files and images (not dataset.json: it names the converter's options)."""
    tree = tree_bytes(out)
    return {k: v for k, v in tree.items() if k.endswith(".jsonl") or k.startswith("images/")}


def test_lmms_parquet_with_string_ids_and_a_row_without_bytes(tmp_path: Path):
    schema = HF_SCHEMA.set(0, pa.field("questionId", pa.string()))
    records = [{**r, "questionId": str(r["questionId"])} for r in RECORDS]
    pages = {Path(r["image"]).name: image_bytes(seed=i) for i, r in enumerate(RECORDS)}
    src = tmp_path / "lmms"
    _write_parquet(src / "DocVQA/validation-00000-of-00001.parquet", records, pages, schema=schema)
    table = pq.read_table(src / "DocVQA/validation-00000-of-00001.parquet")
    images = table.column("image").to_pylist()
    images[2] = {"bytes": None, "path": "wxyz0002_12.png"}
    table = table.set_column(3, "image", pa.array(images, type=HF_SCHEMA.field("image").type))
    pq.write_table(table, src / "DocVQA/validation-00000-of-00001.parquet")
    out = tmp_path / "out"

    assert_converted(convert("docvqa", src, out))
    assert_valid(out)
    assert [r["id"] for r in read_jsonl(out / "docvqa_val.jsonl")] == ["val-1", "val-2"]
    [reason] = report_reasons(out)
    assert reason.endswith("row group 0, row 2: no image bytes in the parquet row (1 record)")


def test_both_kinds_for_one_split_needs_format(tmp_path: Path):
    src = _rrc_2023(tmp_path, RECORDS)
    pages = {Path(r["image"]).name: image_bytes(seed=i) for i, r in enumerate(RECORDS)}
    _write_parquet(src / "data/validation-00000-of-00001.parquet", RECORDS, pages)
    refused = convert("docvqa", src, tmp_path / "refused")
    assert refused.exit_code == 2 and "--format rrc|parquet" in refused.output
    assert_converted(convert("docvqa", src, tmp_path / "out", "--format", "parquet"))
    assert len(read_jsonl(tmp_path / "out/docvqa_val.jsonl")) == 3


def test_normalisers():
    assert question_id(49153) == "49153"
    assert question_id("049153") == "49153"
    assert question_id(True) is None
    assert page_name({"ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81"}) == (
        "pybv0228_81"
    )
    assert page_name({"ucsf_document_id": "pybv0228", "ucsf_document_page_no": 81}) == "pybv0228_81"
    assert page_name({"image": "documents/xnbl0037_1.png"}) == "xnbl0037_1"


def test_killed_parquet_conversion_resumes_to_the_same_bytes(tmp_path: Path):
    """SIGKILL part way through a parquet conversion; the rerun equals an uninterrupted run."""
    rng = np.random.default_rng(0)
    pages, records = {}, []
    for index in range(240):
        name = f"page{index:04d}_1.png"
        buffer = io.BytesIO()
        noise = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="PNG")
        pages[name] = buffer.getvalue()
        for question in range(2):  # two questions per page: items of two records
            qid = 10 * index + question
            records.append(_record(qid, f"page{index:04d}", "1", f"Question {qid}?", [f"a{qid}"]))
    src = tmp_path / "hf"
    _write_parquet(
        src / "data/validation-00000-of-00001.parquet", records, pages, row_group_size=50
    )
    args = ["convert", "docvqa", str(src), "--workers", "2", "--out_dir"]

    reference = tmp_path / "reference"
    assert_converted(run_cli(*args, reference))

    out = tmp_path / "killed"
    journal = out / ".phi3v-convert" / "journal.jsonl"
    process = subprocess.Popen([PHI3V_DATA, *args, str(out)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the conversion ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "docvqa_val.jsonl").exists()
    done = journal.read_bytes().count(b"\n")
    assert 20 <= done < 240

    assert_converted(run_cli(*args, out))
    assert tree_bytes(out) == tree_bytes(reference)


def test_corrupt_parquet_shard_is_one_line_error(tmp_path: Path):
    shard = tmp_path / "hf/data/validation-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"PAR1" + bytes(range(256)) * 8)
    result = convert("docvqa", tmp_path / "hf", tmp_path / "out")
    assert result.exit_code == 2
    assert f"{shard}: not a readable parquet file" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_listed_with_help():
    listed = CliRunner().invoke(convert_command, ["--list"])
    names = [line.split()[0] for line in listed.output.splitlines()]
    assert {"docvqa", "nlvr2", "hateful_memes"} <= set(names)
    for name, options in {
        "docvqa": ["--images_dir", "--format", "Answer briefly."],
        "nlvr2": ["--images_dir", "--answer_words", "img0", "consistency"],
        "hateful_memes": ["--images_dir", "--answer_words", "unlabeled_splits"],
    }.items():
        helped = CliRunner().invoke(convert_command, [name, "--help"], terminal_width=100)
        assert helped.exit_code == 0
        for option in ["--out_dir", "--workers", "--overwrite", *options]:
            assert option in helped.output, (name, option)
