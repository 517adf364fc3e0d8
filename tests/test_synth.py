"""``phi3v-data synth ucf101``: the official layout, readable videos, distinct classes, determinism."""

from __future__ import annotations

import math
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from ucf101_helpers import run_cli, tree_digest

from phi3v_data.synth import held_out_groups, synth_ucf101

OPTIONS = ("--classes", "4", "--groups", "5", "--clips", "2", "--frames", "10", "--size", "64x48")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    result = run_cli("synth", "ucf101", "--out", str(out), *OPTIONS)
    assert result.returncode == 0, result.stderr
    return out


def _lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == data.count(b"\n")  # CRLF everywhere
    return data.decode().split("\r\n")[:-1]


def test_official_layout_and_split_files(raw: Path) -> None:
    lists = raw / "ucfTrainTestlist"
    classes = [line.split(" ")[1] for line in _lines(lists / "classInd.txt")]
    assert _lines(lists / "classInd.txt")[0] == f"1 {classes[0]}" and len(classes) == 4
    videos = sorted(str(p.relative_to(raw / "UCF-101")) for p in (raw / "UCF-101").rglob("*.avi"))
    assert len(videos) == 4 * 5 * 2
    assert all(re.fullmatch(r"(\w+)/v_\1_g\d\d_c\d\d\.avi", v) for v in videos)
    for fold in (1, 2, 3):
        train = [line.split(" ") for line in _lines(lists / f"trainlist0{fold}.txt")]
        test = _lines(lists / f"testlist0{fold}.txt")
        assert all(len(parts) == 2 for parts in train) and all(" " not in t for t in test)
        for path, index in train:  # labels are classInd's 1-based indices
            assert classes[int(index) - 1] == path.split("/")[0]
        train_paths = [path for path, _ in train]
        assert sorted(train_paths + test) == videos and not set(train_paths) & set(test)
        test_groups_seen = {re.search(r"_g(\d\d)_", t)[1] for t in test}
        train_groups_seen = {re.search(r"_g(\d\d)_", t)[1] for t in train_paths}
        assert not test_groups_seen & train_groups_seen  # whole groups held out
    assert held_out_groups(1, 25) == list(range(1, 8))  # like the official fold 1 (g01-g07)


def test_videos_are_mpeg4_avi_of_the_requested_shape(raw: Path) -> None:
    video = next((raw / "UCF-101").rglob("*.avi"))
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert container.format.name == "avi" and stream.codec_context.name == "mpeg4"
        assert (stream.width, stream.height) == (64, 48)
        assert sum(1 for _ in container.decode(stream)) == 10


def _shape_pixels(frame: np.ndarray) -> tuple[float, np.ndarray]:
    """Hue (OpenCV degrees/2) and centroid (x, y) of the saturated pixels of a BGR frame."""
    hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV)
    mask = hsv[..., 1] > 150
    ys, xs = np.nonzero(mask)
    return float(np.median(hsv[..., 0][mask])), np.array([xs.mean(), ys.mean()])


def test_classes_differ_in_colour_and_motion(tmp_path: Path) -> None:
    synth_ucf101(tmp_path, classes=4, groups=2, clips=1, frames=12, size=(96, 72), seed=5)
    hues, moves = [], []
    for class_dir in sorted((tmp_path / "UCF-101").iterdir()):
        capture = cv2.VideoCapture(str(sorted(class_dir.glob("*.avi"))[0]))
        frames = [capture.read()[1] for _ in range(12)]
        (hue, start), (_, end) = _shape_pixels(frames[0]), _shape_pixels(frames[-1])
        hues.append(hue)
        moves.append(end - start)
    for i in range(4):
        for j in range(i + 1, 4):  # hues at least 30 degrees apart on OpenCV's 0..180 circle
            gap = abs(hues[i] - hues[j])
            assert min(gap, 180 - gap) >= 15
    angles = [math.degrees(math.atan2(dy, dx)) % 360 for dx, dy in moves]
    assert all(np.hypot(*move) > 10 for move in moves)  # the shape moves
    assert len({round(angle / 90) % 4 for angle in angles}) == 4  # four directions


def test_deterministic(raw: Path, tmp_path: Path) -> None:
    again = tmp_path / "raw"
    assert run_cli("synth", "ucf101", "--out", str(again), *OPTIONS).returncode == 0
    assert tree_digest(again) == tree_digest(raw)


def test_refuses_existing_tree_and_bad_size(raw: Path, tmp_path: Path) -> None:
    result = run_cli("synth", "ucf101", "--out", str(raw))
    assert result.returncode == 2 and "already holds" in result.stderr
    result = run_cli("synth", "ucf101", "--out", str(tmp_path / "x"), "--size", "64by48")
    assert result.returncode == 2 and "WIDTHxHEIGHT" in result.stderr
    assert "Traceback" not in result.stderr


def test_synth_convert_validate(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    converted = run_cli("convert", "ucf101", str(raw), "--out_dir", str(out), "--num_frames", "4")
    assert converted.returncode == 0, converted.stderr
    validated = run_cli("validate", str(out))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    counts = {
        split: len((out / f"ucf101_{split}.jsonl").read_text().splitlines())
        for split in ("train", "val", "test")
    }
    # 5 groups: fold 1 holds out g01; val takes one of the 4 remaining groups of each class
    assert counts == {"train": 24, "val": 8, "test": 8}
