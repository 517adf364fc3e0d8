"""``phi3v-data validate``: every defect of a dataset, one line each, before a GPU hour is spent.

:func:`validate_dataset` streams every record of a dataset directory (or of one jsonl file), never
holding more than one record: the schema (:mod:`phi3v_data.schema`), every image path and file
(:mod:`phi3v_data.images`, once per distinct path), ids unique across all splits, records shared
between a train split and another split (same id, or same image list), empty splits, misnamed
files, ``dataset.json`` and a missing ``images/`` folder. Each problem is one line
``path:line: field: message`` (line 0: the file or folder as a whole).

Files are opened only when regular (a FIFO or folder named like a split or ``dataset.json`` is
a problem of its own, never waited on). Ctrl-C stops the worker processes too (they ignore
SIGINT; the parent cancels what is queued and ends them) and exits 130 with one line.

Large files are cut into chunks checked by worker processes (:mod:`phi3v_data.record_scan`);
image files are checked once per distinct path, and a bad one is reported at the first record
that names it. Memory grows by about 20 bytes per record: ids and image lists are kept as 8-byte
blake2b digests (a false "duplicate" needs a 64-bit collision) with the 4-byte line number, plus
one sorted copy of the id digests while looking for repeats at the end.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
from array import array
from bisect import bisect_right
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import click
import numpy as np

from phi3v_data.dataset import (
    INFO_FILENAME,
    images_root,
    line_chunks,
    misnamed_message,
    read_info,
    record_context,
    scan_splits,
)
from phi3v_data.images import ImageChecker, check_image_path
from phi3v_data.messages import one_line
from phi3v_data.record_scan import ChunkScan, prune_answers, scan_chunk
from phi3v_data.safe_io import NotRegularFile
from phi3v_data.schema import DatasetInfo
from phi3v_data.workers import available_cores, start_method

#: Problems listed per file; the rest are counted as suppressed.
DEFAULT_MAX_PROBLEMS_PER_FILE = 1000
#: Bytes of jsonl per unit of work of a worker process.
CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True, slots=True)
class Problem:
    """One defect at one place: ``path:line: field: message`` (line 0 = whole file or folder)."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "field": self.field, "message": self.message}


@dataclass
class Range:
    """min / mean / max of a count over many items."""

    count: int = 0
    total: int = 0
    low: int | None = None
    high: int | None = None

    def merge(self, count: int, total: int, low: int, high: int) -> None:
        if not count:
            return
        self.count += count
        self.total += total
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def to_json(self) -> dict[str, float | int | None]:
        mean = round(self.total / self.count, 2) if self.count else None
        return {"min": self.low, "mean": mean, "max": self.high}

    def __str__(self) -> str:
        if not self.count:
            return "-"
        return f"min {self.low} / mean {self.total / self.count:.1f} / max {self.high}"


@dataclass
class SplitSummary:
    split: str | None
    path: str
    lines: int = 0
    records: int = 0


@dataclass
class Summary:
    """Figures of the records that passed the schema check."""

    dataset: str
    name: str | None = None
    splits: list[SplitSummary] = field(default_factory=list)
    records: int = 0
    turns: int = 0
    images: int = 0
    distinct_images: int = 0
    images_per_record: Range = field(default_factory=Range)
    user_chars: Range = field(default_factory=Range)
    assistant_chars: Range = field(default_factory=Range)
    answers: Counter[str] = field(default_factory=Counter)
    answers_exact: bool = True
    labels: Counter[int] = field(default_factory=Counter)
    image_formats: Counter[str] = field(default_factory=Counter)
    image_modes: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "name": self.name,
            "splits": [vars(split) for split in self.splits],
            "records": self.records,
            "turns": self.turns,
            "images": self.images,
            "distinct_images": self.distinct_images,
            "images_per_record": self.images_per_record.to_json(),
            "user_chars": self.user_chars.to_json(),
            "assistant_chars": self.assistant_chars.to_json(),
            "answers_top10": self.answers.most_common(10),
            "answers_exact": self.answers_exact,
            "labels": {str(label): count for label, count in sorted(self.labels.items())},
            "image_formats": dict(self.image_formats.most_common()),
            "image_modes": dict(self.image_modes.most_common()),
        }

    def format_text(self) -> str:
        splits = ", ".join(f"{s.split or '?'} {s.records:,} ({s.path})" for s in self.splits)
        answers = ", ".join(
            f"{answer!r} {count:,}" for answer, count in self.answers.most_common(10)
        )
        lines = [
            f"dataset: {self.dataset}" + (f" (name {self.name})" if self.name else ""),
            f"splits: {splits or 'none'}",
            f"records {self.records:,} · turns {self.turns:,} · images {self.images:,} "
            f"(distinct {self.distinct_images:,})",
            f"images per record: {self.images_per_record}",
            f"user text chars: {self.user_chars}",
            f"assistant text chars: {self.assistant_chars}",
            f"answers, top 10{'' if self.answers_exact else ' (approximate)'}: {answers or '-'}",
        ]
        if self.labels:
            lines.append(
                "labels: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.labels.items()))
            )
        if self.image_formats:
            formats = ", ".join(f"{k} {v:,}" for k, v in self.image_formats.most_common())
            modes = ", ".join(f"{k} {v:,}" for k, v in self.image_modes.most_common())
            lines.append(f"image formats: {formats} · modes: {modes}")
        return "\n".join(lines)


@dataclass
class ValidationReport:
    """The problems found in a dataset and the summary of its valid records."""

    problems: list[Problem]
    summary: Summary
    suppressed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.suppressed

    def format_text(self) -> str:
        lines = [str(problem) for problem in self.problems]
        if self.suppressed:
            lines.append(f"... and {self.suppressed:,} more problems not listed")
        lines.append(self.summary.format_text())
        count = len(self.problems) + self.suppressed
        lines.append("result: valid" if self.ok else f"result: {count:,} problem(s)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problem_count": len(self.problems) + self.suppressed,
            "suppressed": self.suppressed,
            "problems": [problem.to_json() for problem in self.problems],
            "summary": self.summary.to_json(),
        }


class _Validation:
    """State of one validation run: problems, digests and counters over all files."""

    def __init__(
        self,
        data_dir: Path,
        info: DatasetInfo,
        *,
        content: str,
        max_images: int | None,
        max_problems_per_file: int,
        jobs: int,
        progress: bool,
    ) -> None:
        self.info = info
        self.max_images = max_images
        self.max_problems = max_problems_per_file
        self.jobs = jobs
        self.progress = progress
        self.problems: list[Problem] = []
        self.suppressed = 0
        self.per_file: Counter[str] = Counter()
        root = images_root(data_dir)
        self.checker = ImageChecker(root, content=content) if root.is_dir() else None
        #: image path -> (file, line, field) of the first record naming it
        self.first_reference: dict[str, tuple[str, int, str]] = {}
        self.id_digests = bytearray()
        self.image_digests = bytearray()
        self.lines = array("I")
        #: per file: (index of its first record, path, split)
        self.files: list[tuple[int, str, str | None]] = []
        self._pool: ProcessPoolExecutor | None = None
        self._bar = None

    def pool(self) -> ProcessPoolExecutor | None:
        """Worker processes (created on first use), or None when running in one process."""
        if self._pool is None and self.jobs > 1:
            context = multiprocessing.get_context(start_method())
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=context, initializer=_ignore_sigint
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._bar is not None:
            self._bar.close()

    def abort(self) -> None:
        """After Ctrl-C: drop queued work and end the workers now. SIGINT stays ignored from here
        on: the process is on its way out (exit 130), and a second Ctrl-C must neither break the
        clean-up, leaving workers behind, nor turn exit 130 into a death by signal."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join(timeout=10)
        pool.shutdown(wait=True)

    def add(self, path: str, line: int, field_name: str, message: str) -> None:
        """Record one problem, or count it as suppressed once the file's budget is spent."""
        self.per_file[path] += 1
        if self.per_file[path] > self.max_problems:
            self.suppressed += 1
        else:
            self.problems.append(Problem(path, line, one_line(field_name), one_line(message)))

    def scan_file(self, path: Path, split: str | None, summary: Summary) -> None:
        """Validate every line of one jsonl file (in chunks, in parallel), adding to ``summary``."""
        name = str(path)
        self.files.append((len(self.lines), name, split))
        split_summary = SplitSummary(split=split, path=name)
        summary.splits.append(split_summary)
        context = record_context(self.info, split, self.max_images)
        try:
            chunks = line_chunks(path, CHUNK_BYTES)
        except NotRegularFile as error:
            self.add(name, 0, "(file)", error.strerror or str(error))
            return
        starts, stops = [start for start, _ in chunks], [stop for _, stop in chunks]
        arguments = (repeat(path), starts, stops, repeat(context), repeat(self.max_problems))
        pool = self.pool() if len(chunks) > 1 else None
        scans = pool.map(scan_chunk, *arguments) if pool else map(scan_chunk, *arguments)
        offset = 0
        for scan, start, stop in zip(scans, starts, stops, strict=True):
            self._merge(name, offset, scan, split_summary, summary)
            offset += scan.lines
            if self._bar is not None:
                self._bar.update(stop - start)
        if offset == 0:
            self.add(name, 0, "(file)", "the split is empty (no records)")

    def _merge(
        self, name: str, offset: int, scan: ChunkScan, split: SplitSummary, summary: Summary
    ) -> None:
        for line, field_name, message in scan.problems:
            self.add(name, offset + line, field_name, message)
        unlisted = scan.problem_count - len(scan.problems)
        self.per_file[name] += unlisted
        self.suppressed += unlisted
        lines = np.frombuffer(scan.record_lines, dtype=np.uint32) + np.uint32(offset)
        self.lines.frombytes(lines.astype(np.uint32).tobytes())
        self.id_digests += scan.id_digests
        self.image_digests += scan.image_digests
        for relative, line, where in scan.first_references:
            if relative not in self.first_reference:
                self.first_reference[relative] = (name, offset + line, where)
        split.lines += scan.lines
        split.records += scan.records
        summary.records += scan.records
        summary.turns += scan.turns
        summary.images += scan.images
        summary.images_per_record.merge(*scan.images_per_record)
        summary.user_chars.merge(*scan.user_chars)
        summary.assistant_chars.merge(*scan.assistant_chars)
        summary.answers.update(scan.answers)
        pruned = prune_answers(summary.answers)
        summary.answers_exact &= scan.answers_exact and pruned is summary.answers
        summary.answers = pruned
        summary.labels.update(scan.labels)

    def check_images(self) -> None:
        """Check each distinct image path once; a bad one is reported at its first reference."""
        if self.checker is None:
            return
        paths = list(self.first_reference)
        arguments = (repeat(self.checker.root), paths, repeat(self.checker.content))
        pool = self.pool() if len(paths) > 256 else None
        verdicts = pool.map(check_image_path, *arguments, chunksize=64) if pool else None
        for relative, (facts, problem) in zip(
            paths, verdicts or map(check_image_path, *arguments), strict=True
        ):
            self.checker.record(relative, facts, problem)
            if problem is not None:
                self.add(*self.first_reference[relative], problem)

    def sort_problems(self) -> None:
        """Problems in file order (the order files were read), then by line."""
        rank = {path: position for position, (_, path, _) in enumerate(self.files)}
        self.problems.sort(key=lambda problem: (rank.get(problem.path, -1), problem.line))

    def _where(self, index: int) -> tuple[str, int, str | None]:
        starts = [start for start, _, _ in self.files]
        _, path, split = self.files[bisect_right(starts, index) - 1]
        return path, self.lines[index], split

    def check_duplicate_ids(self) -> None:
        """Ids must be unique across all splits; a repeat in another split is a leak."""
        for first, later in _repeats(np.frombuffer(self.id_digests, dtype=np.uint64)):
            first_path, first_line, first_split = self._where(first)
            path, line, split = self._where(later)
            if split != first_split:
                message = (
                    f"id shared between splits {first_split} and {split} "
                    f"(first at {first_path}:{first_line})"
                )
            else:
                message = f"duplicate id (first at {first_path}:{first_line})"
            self.add(path, line, "id", message)

    def check_shared_images(self) -> None:
        """The same image list in a train split and another split is a leak."""
        if not self.files:
            return
        digests = np.frombuffer(self.image_digests, dtype=np.uint64)
        ends = [start for start, _, _ in self.files[1:]] + [len(digests)]
        ranges = [
            (start, end, split) for (start, _, split), end in zip(self.files, ends, strict=True)
        ]
        train_ranges = [(start, end) for start, end, split in ranges if _is_train(split)]
        if not train_ranges:
            return
        train = np.unique(np.concatenate([digests[start:end] for start, end in train_ranges]))
        train = train[train != 0]
        leaks: list[int] = []
        for start, end, split in ranges:
            if not _is_train(split):
                part = digests[start:end]
                leaks += (np.nonzero(np.isin(part, train))[0] + start).tolist()
        if not leaks:
            return
        leaked = np.unique(digests[leaks])
        first_train: dict[int, int] = {}
        for start, end in train_ranges:
            for index in (np.nonzero(np.isin(digests[start:end], leaked))[0] + start).tolist():
                first_train.setdefault(int(digests[index]), index)
        for index in leaks:
            train_path, train_line, _ = self._where(first_train[int(digests[index])])
            path, line, split = self._where(index)
            message = (
                f"same image list as train record {train_path}:{train_line} (leak into {split})"
            )
            self.add(path, line, "images", message)


def _ignore_sigint() -> None:
    """Worker start: Ctrl-C reaches the whole process group; only the parent acts on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _is_train(split: str | None) -> bool:
    return bool(split and split.lower().startswith("train"))


def _train_first(item: tuple[str, Path]) -> tuple[bool, str]:
    return not _is_train(item[0]), item[0]


def _repeats(digests: np.ndarray) -> list[tuple[int, int]]:
    """``(first index, later index)`` for every repeated value, in order of the later index.

    One sorted copy (8 bytes per record) finds whether anything repeats at all; only then are
    the repeats located.
    """
    ordered = np.sort(digests)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(repeated):
        return []
    first: dict[int, int] = {}
    pairs = []
    for index in np.nonzero(np.isin(digests, repeated))[0].tolist():
        value = int(digests[index])
        if value in first:
            pairs.append((first[value], index))
        else:
            first[value] = index
    return pairs


def validate_dataset(
    path: Path,
    *,
    deep: bool = False,
    check_images: bool = True,
    max_images: int | None = None,
    max_problems_per_file: int = DEFAULT_MAX_PROBLEMS_PER_FILE,
    jobs: int | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Validate a dataset directory, or one ``<name>_<split>.jsonl`` file inside one.

    ``deep`` decodes every image fully; ``check_images=False`` checks paths but not contents;
    ``max_images`` overrides ``dataset.json``'s images-per-record limit; ``jobs`` worker processes
    (default: one per available core) share the records and images of large datasets. Raises
    ``OSError`` when a file cannot be read at all.
    """
    path = Path(path)
    single_file = path.is_file()
    data_dir = path.parent if single_file else path
    info, info_errors = read_info(data_dir)
    run = _Validation(
        data_dir,
        info,
        content="deep" if deep else ("header" if check_images else "none"),
        max_images=max_images,
        max_problems_per_file=max_problems_per_file,
        jobs=jobs or available_cores(),
        progress=progress,
    )
    for error in info_errors:
        run.add(error.path, error.line, error.field, error.message)
    found = scan_splits(data_dir, info)
    summary = Summary(dataset=str(path), name=found.name)
    if run.checker is None:
        run.add(str(images_root(data_dir)), 0, "(folder)", "missing images/ folder")
    if single_file:
        split = next((s for s, p in found.splits.items() if p.name == path.name), None)
        files = [(path, split)]
    else:
        files = sorted(found.splits.items(), key=_train_first)
        files = [(split_path, split) for split, split_path in files]
        files += [(misnamed, None) for misnamed in found.misnamed]
        if not files:
            run.add(str(path), 0, "(folder)", "no <name>_<split>.jsonl file in this folder")
    if progress:
        run._bar = _progress_bar(sum(file.stat().st_size for file, _ in files))
    try:
        for file, split in files:
            if split is None:
                run.add(str(file), 0, "(file name)", misnamed_message(found.name))
            run.scan_file(file, split, summary)
        if not single_file:
            _check_unlabeled_splits(run, data_dir, info, found.splits)
            run.check_shared_images()
        run.check_duplicate_ids()
        run.check_images()
    except KeyboardInterrupt:
        run.abort()
        raise
    finally:
        run.close()
    run.sort_problems()
    if run.checker is not None:
        summary.distinct_images = len(run.checker.verdicts)
        summary.image_formats = run.checker.formats
        summary.image_modes = run.checker.modes
    else:
        summary.distinct_images = len(run.first_reference)
    return ValidationReport(problems=run.problems, summary=summary, suppressed=run.suppressed)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="validate", file=sys.stderr)


def _check_unlabeled_splits(
    run: _Validation, data_dir: Path, info: DatasetInfo, splits: dict[str, Path]
) -> None:
    known = ", ".join(sorted(splits)) or "none"
    info_path = data_dir / INFO_FILENAME
    for index, split in enumerate(info.unlabeled_splits):
        if split not in splits:
            message = f"no split named {split!r} (found: {known})"
            run.add(str(info_path), 1, f"unlabeled_splits.{index}", message)


@click.command("validate")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--deep",
    is_flag=True,
    help="Decode JPEG images fully too (default: JPEG header and end marker; every other "
    "format is always decoded).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one line per problem, then a summary; json: one JSON document.",
)
@click.option(
    "--max_images",
    "--max-images",
    type=click.IntRange(min=1),
    default=None,
    help="Most images per record (default: dataset.json's max_images_per_record, else 64).",
)
@click.option(
    "--max_problems",
    "--max-problems",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PROBLEMS_PER_FILE,
    show_default=True,
    help="Problems listed per file; more are counted as suppressed.",
)
@click.option("--no-image-check", is_flag=True, help="Check image paths but not image contents.")
@click.option(
    "--num_crops",
    "--num-crops",
    type=click.IntRange(1, 16),
    default=None,
    help="Also report tokens per record (min / mean / p95 / max per split) at this num_crops, "
    "without loading a model (phi3v_data.token_stats).",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Model folder (as given to training) whose tokenizer counts text tokens exactly for "
    "--num_crops "
    "(default: an estimate of 4 characters per token).",
)
@click.option(
    "--jobs",
    "--workers",
    "jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes for large datasets (default: one per available core).",
)
def validate_command(
    path: Path,
    deep: bool,
    output_format: str,
    max_images: int | None,
    max_problems: int,
    no_image_check: bool,
    jobs: int | None,
    num_crops: int | None = None,
    tokenizer_dir: Path | None = None,
) -> None:
    """Check a dataset directory (or one .jsonl file) and summarize it.

    Every problem is one line `path:line: field: message` (line 0: the whole file). Exit status:
    0 valid, 1 problems found, 2 usage or I/O error.
    """
    if path.is_file() and path.suffix != ".jsonl":
        raise click.UsageError(f"{path}: expected a dataset folder or a .jsonl file")
    try:
        report = validate_dataset(
            path,
            deep=deep,
            check_images=not no_image_check,
            max_images=max_images,
            max_problems_per_file=max_problems,
            jobs=jobs,
            progress=sys.stderr.isatty(),
        )
    except OSError as exc:
        click.echo(f"error: cannot read {exc.filename or path}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    tokens = _token_stats(path, num_crops, tokenizer_dir) if num_crops else None
    if output_format == "json":
        data = report.to_json() | ({"tokens": tokens.to_json()} if tokens else {})
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        click.echo(report.format_text() + (f"\n{tokens.format_text()}" if tokens else ""))
    sys.exit(0 if report.ok else 1)


def _token_stats(path: Path, num_crops: int, tokenizer_dir: Path | None):
    """The ``--num_crops`` token report (:mod:`phi3v_data.token_stats`); exit 2 on an I/O error."""
    from phi3v_data.token_stats import dataset_token_stats, load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    except (OSError, ValueError) as exc:
        click.echo(f"error: cannot load a tokenizer from {tokenizer_dir}: {exc}", err=True)
        sys.exit(2)
    try:
        return dataset_token_stats(path, num_crops, tokenizer)
    except OSError as exc:
        click.echo(f"error: cannot read {exc.filename or path}: {exc.strerror or exc}", err=True)
        sys.exit(2)
