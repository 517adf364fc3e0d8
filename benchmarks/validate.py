"""Speed and memory of ``phi3v-data validate`` against a naive jsonschema baseline.

    .venv/bin/python benchmarks/validate.py [--records 1000000] [--images 3000] [--workdir DIR]
    .venv/bin/python benchmarks/validate.py --issue12 --records 200000   # issue 12 costs only

Builds a dataset in a temporary folder: ``--images`` real JPEG files (320x240) referenced many
times by ``--records`` records, 90% train / 10% test, half UCF-101-like (8 frames, the 101-class
prompt, a class answer), half DocVQA-like (1 page, a question, several answers); a few records
have 1-7 images. Then, each in a fresh subprocess so that peak RSS is its own:

1. schema + path checks (``validate_dataset(check_images=False)``) on the whole dataset with one
   worker process per core and with one process, and on its first 10% (peak RSS of both shows
   how memory grows with the number of records);
2. image header checks (``ImageChecker(content="header")``) on every distinct image;
3. the naive baseline: ``json.loads`` + ``jsonschema.Draft202012Validator`` with
   ``schemas/record.schema.json`` + ``os.path.exists`` per image, on the first ``--baseline``
   records only (its rate is extrapolated to the whole dataset, and the ratio is of rates).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from phi3v_data.workers import available_cores

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"Class{index:03d}" for index in range(101)]
UCF_PROMPT = (
    "Classify the video into one of the following classes: " + ", ".join(CLASSES) + ". Answer:"
)
QUESTIONS = ["What is the date on the letter?", "Who signed the form?", "What is the total?"]


def build_images(root: Path, count: int) -> list[str]:
    from PIL import Image

    rng = random.Random(0)
    names = []
    for index in range(count):
        name = f"v{index // 100:03d}/frame_{index:05d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        Image.new("RGB", (320, 240), color).save(root / name, quality=85)
        names.append(name)
    return names


def build_records(path: Path, count: int, images: list[str], prefix: str, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("wb") as stream:
        for index in range(count):
            kind = rng.random()
            if kind < 0.5:
                start = rng.randrange(len(images) - 8)
                record = {
                    "id": f"{prefix}-ucf-{index:07d}",
                    "source": "ucf101",
                    "conversations": [
                        {
                            "images": images[start : start + 8],
                            "user": UCF_PROMPT,
                            "assistant": rng.choice(CLASSES),
                        }
                    ],
                }
            else:
                count_images = 1 if kind < 0.95 else rng.randint(2, 7)
                answer = f"{rng.randrange(1, 31)} March {rng.randrange(1950, 2000)}"
                record = {
                    "id": f"{prefix}-doc-{index:07d}",
                    "source": "docvqa",
                    "conversations": [
                        {
                            "images": rng.sample(images, count_images),
                            "user": rng.choice(QUESTIONS),
                            "assistant": answer,
                        }
                    ],
                    "answers": [answer, answer.upper()],
                }
            stream.write(orjson.dumps(record) + b"\n")


def build_dataset(root: Path, records: int, image_count: int) -> None:
    (root / "images").mkdir(parents=True)
    images = build_images(root / "images", image_count)
    held_out = max(8, image_count // 10)  # test images never appear in train: no leak problems
    test_records = records // 10
    build_records(root / "bench_train.jsonl", records - test_records, images[held_out:], "tr", 1)
    build_records(root / "bench_test.jsonl", test_records, images[:held_out], "te", 2)


def head_dataset(source: Path, target: Path, fraction: float) -> None:
    """A smaller copy of ``source``: the first ``fraction`` of each split, the same images."""
    target.mkdir()
    (target / "images").symlink_to(source / "images")
    for split_file in source.glob("*.jsonl"):
        with split_file.open("rb") as stream:
            total = sum(1 for _ in stream)
            stream.seek(0)
            with (target / split_file.name).open("wb") as head:
                for _, line in zip(range(int(total * fraction)), stream, strict=False):
                    head.write(line)


def peak_rss_mib() -> float:
    """Peak RSS of this process: VmHWM on Linux (getrusage's ru_maxrss survives exec, so it would
    report the parent's peak), ru_maxrss elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished worker processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def measure_validate(data_dir: Path, jobs: int) -> dict:
    from phi3v_data.validate import validate_dataset

    started, cpu_started = time.perf_counter(), cpu_seconds()
    report = validate_dataset(data_dir, check_images=False, jobs=jobs)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    assert report.ok, report.format_text()[:2000]
    records = report.summary.records
    return {
        "records": records,
        "seconds": seconds,
        "rate": records / seconds,
        "cpu_rate": records / cpu,
        "rss": peak_rss_mib(),
        "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure_headers(data_dir: Path) -> dict:
    from phi3v_data.images import ImageChecker

    names = sorted(
        str(path.relative_to(data_dir / "images")) for path in (data_dir / "images").rglob("*.jpg")
    )
    checker = ImageChecker(data_dir / "images", content="header")
    started = time.perf_counter()
    problems = [name for name in names if checker.check(name) is not None]
    seconds = time.perf_counter() - started
    assert not problems, problems[:5]
    return {"images": len(names), "seconds": seconds, "rate": len(names) / seconds}


def measure_baseline(data_dir: Path, limit: int) -> dict:
    import jsonschema

    schema = json.loads((REPO / "schemas" / "record.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    root = data_dir / "images"
    records = 0
    started, cpu_started = time.perf_counter(), cpu_seconds()
    with (data_dir / "bench_train.jsonl").open("rb") as stream:
        for line in stream:
            record = json.loads(line)
            errors = list(validator.iter_errors(record))
            assert not errors, errors[0]
            for turn in record["conversations"]:
                for image in turn["images"]:
                    assert os.path.exists(os.path.join(root, image)), image
            records += 1
            if records >= limit:
                break
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return {
        "records": records,
        "seconds": seconds,
        "rate": records / seconds,
        "cpu_rate": records / cpu,
        "rss": peak_rss_mib(),
    }


def _old_header_check(path: Path) -> str | None:
    """The default image check before issue 12: header only, PNG chunk CRCs, JPEG end marker."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
        return None
    except Exception as error:  # noqa: BLE001 - any failure is a verdict here
        return str(error)


def measure_issue12(workdir: Path, count: int, records: int) -> None:
    """Issue 12 costs, in one run: the default image check (full decode of every non-JPEG
    format) against the old header check on ``count`` PNG and ``count`` JPEG images, and the
    duplicate-key check's share of schema-check throughput (1 process, alternated runs)."""
    import io

    import numpy as np
    from PIL import Image

    from phi3v_data import record_scan
    from phi3v_data.images import inspect_image
    from phi3v_data.validate import validate_dataset

    rng = np.random.default_rng(0)
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        folder = workdir / f"images_{suffix}"
        folder.mkdir(parents=True)
        # a document-like page: flat paper, dark strokes, some noise (DocVQA pages are PNG)
        for index in range(count):
            page = np.full((240, 320), 235, dtype=np.uint8)
            page[rng.integers(0, 240, 400), rng.integers(0, 320, 400)] = 20
            stream = io.BytesIO()
            Image.fromarray(page).convert("RGB").save(stream, fmt)
            (folder / f"{index}.{suffix}").write_bytes(stream.getvalue())
        paths = sorted(folder.iterdir())
        timings = {}
        for name, check in (
            ("old header check", _old_header_check),
            ("default check (issue 12)", lambda path: inspect_image(path)[1]),
            ("--deep", lambda path: inspect_image(path, deep=True)[1]),
        ):
            started = time.perf_counter()
            assert all(check(path) is None for path in paths)
            timings[name] = time.perf_counter() - started
        size = sum(path.stat().st_size for path in paths) / len(paths) / 1024
        for name, seconds in timings.items():
            print(
                f"| {fmt} 320x240 ({size:.0f} KiB avg) | {name} | {seconds:.2f} | "
                f"{count / seconds:,.0f} |"
            )
    data = workdir / "dups"
    (data / "images").mkdir(parents=True)
    build_records(data / "bench_train.jsonl", records, [f"{i}.jpg" for i in range(64)], "tr", 1)
    real = record_scan.duplicate_keys
    rates: dict[str, list[float]] = {"without duplicate-key check": [], "with it": []}
    for _ in range(3):
        for name, check in (
            ("without duplicate-key check", lambda data, record: []),
            ("with it", real),
        ):
            record_scan.duplicate_keys = check
            started = time.perf_counter()
            report = validate_dataset(data, check_images=False, jobs=1)
            rates[name].append(records / (time.perf_counter() - started))
            assert report.summary.records == records
    record_scan.duplicate_keys = real
    for name, values in rates.items():
        print(f"| schema checks, 1 process | {name} | best of 3: {max(values):,.0f} records/s |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def child(argv: list[str]) -> None:
    kind, data_dir = argv[0], Path(argv[1])
    if kind == "validate":
        result = measure_validate(data_dir, int(argv[2]))
    elif kind == "headers":
        result = measure_headers(data_dir)
    else:
        result = measure_baseline(data_dir, int(argv[2]))
    print(json.dumps(result))


def run_child(*args: str) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--baseline", type=int, default=50_000, help="records the baseline reads")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default tmp)")
    parser.add_argument(
        "--issue12",
        action="store_true",
        help="only the issue 12 costs: image checks on --images PNG + JPEG, duplicate keys on "
        "--records records",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="phi3v-bench-validate-", dir=args.workdir))
    if args.issue12:
        try:
            measure_issue12(workdir, args.images, args.records)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    try:
        started = time.perf_counter()
        full, small = workdir / "full", workdir / "small"
        build_dataset(full, args.records, args.images)
        head_dataset(full, small, 0.1)
        size = sum(path.stat().st_size for path in full.glob("*.jsonl"))
        print(
            f"built {args.records:,} records ({size / 2**20:.0f} MiB jsonl), {args.images:,} "
            f"JPEG images, in {time.perf_counter() - started:.1f} s"
        )
        jobs = available_cores()
        ours = run_child("validate", str(full), str(jobs))
        ours_one = run_child("validate", str(full), "1")
        ours_small = run_child("validate", str(small), str(jobs))
        headers = run_child("headers", str(full))
        baseline = run_child("baseline", str(full), str(args.baseline))
        extra_records = ours["records"] - ours_small["records"]
        growth = (ours["rss"] - ours_small["rss"]) * 2**20 / extra_records
        for result, processes in ((ours, jobs), (ours_one, 1)):
            print(
                f"schema + path checks, {processes} process(es): {result['rate']:,.0f} records/s "
                f"({result['records']:,} records in {result['seconds']:.1f} s); "
                f"{result['cpu_rate']:,.0f} records per CPU-second"
            )
        print(
            f"peak RSS (main process): {ours['rss']:.0f} MiB at {ours['records']:,} records, "
            f"{ours_small['rss']:.0f} MiB at {ours_small['records']:,} "
            f"({growth:.0f} bytes per extra record); largest worker {ours['worker_rss']:.0f} MiB"
        )
        print(
            f"image header checks: {headers['rate']:,.0f} images/s "
            f"({headers['images']:,} distinct images in {headers['seconds']:.2f} s)"
        )
        print(
            f"baseline (json.loads + jsonschema Draft202012Validator + os.path.exists): "
            f"{baseline['rate']:,.0f} records/s ({baseline['cpu_rate']:,.0f} per CPU-second) "
            f"on the first {baseline['records']:,} records, "
            f"extrapolated: {ours['records'] / baseline['rate']:.0f} s for {ours['records']:,}"
        )
        print(
            f"ratio: {ours['rate'] / baseline['rate']:.1f}x the baseline's records/s "
            f"({ours_one['rate'] / baseline['rate']:.1f}x with 1 process); per CPU-second: "
            f"{ours['cpu_rate'] / baseline['cpu_rate']:.1f}x"
        )
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
