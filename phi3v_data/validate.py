"""``phi3v-data validate``: every defect of a dataset, one line each, before a GPU hour is spent.

:func:`validate_dataset` streams every record of a dataset directory (or of one jsonl file), never
holding more than one record: the schema (:mod:`phi3v_data.schema`), every image path and file
(:mod:`phi3v_data.images`, once per distinct path), ids unique across all splits, records shared
between a train split and another split (same id, or same image list), empty splits, misnamed
files, ``dataset.json`` and a missing ``images/`` folder. Each problem is one line
``path:line: field: message`` (line 0: the file or folder as a whole).

Memory is flat but for 20 bytes per record: ids and image lists are kept as 8-byte blake2b
digests (a false "duplicate" needs a 64-bit collision), plus the 4-byte line number.
"""

from __future__ import annotations

import json
import sys
from array import array
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any

import click
import numpy as np
from pydantic import ValidationError

from phi3v_data.dataset import (
    INFO_FILENAME,
    DatasetError,
    images_root,
    misnamed_message,
    read_info,
    read_lines,
    record_context,
    scan_splits,
)
from phi3v_data.images import ImageChecker
from phi3v_data.messages import plain_errors
from phi3v_data.schema import DatasetInfo, Record

#: Problems listed per file; the rest are counted as suppressed.
DEFAULT_MAX_PROBLEMS_PER_FILE = 1000
#: Distinct answers counted exactly; beyond, the counter keeps its most common ones (approximate).
ANSWER_COUNTER_LIMIT = 50_000
_UNSEEN = object()


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

    def count_answer(self, answer: str) -> None:
        self.answers[answer] += 1
        if len(self.answers) > ANSWER_COUNTER_LIMIT:
            self.answers = Counter(dict(self.answers.most_common(ANSWER_COUNTER_LIMIT // 10)))
            self.answers_exact = False

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
        progress: bool,
    ) -> None:
        self.info = info
        self.max_images = max_images
        self.max_problems = max_problems_per_file
        self.progress = progress
        self.problems: list[Problem] = []
        self.suppressed = 0
        self.per_file: Counter[str] = Counter()
        root = images_root(data_dir)
        self.checker = ImageChecker(root, content=content) if root.is_dir() else None
        #: image path -> [index of its problem in self.problems or -1, further references]
        self.image_problems: dict[str, list[int]] = {}
        self.id_digests = bytearray()
        self.image_digests = bytearray()
        self.lines = array("I")
        #: per file: (index of its first record, path, split)
        self.files: list[tuple[int, str, str | None]] = []

    def add(self, path: str, line: int, field_name: str, message: str) -> int:
        """Record one problem; returns its index, or -1 when the file's budget is spent."""
        self.per_file[path] += 1
        if self.per_file[path] > self.max_problems:
            self.suppressed += 1
            return -1
        self.problems.append(Problem(path, line, field_name, message))
        return len(self.problems) - 1

    def scan_file(self, path: Path, split: str | None, summary: Summary) -> None:
        """Validate every line of one jsonl file, adding to ``summary``."""
        name = str(path)
        self.files.append((len(self.lines), name, split))
        split_summary = SplitSummary(split=split, path=name)
        summary.splits.append(split_summary)
        context = record_context(self.info, split, self.max_images)
        validate_json = Record.model_validate_json
        verdicts = self.checker.verdicts if self.checker else {}
        check = self.checker.check if self.checker else None
        id_digests, image_digests, lines = self.id_digests, self.image_digests, self.lines
        no_images = bytes(8)
        count_answer, labels = summary.count_answer, summary.labels
        records = turns = images = 0
        per_record = [0, 0, 1 << 62, 0]  # count, total, min, max
        user = [0, 0, 1 << 62, 0]
        assistant = [0, 0, 1 << 62, 0]
        bar = _progress_bar(path) if self.progress else None
        read = 0
        for number, data, problem in read_lines(path):
            if problem is not None:
                self.add(name, number, *problem)
                continue
            split_summary.lines += 1
            if bar is not None:
                read += len(data)
                if split_summary.lines % 4096 == 0:
                    bar.update(read - bar.n)
            try:
                record = validate_json(data, context=context)
            except ValidationError as exc:
                for field_name, message in plain_errors(exc):
                    self.add(name, number, field_name, message)
                continue
            records += 1
            lines.append(number)
            id_digests += blake2b(record.id.encode(), digest_size=8).digest()
            conversation = record.conversations
            turns += len(conversation)
            record_images = 0
            for turn_index, turn in enumerate(conversation):
                for stats, text in ((user, turn.user), (assistant, turn.assistant)):
                    size = len(text)
                    stats[1] += size
                    if size < stats[2]:
                        stats[2] = size
                    if size > stats[3]:
                        stats[3] = size
                for image_index, relative in enumerate(turn.images):
                    verdict = verdicts.get(relative, _UNSEEN)
                    if verdict is _UNSEEN and check is not None:
                        verdict = check(relative)
                    if verdict is not None and verdict is not _UNSEEN:
                        where = f"conversations.{turn_index}.images.{image_index}"
                        self._image_problem(name, number, where, relative, verdict)
                record_images += len(turn.images)
            user[0] += len(conversation)
            assistant[0] += len(conversation)
            per_record[0] += 1
            per_record[1] += record_images
            per_record[2] = min(per_record[2], record_images)
            per_record[3] = max(per_record[3], record_images)
            images += record_images
            if record_images:
                key = "\x00".join(record.images).encode()
                image_digests += blake2b(key, digest_size=8).digest()
            else:
                image_digests += no_images
            count_answer(conversation[-1].assistant.strip())
            if record.label is not None:
                labels[record.label] += 1
        if bar is not None:
            bar.update(read - bar.n)
            bar.close()
        if split_summary.lines == 0 and not self.per_file[name]:
            self.add(name, 0, "(file)", "the split is empty (no records)")
        split_summary.records = records
        summary.records += records
        summary.turns += turns
        summary.images += images
        summary.images_per_record.merge(*per_record)
        summary.user_chars.merge(*user)
        summary.assistant_chars.merge(*assistant)

    def _image_problem(self, path: str, line: int, where: str, relative: str, verdict: str) -> None:
        seen = self.image_problems.get(relative)
        if seen is None:
            self.image_problems[relative] = [self.add(path, line, where, verdict), 0]
        else:
            seen[1] += 1

    def finish_image_problems(self) -> None:
        """Say how often each bad image is referenced beyond the line that reports it."""
        for index, more in self.image_problems.values():
            if index >= 0 and more:
                problem = self.problems[index]
                message = f"{problem.message} (and {more:,} more references)"
                self.problems[index] = Problem(problem.path, problem.line, problem.field, message)

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
        digests = np.frombuffer(self.image_digests, dtype=np.uint64)
        is_train = np.zeros(len(digests), dtype=bool)
        bounds = [start for start, _, _ in self.files] + [len(digests)]
        for (start, _, split), end in zip(self.files, bounds[1:], strict=True):
            is_train[start:end] = bool(split and split.lower().startswith("train"))
        has_images = digests != 0
        train = digests[is_train & has_images]
        if not len(train) or is_train[has_images].all():
            return
        leaks = np.nonzero(~is_train & has_images & np.isin(digests, train))[0]
        if not len(leaks):
            return
        first_train: dict[int, int] = {}
        for index in np.nonzero(is_train & np.isin(digests, digests[leaks]))[0].tolist():
            first_train.setdefault(int(digests[index]), index)
        for index in leaks.tolist():
            train_path, train_line, _ = self._where(first_train[int(digests[index])])
            path, line, split = self._where(index)
            message = (
                f"same image list as train record {train_path}:{train_line} (leak into {split})"
            )
            self.add(path, line, "images", message)


def _train_first(item: tuple[str, Path]) -> tuple[bool, str]:
    return not item[0].lower().startswith("train"), item[0]


def _repeats(digests: np.ndarray) -> list[tuple[int, int]]:
    """``(first index, later index)`` for every repeated value, in file order of the later one."""
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    same = np.nonzero(ordered[1:] == ordered[:-1])[0]
    pairs, first = [], -1
    for position in same.tolist():
        if position == 0 or ordered[position - 1] != ordered[position]:
            first = int(order[position])
        pairs.append((first, int(order[position + 1])))
    return sorted(pairs, key=lambda pair: pair[1])


def _progress_bar(path: Path):
    from tqdm import tqdm

    return tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=path.name,
        file=sys.stderr,
        leave=False,
    )


def validate_dataset(
    path: Path,
    *,
    deep: bool = False,
    check_images: bool = True,
    max_images: int | None = None,
    max_problems_per_file: int = DEFAULT_MAX_PROBLEMS_PER_FILE,
    progress: bool = False,
) -> ValidationReport:
    """Validate a dataset directory, or one ``<name>_<split>.jsonl`` file inside one.

    ``deep`` decodes every image fully; ``check_images=False`` checks paths but not contents;
    ``max_images`` overrides ``dataset.json``'s images-per-record limit. Raises ``OSError`` when a
    file cannot be read at all.
    """
    path = Path(path)
    single_file = path.is_file()
    data_dir = path.parent if single_file else path
    info, info_errors = read_info(data_dir)
    content = "deep" if deep else ("header" if check_images else "none")
    run = _Validation(
        data_dir,
        info,
        content=content,
        max_images=max_images,
        max_problems_per_file=max_problems_per_file,
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
        if split is None:
            run.add(str(path), 0, "(file name)", misnamed_message(found.name))
        run.scan_file(path, split, summary)
    else:
        if not found.splits and not found.misnamed:
            run.add(str(path), 0, "(folder)", "no <name>_<split>.jsonl file in this folder")
        for split, split_path in sorted(found.splits.items(), key=_train_first):
            run.scan_file(split_path, split, summary)
        for misnamed in found.misnamed:
            run.add(str(misnamed), 0, "(file name)", misnamed_message(found.name))
            run.scan_file(misnamed, None, summary)
        _check_unlabeled_splits(run, data_dir, info, found.splits)
        run.check_shared_images()
    run.check_duplicate_ids()
    run.finish_image_problems()
    run.sort_problems()
    if run.checker is not None:
        summary.distinct_images = len(run.checker.verdicts)
        summary.image_formats = run.checker.formats
        summary.image_modes = run.checker.modes
    return ValidationReport(problems=run.problems, summary=summary, suppressed=run.suppressed)


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
@click.option("--deep", is_flag=True, help="Decode every image fully (default: header checks).")
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
def validate_command(
    path: Path,
    deep: bool,
    output_format: str,
    max_images: int | None,
    max_problems: int,
    no_image_check: bool,
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
            progress=sys.stderr.isatty(),
        )
    except DatasetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: cannot read {exc.filename or path}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    if output_format == "json":
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(report.format_text())
    sys.exit(0 if report.ok else 1)
