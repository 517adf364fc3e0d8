"""Issue 12, the ``convert`` side: no path built from data leaves its root, no special file is
waited on, no run loses data silently (lock on OUT, environment errors abort instead of being
journaled as a record's fault), and Ctrl-C / full or read-only disks give one line."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_converter_helpers import (
    PHI3V_DATA,
    assert_converted,
    assert_valid,
    convert,
    image_bytes,
    read_json,
    read_jsonl,
    report_reasons,
    write_image,
    write_jsonl,
)
from PIL import Image

import phi3v_data.workers
from phi3v_data.convert import LOCK_FILENAME, STATE_DIRNAME, ImageWriter
from phi3v_data.synth import synth_ucf101


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _one_line_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


# ----------------------------------------------------------------------------- raw trees


def _docvqa_record(qid: int, doc: str, page: str) -> dict:
    return {
        "questionId": qid,
        "question": f"Question {qid}?",
        "ucsf_document_id": doc,
        "ucsf_document_page_no": page,
        "answers": [f"a{qid}"],
    }


GOOD_DOC = _docvqa_record(1, "good0001", "1")
#: ucsf_document_id / page values that must never become a path outside OUT/images
ESCAPES = [
    ("../../../../victim", "1"),
    ("/tmp/phi3v-victim", "1"),
    ("..\\..\\victim", "1"),
    ("good0002", "1/../../../../victim"),
]


def _docvqa_json(src: Path, records: list[dict]) -> Path:
    (src / "spdocvqa_qas").mkdir(parents=True)
    data = {"data": records}
    (src / "spdocvqa_qas" / "val_v1.0_withQT.json").write_text(json.dumps(data))
    write_image(src / "spdocvqa_images" / "good0001_1.png", seed=1)
    return src


def _docvqa_parquet(src: Path, records: list[dict]) -> Path:
    rows = [
        {**record, "image": {"bytes": image_bytes(seed=index), "path": None}}
        for index, record in enumerate(records)
    ]
    (src / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), src / "data" / "validation-00000-of-00001.parquet")
    return src


def _memes(src: Path, count: int, extra: list[dict] | None = None) -> list[dict]:
    rows = [
        {"id": index, "img": f"img/{index:05d}.png", "label": index % 2, "text": f"t{index}"}
        for index in range(1, count + 1)
    ]
    for row in rows:
        write_image(src / row["img"], seed=row["id"])
    write_jsonl(src / "train.jsonl", rows + (extra or []))
    return rows


# ----------------------------------------------------------------------------- class 1: paths


@pytest.mark.parametrize("kind", ["json", "parquet"])
@pytest.mark.parametrize(("doc", "page"), ESCAPES)
def test_docvqa_ids_that_escape_are_rejected_before_writing(
    tmp_path: Path, kind: str, doc: str, page: str
):
    victim = tmp_path / "victim_1.png"
    victim.write_bytes(b"precious")
    records = [GOOD_DOC, _docvqa_record(2, doc, page)]
    build = _docvqa_json if kind == "json" else _docvqa_parquet
    src = build(tmp_path / "raw" / "src", records)
    out = tmp_path / "raw" / "out"
    before = _files(tmp_path)

    assert_converted(convert("docvqa", src, out))
    assert [r["id"] for r in read_jsonl(out / "docvqa_val.jsonl")] == ["val-1"]
    reasons = report_reasons(out)
    assert len(reasons) == 1 and "unsafe path" in reasons[0], reasons
    assert_valid(out)
    after = _files(tmp_path)
    outside = {k: v for k, v in after.items() if not k.startswith("raw/out/")}
    assert outside == before  # nothing outside OUT created or overwritten
    assert not Path("/tmp/phi3v-victim_1.png").exists()


def _half_converted(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str) -> None:
    """A memes conversion stopped by a full disk while writing ``fail_on``."""
    real_write = ImageWriter._write

    def write(self: ImageWriter, relative: str, data: object) -> str:
        if fail_on in relative:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path(relative)))
        return real_write(self, relative, data)

    with monkeypatch.context() as patch:
        patch.setattr(ImageWriter, "_write", write)
        result = convert("hateful_memes", src, out)
    assert result.exit_code == 2 and "No space left on device" in result.output


def test_symlinked_folder_inside_out_images_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    src, out, elsewhere = tmp_path / "src", tmp_path / "out", tmp_path / "elsewhere"
    _memes(src, 4)
    _half_converted(src, out, monkeypatch, "00001")
    elsewhere.mkdir()
    train_images = out / "images" / "train"
    shutil.rmtree(train_images, ignore_errors=True)
    train_images.parent.mkdir(exist_ok=True)
    train_images.symlink_to(elsewhere, target_is_directory=True)  # planted between runs

    assert_converted(convert("hateful_memes", src, out))
    assert list(elsewhere.iterdir()) == []
    reasons = report_reasons(out)
    assert len(reasons) == 4 and all("unsafe path" in r and "outside" in r for r in reasons)


@pytest.mark.parametrize(
    "img",
    [
        "../secret.png",
        "../../secret.png",
        "/ABS/secret.png",
        "img/link.png",
        "img\\..\\..\\secret.png",
    ],
)
def test_memes_images_named_by_data_stay_inside_src(tmp_path: Path, img: str):
    secret = write_image(tmp_path / "secret.png", seed=99)
    src, out = tmp_path / "data" / "src", tmp_path / "data" / "out"
    src.mkdir(parents=True)
    (src / "img").mkdir()
    (src / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    img = img.replace("/ABS", str(tmp_path))
    _memes(src, 2, extra=[{"id": 7, "img": img, "label": 1, "text": "steal"}])

    assert_converted(convert("hateful_memes", src, out))
    assert [r["id"] for r in read_jsonl(out / "hateful_memes_train.jsonl")] == [
        "train-00001",
        "train-00002",
    ]
    assert any("unsafe path" in reason for reason in report_reasons(out)), report_reasons(out)
    assert secret not in _files(out).values()


def test_nlvr2_image_symlinked_out_of_src_is_not_read(tmp_path: Path):
    secret = write_image(tmp_path / "secret.png", seed=42)
    src, out = tmp_path / "data" / "src", tmp_path / "data" / "out"
    rows = []
    for pair in range(2):
        identifier = f"dev-1-{pair}-0"
        rows.append({"identifier": identifier, "sentence": "s", "label": "True"})
        for side in ("img0", "img1"):
            write_image(src / "dev" / f"dev-1-{pair}-{side}.png", seed=pair)
    (src / "dev" / "dev-1-1-img1.png").unlink()
    (src / "dev" / "dev-1-1-img1.png").symlink_to(tmp_path / "secret.png")
    write_jsonl(src / "dev.json", rows)

    assert_converted(convert("nlvr2", src, out))
    assert [r["id"] for r in read_jsonl(out / "nlvr2_dev.jsonl")] == ["dev-1-0-0"]
    assert "unsafe path" in report_reasons(out)[0]
    assert secret not in _files(out).values()


@pytest.fixture(scope="module")
def ucf_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ucf")
    synth_ucf101(root, classes=2, groups=2, clips=2, frames=12, size=(32, 24), seed=1)
    return root


def _ucf_copy(ucf_raw: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(ucf_raw), str(dest)], check=True)
    return dest


def _convert_ucf(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """A real ``phi3v-data convert ucf101`` (the timeout catches a FIFO opened and waited on)."""
    return subprocess.run(
        _cli("convert", "ucf101", src, "--out_dir", out, "--num_frames", "2"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ucf101_list_entries_that_escape_and_fifos_are_skipped(tmp_path: Path, ucf_raw: Path):
    src = _ucf_copy(ucf_raw, tmp_path / "src")
    lists, videos = src / "ucfTrainTestlist", src / "UCF-101"
    classes = (lists / "classInd.txt").read_text().splitlines()
    (lists / "classInd.txt").write_text("\r\n".join([*classes, f"{len(classes) + 1} .."]) + "\r\n")
    outside = tmp_path / "v_Outside_g01_c01.avi"
    first_video = sorted(videos.rglob("*.avi"))[0]
    outside.write_bytes(first_video.read_bytes())
    with (lists / "trainlist01.txt").open("a") as handle:
        handle.write(f"../v_Outside_g01_c01.avi {len(classes) + 1}\r\n")
    fifo = sorted(videos.rglob("*.avi"))[-1]
    fifo.unlink()
    os.mkfifo(fifo)

    out = tmp_path / "out"
    result = _convert_ucf(src, out)
    assert result.returncode == 0, result.stderr
    reasons = {
        entry["input"]: entry["reason"]
        for entry in read_json(out / "convert_report.json")["skipped"]
    }
    assert "unsafe path" in reasons["../v_Outside_g01_c01.avi"]
    fifo_key = fifo.relative_to(videos).as_posix()
    assert "not a regular file" in reasons[fifo_key]
    assert_valid(out)


def test_ucf101_subset_fifo_in_listing_is_reported_not_opened(tmp_path: Path, ucf_raw: Path):
    src = tmp_path / "subset"
    for split, group in (("train", "g01"), ("test", "g02")):
        for video in sorted((ucf_raw / "UCF-101").rglob(f"*_{group}_*.avi")):
            target = src / split / video.parent.name / video.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(video.read_bytes())
    fifo = src / "train" / "Archery" / "v_Archery_g09_c01.avi"
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    out = tmp_path / "out"
    result = _convert_ucf(src, out)
    assert result.returncode == 0, result.stderr
    assert any("not a regular file" in reason for reason in report_reasons(out))


# ----------------------------------------------------------------------------- class 3: loss


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES])
def test_environment_errors_abort_and_a_rerun_converts_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, workers: str
):
    src, out = tmp_path / "src", tmp_path / "out"
    rows = _memes(src, 12)
    real_write = ImageWriter._write

    def write(self: ImageWriter, relative: str, data: object) -> str:
        if relative.endswith(("00005.png", "00009.png")):  # some items only, in any worker
            raise OSError(code, os.strerror(code), str(self.path(relative)))
        return real_write(self, relative, data)

    with monkeypatch.context() as patch:
        patch.setattr(ImageWriter, "_write", write)
        patch.setattr(phi3v_data.workers, "start_method", lambda: "fork")  # workers see the patch
        failed = convert("hateful_memes", src, out, "--workers", workers)
    assert failed.exit_code == 2
    line = _one_line_error(failed.output)
    assert os.strerror(code) in line and str(out / "images") in line
    journal = out / STATE_DIRNAME / "journal.jsonl"
    if journal.exists():
        assert b'"skip"' not in journal.read_bytes()  # never recorded as a record's fault

    assert_converted(convert("hateful_memes", src, out, "--workers", workers))
    converted = read_jsonl(out / "hateful_memes_train.jsonl")
    assert len(converted) == len(rows)
    assert read_json(out / "convert_report.json")["skipped_total"] == 0
    assert_valid(out)


def test_environment_error_reading_a_source_image_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from phi3v_data.converters import _image_records

    src, out = tmp_path / "src", tmp_path / "out"
    _memes(src, 3)
    real_read = _image_records.read_regular_bytes

    def read(path: object, *args: object) -> bytes:
        if str(path).endswith("00002.png"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path, *args)

    with monkeypatch.context() as patch:
        patch.setattr(_image_records, "read_regular_bytes", read)
        failed = convert("hateful_memes", src, out)
    assert failed.exit_code == 2 and "00002.png: Input/output error" in failed.output
    assert_converted(convert("hateful_memes", src, out))
    assert len(read_jsonl(out / "hateful_memes_train.jsonl")) == 3


def test_lock_held_refuses_a_second_run_and_leaves_out_alone(tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    _memes(src, 3)
    out.mkdir()
    with (out / LOCK_FILENAME).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = convert("hateful_memes", src, out)
        assert refused.exit_code == 2
        assert "another convert is writing into it" in _one_line_error(refused.output)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILENAME]
    assert_converted(convert("hateful_memes", src, out))  # free again: a stale file is no lock
    assert not (out / LOCK_FILENAME).exists()


def _cli(*args: str | Path) -> list[str]:
    return [PHI3V_DATA, *map(str, args)]


def test_two_concurrent_runs_into_one_out(tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    rows = _memes(src, 60)
    command = _cli("convert", "hateful_memes", src, "--out_dir", out)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        manifest = out / STATE_DIRNAME / "manifest.json"
        while not manifest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # holds the lock while the second one starts
        assert first.poll() is None, "the first run finished before the second could start"
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "another convert is writing into it" in _one_line_error(second.stderr)
    finally:
        first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert len(read_jsonl(out / "hateful_memes_train.jsonl")) == len(rows)
    assert_valid(out)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr


# ----------------------------------------------------------------------------- class 2/4: Ctrl-C


def test_ctrl_c_with_workers_prints_one_line_and_resumes(tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    synth_ucf101(src, classes=3, groups=4, clips=3, frames=40, size=(64, 48), seed=2)
    command = _cli(
        "convert", "ucf101", src, "--out_dir", out, "--workers", "2", "--num_frames", "8"
    )
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    journal = out / STATE_DIRNAME / "journal.jsonl"
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        if journal.exists() and journal.stat().st_size > 0:
            break
        time.sleep(0.01)
    assert run.poll() is None, "finished before it could be interrupted"
    os.killpg(run.pid, signal.SIGINT)  # as a terminal does: parent and workers alike
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    assert "interrupted" in _one_line_error(stderr)

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    report = read_json(out / "convert_report.json")
    assert report["skipped_total"] == 0
    assert sum(split["records"] for split in report["splits"].values()) == 36
    assert_valid(out)


# ----------------------------------------------------------------------------- class 4: OUT


def test_out_dir_that_is_a_file(tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    _memes(src, 2)
    out.write_bytes(b"keep me")
    result = subprocess.run(
        _cli("convert", "hateful_memes", src, "--out_dir", out),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert str(out) in _one_line_error(result.stderr.replace("Usage:", "").split("\n\n")[-1])
    assert out.read_bytes() == b"keep me"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 64 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_then_read_only_disk_one_line_and_nothing_lost(tmp_path: Path, small_disk: Path):
    src, out = tmp_path / "src", small_disk / "out"
    rows = [
        {"id": index, "img": f"img/{index:05d}.png", "label": index % 2, "text": "t"}
        for index in range(1, 9)
    ]
    (src / "img").mkdir(parents=True)
    for row in rows:  # 8 incompressible ~13 KiB images: they cannot all fit in 64 KiB
        noise = Image.frombytes("RGB", (70, 60), os.urandom(70 * 60 * 3))
        buffer = io.BytesIO()
        noise.save(buffer, format="PNG")
        (src / row["img"]).write_bytes(buffer.getvalue())
    write_jsonl(src / "train.jsonl", rows)
    command = _cli("convert", "hateful_memes", src, "--out_dir", out)

    full = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert full.returncode != 0
    assert "No space left on device" in _one_line_error(full.stderr)
    kept = _files(out / "images") if (out / "images").exists() else {}

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    read_only = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert read_only.returncode != 0
    line = _one_line_error(read_only.stderr)
    assert "Read-only file system" in line and str(out) in line
    assert (_files(out / "images") if (out / "images").exists() else {}) == kept

    subprocess.run(["mount", "-o", "remount,rw,size=1m", str(small_disk)], check=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(out / "hateful_memes_train.jsonl")) == len(rows)
    assert_valid(out)
