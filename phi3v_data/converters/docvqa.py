"""``docvqa``: DocVQA Task 1 (single page) from the RRC release or the HF parquet files.

Accepted inputs, found in SRC (or one folder below) by their official names:

- RRC annotation JSON: ``{train,val,test}_v1.0_withQT.json`` (2023, in ``spdocvqa_qas/``) or the
  older ``{train,val,test}_v1.0.json`` (legacy ``train/``, ``val/``, ``test/`` folders). The top level
  is the official object with a ``data`` list, or a bare list of records. When both the ``_withQT``
  and the plain file of a split exist, the ``_withQT`` file is used.
- Page images of the RRC release: a record's ``image`` (``documents/<doc>_<page>.png``) is looked up
  relative to its annotation file (legacy layout), then by file name in ``--images_dir``,
  ``spdocvqa_images/``, ``<split>/documents/``, ``documents/`` and ``images/``.
- HF parquet shards (``HuggingFaceM4/DocumentVQA`` or ``lmms-lab/DocVQA`` columns) named
  ``train-*.parquet``, ``validation-*.parquet``, ``test-*.parquet`` (e.g. under ``data/``); the page
  is the ``bytes`` of the ``image`` struct (its ``path`` is ignored).

Output: splits ``train``, ``val`` (HF ``validation``) and ``test``; one image per page and split,
``images/<split>/<ucsf_document_id>_<page>.png`` for both input kinds, shared by every question on
that page. Record ids are ``<split>-<questionId>``. The user text is the original recipe's
``<question>`` then ``Answer briefly.`` on its own line; the assistant text is the first answer and
``answers`` keeps every reference answer (ANLS takes the best). A split without any answer (the
official test split) is written with empty assistant texts and declared in ``unlabeled_splits``;
in a labelled split a question without answers is skipped and reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from phi3v_data.convert import Plan, Skipped, SourceError
from phi3v_data.safe_io import UnsafePath

from ._image_files import UnusableImage
from ._image_records import (
    ImageFile,
    ImageRecordsConverter,
    RecordGroups,
    help_from_docstring,
    images_dir_option,
    make_record,
    path_option,
    source_file,
)
from ._raw_tables import RawRow, document_rows, read_json_document, text_field

NAME = "docvqa"
USER_INSTRUCTION = "Answer briefly."
METRICS = ["anls"]
NUM_CROPS = 16

#: RRC annotation file names: split, and whether it is the 2023 ``_withQT`` version.
RRC_FILE = re.compile(r"^(train|val|test)_v1\.0(_withQT)?\.json$")
#: HF parquet shard names: ``train-00000-of-00017.parquet``, ``validation-....parquet``, ...
PARQUET_FILE = re.compile(r"^(train|validation|val|test)(?:[-_.].*)?\.parquet$")
#: Raw split name -> output split name.
SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
SPLIT_ORDER = ["train", "val", "test"]
#: Parquet columns read while planning (the image column is read by the workers only).
PARQUET_TEXT_COLUMNS = [
    "questionId",
    "question",
    "question_types",
    "ucsf_document_id",
    "ucsf_document_page_no",
    "answers",
]


@dataclass(frozen=True)
class AnnotationFiles:
    """The annotation files of one output split."""

    split: str
    kind: Literal["rrc", "parquet"]
    paths: tuple[Path, ...]


def find_annotation_files(src: Path, input_format: str = "auto") -> list[AnnotationFiles]:
    """The annotation files of each split in ``src``, in train/val/test order.

    ``input_format`` is ``auto``, ``rrc`` or ``parquet``; ``auto`` refuses a SRC that holds both
    kinds for one split rather than guessing.
    """
    candidates = [src] if src.is_file() else [*src.glob("*"), *src.glob("*/*")]
    rrc: dict[str, list[tuple[bool, Path]]] = {}
    parquet: dict[str, list[Path]] = {}
    for path in candidates:
        if match := RRC_FILE.match(path.name):
            if path.is_file():
                rrc.setdefault(SPLITS[match[1]], []).append((match[2] is not None, path))
        elif (match := PARQUET_FILE.match(path.name)) and path.is_file():
            parquet.setdefault(SPLITS[match[1]], []).append(path)
    found: list[AnnotationFiles] = []
    for split in SPLIT_ORDER:
        use_rrc = split in rrc and input_format in ("auto", "rrc")
        use_parquet = split in parquet and input_format in ("auto", "parquet")
        if use_rrc and use_parquet:
            raise SourceError(
                src,
                f"split {split} has both RRC JSON ({rrc[split][0][1].name}) and parquet files "
                f"({parquet[split][0].name}); choose one with --format rrc|parquet",
            )
        if use_rrc:
            found.append(AnnotationFiles(split, "rrc", (_pick_rrc_file(src, split, rrc[split]),)))
        elif use_parquet:
            found.append(AnnotationFiles(split, "parquet", tuple(sorted(parquet[split]))))
    if not found:
        raise SourceError(
            src,
            "no DocVQA annotations: expected {train,val,test}_v1.0[_withQT].json or "
            "{train,validation,test}-*.parquet in it or one folder below",
        )
    return found


def _pick_rrc_file(src: Path, split: str, files: list[tuple[bool, Path]]) -> Path:
    newest = max(with_qt for with_qt, _ in files)
    chosen = sorted(path for with_qt, path in files if with_qt == newest)
    if len(chosen) > 1:
        listed = ", ".join(str(path) for path in chosen)
        raise SourceError(src, f"split {split} has several annotation files: {listed}")
    return chosen[0]


# --------------------------------------------------------------------------- raw rows


def read_rrc_rows(path: Path) -> list[RawRow]:
    """The records of an RRC annotation file: the official object's ``data``, or a bare list."""
    document = read_json_document(path)
    if isinstance(document, dict):
        if "data" not in document:
            raise SourceError(path, "missing: expected the official object with data", field="data")
        return document_rows(path, document["data"], "data")
    return document_rows(path, document, "(top level)")


def read_parquet_rows(path: Path) -> Iterator[tuple[RawRow, int, int]]:
    """The text columns of one HF parquet shard: (row, row group, row within the group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        available = set(parquet.schema_arrow.names)
        for required in ("questionId", "question", "image"):
            if required not in available:
                raise SourceError(path, "missing column", field=required)
        columns = [name for name in PARQUET_TEXT_COLUMNS if name in available]
        index = 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=columns)
            for position, row in enumerate(table.to_pylist()):
                yield RawRow(path, None, index, row), group, position
                index += 1
    except (OSError, pa.ArrowException) as error:
        raise SourceError(path, f"not a readable parquet file ({_first_line(error)})") from None


def answer_list(value: Any) -> list[str]:
    """The non-empty answers of a row, stripped, in order (None, [] and non-lists give [])."""
    if not isinstance(value, list):
        return []
    return [answer.strip() for answer in value if isinstance(answer, str) and answer.strip()]


def question_id(value: Any) -> str | None:
    """``questionId`` as the string of its integer value (int in RRC/HuggingFaceM4, str in lmms)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return str(int(text)) if text.isdigit() else text
    return None


def page_name(data: Mapping[str, Any]) -> str | None:
    """``<ucsf_document_id>_<page>`` (the official image stem), else the stem of ``image``."""
    document, page = data.get("ucsf_document_id"), data.get("ucsf_document_page_no")
    if isinstance(page, int) and not isinstance(page, bool):
        page = str(page)
    if isinstance(document, str) and document.strip() and isinstance(page, str) and page.strip():
        return f"{document.strip()}_{page.strip()}"
    image = data.get("image")
    if isinstance(image, str) and image.strip():
        stem = Path(image.strip().replace("\\", "/")).stem
        return stem if stem not in {"", ".", ".."} else None
    return None


def build_record(row: RawRow, split: str, labeled: bool) -> dict[str, Any] | str:
    """The record of one question (without its image), or the reason it is skipped."""
    if row.problem:
        return row.problem
    qid = question_id(row.data.get("questionId"))
    if qid is None:
        return "questionId: missing, or not an integer or string"
    question = text_field(row, "question")
    if question is None:
        return f"question: missing or empty (questionId {qid})"
    raw_answers = row.data.get("answers")
    if raw_answers is not None and not isinstance(raw_answers, list):
        return f"answers: expected a list of strings (questionId {qid})"
    answers = answer_list(raw_answers)
    if labeled and not answers:
        return f"answers: none, in a labelled split (questionId {qid})"
    meta: dict[str, Any] = {"questionId": qid}
    types = row.data.get("question_types")
    if isinstance(types, list) and types:
        meta["question_types"] = [str(kind) for kind in types]
    return make_record(
        f"{split}-{qid}",
        NAME,
        f"{question}\n{USER_INSTRUCTION}",
        answers[0] if labeled else "",
        answers=answers if labeled else None,
        meta=meta,
    )


# --------------------------------------------------------------------------- page images


class RrcImageFinder:
    """Finds the page image of an RRC record in the legacy or the 2023 layout (cached per name)."""

    def __init__(self, src: Path, annotation: Path, images_dir: Path | None):
        raw_split = annotation.name.split("_", 1)[0]
        folders = [images_dir] if images_dir else []
        folders += [
            src / "spdocvqa_images",
            annotation.parent / "spdocvqa_images",
            annotation.parent.parent / "spdocvqa_images",
            annotation.parent / "documents",
            src / raw_split / "documents",
            src / "documents",
            src / "images",
        ]
        self.annotation_dir = annotation.parent
        self.folders = list(dict.fromkeys(folder for folder in folders if folder.is_dir()))
        self._cache: dict[str, Path | None] = {}

    def find(self, data: Mapping[str, Any], name: str) -> Path | str:
        """The page image of the record, or the reason there is none."""
        image = data.get("image")
        relative = image.strip().replace("\\", "/") if isinstance(image, str) else ""
        key = relative or name
        if key not in self._cache:
            self._cache[key] = self._lookup(relative, name)
        found = self._cache[key]
        if found is None:
            return (
                f"image: missing {relative or name + '.png'} "
                "(looked beside the annotations, in --images_dir and spdocvqa_images/)"
            )
        return found

    def _lookup(self, relative: str, name: str) -> Path | None:
        """Raises UnsafePath when the record's ``image`` or page name leads out of a folder."""
        if relative and (found := source_file(self.annotation_dir, relative)):
            return found
        basename = relative.split("/")[-1] if relative else f"{name}.png"
        for folder in self.folders:
            if found := source_file(folder, basename):
                return found
        return None


#: Image column of the row group a worker read last: (path, row group) -> image structs.
_ROW_GROUP_CACHE: dict[tuple[str, int], list[Any]] = {}


@dataclass(frozen=True)
class ParquetImage:
    """A page image embedded in a parquet shard (read in the worker, one row group at a time)."""

    path: str
    row_group: int
    row: int

    def read(self) -> bytes:
        key = (self.path, self.row_group)
        if key not in _ROW_GROUP_CACHE:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=["image"])
            _ROW_GROUP_CACHE.clear()  # items arrive in plan order: keep one row group only
            _ROW_GROUP_CACHE[key] = table.column("image").to_pylist()
        value = _ROW_GROUP_CACHE[key][self.row]
        data = value.get("bytes") if isinstance(value, dict) else value  # HF Image struct or bytes
        if not isinstance(data, bytes) or not data:
            raise UnusableImage("no image bytes in the parquet row")
        return data

    def describe(self) -> str:
        return f"{self.path}: row group {self.row_group}, row {self.row}"


# --------------------------------------------------------------------------- the converter


class DocVQAConverter(ImageRecordsConverter):
    name = NAME
    help = help_from_docstring(
        "DocVQA single page: RRC annotation JSON + page images, or HF parquet files.", __doc__
    )
    options = [
        images_dir_option("Folder of the page images (spdocvqa_images/) when it is not in SRC."),
        click.Option(
            ["--format", "input_format"],
            type=click.Choice(["auto", "rrc", "parquet"]),
            default="auto",
            show_default=True,
            help="Which annotations to read when SRC holds both kinds.",
        ),
    ]

    def plan(self, src: Path, options: Mapping[str, Any]) -> Plan:
        images_dir = path_option(options, "images_dir")
        pages = RecordGroups()
        skipped: list[Skipped] = []
        unlabeled: list[str] = []
        for files in find_annotation_files(src, options.get("input_format") or "auto"):
            split = files.split
            if files.kind == "rrc":
                rows = read_rrc_rows(files.paths[0])
                finder = RrcImageFinder(src, files.paths[0], images_dir)
                located = [(row, None, None) for row in rows]
            else:
                located = [row for path in files.paths for row in read_parquet_rows(path)]
                finder = None
            labeled = any(answer_list(row.data.get("answers")) for row, _, _ in located)
            if not labeled:
                unlabeled.append(split)
            for row, group, position in located:
                reason = _plan_question(row, split, labeled, finder, (group, position), pages)
                if reason is not None:
                    skipped.append(Skipped(split, row.where, reason))
        return Plan(
            items=pages.items(),
            skipped=skipped,
            info={"metrics": METRICS, "num_crops": NUM_CROPS, "unlabeled_splits": unlabeled},
        )


def _plan_question(
    row: RawRow,
    split: str,
    labeled: bool,
    finder: RrcImageFinder | None,
    parquet_position: tuple[int | None, int | None],
    pages: RecordGroups,
) -> str | None:
    """Add one question to its page; returns why it is skipped instead, if it is."""
    record = build_record(row, split, labeled)
    if isinstance(record, str):
        return record
    name = page_name(row.data)
    if name is None:
        return "ucsf_document_id/ucsf_document_page_no: missing, and no image path"
    source: ImageFile | ParquetImage
    if finder is None:
        group, position = parquet_position
        source = ParquetImage(str(row.path), int(group or 0), int(position or 0))
    else:
        try:
            found = finder.find(row.data, name)
        except UnsafePath as error:
            return f"unsafe path: {error}"
        if isinstance(found, str):
            return found
        source = ImageFile(str(found))
    return pages.add(split, name, ((f"{split}/{name}", source),), record)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


CONVERTER = DocVQAConverter
