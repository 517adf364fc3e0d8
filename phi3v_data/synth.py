"""``phi3v-data synth``: small synthetic raw datasets in the official layouts, for demos and tests.

``phi3v-data synth ucf101 --out RAW`` writes a video-classification set laid out exactly like the
official UCF-101 release::

    RAW/UCF-101/<Class>/v_<Class>_gGG_cCC.avi       MPEG-4 part 2 (XviD) AVI
    RAW/ucfTrainTestlist/classInd.txt               '<index> <Class>', CRLF
    RAW/ucfTrainTestlist/trainlist0{1,2,3}.txt      '<Class>/<file>.avi <index>', CRLF
    RAW/ucfTrainTestlist/testlist0{1,2,3}.txt       '<Class>/<file>.avi', CRLF

Each class is one saturated colour (hues spread evenly), one shape and one direction of motion, so
a class is recognisable from any single frame and also over time. Clips of one group share a
background tint and the shape's size, like the real groups cut from one long video; clips differ
in their starting point. Each fold holds out whole groups for test (fold 1: the first ~28% of the
groups, as g01-g07 of 25). Output is deterministic for given options; files are written under a
temporary name and renamed.
"""

from __future__ import annotations

import colorsys
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from phi3v_data.atomic import write_atomic

#: Class names (UCF-101's first classes in classInd order); --classes N takes the first N.
CLASS_NAMES = (
    "ApplyEyeMakeup",
    "ApplyLipstick",
    "Archery",
    "BabyCrawling",
    "BalanceBeam",
    "BandMarching",
    "BaseballPitch",
    "Basketball",
    "BasketballDunk",
    "BenchPress",
    "Biking",
    "Billiards",
)
SHAPES = ("circle", "square", "triangle")
#: FourCCs tried in order; the first one this OpenCV build writes and reads back is used.
FOURCCS = ("XVID", "mp4v", "MJPG")
FOLDS = 3
VIDEO_ROOT = "UCF-101"
SPLITS_DIRNAME = "ucfTrainTestlist"


@dataclass(frozen=True)
class ClassLook:
    """How one class looks: colour (BGR), shape, direction of motion (radians)."""

    color: tuple[int, int, int]
    shape: str
    angle: float


def class_looks(count: int) -> list[ClassLook]:
    looks = []
    for index in range(count):
        red, green, blue = colorsys.hsv_to_rgb(index / count, 1.0, 1.0)
        looks.append(
            ClassLook(
                color=(int(blue * 255), int(green * 255), int(red * 255)),
                shape=SHAPES[index % len(SHAPES)],
                angle=2 * math.pi * index / count,
            )
        )
    return looks


def render_clip(
    look: ClassLook,
    size: tuple[int, int],
    frames: int,
    *,
    tint: tuple[int, int, int],
    radius: int,
    seed: int,
) -> list[np.ndarray]:
    """BGR frames of one clip: the class's shape crossing a tinted, slightly noisy background."""
    import cv2

    width, height = size
    rng = random.Random(seed)
    noise = np.random.default_rng(seed).integers(0, 12, (height, width, 3), dtype=np.uint8)
    background = np.full((height, width, 3), tint, dtype=np.uint8) + noise
    travel = 0.5 * min(width, height)
    start_x = width / 2 - math.cos(look.angle) * travel / 2 + rng.uniform(-0.1, 0.1) * width
    start_y = height / 2 - math.sin(look.angle) * travel / 2 + rng.uniform(-0.1, 0.1) * height
    clip = []
    for index in range(frames):
        progress = index / max(1, frames - 1)
        x = int(start_x + math.cos(look.angle) * travel * progress)
        y = int(start_y + math.sin(look.angle) * travel * progress)
        frame = background.copy()
        if look.shape == "circle":
            cv2.circle(frame, (x, y), radius, look.color, -1)
        elif look.shape == "square":
            cv2.rectangle(frame, (x - radius, y - radius), (x + radius, y + radius), look.color, -1)
        else:
            points = np.array(
                [[x, y - radius], [x - radius, y + radius], [x + radius, y + radius]], np.int32
            )
            cv2.fillPoly(frame, [points], look.color)
        clip.append(frame)
    return clip


def usable_fourcc(directory: Path) -> str:
    """The first of :data:`FOURCCS` that this OpenCV build writes to AVI and reads back."""
    import cv2

    probe = directory / ".fourcc-probe.avi"
    try:
        for fourcc in FOURCCS:
            writer = cv2.VideoWriter(str(probe), cv2.VideoWriter_fourcc(*fourcc), 25, (32, 32))
            if writer.isOpened():
                for _ in range(2):
                    writer.write(np.zeros((32, 32, 3), np.uint8))
                writer.release()
                capture = cv2.VideoCapture(str(probe))
                ok = capture.isOpened() and capture.read()[0]
                capture.release()
                if ok:
                    return fourcc
            else:
                writer.release()
    finally:
        probe.unlink(missing_ok=True)
    raise click.ClickException(f"this OpenCV build writes none of the AVI codecs {FOURCCS}")


def write_video(path: Path, frames: list[np.ndarray], fps: float, fourcc: str) -> None:
    """Write an AVI under a temporary name in the same folder, then rename it."""
    import cv2

    height, width = frames[0].shape[:2]
    temp = path.with_name(f".{path.stem}.partial.avi")  # VideoWriter wants the .avi suffix
    writer = cv2.VideoWriter(str(temp), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    try:
        for frame in frames:
            writer.write(frame)
        writer.release()
        os.replace(temp, path)
    finally:
        writer.release()
        temp.unlink(missing_ok=True)


def held_out_groups(fold: int, groups: int) -> list[int]:
    """Groups (1-based) held out for test in ``fold``: a block of ~28% of the groups per fold."""
    per_fold = min(groups - 1, max(1, round(groups * 7 / 25)))
    return sorted({((fold - 1) * per_fold + j) % groups + 1 for j in range(per_fold)})


def _crlf(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


def synth_ucf101(
    out: Path,
    *,
    classes: int = 4,
    groups: int = 6,
    clips: int = 3,
    frames: int = 32,
    size: tuple[int, int] = (160, 120),
    fps: float = 25.0,
    seed: int = 0,
    on_video: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the synthetic UCF-101 tree under ``out``; returns the video paths."""
    out.mkdir(parents=True, exist_ok=True)
    fourcc = usable_fourcc(out)
    names = list(CLASS_NAMES[:classes])
    videos: list[Path] = []
    listing: list[tuple[int, str, int]] = []  # (class index, relative path, group)
    for class_index, (name, look) in enumerate(zip(names, class_looks(classes), strict=True)):
        for group in range(1, groups + 1):
            group_rng = random.Random(hash_seed(seed, f"{name}/g{group}"))
            tint = (group_rng.randint(30, 90), group_rng.randint(30, 90), group_rng.randint(30, 90))
            radius = max(4, int(min(size) * group_rng.uniform(0.16, 0.24)))
            for clip in range(1, clips + 1):
                relative = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"
                bgr = render_clip(
                    look, size, frames, tint=tint, radius=radius, seed=hash_seed(seed, relative)
                )
                path = out / VIDEO_ROOT / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                write_video(path, bgr, fps, fourcc)
                videos.append(path)
                listing.append((class_index + 1, relative, group))
                if on_video:
                    on_video(path)
    split_dir = out / SPLITS_DIRNAME
    write_atomic(split_dir / "classInd.txt", _crlf([f"{i} {n}" for i, n in enumerate(names, 1)]))
    for fold in range(1, FOLDS + 1):
        held_out = set(held_out_groups(fold, groups))
        train = [f"{rel} {index}" for index, rel, group in listing if group not in held_out]
        test = [rel for _, rel, group in listing if group in held_out]
        write_atomic(split_dir / f"trainlist0{fold}.txt", _crlf(train))
        write_atomic(split_dir / f"testlist0{fold}.txt", _crlf(test))
    return videos


def hash_seed(seed: int, text: str) -> int:
    """A stable 32-bit seed from ``seed`` and a name (Python's hash() is salted per process)."""
    value = seed & 0xFFFFFFFF
    for byte in text.encode():
        value = (value * 1_000_003 + byte) & 0xFFFFFFFF
    return value


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 160x120") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise click.BadParameter(f"{value!r}: width and height must be even and at least 16")
    return width, height


@click.group("synth", context_settings={"help_option_names": ["-h", "--help"]})
def synth_command() -> None:
    """Write small synthetic raw datasets in the official layouts (for demos and tests)."""


@synth_command.command("ucf101")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write UCF-101/ and ucfTrainTestlist/ into.",
)
@click.option(
    "--classes",
    type=click.IntRange(2, len(CLASS_NAMES)),
    default=4,
    show_default=True,
    help="Number of classes.",
)
@click.option(
    "--groups",
    type=click.IntRange(min=2),
    default=6,
    show_default=True,
    help="Groups per class (gGG).",
)
@click.option(
    "--clips",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Clips per group (cCC).",
)
@click.option(
    "--frames", type=click.IntRange(min=1), default=32, show_default=True, help="Frames per clip."
)
@click.option(
    "--size",
    default="160x120",
    show_default=True,
    callback=_parse_size,
    help="Frame size WIDTHxHEIGHT.",
)
@click.option(
    "--fps", type=click.FloatRange(min=1), default=25.0, show_default=True, help="Frame rate."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of positions and backgrounds."
)
def synth_ucf101_command(
    out: Path,
    classes: int,
    groups: int,
    clips: int,
    frames: int,
    size: tuple[int, int],
    fps: float,
    seed: int,
) -> None:
    """A synthetic video-classification set in the official UCF-101 layout.

    Each class is a shape of its own colour moving in its own direction; convert it with
    `phi3v-data convert ucf101 RAW --out_dir DATA`.
    """
    from tqdm import tqdm

    if out.exists() and any((out / name).exists() for name in (VIDEO_ROOT, SPLITS_DIRNAME)):
        click.echo(f"error: {out}: already holds {VIDEO_ROOT}/ or {SPLITS_DIRNAME}/", err=True)
        raise SystemExit(2)
    total = classes * groups * clips
    with tqdm(total=total, desc="synth ucf101", unit="video", disable=None) as bar:
        videos = synth_ucf101(
            out,
            classes=classes,
            groups=groups,
            clips=clips,
            frames=frames,
            size=size,
            fps=fps,
            seed=seed,
            on_video=lambda _path: bar.update(1),
        )
    click.echo(f"wrote {len(videos)} videos of {classes} classes to {out}")
