"""The converter runner: discovery, CLI, determinism, --workers, refusal, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ucf101_helpers import REPO_ROOT, run_cli, tree_digest

from phi3v_data.convert import STATE_DIRNAME, run_conversion
from phi3v_data.converters.ucf101 import Ucf101Converter
from phi3v_data.synth import synth_ucf101
from phi3v_data.validate import validate_dataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic official-layout UCF-101 tree: 3 classes x 4 groups x 3 clips of 40 frames."""
    root = tmp_path_factory.mktemp("raw")
    synth_ucf101(root, classes=3, groups=4, clips=3, frames=40, size=(96, 72), seed=3)
    return root


@pytest.fixture(scope="module")
def reference(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Digest of an uninterrupted single-process run, through the CLI."""
    out = tmp_path_factory.mktemp("reference") / "data"
    result = run_cli("convert", "ucf101", str(raw), "--out_dir", str(out), "--num_frames", "6")
    assert result.returncode == 0, result.stderr
    return tree_digest(out)


# ---------------------------------------------------------------------------------------------
# Discovery and the command line
# ---------------------------------------------------------------------------------------------


def test_list_and_help() -> None:
    listed = run_cli("convert", "--list")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert "ucf101" in names and names == sorted(names)
    assert "[built-in]" in listed.stdout
    helped = run_cli("convert", "ucf101", "--help")
    assert helped.returncode == 0
    for option in (
        "--out_dir",
        "--workers",
        "--overwrite",
        "--fold",
        "--classes",
        "--num_frames",
        "--val_fraction",
        "--seed",
    ):
        assert option in helped.stdout
    unknown = run_cli("convert", "nosuchdata", "x", "--out_dir", "y")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_builtins_are_not_a_top_level_package() -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('converters'))"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert found.stdout.strip() == "None"


PLUGIN = """
from PIL import Image
from phi3v_data.convert import Converter, Item, Plan, SourceError
import click

class Squares(Converter):
    name = "squares"
    help = "Grey squares (a third-party test plugin).\\n\\nMore help."
    options = [click.Option(["--count"], type=int, default=3, help="How many squares.")]

    def plan(self, src, options):
        if not (src / "squares.txt").is_file():
            raise SourceError(src / "squares.txt", "missing")
        return Plan([Item("train", f"sq{i}", i) for i in range(options["count"])])

    def convert(self, item, images):
        path = images.save(f"train/{item.payload}.png", Image.new("L", (4, 4), item.payload))
        return [{"id": f"train-{item.payload}", "source": "squares",
                 "conversations": [{"images": [path], "user": "Grey level?",
                                    "assistant": str(item.payload)}]}]
"""


def _plugin_env(tmp_path: Path, target: str) -> dict[str, str]:
    """A distribution on PYTHONPATH whose entry point names ``target``."""
    site = tmp_path / "site"
    (site / "squares_plugin.py").parent.mkdir(parents=True, exist_ok=True)
    (site / "squares_plugin.py").write_text(PLUGIN)
    dist = site / "squares_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: squares-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[phi3v.converters]\nsquares = {target}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_third_party_converter_through_entry_point(tmp_path: Path) -> None:
    env = _plugin_env(tmp_path, "squares_plugin:Squares")
    listed = run_cli("convert", "--list", env=env)
    assert "squares" in listed.stdout and "[squares-plugin]" in listed.stdout
    assert "--count" in run_cli("convert", "squares", "--help", env=env).stdout
    src = tmp_path / "src"
    src.mkdir()
    missing = run_cli("convert", "squares", str(src), "--out_dir", str(tmp_path / "o"), env=env)
    assert missing.returncode == 2 and "squares.txt: missing" in missing.stderr
    (src / "squares.txt").write_text("")
    out = tmp_path / "out"
    done = run_cli("convert", "squares", str(src), "--out_dir", str(out), "--count", "2", env=env)
    assert done.returncode == 0, done.stderr
    lines = (out / "squares_train.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["train-0", "train-1"]
    info = json.loads((out / "dataset.json").read_text())
    assert info["converter"] == {"name": "squares", "options": {"count": 2}}
    assert validate_dataset(out).ok


def test_broken_plugin_does_not_hide_the_others(tmp_path: Path) -> None:
    env = _plugin_env(tmp_path, "no_such_module:Nothing")
    listed = run_cli("convert", "--list", env=env)
    assert listed.returncode == 0 and "ucf101" in listed.stdout
    assert "failed to load" in listed.stderr and "Traceback" not in listed.stderr


# ---------------------------------------------------------------------------------------------
# Common behaviour
# ---------------------------------------------------------------------------------------------


def test_output_is_valid_and_clean(raw: Path, reference: dict[str, str]) -> None:
    names = set(reference)
    assert {
        "ucf101_train.jsonl",
        "ucf101_val.jsonl",
        "ucf101_test.jsonl",
        "dataset.json",
        "convert_report.json",
        f"{STATE_DIRNAME}/manifest.json",
    } <= names
    # no temporaries, no journal once finished; only images besides
    others = names - {n for n in names if n.startswith("images/")}
    assert len(others) == 6, others


def test_deterministic_across_runs_and_workers(
    raw: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    again = tmp_path / "again"
    run_conversion(
        Ucf101Converter,
        raw,
        again,
        {
            "num_frames": 6,
            "classes": None,
            "fold": 1,
            "val_fraction": 0.1,
            "seed": 0,
            "video_root": None,
            "splits_dir": None,
        },
    )
    assert tree_digest(again) == reference
    parallel = tmp_path / "parallel"
    result = run_cli(
        "convert",
        "ucf101",
        str(raw),
        "--out_dir",
        str(parallel),
        "--num_frames",
        "6",
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert tree_digest(parallel) == reference
    assert validate_dataset(parallel).ok


def test_refuses_foreign_output_unless_overwrite(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ("convert", "ucf101", str(raw), "--out_dir", str(out), "--num_frames", "2")
    refused = run_cli(*args)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --overwrite with a bad SRC: OUT is left as it was
    bad = run_cli("convert", "ucf101", str(raw / "UCF-101"), "--out_dir", str(out), "--overwrite")
    assert bad.returncode == 2 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert run_cli(*args, "--overwrite").returncode == 0
    assert not (out / "notes.txt").exists() and (out / "ucf101_train.jsonl").is_file()
    # the same command again: already complete, nothing changes
    before = tree_digest(out)
    assert run_cli(*args).returncode == 0 and tree_digest(out) == before
    # other options into the same OUT: refused
    other = run_cli("convert", "ucf101", str(raw), "--out_dir", str(out), "--num_frames", "3")
    assert other.returncode == 2 and tree_digest(out) == before


def test_never_overwrites_its_own_source(raw: Path) -> None:
    before = tree_digest(raw)
    result = run_cli("convert", "ucf101", str(raw / "UCF-101"), "--out_dir", str(raw),
                     "--video_root", str(raw / "UCF-101"), "--overwrite")  # fmt: skip
    assert result.returncode == 2 and "holds SRC" in result.stderr
    assert tree_digest(raw) == before


def _kill_when(process: subprocess.Popen, out: Path, min_images: int) -> bool:
    """SIGKILL the process group once ``min_images`` frames exist; False if it ended first."""
    images = out / "images"
    while process.poll() is None:
        if images.is_dir() and sum(1 for _ in images.rglob("*.jpg")) >= min_images:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("extra", [["--workers", "1"], ["--workers", "2", "--overwrite"]])
def test_sigkill_then_rerun_equals_uninterrupted(
    raw: Path, reference: dict[str, str], tmp_path: Path, extra: list[str]
) -> None:
    """Killed three times, rerun with the same command: the same bytes, finished work kept
    (also with --overwrite, which only empties an OUT written by something else)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "phi3v_data", "convert", "ucf101", str(raw), "--out_dir",
               str(out), "--num_frames", "6", *extra]  # fmt: skip
    kills = 0
    for min_images in (6, 60, 120):
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kills += _kill_when(process, out, min_images)
    assert kills >= 1, "conversion finished before it could be killed"
    journaled = _journaled_images(out)
    assert journaled or kills < 3
    inodes = {path: (out / "images" / path).stat().st_ino for path in journaled}
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert tree_digest(out) == reference
    # finished work was not redone: its frames are still the files written before the kill
    assert {path: (out / "images" / path).stat().st_ino for path in journaled} == inodes


def _journaled_images(out: Path) -> list[str]:
    journal = out / STATE_DIRNAME / "journal.jsonl"
    paths = []
    for line in journal.read_bytes().splitlines() if journal.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn last line
        for record in entry.get("records") or []:
            paths += record["conversations"][0]["images"]
    return paths


def test_torn_journal_line_is_ignored(raw: Path, reference: dict[str, str], tmp_path: Path) -> None:
    """A kill in the middle of a journal write leaves half a line: the rerun drops it."""
    out = tmp_path / "out"
    args = ("convert", "ucf101", str(raw), "--out_dir", str(out), "--num_frames", "6")
    assert run_cli(*args).returncode == 0
    manifest = out / STATE_DIRNAME / "manifest.json"
    state = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**state, "complete": False}))
    (out / STATE_DIRNAME / "journal.jsonl").write_bytes(b'{"i": 0, "key": "Appl')
    (out / "ucf101_val.jsonl").unlink()
    assert run_cli(*args).returncode == 0
    assert tree_digest(out) == reference
    # killed while writing the very first manifest: only our temporaries are in OUT
    fresh = tmp_path / "fresh"
    (fresh / STATE_DIRNAME / "partial").mkdir(parents=True)
    (fresh / STATE_DIRNAME / "partial" / ".manifest.json.x").write_bytes(b'{"ident')
    assert run_cli("convert", "ucf101", str(raw), "--out_dir", str(fresh), "--num_frames",
                   "6").returncode == 0  # fmt: skip
    assert tree_digest(fresh) == reference
    # killed after the manifest was marked complete but before the clean-up
    (out / STATE_DIRNAME / "journal.jsonl").write_bytes(b"{}\n")
    (out / STATE_DIRNAME / "partial").mkdir()
    (out / STATE_DIRNAME / "partial" / ".x.jpg.tmp").write_bytes(b"half")
    assert run_cli(*args).returncode == 0
    assert tree_digest(out) == reference


def test_benchmark_runs_and_selects_the_originals_frames() -> None:
    """The benchmark script in a tiny configuration: it runs, and our frames are the original's."""
    result = subprocess.run(
        [sys.executable, "benchmarks/convert_ucf101.py", "--videos", "2", "--rounds", "1",
         "--access_videos", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "same frames as the original method: 2/2 clips" in result.stdout
    ours = [line for line in result.stdout.splitlines() if "ours (PyAV keyframe)" in line]
    assert len(ours) == 2 and all(line.rstrip().endswith("exact 1/1") for line in ours)
