"""``nlvr2``: NLVR2 statements about image pairs, from the official files of lil-lab/nlvr.

Inputs found in SRC (or up to two folders below, e.g. ``nlvr2/data/``): ``train.json``,
``dev.json``, ``test1.json``, ``test2.json``: JSON lines despite the extension, ``label`` the strings
``"True"`` / ``"False"``. The images of identifier ``<split>-<set>-<pair>-<sentence>`` are
``<split>-<set>-<pair>-img0.png`` (left) and ``...-img1.png`` (right), looked up in
``--images_dir`` then SRC, in ``<split>/<directory>/`` (train, nested by the record's
``directory``), ``images/<split>/<directory>/``, ``<split>/`` and ``images/<split>/`` (flat folders
of ``download_images.py``).

Output: splits ``train``, ``dev``, ``test1``, ``test2``; record id = the identifier; two images per
record, left then right, written once per pair under ``images/<split>/`` (train keeps its
``directory`` folders) with the suffix of their real format (many ``.png`` files are JPEG or GIF;
non-PNG/JPEG images are re-encoded as PNG). The user text states that the first image is the left
one, gives the statement and asks for the answer words; the assistant answers ``yes`` for True and
``no`` for False (``--answer_words``); ``label`` keeps 1/0. ``group`` is the official consistency
key, the identifier without its pair id (``dev-850--0``: one sentence written for one image set).
Records whose images are missing (about 5% of the URLs are dead) or do not decode are skipped and
listed in convert_report.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from phi3v_data.convert import Plan, Skipped, SourceError

from ._image_records import (
    ImageFile,
    ImageRecordsConverter,
    RecordGroups,
    answer_words_option,
    make_record,
    parse_answer_words,
    path_option,
)
from ._raw_tables import RawRow, iter_json_lines, text_field

NAME = "nlvr2"
SPLITS = ["train", "dev", "test1", "test2"]
METRICS = ["accuracy", "consistency"]
NUM_CROPS = 16
#: ``<split>-<set>-<pair>-<sentence>``
IDENTIFIER = re.compile(r"^(?P<split>[A-Za-z0-9]+)-(?P<set>\d+)-(?P<pair>\d+)-(?P<sentence>\d+)$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def user_text(sentence: str, words: Mapping[str, str]) -> str:
    """The question of one record (the first image is the left one, the second the right one)."""
    return (
        "The first image is the left image and the second image is the right image.\n"
        f"Statement: {sentence}\n"
        f"Is the statement true? Answer {words['1']} or {words['0']}."
    )


def find_annotation_files(src: Path) -> dict[str, Path]:
    """split -> annotation file, looked for in SRC and up to two folders below (sorted)."""
    found: dict[str, list[Path]] = {}
    for pattern in ("{}.json", "*/{}.json", "*/*/{}.json"):
        for split in SPLITS:
            for path in sorted(src.glob(pattern.format(split))):
                if path.is_file():
                    found.setdefault(split, []).append(path)
        if found:
            break
    if not found:
        raise SourceError(
            src, "no NLVR2 annotations: expected train.json, dev.json, test1.json or test2.json"
        )
    for split, paths in found.items():
        if len(paths) > 1:
            listed = ", ".join(str(path) for path in paths)
            raise SourceError(src, f"several {split}.json files: {listed}")
    return {split: found[split][0] for split in SPLITS if split in found}


def parse_label(value: Any) -> int | None | str:
    """``"True"``/``"False"`` (any case, or a JSON boolean) -> 1/0; None when absent; else a reason."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return int(value.strip().lower() == "true")
    return f"label: {value!r} is not True or False"


class ImageFinder:
    """Finds the files of an image pair in the nested or flat layouts (folder checks cached)."""

    def __init__(self, src: Path, images_dir: Path | None):
        self.src, self.images_dir = src, images_dir
        self._folders: dict[tuple[str, str | None], list[Path]] = {}

    def folders(self, split: str, directory: str | None) -> list[Path]:
        """Existing candidate folders of a split (and train directory), most specific first."""
        key = (split, directory)
        if key not in self._folders:
            roots = [root for root in (self.images_dir, self.src) if root is not None]
            candidates = []
            for root in roots:
                if directory is not None:
                    candidates += [root / split / directory, root / "images" / split / directory]
                candidates += [root / split, root / "images" / split]
            if self.images_dir is not None:  # --images_dir may name the split's own folder
                if directory is not None:
                    candidates.append(self.images_dir / directory)
                candidates.append(self.images_dir)
            self._folders[key] = [path for path in dict.fromkeys(candidates) if path.is_dir()]
        return self._folders[key]

    def find(self, split: str, directory: str | None, filename_stem: str) -> Path | None:
        for folder in self.folders(split, directory):
            for suffix in IMAGE_SUFFIXES:
                candidate = folder / f"{filename_stem}{suffix}"
                if candidate.is_file():
                    return candidate
        return None


def _directory(row: RawRow) -> str | None:
    value = row.data.get("directory")
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return str(int(value))
    return None


class NLVR2Converter(ImageRecordsConverter):
    name = NAME
    help = (
        "NLVR2: official JSON-lines files (train/dev/test1/test2.json) and their image pairs.\n\n"
        + __doc__.split("\n\n", 1)[1]
    )
    options = [
        click.Option(
            ["--images_dir"],
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Root of the image folders (holding train/, dev/, ...) when it is not SRC.",
        ),
        answer_words_option("False, True"),
    ]

    def plan(self, src: Path, options: Mapping[str, Any]) -> Plan:
        words = parse_answer_words(options.get("answer_words"))
        finder = ImageFinder(src, path_option(options, "images_dir"))
        groups = RecordGroups()
        skipped: list[Skipped] = []
        unlabeled: list[str] = []
        for split, path in find_annotation_files(src).items():
            rows = list(iter_json_lines(path))
            labeled = any(isinstance(parse_label(row.data.get("label")), int) for row in rows)
            if not labeled:
                unlabeled.append(split)
            for row in rows:
                reason = _plan_row(row, split, labeled, words, finder, groups)
                if reason is not None:
                    skipped.append(Skipped(split, row.where, reason))
        return Plan(
            items=groups.items(),
            skipped=skipped,
            info={
                "metrics": METRICS,
                "num_crops": NUM_CROPS,
                "answer_words": words,
                "unlabeled_splits": unlabeled,
            },
        )


def _plan_row(
    row: RawRow,
    split: str,
    labeled: bool,
    words: Mapping[str, str],
    finder: ImageFinder,
    groups: RecordGroups,
) -> str | None:
    """Add one statement to its image pair; returns why it is skipped instead, if it is."""
    if row.problem:
        return row.problem
    identifier = text_field(row, "identifier")
    match = IDENTIFIER.match(identifier or "")
    if match is None:
        return f"identifier: {identifier!r} is not <split>-<set>-<pair>-<sentence>"
    sentence = text_field(row, "sentence")
    if sentence is None:
        return f"sentence: missing or empty ({identifier})"
    label = parse_label(row.data.get("label"))
    if isinstance(label, str):
        return f"{label} ({identifier})"
    if label is None and labeled:
        return f"label: missing, in a labelled split ({identifier})"
    pair = f"{match['split']}-{match['set']}-{match['pair']}"
    directory = _directory(row) if split == "train" else None
    folder = f"{split}/{directory}" if directory is not None else split
    images = []
    for side in ("img0", "img1"):
        found = finder.find(split, directory, f"{pair}-{side}")
        if found is None:
            return f"image: missing {pair}-{side}.png ({identifier})"
        images.append((f"{folder}/{pair}-{side}", ImageFile(str(found))))
    record = make_record(
        identifier,
        NAME,
        user_text(sentence, words),
        words[str(label)] if label is not None else "",
        label=label,
        group=f"{match['split']}-{match['set']}--{match['sentence']}",
    )
    key = pair if directory is None else f"{directory}/{pair}"
    return groups.add(split, key, tuple(images), record)


CONVERTER = NLVR2Converter
