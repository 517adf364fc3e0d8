"""The ucf101 converter on raw trees built here, on the real split-file excerpts, and on each trap."""

from __future__ import annotations

import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from ucf101_helpers import (
    counted_index,
    counting_frame,
    frame_index_of,
    official_tree,
    run_cli,
    set_avi_frame_count,
    write_counting_video,
    write_video,
)

from phi3v_data.convert import run_conversion
from phi3v_data.converters import ucf101
from phi3v_data.converters.ucf101 import (
    Ucf101Converter,
    read_class_index,
    read_sampled_frames,
    read_split_list,
    sample_indices,
)
from phi3v_data.validate import validate_dataset

PROMPT = "Classify the video into one of the following classes: "


def _records(out: Path, split: str) -> list[dict]:
    path = out / f"ucf101_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _convert(src: Path, out: Path, **options) -> dict:
    return run_conversion(Ucf101Converter, src, out, options)


def _clips(name: str, groups: range, clips: range = range(1, 3), stem: str | None = None):
    stem = stem or name
    return [f"{name}/v_{stem}_g{g:02d}_c{c:02d}.avi" for g in groups for c in clips]


# ---------------------------------------------------------------------------------------------
# The real split files (../shared/fixtures/raw/ucf101)
# ---------------------------------------------------------------------------------------------


def test_real_class_index_is_case_insensitive_order_with_handstand(shared_dir: Path) -> None:
    lists = shared_dir / "fixtures/raw/ucf101/ucfTrainTestlist"
    assert b"\r\n" in (lists / "classInd.txt").read_bytes()
    classes = read_class_index(lists / "classInd.txt")
    assert len(classes) == 101 and classes[0] == "ApplyEyeMakeup" and classes[-1] == "YoYo"
    assert classes[36] == "HandstandPushups"
    # classInd is sorted case-insensitively: a plain sorted() would swap these pairs
    assert classes[34:36] == ["Hammering", "HammerThrow"]
    assert classes[46:48] == ["JumpingJack", "JumpRope"]
    assert all("\r" not in name for name in classes)


def test_real_split_lists_parse(shared_dir: Path) -> None:
    lists = shared_dir / "fixtures/raw/ucf101/ucfTrainTestlist"
    classes = read_class_index(lists / "classInd.txt")
    train = read_split_list(lists / "trainlist01.txt", "train", classes)
    test = read_split_list(lists / "testlist01.txt", "test", classes)
    assert len(train) == 200 and len(test) == 200
    assert train[0].relative == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"
    assert train[0].group == "g08" and train[0].class_name == "ApplyEyeMakeup"
    assert {clip.group for clip in test} <= {f"g0{g}" for g in range(1, 8)}  # fold-1 test groups


def test_real_split_lists_convert(shared_dir: Path, tmp_path: Path) -> None:
    """The real fold-1 lists with a video tree holding some of their clips: the rest is reported."""
    lists = shared_dir / "fixtures/raw/ucf101/ucfTrainTestlist"
    src = tmp_path / "src"
    shutil.copytree(lists, src / "ucfTrainTestlist")
    present = _clips("ApplyEyeMakeup", range(8, 12), range(1, 3)) + _clips(
        "ApplyEyeMakeup", range(1, 3), range(1, 3)
    )
    for relative in present:
        write_counting_video(src / "UCF-101" / relative, 10)
    out = tmp_path / "out"
    report = _convert(src, out, classes="1", num_frames=4)
    records = _records(out, "train") + _records(out, "val") + _records(out, "test")
    assert sorted(r["meta"]["video"] for r in records) == sorted(present)
    missing = [s for s in report["skipped"] if s["reason"] == "video file is missing"]
    assert missing and all(s["input"].startswith("ApplyEyeMakeup/") for s in missing)
    assert report["skipped_total"] == len(missing)
    assert records[0]["conversations"][0]["user"] == PROMPT + "ApplyEyeMakeup."
    assert validate_dataset(out).ok


# ---------------------------------------------------------------------------------------------
# Layout (a): the official release, and its traps
# ---------------------------------------------------------------------------------------------

CLASSES = ["Archery", "HammerThrow", "Hammering", "HandstandPushups"]


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("official")
    train = (
        _clips("Archery", range(3, 7))
        + _clips("HammerThrow", range(3, 7))
        + _clips("Hammering", range(3, 7))
        + _clips("HandstandPushups", range(3, 7), stem="HandStandPushups")
    )
    test = (
        _clips("Archery", range(1, 3))
        + _clips("HammerThrow", range(1, 3))
        + _clips("Hammering", range(1, 3))
        + _clips("HandstandPushups", range(1, 3), stem="HandStandPushups")
    )
    return official_tree(root, CLASSES, train, test, frames=12)


@pytest.fixture(scope="module")
def official_out(official: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("official_out") / "data"
    _convert(official, out, val_fraction=0.25, seed=1)
    return out


def test_official_output_layout_and_records(official_out: Path) -> None:
    assert validate_dataset(official_out).ok
    info = json.loads((official_out / "dataset.json").read_text())
    assert info["metrics"] == ["accuracy"] and info["num_crops"] == 4
    assert info["converter"]["name"] == "ucf101"
    assert info["converter"]["options"]["val_fraction"] == 0.25
    train, val, test = (_records(official_out, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (24, 8, 16)
    ids = [r["id"] for r in train + val + test]
    assert ids == [f"{r['id'].split('-')[0]}-{i:010d}" for i, r in enumerate(train + val + test)]
    assert all(re.fullmatch(r"(train|val|test)-\d{10}", i) for i in ids)
    # the prompt lists classInd's order (not a case-sensitive sort); the answer is the class
    expected_prompt = PROMPT + "Archery, HammerThrow, Hammering, HandstandPushups."
    for split, records in (("train", train), ("val", val), ("test", test)):
        for record in records:
            (turn,) = record["conversations"]
            assert turn["user"] == expected_prompt
            assert turn["assistant"] in CLASSES
            stem = Path(record["meta"]["video"]).stem
            assert turn["images"] == [
                f"{split}/{turn['assistant']}/{stem}.{k}.jpg" for k in range(8)
            ]
            assert all((official_out / "images" / p).is_file() for p in turn["images"])


def test_handstand_pushups_trap(official_out: Path) -> None:
    test = _records(official_out, "test")
    handstand = [r for r in test if r["conversations"][0]["assistant"] == "HandstandPushups"]
    assert len(handstand) == 4
    assert handstand[0]["conversations"][0]["images"][0] == (
        "test/HandstandPushups/v_HandStandPushups_g01_c01.0.jpg"
    )


def test_hand_edited_split_lists_resolve_too(official: Path, tmp_path: Path) -> None:
    """Copies of the lists 'fixed' to HandStandPushups/ still find the real folder."""
    src = tmp_path / "src"
    shutil.copytree(official, src)
    for name in ("trainlist01.txt", "testlist01.txt"):
        path = src / "ucfTrainTestlist" / name
        path.write_bytes(path.read_bytes().replace(b"HandstandPushups/", b"HandStandPushups/"))
    out = tmp_path / "out"
    report = _convert(src, out, classes="HandstandPushups")
    assert report["skipped_total"] == 0
    assert [len(_records(out, s)) for s in ("train", "val", "test")] == [6, 2, 4]


def test_val_holds_whole_groups_of_every_class(official_out: Path) -> None:
    def groups(split: str) -> set[tuple[str, str]]:
        return {
            (r["conversations"][0]["assistant"], re.search(r"_(g\d+)_", r["meta"]["video"])[1])
            for r in _records(official_out, split)
        }

    train, val, test = groups("train"), groups("val"), groups("test")
    assert not train & val and not (train | val) & test
    assert {cls for cls, _ in val} == set(CLASSES)  # 25% of 4 groups: one group per class


def test_val_fraction_zero_and_seed(official: Path, tmp_path: Path) -> None:
    _convert(official, tmp_path / "none", val_fraction=0.0)
    assert not (tmp_path / "none" / "ucf101_val.jsonl").exists()
    vals = set()
    for seed in range(4):
        _convert(official, tmp_path / f"s{seed}", val_fraction=0.25, seed=seed, num_frames=1)
        vals.add(tuple(r["meta"]["video"] for r in _records(tmp_path / f"s{seed}", "val")))
    assert len(vals) > 1  # the seed changes which groups go to val


def test_classes_option(official: Path, tmp_path: Path) -> None:
    _convert(official, tmp_path / "two", classes="2", num_frames=1)
    answers = {r["conversations"][0]["assistant"] for r in _records(tmp_path / "two", "test")}
    assert answers == {"Archery", "HammerThrow"}
    # names in any order and case: the prompt keeps classInd's order
    _convert(official, tmp_path / "named", classes="hammering, archery", num_frames=1)
    (record, *_) = _records(tmp_path / "named", "test")
    assert record["conversations"][0]["user"] == PROMPT + "Archery, Hammering."


def test_bad_classes_and_missing_files_exit_2(official: Path, tmp_path: Path) -> None:
    result = run_cli(
        "convert",
        "ucf101",
        str(official),
        "--out_dir",
        str(tmp_path / "o"),
        "--classes",
        "Archery,Juggling",
    )
    assert result.returncode == 2 and "Juggling" in result.stderr
    assert "Traceback" not in result.stderr
    src = tmp_path / "src"
    shutil.copytree(official, src)
    (src / "ucfTrainTestlist" / "testlist01.txt").unlink()
    result = run_cli("convert", "ucf101", str(src), "--out_dir", str(tmp_path / "o2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "testlist01.txt: missing" in result.stderr
    result = run_cli(
        "convert", "ucf101", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "o3")
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").glob("*.jsonl"))


def test_wrong_label_in_train_list_names_line_and_field(official: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(official, src)
    path = src / "ucfTrainTestlist" / "trainlist01.txt"
    lines = path.read_bytes().split(b"\r\n")
    lines[2] = lines[2].rsplit(b" ", 1)[0] + b" 3"
    path.write_bytes(b"\r\n".join(lines))
    result = run_cli("convert", "ucf101", str(src), "--out_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:3: index: " in result.stderr


def test_test_list_with_labels_and_ucf101_root_name(tmp_path: Path) -> None:
    """Some copies label the test list; some unpack to UCF101/ without the hyphen."""
    src = official_tree(
        tmp_path / "src",
        ["Archery", "Biking"],
        _clips("Archery", range(3, 5)) + _clips("Biking", range(3, 5)),
        _clips("Biking", range(1, 2)),
        video_root="UCF101",
        label_test=True,
    )
    _convert(src, tmp_path / "out", num_frames=2, val_fraction=0.0)
    assert [r["conversations"][0]["assistant"] for r in _records(tmp_path / "out", "test")] == [
        "Biking",
        "Biking",
    ]


def test_unreadable_video_is_skipped_and_reported(official: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(official, src)
    broken = src / "UCF-101/Archery/v_Archery_g01_c01.avi"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video")
    (src / "UCF-101/Archery/v_Archery_g01_c02.avi").unlink()
    (src / "UCF-101/Archery/v_Archery_g02_c01.avi").write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    result = run_cli("convert", "ucf101", str(src), "--out_dir", str(out), "--classes", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "convert_report.json").read_text())
    reasons = {s["input"]: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "Archery/v_Archery_g01_c01.avi": "no video stream",
        "Archery/v_Archery_g01_c02.avi": "video file is missing",
        "Archery/v_Archery_g02_c01.avi": "cannot decode the video: "
        "Invalid data found when processing input",
    }
    assert report["splits"]["test"] == {"records": 1, "skipped": 3}
    assert "3 inputs skipped" in result.stdout
    assert validate_dataset(out).ok


# ---------------------------------------------------------------------------------------------
# Layout (b): the original recipe's subset
# ---------------------------------------------------------------------------------------------


def test_subset_layout_keeps_its_splits(tmp_path: Path) -> None:
    root = tmp_path / "src" / "UCF101_subset"
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        for name in ("BabyCrawling", "ApplyLipstick"):
            for clip in range(count):
                write_counting_video(root / split / name / f"v_{name}_g0{clip + 1}_c01.avi", 9)
    out = tmp_path / "out"
    _convert(tmp_path / "src", out, num_frames=3)
    train, val, test = (_records(out, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 4)
    assert val[0]["id"] == "val-0000000006"  # global index, as the original
    assert train[0]["conversations"][0]["user"] == PROMPT + "ApplyLipstick, BabyCrawling."
    assert train[0]["conversations"][0]["images"][0] == (
        "train/ApplyLipstick/v_ApplyLipstick_g01_c01.0.jpg"
    )
    assert validate_dataset(out).ok


# ---------------------------------------------------------------------------------------------
# Frames: floor(k*T/n), T checked against the decoder
# ---------------------------------------------------------------------------------------------


def test_sample_indices_are_the_originals() -> None:
    assert sample_indices(175, 8) == [0, 21, 43, 65, 87, 109, 131, 153]
    assert sample_indices(30, 8) == [0, 3, 7, 11, 15, 18, 22, 26]
    assert sample_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("true_count", "claimed", "num_frames"),
    [
        (30, None, 8),  # header right
        (30, 20, 8),  # header too low
        (30, 60, 8),  # header too high
        (120, 100, 2),  # header too low, last sample far from the end
        (120, 240, 2),  # header too high, last sample far from the end
        (3, None, 8),  # fewer frames than samples: frames repeat
    ],
)
def test_frames_are_the_sampled_indices(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    true_count: int,
    claimed: int | None,
    num_frames: int,
) -> None:
    """Well-formed clips take the keyframe path, also when the header's count is wrong."""
    monkeypatch.setattr(ucf101, "_decode_sequentially", _no_fallback)
    video = write_counting_video(tmp_path / "v.avi", true_count)
    if claimed is not None:
        set_avi_frame_count(video, claimed)
    count, indices, frames = read_sampled_frames(video, num_frames)
    assert count == true_count
    assert indices == sample_indices(true_count, num_frames)
    assert [counted_index(np.asarray(frame)) for frame in frames] == indices


def _no_fallback(*_args):
    raise AssertionError("fell back to decoding from the start")


def test_truncated_video_uses_the_frames_it_has(tmp_path: Path) -> None:
    video = write_counting_video(tmp_path / "v.avi", 60, size=(64, 48))
    data = video.read_bytes()
    video.write_bytes(data[: len(data) * 6 // 10])  # header still says 60
    count, indices, frames = read_sampled_frames(video, 4)
    assert 0 < count < 60 and indices == sample_indices(count, 4)
    assert [counted_index(np.asarray(frame)) for frame in frames] == indices


def test_written_jpegs_show_the_sampled_frames(official_out: Path) -> None:
    record = _records(official_out, "train")[0]
    assert record["meta"]["frame_count"] == 12
    shown = [
        frame_index_of(official_out / "images" / p) for p in record["conversations"][0]["images"]
    ]
    assert shown == sample_indices(12, 8) == record["meta"]["frames"]


def test_timestamp_gap_falls_back_to_counting_decoded_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clip whose timestamps jump (a dropped frame) is sampled by decoded-frame ordinal,
    as the original recipe does, with T counted by decoding (the header says 22)."""
    path = tmp_path / "gap.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(20):
            frame = av.VideoFrame.from_ndarray(counting_frame(index, (64, 48)), format="bgr24")
            frame.pts, frame.time_base = index + (2 if index >= 10 else 0), Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    calls = []
    original = ucf101._decode_sequentially
    monkeypatch.setattr(ucf101, "_decode_sequentially", lambda *a: calls.append(a) or original(*a))
    count, indices, frames = read_sampled_frames(path, 8)
    assert calls, "a clip with a timestamp gap must fall back"
    assert count == 20 and indices == sample_indices(20, 8)
    assert [counted_index(np.asarray(frame)) for frame in frames] == indices


def test_frame_size_and_fps_come_from_the_file(tmp_path: Path) -> None:
    """Some real clips are 400x226 at 29.97 fps: nothing assumes 320x240 at 25 fps."""
    frames = [counting_frame(i, (80, 46)) for i in range(40)]
    video = write_video(tmp_path / "v.avi", frames, fps=29.97)
    count, indices, images = read_sampled_frames(video, 8)
    assert count == 40 and all(image.size == (80, 46) for image in images)
    assert [counted_index(np.asarray(image)) for image in images] == indices
