"""Tiny AVI videos and raw UCF-101 trees for the converter tests (written with OpenCV)."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: A counting video's frame i shows gray levels BASE + STEP * digit for the two base-DIGITS digits
#: of i (left half, right half): its index can be read back after lossy compression.
BASE, STEP, DIGITS = 40, 8, 24


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write XVID AVI here"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def counting_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, : width // 2] = BASE + STEP * (index % DIGITS)
    frame[:, width // 2 :] = BASE + STEP * (index // DIGITS)
    return frame


def write_counting_video(path: Path, count: int, size: tuple[int, int] = (32, 24)) -> Path:
    """A video whose frame i shows i (see :data:`DIGITS`)."""
    assert count <= DIGITS * DIGITS
    return write_video(path, [counting_frame(i, size) for i in range(count)])


def counted_index(frame: np.ndarray) -> int:
    """The index a counting-video frame (any channel order) shows."""
    height, width = frame.shape[:2]
    left = float(frame[:, : width // 4].mean())
    right = float(frame[:, width - width // 4 :].mean())
    return round((left - BASE) / STEP) + DIGITS * round((right - BASE) / STEP)


def frame_index_of(image_path: Path) -> int:
    """The index of the counting-video frame an extracted JPEG shows."""
    return counted_index(np.asarray(cv2.imread(str(image_path))))


def set_avi_frame_count(path: Path, count: int) -> None:
    """Overwrite the stream header's frame count (strh dwLength), which decoders report as T."""
    data = bytearray(path.read_bytes())
    at = data.find(b"strh")
    assert at >= 0
    struct.pack_into("<I", data, at + 8 + 32, count)
    path.write_bytes(bytes(data))


def official_tree(
    root: Path,
    classes: list[str],
    train: list[str],
    test: list[str],
    *,
    frames: int = 12,
    video_root: str = "UCF-101",
    label_test: bool = False,
) -> Path:
    """An official-layout tree: videos for every listed path, classInd and fold-1 lists (CRLF)."""
    index = {name: i for i, name in enumerate(classes, 1)}
    for relative in train + test:
        write_counting_video(root / video_root / relative, frames)
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)

    def crlf(lines: list[str]) -> bytes:
        return "".join(f"{line}\r\n" for line in lines).encode()

    def label(relative: str) -> str:
        folder = relative.split("/")[0]
        return f"{relative} {index[next(n for n in classes if n.lower() == folder.lower())]}"

    (lists / "classInd.txt").write_bytes(crlf([f"{i} {n}" for n, i in index.items()]))
    (lists / "trainlist01.txt").write_bytes(crlf([label(r) for r in train]))
    (lists / "testlist01.txt").write_bytes(crlf([label(r) if label_test else r for r in test]))
    return root


def run_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m phi3v_data ARGS`` in a subprocess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "phi3v_data", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
        **kwargs,
    )


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``root`` (hidden ones included)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
