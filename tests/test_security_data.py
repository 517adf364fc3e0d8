"""Issue 12, data side: every attack on images and dataset files, through validate, training and
``phi3v-train eval``; each must end in one line naming the place, never a hang or a traceback.

Classes: one image-access path (symlink out of images/, FIFO, truncated or corrupt image files),
FIFOs and folders where dataset files belong, Ctrl-C during a parallel validate, unwritable eval
output, duplicate JSON keys.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from dataset_files import image_bytes, png_corrupt_stream, truncated
from PIL import Image
from train_helpers import base_args, tiny_model, write_dataset

from phi3v_data.dataset import DatasetError, RecordError, duplicate_keys, iter_records
from phi3v_data.images import ImageError, load_image
from phi3v_data.schema import Record
from phi3v_train.cli import group

#: What an attacker can put where images/val_red.png is expected (val record 1 names it).
IMAGE_ATTACKS = {
    "symlink_out": lambda path: os.symlink("/etc/passwd", path),
    "fifo": os.mkfifo,
    "truncated_bmp": lambda path: path.write_bytes(truncated(image_bytes("BMP", size=(96, 64)))),
    "truncated_tiff": lambda path: path.write_bytes(truncated(image_bytes("TIFF"))),
    "corrupt_png": lambda path: path.write_bytes(png_corrupt_stream()),
}
#: What a dataset file can be instead of a regular file.
FILE_ATTACKS = {"fifo": os.mkfifo, "folder": os.mkdir}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


def toy(root: Path) -> Path:
    return write_dataset(root, train=4, val=2, text_only_every=0)


def attack_image(data_dir: Path, attack: str, name: str = "val_red.png") -> Path:
    path = data_dir / "images" / name
    path.unlink()
    IMAGE_ATTACKS[attack](path)
    return path


def phi3v_data(*args: str | Path, timeout: int = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phi3v_data", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def invoke(*args: str | Path):
    """``phi3v-train ARGS`` in this process, through the CLI's own last net (LazyGroup)."""
    result = CliRunner().invoke(group, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def eval_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model_dir), "--data_dir", str(data_dir), "--split", "val",
            "--batch_size", "2", "--max_new_tokens", "2", "--out", str(out), *extra]  # fmt: skip


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


# --- 1 and 3: one image-access path -----------------------------------------------------------


@pytest.mark.parametrize("attack", list(IMAGE_ATTACKS))
def test_image_attack_refused_by_validate_and_eval(model_dir, tmp_path: Path, attack: str):
    data_dir = toy(tmp_path / "d")
    attack_image(data_dir, attack)
    jsonl = data_dir / "toy_val.jsonl"
    where = f"{jsonl}:1: conversations.0.images.0: val_red.png"

    result = phi3v_data("validate", data_dir)  # default check, no --deep
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert where in result.stdout, result.stdout

    out = tmp_path / "eval.json"
    result = invoke(*eval_args(model_dir, data_dir, out))
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert line.startswith(f"Error: {where}: "), result.output
    assert "record 'val-0'" in result.output and "root:" not in result.output
    assert not out.exists()


def test_image_attack_stops_training_with_one_line_even_in_a_worker(
    model_dir, tmp_path: Path, monkeypatch
):
    """An image that fails after validate passed (swapped later, or a case validate cannot
    see) stops training from a DataLoader worker with one line naming file, line and image."""
    from phi3v_data import validate
    from phi3v_data.validate import validate_dataset

    data_dir = toy(tmp_path / "d")
    report = validate_dataset(data_dir, jobs=1)
    assert report.ok
    attack_image(data_dir, "truncated_bmp", name="train_red.png")
    monkeypatch.setattr(validate, "validate_dataset", lambda *args, **kwargs: report)
    args = base_args(model_dir, data_dir, tmp_path / "out", num_workers=1, max_steps=2)
    result = invoke("train", *args)
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert line.startswith(
        f"Error: {data_dir / 'toy_train.jsonl'}:1: conversations.0.images.0: train_red.png: "
        "cannot be decoded"
    ), line
    assert "(record 'train-0')" in line


def test_eval_worker_error_is_picklable_and_names_the_record(model_dir, tmp_path: Path):
    from phi3v_train.evaluation.evaluate import evaluate_split, load_for_inference

    data_dir = toy(tmp_path / "d")
    attack_image(data_dir, "fifo", name="val_blue.png")
    model, processor = load_for_inference(model_dir, num_crops=1)
    started = time.monotonic()
    with pytest.raises(RecordError) as caught:
        evaluate_split(model, processor, data_dir, "val", batch_size=1, num_workers=1)
    assert time.monotonic() - started < 60
    error = caught.value
    assert (error.path, error.line, error.field) == (
        str(data_dir / "toy_val.jsonl"),
        2,
        "conversations.0.images.0",
    )
    assert "\n" not in str(error) and "not a regular file" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_load_image_is_the_one_path(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGBA", (8, 6), (1, 2, 3, 4)).save(root / "ok.png")
    (tmp_path / "secret.png").write_bytes((root / "ok.png").read_bytes())
    os.symlink(tmp_path / "secret.png", root / "out.png")
    os.mkfifo(root / "pipe.png")
    image = load_image(root, "ok.png")
    assert image.mode == "RGB" and image.size == (8, 6)
    for name, words in [
        ("out.png", "outside images/"),
        ("pipe.png", "not a regular file"),
        ("../secret.png", "without '..'"),
        ("gone.png", "does not exist"),
    ]:
        with pytest.raises(ImageError, match=words) as caught:
            load_image(root, name)
        assert str(caught.value).startswith(f"{name}: ")
        assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


# --- 2 and 4: dataset files that are FIFOs, folders or unreadable ------------------------------


@pytest.mark.parametrize("kind", list(FILE_ATTACKS))
@pytest.mark.parametrize("file", ["dataset.json", "toy_val.jsonl"])
def test_special_dataset_file_is_one_line_everywhere(
    model_dir, tmp_path: Path, kind: str, file: str
):
    data_dir = toy(tmp_path / "d")
    target = data_dir / file
    target.unlink(missing_ok=True)
    FILE_ATTACKS[kind](target)
    where = f"{target}:0: (file): is "

    result = phi3v_data("validate", data_dir, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert where in result.stdout, result.stdout

    args = base_args(model_dir, data_dir, tmp_path / "out", max_steps=1)
    result = invoke("train", *args)
    assert result.exit_code == 2 and where in result.output, result.output
    assert error_lines(result.output)[-1].endswith("nothing was trained")

    result = invoke(*eval_args(model_dir, data_dir, tmp_path / "eval.json"))
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert line.startswith(f"Error: {where}"), result.output


def test_unreadable_jsonl_is_one_line_everywhere(model_dir, tmp_path: Path, monkeypatch):
    """Permission 000 (tests run as root, so the open is made to fail as it would)."""
    from phi3v_data import dataset

    data_dir = toy(tmp_path / "d")
    jsonl = data_dir / "toy_val.jsonl"
    real_open = dataset.open_regular

    def open_regular(path):
        if Path(path) == jsonl:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(dataset, "open_regular", open_regular)
    expected = f"{jsonl}: Permission denied"
    from phi3v_data.validate import validate_command

    result = CliRunner().invoke(validate_command, [str(data_dir), "--jobs", "1"])
    assert result.exit_code == 2 and result.output.strip() == f"error: cannot read {expected}"
    result = invoke("train", *base_args(model_dir, data_dir, tmp_path / "out", max_steps=1))
    assert result.exit_code == 1 and error_lines(result.output) == [f"Error: {expected}"]
    result = invoke(*eval_args(model_dir, data_dir, tmp_path / "eval.json"))
    assert result.exit_code == 1 and error_lines(result.output) == [f"Error: {expected}"]


# --- 2: Ctrl-C during a parallel validate ------------------------------------------------------


def _group_members(group_id: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group_id and fields[0] != "Z":
                members.append(int(entry.name))
    return members


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,200 distinct images, slow enough to decode that Ctrl-C lands while workers run."""
    root = tmp_path_factory.mktemp("many")
    stream = io.BytesIO()
    Image.new("RGB", (1024, 1024), (10, 200, 30)).save(stream, "PNG")
    (root / "images").mkdir()
    rows = []
    for index in range(1200):
        (root / "images" / f"{index}.png").write_bytes(stream.getvalue())
        turn = {"images": [f"{index}.png"], "user": "q", "assistant": "a"}
        rows.append(json.dumps({"id": f"r{index}", "source": "t", "conversations": [turn]}))
    (root / "toy_train.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("trial", range(3))
def test_ctrl_c_during_parallel_validate_leaves_no_worker(many_images: Path, trial: int):
    command = [sys.executable, "-m", "phi3v_data", "validate", str(many_images), "--workers", "2"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while len(_group_members(process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # wait for the two workers: the interrupt must find them running
    assert process.poll() is None, "validate ended before it could be interrupted"
    time.sleep(0.05 * trial)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal does: the whole group
    if trial == 2:
        time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # impatient second Ctrl-C
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "InvalidStateError" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    deadline = time.monotonic() + 10
    while _group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(process.pid) == []


# --- 4: eval --out unwritable: refused before the evaluation, results never lost --------------


@pytest.mark.parametrize("case", ["directory", "parent_is_a_file", "read_only"])
def test_eval_out_unwritable_refused_before_evaluating(
    model_dir, tmp_path: Path, monkeypatch, case: str
):
    from phi3v_train.evaluation import evaluate

    data_dir = toy(tmp_path / "d")
    out = tmp_path / "eval.json"
    if case == "directory":
        out.mkdir()
    elif case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "eval.json"
    else:

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

        monkeypatch.setattr(evaluate.tempfile, "mkstemp", read_only)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded although --out cannot be written")

    monkeypatch.setattr(evaluate, "load_for_inference", must_not_run)
    result = invoke(*eval_args(model_dir, data_dir, out))
    assert result.exit_code in (1, 2) and len(error_lines(result.output)) == 1, result.output
    assert str(out) in result.output or str(tmp_path) in result.output


def test_eval_disk_full_at_the_end_keeps_the_metrics_on_screen(
    model_dir, tmp_path: Path, monkeypatch
):
    from phi3v_train.evaluation import evaluate

    data_dir = toy(tmp_path / "d")
    out = tmp_path / "eval.json"

    def disk_full(path, data, temp_dir=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "write_atomic", disk_full)
    result = invoke(*eval_args(model_dir, data_dir, out))
    assert result.exit_code == 1
    assert "split val: 2 examples" in result.output and "accuracy" in result.output
    assert error_lines(result.output) == [
        f"Error: --out: cannot write the results: {out}: No space left on device"
    ]
    assert not out.exists() and not list(tmp_path.glob(".eval.json.*"))


# --- 5: duplicate JSON keys --------------------------------------------------------------------


DUPLICATES = [
    ('{"id": "a", "id": "b", "source": "s", "conversations": [{"user": "u", "assistant": "x"}]}',
     "id"),
    ('{"id": "a", "source": "s", "conversations": [{"user": "u", "assistant": "x", '
     '"assistant" : "y"}]}', "conversations.0.assistant"),
    ('{"id": "a", "source": "s", "meta": {"k": {"z": 1, "z": 2}}, '
     '"conversations": [{"user": "u", "assistant": "x"}]}', "meta.k.z"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "field"), DUPLICATES)
def test_duplicate_keys_reported_everywhere(model_dir, tmp_path: Path, line: str, field: str):
    data_dir = toy(tmp_path / "d")
    jsonl = data_dir / "toy_val.jsonl"
    jsonl.write_text(jsonl.read_text() + line + "\n")
    where = f"{jsonl}:3: {field}: duplicate key"

    result = phi3v_data("validate", data_dir)
    assert result.returncode == 1 and where in result.stdout, result.stdout
    result = invoke("train", *base_args(model_dir, data_dir, tmp_path / "out", max_steps=1))
    assert result.exit_code == 2 and where in result.output
    result = invoke(*eval_args(model_dir, data_dir, tmp_path / "eval.json"))
    assert result.exit_code == 1 and error_lines(result.output)[0].startswith(f"Error: {where}")
    with pytest.raises(DatasetError, match="duplicate key"):
        list(iter_records(jsonl))


def test_duplicate_key_check_has_no_false_alarm() -> None:
    """Quotes and colons inside strings, spacing, several turns: no key repeats, none reported."""
    turns = [{"images": ["a.png"], "user": 'say "x": y', "assistant": '\\": z'}] * 3
    value = {"id": 'i"d', "source": "s", "conversations": turns, "meta": {"a": [{"b": 1}]}}
    for text in (json.dumps(value), json.dumps(value, indent=1).replace("\n", " ")):
        record = Record.model_validate_json(text)
        assert duplicate_keys(text.encode(), record) == []
