"""Benchmark: our ``ucf101`` converter against the original recipe's frame extraction.

Synthesizes N realistic clips (320x240, 25 fps, 6-8 s, MPEG-4 part 2 in AVI like the real files:
a textured, panning background, several moving objects and sensor noise) in the official layout,
then, on the same files in the same run:

1. the original recipe's method (``convert_ucf101.py``: PyAV, T from ``stream.frames``, decode every
   frame from the start up to the last sampled index, keep floor(k*T/8), save JPEGs with PIL);
2. ``phi3v-data convert ucf101`` with ``--workers 1`` and ``--workers 2`` (the whole runner:
   plan, frames, JPEGs, journal, jsonl);

and prints videos/s and the ratios (best of ``--rounds``, rounds interleaved), checks that both
select the same frames (every frame we keep is nearest to the original's frame of that index
among its neighbours), and measures frame access alone: ours (what the converter
uses: PyAV, decoding from the nearest keyframe before each sampled index) against OpenCV's
sequential ``grab()`` and ``CAP_PROP_POS_FRAMES`` seeking, for short (OpenCV's default, 12) and
long (250) keyframe intervals.

    .venv/bin/python benchmarks/convert_ucf101.py --videos 40 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

from phi3v_data.convert import run_conversion
from phi3v_data.converters.ucf101 import (
    Ucf101Converter,
    read_sampled_frames,
    sample_indices,
)

NUM_FRAMES = 8
SIZE = (320, 240)
FPS = 25
CLASSES = ("ApplyEyeMakeup", "Archery", "Biking", "Drumming")


# ---------------------------------------------------------------------------------------------
# Realistic clips
# ---------------------------------------------------------------------------------------------


def render(seed: int, frame_count: int) -> list[np.ndarray]:
    """BGR frames: a blurred textured scene panning slowly, three moving blobs, sensor noise."""
    rng = np.random.default_rng(seed)
    width, height = SIZE
    scene = rng.integers(0, 256, (height * 2 // 8, width * 2 // 8, 3), dtype=np.uint8)
    scene = cv2.resize(scene, (width * 2, height * 2), interpolation=cv2.INTER_CUBIC)
    scene = cv2.GaussianBlur(scene, (0, 0), 3)
    yy, xx = np.mgrid[0 : height * 2, 0 : width * 2]
    scene = (scene * 0.7 + np.stack([xx / 5 % 80, yy / 4 % 60, (xx + yy) / 9 % 70], -1)).astype(
        np.uint8
    )
    pan = rng.uniform(0.3, 1.2, 2)
    blobs = rng.uniform(0, 1, (3, 5))
    frames = []
    for index in range(frame_count):
        ox = int(index * pan[0]) % width
        oy = int(index * pan[1]) % height
        frame = scene[oy : oy + height, ox : ox + width].copy()
        for bx, by, speed, radius, hue in blobs:
            cx = int(width * (0.5 + 0.4 * np.sin(index * speed / 10 + bx * 6)))
            cy = int(height * (0.5 + 0.4 * np.cos(index * speed / 13 + by * 6)))
            color = tuple(int(c) for c in cv2.cvtColor(
                np.uint8([[[hue * 179, 200, 220]]]), cv2.COLOR_HSV2BGR)[0, 0])  # fmt: skip
            cv2.circle(frame, (cx, cy), int(12 + radius * 25), color, -1)
        noise = rng.integers(-6, 7, frame.shape, dtype=np.int16)
        frames.append(np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return frames


def write_opencv(path: Path, frames: list[np.ndarray]) -> None:
    """XviD (MPEG-4 part 2) AVI through OpenCV's writer (keyframe every 12 frames)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), FPS, SIZE)
    for frame in frames:
        writer.write(frame)
    writer.release()


def write_long_gop(path: Path, frames: list[np.ndarray], gop: int = 250) -> None:
    """MPEG-4 part 2 AVI (XVID tag) through PyAV with a long keyframe interval."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_tag = "XVID"
        stream.bit_rate = 1_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode())


def synthesize(root: Path, count: int, writer) -> list[Path]:
    """``count`` clips in the official layout (all in train; one test clip per class)."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    videos, train, test = [], [], []
    for index in range(count):
        class_index = index % len(CLASSES)
        name = CLASSES[class_index]
        group, clip = index // len(CLASSES) // 4 + 1, index // len(CLASSES) % 4 + 1
        relative = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"
        path = root / "UCF-101" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        frame_count = int(FPS * (6 + 2 * ((index * 7919) % 100) / 100))  # 6-8 s
        writer(path, render(index, frame_count))
        videos.append(path)
        (test if group == 1 and clip == 1 else train).append(
            relative if group == 1 and clip == 1 else f"{relative} {class_index + 1}"
        )
    crlf = "".join
    (lists / "classInd.txt").write_text(crlf(f"{i} {n}\r\n" for i, n in enumerate(CLASSES, 1)))
    (lists / "trainlist01.txt").write_text(crlf(f"{line}\r\n" for line in train))
    (lists / "testlist01.txt").write_text(crlf(f"{line}\r\n" for line in test))
    return videos


# ---------------------------------------------------------------------------------------------
# The original recipe's method (re-implemented from its description)
# ---------------------------------------------------------------------------------------------


def original_frames(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """PyAV, T from stream.frames, decode from the start up to the last sampled index."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        indices = sample_indices(stream.frames, NUM_FRAMES)
        wanted = set(indices)
        container.seek(0)
        frames = []
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= indices[-1]:
                break
    return indices, frames


def original_convert(videos: list[Path], out: Path) -> None:
    for video in videos:
        _, frames = original_frames(video)
        folder = out / "images" / "train" / video.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for k, frame in enumerate(frames):
            Image.fromarray(frame).convert("RGB").save(folder / f"{video.stem}.{k}.jpg")


# ---------------------------------------------------------------------------------------------
# Frame access: ours vs OpenCV grab vs OpenCV seek
# ---------------------------------------------------------------------------------------------


def _capture(path: Path):
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])


def opencv_grab_frames(path: Path) -> tuple[int, list[int], list[np.ndarray]]:
    """Alternative 1: OpenCV, grab() sequentially to each sampled index, then on to the end to
    check the header's T."""
    capture = _capture(path)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    indices = sample_indices(count, NUM_FRAMES)
    frames, position = [], 0
    for index in indices:
        while position < index:
            capture.grab()
            position += 1
        ok, frame = capture.read()
        position += 1
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if ok else None)
    while capture.grab():
        position += 1
    capture.release()
    return count if position == count else -1, indices, frames


def opencv_seek_frames(path: Path) -> tuple[int, list[int], list[np.ndarray]]:
    """Alternative 2: OpenCV, CAP_PROP_POS_FRAMES to each sampled index and to T-1 (check)."""
    capture = _capture(path)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    indices = sample_indices(count, NUM_FRAMES)
    frames = []
    for index in indices:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = capture.read()
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if ok else None)
    capture.set(cv2.CAP_PROP_POS_FRAMES, count - 1)
    checked = capture.grab() and not capture.grab()
    capture.release()
    return count if checked else -1, indices, frames


def ours_frames(path: Path) -> tuple[int, list[int], list[np.ndarray]]:
    """What the converter uses: PyAV, decoding from the nearest keyframe before each index."""
    count, indices, images = read_sampled_frames(path, NUM_FRAMES)
    return count, indices, [np.asarray(image) for image in images]


def all_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def selects_right_frames(
    path: Path, indices: list[int], frames: list[np.ndarray], reference: list[np.ndarray]
) -> bool:
    """Each frame is nearest (mean abs difference) to the reference frame of its own index
    among the reference frames within +-3, and nearly identical to it."""
    for index, frame in zip(indices, frames, strict=True):
        if frame is None:
            return False
        window = range(max(0, index - 3), min(len(reference), index + 4))
        errors = {i: float(np.abs(frame.astype(np.int16) - reference[i]).mean()) for i in window}
        if min(errors, key=errors.get) != index or errors[index] > 2.0:
            return False
    return True


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the --workers pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_interleaved(
    videos: list[Path], methods: dict, rounds: int
) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) ms per clip of each method; each round runs every method once, in turn."""
    best = {name: (float("inf"), float("inf")) for name in methods}
    for _ in range(rounds):
        for name, read in methods.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for video in videos:
                read(video)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return {name: (w / len(videos) * 1000, c / len(videos) * 1000) for name, (w, c) in best.items()}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--access_videos", type=int, default=12, help="clips per GOP variant")
    args = parser.parse_args()
    options = {"fold": 1, "classes": None, "num_frames": NUM_FRAMES, "val_fraction": 0.0,
               "seed": 0, "video_root": None, "splits_dir": None}  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="bench-ucf101-"))
    try:
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
              f"load {os.getloadavg()[0]:.2f}; cv2 {cv2.__version__}, PyAV {av.__version__}")  # fmt: skip
        started = time.perf_counter()
        raw = work / "raw"
        videos = synthesize(raw, args.videos, write_opencv)
        mean_frames = statistics.mean(
            int(cv2.VideoCapture(str(v)).get(cv2.CAP_PROP_FRAME_COUNT)) for v in videos
        )
        size_kb = statistics.mean(v.stat().st_size for v in videos) / 1024
        print(f"synthesized {len(videos)} clips 320x240 @25 fps, mean {mean_frames:.0f} frames "
              f"({mean_frames / FPS:.1f} s), {size_kb:.0f} KiB each, "
              f"in {time.perf_counter() - started:.1f} s")  # fmt: skip

        # 1) throughput, interleaved rounds
        original = "original (PyAV, decode to last index)"
        wall = {original: [], "ours --workers 1": [], "ours --workers 2": []}
        cpu = {label: [] for label in wall}
        for round_index in range(args.rounds):
            for label in wall:
                out = work / f"out-{round_index}-{label.split()[-1]}"
                started, cpu_started = time.perf_counter(), cpu_seconds()
                if label == original:
                    original_convert(videos, out)
                else:
                    workers = int(label.split()[-1])
                    run_conversion(Ucf101Converter, raw, out, options, workers=workers)
                wall[label].append(time.perf_counter() - started)
                cpu[label].append(cpu_seconds() - cpu_started)
                shutil.rmtree(out)
        base = len(videos) / min(wall[original])
        base_cpu = min(cpu[original])
        print(f"\nthroughput, best of {args.rounds} interleaved rounds ({len(videos)} clips, "
              f"{NUM_FRAMES} frames each, JPEGs written; load {os.getloadavg()[0]:.2f}):")  # fmt: skip
        for label, seconds in wall.items():
            rate = len(videos) / min(seconds)
            cpu_ms = min(cpu[label]) / len(videos) * 1000
            print(f"  {label:<40} {rate:7.1f} videos/s   x{rate / base:.2f}   "
                  f"CPU {cpu_ms:5.1f} ms/video (x{base_cpu / min(cpu[label]):.2f} less)")  # fmt: skip

        # 2) same frames selected as the original
        same = 0
        for video in videos:
            indices, frames = original_frames(video)
            _, our_indices, our_frames = ours_frames(video)
            same += our_indices == indices and selects_right_frames(
                video, our_indices, our_frames, all_frames(video)
            )
        print(f"\nsame frames as the original method: {same}/{len(videos)} clips")

        # 3) frame access alone: ours vs OpenCV grab/seek, short and long keyframe intervals
        print("\nframe access only (8 frames + frame-count check, no JPEG), per clip, best of "
              f"{args.rounds} interleaved rounds:")  # fmt: skip
        for label, writer in (("GOP 12 (OpenCV XVID)", write_opencv),
                              ("GOP 250 (PyAV mpeg4)", write_long_gop)):  # fmt: skip
            clips = synthesize(work / label.split()[1], args.access_videos, writer)
            reference = {clip: all_frames(clip) for clip in clips}
            methods = {
                "original (PyAV)": lambda clip: original_frames(clip),
                "ours (PyAV keyframe)": ours_frames,
                "OpenCV grab": opencv_grab_frames,
                "OpenCV seek": opencv_seek_frames,
            }
            timings = time_interleaved(clips, methods, args.rounds)
            base_wall, base_cpu = timings["original (PyAV)"]
            for name, read in methods.items():
                exact = ""
                if name != "original (PyAV)":
                    hits = sum(selects_right_frames(c, *read(c)[1:], reference[c]) for c in clips)
                    exact = f"exact {hits}/{len(clips)}"
                wall, cpu = timings[name]
                print(f"  {label:<22} {name:<21} wall {wall:6.1f} ms x{base_wall / wall:.2f}   "
                      f"CPU {cpu:6.1f} ms x{base_cpu / cpu:.2f}   {exact}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
