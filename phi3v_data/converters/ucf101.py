"""``ucf101``: UCF-101 action videos as ``num_frames`` JPEG frames per clip, as the original recipe.

Accepted SRC layouts:

(a) the official release: a video root ``UCF-101/`` (or ``UCF101/``, or ``--video_root``) holding
    ``<Class>/v_<Class>_gGG_cCC.avi``, and ``ucfTrainTestlist/`` (or ``--splits_dir``) holding
    ``classInd.txt``, ``trainlist0N.txt`` and ``testlist0N.txt`` (CRLF line endings; test lists
    without labels; ``HandstandPushups/v_HandStandPushups_*`` and hand-edited copies that spell the
    folder differently both resolve, because paths are matched case-insensitively on disk).
    ``--fold`` picks the official train/test lists; ``val`` is carved out of train.
(b) the original recipe's subset: ``ROOT/{train,val,test}/<Class>/*.avi`` (also inside
    ``ROOT/UCF101_subset/``). Its ``val`` folder is used as it is; without one, ``val`` is carved
    out of train.

Class order is classInd's (case-insensitive; for layout (b) the folder names sorted
case-insensitively, which is classInd's order). ``--classes`` keeps some classes; the prompt lists
the kept classes in that order. ``val`` holds whole groups ``gGG`` of each class (``--val_fraction``
of the class's train groups, at least one, drawn with ``--seed``), so clips of one group never
straddle train and val.

Frames: indices floor(k*T/num_frames), k = 0..num_frames-1, as the original. T is the number of
video packets (one per frame in AVI), checked against the container header's count; when the two
disagree (a wrong header, a truncated file) the last frame is decoded to confirm T. Each sampled frame is decoded from the nearest keyframe before it, or on from the
previous one when that is nearer, so a clip costs a few GOPs of decoding instead of the original's
decode-everything-up-to-the-last-index (measured against OpenCV grab() and CAP_PROP_POS_FRAMES
seeking in benchmarks/convert_ucf101.py; figures in benchmarks/RESULTS.md). Any irregularity
(empty packets, timestamp gaps, a frame the decoder does not deliver) falls back to the original
way with T counted by decoding.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from phi3v_data.convert import Converter, ImageWriter, Item, Plan, SkipItem, Skipped, SourceError
from phi3v_data.safe_io import (
    UnsafePath,
    is_environment_error,
    is_regular_file,
    join_inside,
    read_regular_bytes,
)

NAME = "ucf101"
SPLITS_DIRNAME = "ucfTrainTestlist"
VIDEO_ROOT_NAMES = ("UCF-101", "UCF101")
SUBSET_DIRNAMES = ("UCF101_subset",)
SUBSET_SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".avi",)
#: Pillow's default JPEG quality, which the original recipe's frames were saved with.
FRAME_JPEG_QUALITY = 75
PROMPT_PREFIX = "Classify the video into one of the following classes: "
_GROUP_CLIP = re.compile(r"_g(\d+)_c(\d+)$", re.IGNORECASE)


def prompt(classes: list[str]) -> str:
    """The original recipe's user text."""
    return PROMPT_PREFIX + ", ".join(classes) + "."


def sample_indices(frame_count: int, num_frames: int) -> list[int]:
    """floor(k*T/num_frames) for k = 0..num_frames-1 (the original recipe's frame choice)."""
    return [k * frame_count // num_frames for k in range(num_frames)]


# --------------------------------------------------------------------------------------------
# Frame reading
# --------------------------------------------------------------------------------------------


def _rgb_image(frame: Any) -> Any:
    """A decoded frame as a PIL RGB image (the same pixels as ``frame.to_image()``, measured
    about 2x faster)."""
    from PIL import Image

    return Image.fromarray(frame.to_ndarray(format="rgb24"))


@dataclass
class _PacketIndex:
    """Timestamps and keyframe flags of a clip's video packets, demuxed without decoding; packet
    i is frame i when :attr:`indexed` (timestamps first..first+N-1, no empty packets), as in
    well-formed AVI."""

    claimed: int  # the container header's frame count
    pts: list[int]
    keyframes: list[int]  # packet positions

    @classmethod
    def read(cls, container: Any) -> _PacketIndex:
        stream = container.streams.video[0]
        packets = [
            (packet.pts, packet.is_keyframe)
            for packet in container.demux(stream)
            if packet.size and packet.pts is not None
        ]
        return cls(
            claimed=int(stream.frames or 0),
            pts=[pts for pts, _ in packets],
            keyframes=[i for i, (_, key) in enumerate(packets) if key],
        )

    @property
    def indexed(self) -> bool:
        return bool(self.pts) and all(p - self.pts[0] == i for i, p in enumerate(self.pts))


def _decode_at(container: Any, index: _PacketIndex, wanted: list[int]) -> dict[int, Any] | None:
    """PIL images of frames ``wanted`` (sorted), each decoded from the nearest keyframe before it,
    or on from the previous one when no keyframe lies between. None when the decoder does not
    deliver exactly the frames the index promises. Frames are converted at once: holding decoded
    frames makes the decoder allocate new buffers (measured: about 2x wall time)."""
    stream = container.streams.video[0]
    first = index.pts[0]
    found: dict[int, Any] = {}
    frames = None
    position = None  # index of the next frame the decoder will deliver
    for target in wanted:
        if target in found:
            continue
        keyframe = max((k for k in index.keyframes if k <= target), default=None)
        if keyframe is None:
            return None
        if frames is None or not keyframe < position <= target:
            container.seek(index.pts[keyframe], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            if frame.pts is None:
                return None
            position = frame.pts - first + 1
            if position - 1 in wanted:
                found[position - 1] = _rgb_image(frame)
            if position - 1 >= target:
                break
        if target not in found:
            return None
    return found


def _decode_sequentially(path: Path, num_frames: int) -> tuple[int, list[int], list[Any]]:
    """The original recipe's way, with T counted by decoding: frame i is the i-th decoded frame."""
    import av

    with av.open(str(path)) as container:
        count = sum(1 for _ in container.decode(video=0))
    if count == 0:
        raise SkipItem("no decodable frame")
    indices = sample_indices(count, num_frames)
    wanted, frames = set(indices), {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = _rgb_image(frame)
            if index >= indices[-1]:
                break
    if len(frames) != len(wanted):
        raise SkipItem("the decoder delivers a different number of frames on each pass")
    return count, indices, [frames[i] for i in indices]


def read_sampled_frames(path: Path, num_frames: int) -> tuple[int, list[int], list[Any]]:
    """(T, sampled indices, PIL RGB images) of one clip; raises SkipItem when it is unusable.

    Fast path: T is the number of video packets, checked against the header (when they disagree,
    by decoding the last frame); each sampled frame is decoded from the nearest keyframe before
    it. Any
    irregularity (empty packets, gaps in timestamps, a frame the decoder does not deliver, a
    decoding error) falls back to decoding the clip from the start and counting frames.
    """
    import av

    if not is_regular_file(path):  # replaced by a FIFO or device since planning: never open it
        raise SkipItem("not a regular file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SkipItem("no video stream")
            container.streams.video[0].codec_context.thread_count = 1  # --workers parallelises
            index = _PacketIndex.read(container)
            if index.indexed:
                count = len(index.pts)
                indices = sample_indices(count, num_frames)
                # header and index disagree (wrong header, truncated file): decode the last frame
                wanted = sorted({*indices, count - 1} if index.claimed != count else set(indices))
                found = _decode_at(container, index, wanted)
                if found is not None:
                    return count, indices, [found[i] for i in indices]
    except av.error.FFmpegError as error:
        if is_environment_error(error):
            raise  # I/O error, permissions: the run stops, the clip is not blamed
        # otherwise decode it the slow way; that reports the error if it persists
    try:
        return _decode_sequentially(path, num_frames)
    except av.error.FFmpegError as error:
        if is_environment_error(error):
            raise
        raise SkipItem(f"cannot decode the video: {error.strerror}") from None


# --------------------------------------------------------------------------------------------
# Split files and layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One video of the source: its split, class, path relative to the video root, group."""

    split: str
    class_name: str
    relative: str
    group: str


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines; CRLF or LF."""
    try:
        text = read_regular_bytes(path).decode("utf-8-sig")  # a FIFO is refused, not waited on
    except UnicodeDecodeError as error:
        raise SourceError(path, f"not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise SourceError(path, f"cannot read: {error.strerror or error}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_index(path: Path) -> list[str]:
    """classInd.txt: ``<1-based index> <ClassName>`` lines -> class names in index order."""
    names: list[str] = []
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SourceError(path, "expected '<index> <ClassName>'", line=number, field="line")
        if int(parts[0]) != len(names) + 1:
            raise SourceError(
                path, f"index {parts[0]}, expected {len(names) + 1}", line=number, field="index"
            )
        names.append(parts[1])
    if not names:
        raise SourceError(path, "no classes")
    return names


def _group_of(stem: str) -> str:
    match = _GROUP_CLIP.search(stem)
    return f"g{int(match.group(1)):02d}" if match else stem


def read_split_list(path: Path, split: str, classes: list[str]) -> list[Clip]:
    """trainlist/testlist: ``<Class>/<file>.avi [<1-based class index>]`` lines."""
    by_lower = {name.lower(): name for name in classes}
    clips = []
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) not in (1, 2) or "/" not in parts[0]:
            raise SourceError(
                path, "expected '<Class>/<file>.avi [<index>]'", line=number, field="line"
            )
        folder = parts[0].split("/")[0]
        class_name = by_lower.get(folder.lower())
        if class_name is None:
            raise SourceError(
                path, f"class folder {folder!r} is not in classInd.txt", line=number, field="path"
            )
        if len(parts) == 2:
            label = int(parts[1]) if parts[1].isdigit() else 0
            if not 1 <= label <= len(classes) or classes[label - 1] != class_name:
                raise SourceError(
                    path,
                    f"{parts[1]!r} is not classInd's index of {class_name} "
                    f"({classes.index(class_name) + 1})",
                    line=number,
                    field="index",
                )
        stem = Path(parts[0]).stem
        clips.append(Clip(split, class_name, parts[0], _group_of(stem)))
    return clips


class CaseInsensitiveTree:
    """Resolves ``<Class>/<file>`` under a video root whatever the case of either part.

    ``relative`` comes from the split lists: one that leaves the root (``..``, absolute, a
    symlink leading out) raises :class:`~phi3v_data.safe_io.UnsafePath`. What is found may be
    something other than a regular file (a FIFO, a folder): the caller checks, and never opens
    it.
    """

    def __init__(self, root: Path):
        self.root = root
        self._folders: dict[str, Path] | None = None
        self._files: dict[Path, dict[str, Path]] = {}

    def resolve(self, relative: str) -> Path | None:
        exact = join_inside(self.root, relative, what="video path")
        if os.path.lexists(exact):
            return exact
        if self._folders is None:
            self._folders = {p.name.lower(): p for p in sorted(self.root.iterdir()) if p.is_dir()}
        folder_name, _, file_name = relative.partition("/")
        folder = self._folders.get(folder_name.lower())
        if folder is None:
            return None
        if folder not in self._files:
            self._files[folder] = {p.name.lower(): p for p in sorted(folder.iterdir())}
        found = self._files[folder].get(file_name.lower())
        if found is None:
            return None
        return join_inside(self.root, found.relative_to(self.root).as_posix(), what="video path")


def _find_dir(src: Path, option: Path | None, names: tuple[str, ...]) -> Path | None:
    if option is not None:
        return option
    for name in names:
        if (src / name).is_dir():
            return src / name
    return None


def _subset_root(src: Path) -> Path | None:
    for candidate in (src, *(src / name for name in SUBSET_DIRNAMES)):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def _official_clips(splits_dir: Path, fold: int) -> tuple[list[str], list[Clip]]:
    for name in ("classInd.txt", f"trainlist0{fold}.txt", f"testlist0{fold}.txt"):
        if not (splits_dir / name).is_file():
            raise SourceError(splits_dir / name, "missing (official UCF-101 split file)")
    classes = read_class_index(splits_dir / "classInd.txt")
    clips = read_split_list(splits_dir / f"trainlist0{fold}.txt", "train", classes)
    clips += read_split_list(splits_dir / f"testlist0{fold}.txt", "test", classes)
    return classes, clips


def _subset_clips(root: Path) -> tuple[list[str], list[Clip]]:
    clips = []
    for split in SUBSET_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for video in sorted(class_dir.iterdir()):
                if video.suffix.lower() in VIDEO_SUFFIXES:
                    relative = f"{split}/{class_dir.name}/{video.name}"
                    clips.append(Clip(split, class_dir.name, relative, _group_of(video.stem)))
    classes = sorted({clip.class_name for clip in clips}, key=lambda name: (name.lower(), name))
    if not classes:
        raise SourceError(root, "no <split>/<Class>/*.avi videos")
    return classes, clips


def select_classes(value: str | None, classes: list[str]) -> list[str]:
    """``--classes``: None (all), an integer N (the first N) or comma-separated names."""
    if value is None or not value.strip():
        return list(classes)
    value = value.strip()
    if value.isdigit():
        count = int(value)
        if not 1 <= count <= len(classes):
            raise click.BadParameter(
                f"{count} is not between 1 and {len(classes)}", param_hint="--classes"
            )
        return classes[:count]
    by_lower = {name.lower(): name for name in classes}
    wanted = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in wanted if name.lower() not in by_lower]
    if unknown:
        raise click.BadParameter(
            f"unknown class {', '.join(unknown)} (see classInd.txt)", param_hint="--classes"
        )
    chosen = {by_lower[name.lower()] for name in wanted}
    return [name for name in classes if name in chosen]


def carve_val(clips: list[Clip], fraction: float, seed: int) -> list[Clip]:
    """Move ``fraction`` of each class's train groups (at least one) into ``val``."""
    if fraction <= 0:
        return clips
    groups_by_class: dict[str, list[str]] = {}
    for clip in clips:
        if clip.split == "train":
            groups = groups_by_class.setdefault(clip.class_name, [])
            if clip.group not in groups:
                groups.append(clip.group)
    rng = random.Random(seed)
    val_groups: set[tuple[str, str]] = set()
    for class_name in sorted(groups_by_class):
        groups = sorted(groups_by_class[class_name])
        if len(groups) < 2:
            continue  # a class with one group keeps it for training
        count = min(len(groups) - 1, max(1, round(fraction * len(groups))))
        val_groups.update((class_name, group) for group in rng.sample(groups, count))
    return [
        Clip("val", c.class_name, c.relative, c.group)
        if c.split == "train" and (c.class_name, c.group) in val_groups
        else c
        for c in clips
    ]


# --------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------


class Ucf101Converter(Converter):
    name = NAME
    help = """UCF-101 action videos -> num_frames JPEG frames per clip (official release or subset).

    SRC holds UCF-101/ (or UCF101/) and ucfTrainTestlist/ as unpacked from the official archives,
    or the original recipe's subset ROOT/{train,val,test}/<Class>/*.avi.
    Splits: train, val (whole groups carved out of train), test. Frames at floor(k*T/num_frames)
    with T read from the container and checked by decoding.
    """
    options = [
        click.Option(
            ["--fold"],
            type=click.IntRange(1, 3),
            default=1,
            show_default=True,
            help="Official train/test split (trainlist0N.txt / testlist0N.txt).",
        ),
        click.Option(
            ["--classes"],
            default=None,
            help="Keep these classes: comma-separated names, or N for the first N of classInd.",
        ),
        click.Option(
            ["--num_frames"],
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Frames per clip.",
        ),
        click.Option(
            ["--val_fraction"],
            type=click.FloatRange(0, 1, max_open=True),
            default=0.1,
            show_default=True,
            help="Share of each class's train groups moved to val.",
        ),
        click.Option(
            ["--seed"], type=int, default=0, show_default=True, help="Seed of the val groups."
        ),
        click.Option(
            ["--video_root"],
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder of the <Class>/ video folders [default: SRC/UCF-101 or SRC/UCF101].",
        ),
        click.Option(
            ["--splits_dir"],
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder of classInd.txt and the split lists [default: SRC/ucfTrainTestlist].",
        ),
    ]

    def plan(self, src: Path, options: Mapping[str, Any]) -> Plan:
        splits_dir = _find_dir(src, _path(options.get("splits_dir")), (SPLITS_DIRNAME,))
        subset = _subset_root(src) if splits_dir is None else None
        if splits_dir is not None:
            classes, clips = _official_clips(splits_dir, int(options.get("fold", 1)))
            video_root = _find_dir(src, _path(options.get("video_root")), VIDEO_ROOT_NAMES)
            if video_root is None:
                raise SourceError(
                    src, "no video root: expected UCF-101/ or UCF101/ (or --video_root)"
                )
            carve = True
        elif subset is not None:
            classes, clips = _subset_clips(subset)
            video_root = subset
            carve = not any(clip.split == "val" for clip in clips)
        else:
            raise SourceError(
                src,
                f"not a UCF-101 folder: expected {SPLITS_DIRNAME}/ with UCF-101/, "
                "or {train,val,test}/<Class>/*.avi",
            )
        if not video_root.is_dir():
            raise SourceError(video_root, "video root is not a folder")
        kept = select_classes(options.get("classes"), classes)
        kept_names = set(kept)
        clips = [clip for clip in clips if clip.class_name in kept_names]
        if carve:
            clips = carve_val(
                clips, float(options.get("val_fraction", 0.1)), int(options.get("seed", 0))
            )
        order = {name: i for i, name in enumerate(classes)}
        split_rank = {"train": 0, "val": 1, "test": 2}
        clips.sort(key=lambda c: (split_rank[c.split], order[c.class_name], c.relative))

        num_frames = int(options.get("num_frames", 8))
        user = prompt(kept)
        tree = CaseInsensitiveTree(video_root)
        items, skipped = [], []
        for index, clip in enumerate(clips):
            try:
                video = tree.resolve(clip.relative)
            except UnsafePath as error:
                skipped.append(Skipped(clip.split, clip.relative, f"unsafe path: {error}"))
                continue
            if video is None:
                skipped.append(Skipped(clip.split, clip.relative, "video file is missing"))
                continue
            if not is_regular_file(video):  # a FIFO, device or folder: listed, never opened
                reason = "not a regular file (a FIFO, device, socket or folder)"
                skipped.append(Skipped(clip.split, clip.relative, reason))
                continue
            payload = {
                "id": f"{clip.split}-{index:010d}",
                "video": str(video),
                "relative": clip.relative,
                "folder": f"{clip.split}/{clip.class_name}/{video.stem}",
                "class_name": clip.class_name,
                "user": user,
                "num_frames": num_frames,
            }
            items.append(Item(clip.split, clip.relative, payload))
        info = {
            "metrics": ["accuracy"],
            "num_crops": 4,
            "max_images_per_record": max(64, num_frames),
        }
        return Plan(items, skipped, info)

    def convert(self, item: Item, images: ImageWriter) -> list[dict[str, Any]]:

        p = item.payload
        frame_count, indices, frames = read_sampled_frames(Path(p["video"]), p["num_frames"])
        paths = [
            images.save(f"{p['folder']}.{k}.jpg", frame, quality=FRAME_JPEG_QUALITY)
            for k, frame in enumerate(frames)
        ]
        return [
            {
                "id": p["id"],
                "source": NAME,
                "conversations": [
                    {"images": paths, "user": p["user"], "assistant": p["class_name"]}
                ],
                "meta": {"video": p["relative"], "frame_count": frame_count, "frames": indices},
            }
        ]


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


CONVERTER = Ucf101Converter
