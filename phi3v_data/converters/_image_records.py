"""The shared half of the image-dataset converters (docvqa, nlvr2, hateful_memes).

Their ``plan`` reads the annotations and groups the records by the images they show (many DocVQA
questions share a page; the two NLVR2 sentences of a pair share both images), giving one
:class:`~phi3v_data.convert.Item` per group whose payload is a :class:`RecordGroup`. The common
``convert`` below then exports each image once (``_image_files.export_image``: kept byte for byte
when it is a plain PNG/JPEG, under the suffix of its real format) and returns the group's records
with their image paths filled in.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click

from phi3v_data.convert import Converter, ImageWriter, Item, Plan, SkipItem, Skipped, SourceError
from phi3v_data.safe_io import (
    UnsafePath,
    is_environment_error,
    is_regular_file,
    join_inside,
    read_regular_bytes,
)

from ._image_files import UnusableImage, export_image
from ._raw_tables import RawRow, iter_json_lines


@dataclass(frozen=True)
class ImageFile:
    """An image read from a file of the raw release."""

    path: str

    def read(self) -> bytes:
        try:
            return read_regular_bytes(self.path)  # a FIFO put there since planning is not waited on
        except FileNotFoundError:
            raise UnusableImage(f"missing image {self.path}") from None
        except OSError as error:
            if is_environment_error(error):
                raise  # unreadable disk or permissions: the run stops, the record is not blamed
            raise UnusableImage(f"cannot read {self.path}: {error.strerror or error}") from None

    def describe(self) -> str:
        return self.path


def source_file(root: Path, relative: str, *, what: str = "image") -> Path | None:
    """``root/relative`` when it is a regular file; None when there is none (or a FIFO, device,
    folder). ``relative`` comes from the data: one that leaves ``root`` (``..``, absolute, a
    symlink leading out) raises :class:`~phi3v_data.safe_io.UnsafePath`, so the row is rejected
    with that reason and nothing outside SRC is ever read."""
    path = join_inside(root, relative, what=what)
    return path if is_regular_file(path) else None


@dataclass(frozen=True)
class RecordGroup:
    """Records that show the same images, in order.

    ``images`` pairs each output name (relative to ``images/``, starting with the split, without
    suffix) with its source (anything with ``read() -> bytes`` and ``describe() -> str``). Every
    record's last turn gets the written paths, in this order.
    """

    images: tuple[tuple[str, Any], ...]
    records: tuple[dict[str, Any], ...]


class RecordGroups:
    """Records grouped by split and image key, in order of first appearance; ids kept unique."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], tuple[tuple[tuple[str, Any], ...], list[dict]]] = {}
        self._ids: set[str] = set()

    def add(
        self,
        split: str,
        key: str,
        images: tuple[tuple[str, Any], ...],
        record: dict[str, Any],
    ) -> str | None:
        """Add ``record`` to the group of (split, key); returns a reason if its id is taken."""
        if record["id"] in self._ids:
            return f"id: duplicate {record['id']}"
        self._ids.add(record["id"])
        self._groups.setdefault((split, key), (images, []))[1].append(record)
        return None

    def items(self) -> list[Item]:
        """One :class:`~phi3v_data.convert.Item` per group, keyed ``<split>/<key>``."""
        return [
            Item(split, f"{split}/{key}", RecordGroup(images, tuple(records)))
            for (split, key), (images, records) in self._groups.items()
        ]


class ImageRecordsConverter(Converter):
    """Base class: ``convert`` writes a :class:`RecordGroup`'s images and returns its records."""

    def convert(self, item: Item, images: ImageWriter) -> list[dict[str, Any]]:
        group: RecordGroup = item.payload
        written = []
        for name, source in group.images:
            try:
                exported = export_image(source.read())
            except UnusableImage as error:
                where = source.describe()
                reason = str(error) if where in str(error) else f"{where}: {error}"
                raise SkipItem(f"{reason} ({_count(group.records)})") from None
            written.append(images.save_bytes(f"{name}{exported.suffix}", exported.data))
        records = []
        for record in group.records:
            conversations = [dict(turn) for turn in record["conversations"]]
            conversations[-1]["images"] = list(written)
            records.append({**record, "conversations": conversations})
        return records


def _count(records: Sequence[dict[str, Any]]) -> str:
    return "1 record" if len(records) == 1 else f"{len(records)} records"


def make_record(
    record_id: str,
    source: str,
    user: str,
    assistant: str,
    **fields: Any,
) -> dict[str, Any]:
    """A single-turn record dict without images (filled in by ``convert``); None fields dropped."""
    record = {
        "id": record_id,
        "source": source,
        "conversations": [{"images": [], "user": user, "assistant": assistant}],
    }
    record.update({key: value for key, value in fields.items() if value is not None})
    return record


# --------------------------------------------------------------------------- answer words

#: Default answer words of binary labels: label 0 -> "no", label 1 -> "yes".
DEFAULT_ANSWER_WORDS = "no,yes"


def answer_words_option(meaning: str) -> click.Option:
    """``--answer_words NEG,POS``: the assistant's word for label 0 and label 1."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        parse_answer_words(value)
        return value

    return click.Option(
        ["--answer_words"],
        default=DEFAULT_ANSWER_WORDS,
        show_default=True,
        callback=check,
        help=f"Answer words for label 0 and label 1, comma-separated ({meaning}).",
    )


def parse_answer_words(value: str | None) -> dict[str, str]:
    """``"no,yes"`` -> ``{"0": "no", "1": "yes"}``; raises click.BadParameter when malformed."""
    words = [word.strip() for word in (value or DEFAULT_ANSWER_WORDS).split(",")]
    if len(words) != 2 or not all(words) or words[0].lower() == words[1].lower():
        raise click.BadParameter(
            f"{value!r}: expected two different words, e.g. no,yes", param_hint="--answer_words"
        )
    return {"0": words[0], "1": words[1]}


# --------------------------------------------------------------------------- options and help


def images_dir_option(help_text: str) -> click.Option:
    """``--images_dir``: where the images are when they are not found in SRC."""
    return click.Option(
        ["--images_dir"],
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )


def path_option(options: Mapping[str, Any], name: str) -> Path | None:
    """An optional path option (the runner hands options over as JSON-ready strings)."""
    value = options.get(name)
    return Path(value) if value else None


def help_from_docstring(first_line: str, docstring: str | None) -> str:
    """``--help`` text: ``first_line``, then the module docstring's body without RST quoting."""
    body = (docstring or "").split("\n\n", 1)[-1].replace("``", "")
    return f"{first_line}\n\n{body}"


# --------------------------------------------------------------------------- labelled JSON lines


def find_labelled_jsonl(
    src: Path, splits: Sequence[str], suffix: str, depth: int
) -> dict[str, Path]:
    """split -> ``<split><suffix>`` in SRC or up to ``depth`` folders below (the first level
    holding any); raises :class:`SourceError` when none is found or a split has two files."""
    for level in range(depth + 1):
        prefix = "*/" * level
        found = {
            split: [path for path in sorted(src.glob(f"{prefix}{split}{suffix}")) if path.is_file()]
            for split in splits
        }
        found = {split: paths for split, paths in found.items() if paths}
        if found:
            break
    else:
        names = ", ".join(f"{split}{suffix}" for split in splits)
        raise SourceError(src, f"no annotation file found: expected one of {names}")
    for split, paths in found.items():
        if len(paths) > 1:
            listed = ", ".join(str(path) for path in paths)
            raise SourceError(src, f"several {split}{suffix} files: {listed}")
    return {split: paths[0] for split, paths in found.items()}


@dataclass(frozen=True)
class RowContext:
    """What ``LabeledRowsConverter.plan_row`` needs besides the row."""

    split: str
    label: int | None
    words: Mapping[str, str]
    finder: Any
    groups: RecordGroups

    @property
    def answer(self) -> str:
        """The assistant text: the label's answer word, or empty in an unlabeled split."""
        return self.words[str(self.label)] if self.label is not None else ""


class LabeledRowsConverter(ImageRecordsConverter):
    """Base of converters whose annotations are one JSON-lines file per split, one row per record,
    with a binary label (nlvr2, hateful_memes).

    A file without any label is an unlabeled split (empty assistant texts, declared in
    ``unlabeled_splits``); in a labelled file a row without a label is skipped and reported.
    """

    splits: ClassVar[Sequence[str]]
    suffix: ClassVar[str]
    search_depth: ClassVar[int]
    metrics: ClassVar[list[str]]
    num_crops: ClassVar[int] = 16

    #: ``finder_class(src, images_dir)`` finds a row's image files for ``plan_row``
    finder_class: ClassVar[type]

    @staticmethod
    @abstractmethod
    def parse_label(value: Any) -> int | None | str:
        """1/0, None when absent, or the reason the value is unusable."""

    @abstractmethod
    def plan_row(self, row: RawRow, context: RowContext) -> str | None:
        """Add the row's record to ``context.groups``; return why it is skipped instead, if it is.

        ``context.label`` is already checked (None only in an unlabeled split).
        """

    def plan(self, src: Path, options: Mapping[str, Any]) -> Plan:
        words = parse_answer_words(options.get("answer_words"))
        finder = self.finder_class(src, path_option(options, "images_dir"))
        groups = RecordGroups()
        skipped: list[Skipped] = []
        unlabeled: list[str] = []
        for split, path in find_labelled_jsonl(
            src, self.splits, self.suffix, self.search_depth
        ).items():
            rows = list(iter_json_lines(path))
            labels = [self.parse_label(row.data.get("label")) for row in rows]
            labeled = any(isinstance(label, int) for label in labels)
            if not labeled:
                unlabeled.append(split)
            for row, label in zip(rows, labels, strict=True):
                if row.problem:
                    reason: str | None = row.problem
                elif isinstance(label, str):
                    reason = label
                elif label is None and labeled:
                    reason = "label: missing, in a labelled split"
                else:
                    context = RowContext(split, label, words, finder, groups)
                    try:
                        reason = self.plan_row(row, context)
                    except UnsafePath as error:
                        reason = f"unsafe path: {error}"
                if reason is not None:
                    skipped.append(Skipped(split, row.where, reason))
        return Plan(
            items=groups.items(),
            skipped=skipped,
            info={
                "metrics": self.metrics,
                "num_crops": self.num_crops,
                "answer_words": words,
                "unlabeled_splits": unlabeled,
            },
        )
