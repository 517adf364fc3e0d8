"""Every rule of ``phi3v-data validate`` on real files in temporary folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dataset_files import (
    animated_bytes,
    image_bytes,
    png16_bytes,
    png_corrupt_stream,
    png_header_only,
    record,
    truncated,
    write_dataset,
    write_jsonl,
)

from phi3v_data import validate as validate_module
from phi3v_data.validate import ValidationReport, validate_dataset

PROBLEM_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<field>\S+): (?P<message>.+)$")


def run_validate(path: Path, **options) -> ValidationReport:
    options.setdefault("jobs", 1)
    return validate_dataset(path, **options)


def found(report: ValidationReport, file: str, line: int, field: str, words: str) -> bool:
    """Whether the report holds a problem at ``<file>:<line>: <field>`` saying ``words``."""
    return any(
        Path(problem.path).name == file
        and problem.line == line
        and problem.field == field
        and words in problem.message
        for problem in report.problems
    )


def only_problem(report: ValidationReport) -> str:
    assert len(report.problems) == 1, report.format_text()
    return str(report.problems[0])


@pytest.fixture
def good_dataset(tmp_path: Path) -> Path:
    images = {"a.jpg": image_bytes("JPEG"), "sub/b.png": image_bytes("PNG")}
    return write_dataset(
        tmp_path / "good",
        {
            "train": [
                record("t1", ["a.jpg"], assistant="yes"),
                record("t2", ["a.jpg", "sub/b.png"], assistant="no", label=0),
                record("t3", [], assistant="yes", answers=["yes", "Yes"], group="g1"),
            ],
            "test": [record("e1", ["sub/b.png", "a.jpg"], assistant="yes", label=1)],
        },
        images=images,
    )


def test_valid_dataset_has_no_problem_and_a_true_summary(good_dataset: Path, capsys) -> None:
    report = run_validate(good_dataset, progress=True)
    assert "validate: 100%" in capsys.readouterr().err
    assert report.ok, report.format_text()
    summary = report.summary.to_json()
    assert summary["records"] == 4 and summary["turns"] == 4
    assert summary["images"] == 5 and summary["distinct_images"] == 2
    assert summary["images_per_record"] == {"min": 0, "mean": 1.25, "max": 2}
    assert [tuple(pair) for pair in summary["answers_top10"]] == [("yes", 3), ("no", 1)]
    assert summary["labels"] == {"0": 1, "1": 1}
    assert summary["image_formats"] == {"JPEG": 1, "PNG": 1}
    assert [split["split"] for split in summary["splits"]] == ["train", "test"]
    assert summary["user_chars"]["max"] == len("What is shown?")


def test_schema_defects_are_plain_one_line_messages(tmp_path: Path) -> None:
    bad_types = record("x", ["a.jpg"])
    bad_types["id"] = 5
    bad_types["conversations"][0]["images"] = "a.jpg"
    rows = [
        '{"id": "a", ',
        bad_types,
        {**record("y"), "assitant": "typo"},
        record("z", ["/abs/a.jpg", "a/../b.jpg", "a\\b.jpg", "./a.jpg", "a//b.jpg"]),
        record("w", user="   "),
        {"id": "v", "source": "s", "conversations": []},
        [1, 2],
        record("u", label=2),
    ]
    rows[6] = "[1, 2]"
    dataset = write_dataset(tmp_path / "d", {"train": rows})
    report = run_validate(dataset)
    file = "toy_train.jsonl"
    assert found(report, file, 1, "(json)", "invalid JSON: EOF while parsing")
    assert found(report, file, 2, "id", "must be a string, got a number")
    assert found(report, file, 2, "conversations.0.images", "must be an array, got a string")
    assert found(report, file, 3, "assitant", "unknown key")
    assert found(report, file, 4, "conversations.0.images.0", "is absolute")
    assert found(report, file, 4, "conversations.0.images.1", "contains '..'")
    assert found(report, file, 4, "conversations.0.images.2", "backslash")
    assert found(report, file, 4, "conversations.0.images.3", "'.' component")
    assert found(report, file, 4, "conversations.0.images.4", "empty component")
    assert found(report, file, 5, "conversations.0.user", "blank")
    assert found(report, file, 6, "conversations", "at least 1 item")
    assert found(report, file, 7, "(record)", "must be an object, got an array")
    assert found(report, file, 8, "label", "must be 0 or 1, got 2")
    for problem in report.problems:
        assert "pattern" not in problem.message and "\n" not in str(problem)
        assert PROBLEM_LINE.match(str(problem)), problem


def test_line_level_defects(tmp_path: Path) -> None:
    good = json.dumps(record("a")).encode()
    dataset = tmp_path / "d"
    write_dataset(dataset, {})
    (dataset / "toy_train.jsonl").write_bytes(
        b"\xef\xbb\xbf"
        + good
        + b"\n\n   \n"
        + json.dumps(record("b", user="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9")
        + b"\n"
        + json.dumps(record("c")).encode()
        + b"\r\n"
    )
    report = run_validate(dataset)
    file = "toy_train.jsonl"
    assert found(report, file, 1, "(encoding)", "byte order mark")
    assert found(report, file, 2, "(line)", "empty line")
    assert found(report, file, 3, "(line)", "empty line")
    assert found(report, file, 4, "(encoding)", "not valid UTF-8")
    assert len(report.problems) == 4, report.format_text()
    assert report.summary.records == 2  # the BOM line is still read; the CRLF line is fine


def test_huge_line_is_reported_without_reading_it(tmp_path: Path, monkeypatch) -> None:
    from phi3v_data import dataset as dataset_module

    monkeypatch.setattr(dataset_module, "MAX_LINE_BYTES", 1000)
    huge = json.dumps(record("big", user="x" * 5000))
    dataset = write_dataset(tmp_path / "d", {"train": [record("a"), huge, record("b")]})
    report = run_validate(dataset)
    assert only_problem(report).endswith(
        "toy_train.jsonl:2: (line): line longer than 1000 bytes; skipped"
    )
    assert report.summary.records == 2


def test_image_files_rules(tmp_path: Path) -> None:
    jpeg, png = image_bytes("JPEG", size=(128, 96)), image_bytes("PNG", size=(128, 96))
    images = {
        "ok.jpg": jpeg,
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "cut.png": png[: len(png) - 40],
        "cmyk.jpg": image_bytes("JPEG", mode="CMYK"),
        "palette.png": image_bytes("PNG", mode="P"),
        "gray_alpha.png": image_bytes("PNG", mode="LA"),
        "wide.png": png16_bytes(),
        "anim.gif": animated_bytes("GIF"),
        "anim.png": animated_bytes("PNG"),
        "bomb.png": png_header_only(12_000, 12_000),
        "huge_bomb.png": png_header_only(40_000, 40_000),
        "dir.jpg/inner.jpg": jpeg,
    }
    names = list(images)[:-1] + [
        "dir.jpg",
        "missing.jpg",
        "link_in.jpg",
        "link_out.jpg",
        "dead.jpg",
    ]
    dataset = write_dataset(
        tmp_path / "d",
        {"train": [record(f"r{index}", [name]) for index, name in enumerate(names)]},
        images=images,
    )
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg)
    os.symlink("ok.jpg", dataset / "images" / "link_in.jpg")
    os.symlink(outside, dataset / "images" / "link_out.jpg")
    os.symlink("nowhere.jpg", dataset / "images" / "dead.jpg")
    expected = {
        "empty.jpg": "empty file (0 bytes)",
        "text.jpg": "not an image file",
        "cut.jpg": "truncated",
        "cut.png": "truncated",
        "wide.png": "I;16 image",
        "anim.gif": "animated GIF (3 frames)",
        "anim.png": "animated PNG (3 frames)",
        "bomb.png": "decompression bomb: 12000x12000",
        "huge_bomb.png": "decompression bomb",
        "dir.jpg": "not a regular file",
        "missing.jpg": "does not exist",
        "link_out.jpg": "outside images/",
        "dead.jpg": "broken symlink",
    }
    for deep in (False, True):
        report = run_validate(dataset, deep=deep)
        for line, name in enumerate(names, 1):
            if name in expected:
                assert found(
                    report, "toy_train.jsonl", line, "conversations.0.images.0", expected[name]
                ), (deep, name, report.format_text())
        assert len(report.problems) == len(expected), report.format_text()
        assert report.summary.image_modes["CMYK"] == 1 and report.summary.image_modes["LA"] == 1


def test_default_check_decodes_every_format_but_jpeg(tmp_path: Path) -> None:
    """What training would trip over is caught without --deep: a PNG with valid CRCs but a
    corrupt compressed stream, truncated BMP / TIFF / GIF / WebP (their headers look fine)."""
    images = {
        "stream.png": png_corrupt_stream(),
        "cut.bmp": truncated(image_bytes("BMP")),
        "cut.tif": truncated(image_bytes("TIFF")),
        "cut.gif": truncated(animated_bytes("GIF", frames=1), 0.8),
        "cut.webp": truncated(image_bytes("WEBP")),
        "ok.bmp": image_bytes("BMP"),
        "ok.tif": image_bytes("TIFF"),
        "ok.gif": image_bytes("GIF"),
    }
    rows = [record(f"r{index}", [name]) for index, name in enumerate(images)]
    dataset = write_dataset(tmp_path / "d", {"train": rows}, images=images)
    for deep in (False, True):
        report = run_validate(dataset, deep=deep)
        for line in range(1, 6):
            assert found(report, "toy_train.jsonl", line, "conversations.0.images.0", "decoded")
        assert len(report.problems) == 5, report.format_text()


def test_bad_image_reported_once_at_first_reference(tmp_path: Path) -> None:
    rows = [record(f"r{index}", ["ok.jpg", "gone.jpg"]) for index in range(5)]
    dataset = write_dataset(tmp_path / "d", {"train": rows}, images={"ok.jpg": image_bytes()})
    report = run_validate(dataset)
    assert only_problem(report).endswith(
        "toy_train.jsonl:1: conversations.0.images.1: gone.jpg: does not exist in images/"
    )


def test_ids_and_image_lists_across_splits(tmp_path: Path) -> None:
    images = {name: image_bytes() for name in ("a.jpg", "b.jpg", "c.jpg")}
    dataset = write_dataset(
        tmp_path / "d",
        {
            "train": [record("t1", ["a.jpg"]), record("t2", ["b.jpg"]), record("t1", ["c.jpg"])],
            "val": [record("v1", ["b.jpg"]), record("t2", ["a.jpg", "b.jpg"])],
            "test": [record("e1", ["c.jpg", "a.jpg"]), record("e1", ["a.jpg", "c.jpg"])],
        },
        images=images,
    )
    report = run_validate(dataset)
    assert found(report, "toy_train.jsonl", 3, "id", "duplicate id (first at")
    assert found(report, "toy_val.jsonl", 2, "id", "shared between splits train and val")
    assert found(report, "toy_val.jsonl", 1, "images", "same image list as train record")
    assert found(report, "toy_test.jsonl", 2, "id", "duplicate id")
    assert len(report.problems) == 4, report.format_text()  # image order matters: no test leak


def test_dataset_level_rules(tmp_path: Path) -> None:
    dataset = write_dataset(
        tmp_path / "d",
        {"train": [record("a")], "val": []},
        info={"unlabeled_splits": ["test", "tset"]},
    )
    write_jsonl(dataset / "toy_test.jsonl", [record("b", assistant="")])
    write_jsonl(dataset / "notes.jsonl", [record("c")])
    (dataset / "images").rmdir()
    report = run_validate(dataset)
    assert found(report, "images", 0, "(folder)", "missing images/ folder")
    assert found(report, "toy_val.jsonl", 0, "(file)", "the split is empty")
    assert found(report, "notes.jsonl", 0, "(file name)", "does not match toy_<split>.jsonl")
    assert found(report, "dataset.json", 1, "unlabeled_splits.1", "no split named 'tset'")
    assert len(report.problems) == 4, report.format_text()  # the unlabeled test split is fine


def test_bad_dataset_json_and_empty_folder(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "d", {}, info={"metrics": ["bleu"], "num_crops": 99})
    report = run_validate(dataset)
    assert found(report, "dataset.json", 1, "metrics.0", "must be")
    assert found(report, "dataset.json", 1, "num_crops", "")
    assert found(report, "d", 0, "(folder)", "no <name>_<split>.jsonl file")
    (dataset / "dataset.json").write_text('{\n  "name": "toy",\n  "metrics": [\n')
    assert found(run_validate(dataset), "dataset.json", 4, "(json)", "invalid JSON")


def test_images_per_record_limit(tmp_path: Path) -> None:
    rows = [record("a", ["x.jpg"] * 3), record("b", ["x.jpg"] * 2)]
    dataset = write_dataset(
        tmp_path / "d",
        {"train": rows},
        images={"x.jpg": image_bytes()},
        info={"max_images_per_record": 2},
    )
    assert "3 images in one record, more than the 2 allowed" in only_problem(run_validate(dataset))
    assert found(run_validate(dataset, max_images=1), "toy_train.jsonl", 2, "conversations", "")
    assert run_validate(dataset, max_images=3).ok


def test_single_file_mode(good_dataset: Path, tmp_path: Path) -> None:
    assert run_validate(good_dataset / "toy_test.jsonl").ok
    odd = write_jsonl(good_dataset / "scratch.jsonl", [record("a"), record("a")])
    report = run_validate(odd)
    assert found(report, "scratch.jsonl", 0, "(file name)", "does not match")
    assert found(report, "scratch.jsonl", 2, "id", "duplicate id")


def test_problem_cap_counts_what_it_hides(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "d", {"train": ["{"] * 7})
    report = run_validate(dataset, max_problems_per_file=2)
    assert len(report.problems) == 2 and report.suppressed == 5 and not report.ok
    assert "5 more problems not listed" in report.format_text()
    assert report.to_json()["problem_count"] == 7


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_chunks_on_worker_processes_give_the_same_report(
    tmp_path: Path, monkeypatch, start_method: str
) -> None:
    images = {f"i{index}.jpg": image_bytes() for index in range(3)}
    rows = []
    for index in range(400):
        rows.append(record(f"r{index}", [f"i{index % 3}.jpg"], assistant=f"a{index % 7}"))
        if index % 37 == 5:
            rows.append("{broken")
        if index % 91 == 3:
            rows.append(record(f"r{index - 1}", ["missing.jpg"]))
    dataset = write_dataset(tmp_path / "d", {"train": rows}, images=images)
    one = run_validate(dataset)
    monkeypatch.setattr(validate_module, "CHUNK_BYTES", 2000)
    monkeypatch.setattr(validate_module, "start_method", lambda: start_method)
    two = run_validate(dataset, jobs=2)
    assert [str(p) for p in one.problems] == [str(p) for p in two.problems]
    assert one.summary.to_json() == two.summary.to_json()
    assert found(one, "toy_train.jsonl", 8, "(json)", "invalid JSON")
    assert found(two, "toy_train.jsonl", 5, "id", "duplicate id (first at")


# --- the command line, in a subprocess ------------------------------------------------------------


def phi3v_data(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phi3v_data", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_and_formats(good_dataset: Path, tmp_path: Path) -> None:
    result = phi3v_data("validate", good_dataset)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: valid" in result.stdout and "records 4" in result.stdout
    result = phi3v_data("validate", good_dataset, "--format", "json", "--deep", "--jobs", "2")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["summary"]["records"] == 4
    assert phi3v_data("validate", tmp_path / "nowhere").returncode == 2
    assert phi3v_data("validate", good_dataset, "--format", "xml").returncode == 2
    (tmp_path / "notes.txt").write_text("hello")
    result = phi3v_data("validate", tmp_path / "notes.txt")
    assert result.returncode == 2 and "expected a dataset folder or a .jsonl file" in result.stderr
    help_text = phi3v_data("validate", "--help")
    assert help_text.returncode == 0 and "--deep" in help_text.stdout
    assert phi3v_data("--help").returncode == 0


def test_cli_io_error_exits_2_with_one_line(good_dataset: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    def unreadable(path, **options):
        raise PermissionError(13, "Permission denied", str(path / "toy_train.jsonl"))

    monkeypatch.setattr(validate_module, "validate_dataset", unreadable)
    result = CliRunner().invoke(validate_module.validate_command, [str(good_dataset)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: cannot read {good_dataset / 'toy_train.jsonl'}: Permission denied"
    )


def test_cli_reports_every_bad_input_without_traceback(tmp_path: Path) -> None:
    jpeg = image_bytes("JPEG", size=(128, 96))
    images = {
        "ok.jpg": jpeg,
        "zero.jpg": b"",
        "text.jpg": b"hello",
        "cut.jpg": jpeg[:300],
        "cmyk.jpg": image_bytes("JPEG", mode="CMYK"),
        "wide.png": png16_bytes(),
        "palette.png": image_bytes("PNG", mode="P"),
        "anim.webp": animated_bytes("WEBP"),
    }
    dataset = write_dataset(tmp_path / "d", {}, images=images)
    bad_record = record("types")
    bad_record["conversations"][0]["user"] = ["not", "text"]
    lines = [
        b"\xef\xbb\xbf" + json.dumps(record("bom", ["ok.jpg"])).encode(),
        b'{"id": "x", "source": ',
        json.dumps(bad_record).encode(),
        b"",
        b'{"id": "\xff\xfe", "source": "s", "conversations": []}',
        b'{"id": "big", "pad": "' + b"x" * (17 * 2**20) + b'"}',
    ] + [json.dumps(record(f"img{index}", [name])).encode() for index, name in enumerate(images)]
    (dataset / "toy_train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    file = str(dataset / "toy_train.jsonl")
    for output_format in ("text", "json"):
        result = phi3v_data("validate", dataset, "--format", output_format)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    result = phi3v_data("validate", dataset)
    expected = [
        f"{file}:1: (encoding): UTF-8 byte order mark",
        f"{file}:2: (json): invalid JSON",
        f"{file}:3: conversations.0.user: must be a string, got an array",
        f"{file}:4: (line): empty line",
        f"{file}:5: (encoding): not valid UTF-8",
        f"{file}:6: (line): line longer than",
        f"{file}:8: conversations.0.images.0: zero.jpg: empty file",
        f"{file}:9: conversations.0.images.0: text.jpg: not an image file",
        f"{file}:10: conversations.0.images.0: cut.jpg: cannot be decoded",
        f"{file}:12: conversations.0.images.0: wide.png: I;16 image",
        f"{file}:14: conversations.0.images.0: anim.webp: animated WEBP (3 frames)",
    ]
    reported = [line for line in result.stdout.splitlines() if line.startswith(file)]
    assert len(reported) == len(expected), result.stdout
    for line, start in zip(reported, expected, strict=True):
        assert line.startswith(start), (line, start)
