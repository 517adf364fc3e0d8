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

from ._image_records import (
    ImageFile,
    LabeledRowsConverter,
    RowContext,
    answer_words_option,
    help_from_docstring,
    images_dir_option,
    make_record,
    source_file,
)
from ._raw_tables import RawRow, text_field

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
                if found := source_file(folder, f"{filename_stem}{suffix}"):
                    return found
        return None


def _directory(row: RawRow) -> str | None:
    value = row.data.get("directory")
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return str(int(value))
    return None


class NLVR2Converter(LabeledRowsConverter):
    name = NAME
    help = help_from_docstring(
        "NLVR2: official JSON-lines files (train/dev/test1/test2.json) and their image pairs.",
        __doc__,
    )
    options = [
        images_dir_option("Root of the image folders (holding train/, dev/, ...) when not SRC."),
        answer_words_option("False, True"),
    ]
    splits = SPLITS
    suffix = ".json"
    search_depth = 2
    metrics = METRICS
    num_crops = NUM_CROPS
    parse_label = staticmethod(parse_label)
    finder_class = ImageFinder

    def plan_row(self, row: RawRow, context: RowContext) -> str | None:
        split, finder = context.split, context.finder
        identifier = text_field(row, "identifier")
        match = IDENTIFIER.match(identifier or "")
        if match is None:
            return f"identifier: {identifier!r} is not <split>-<set>-<pair>-<sentence>"
        sentence = text_field(row, "sentence")
        if sentence is None:
            return f"sentence: missing or empty ({identifier})"
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
            identifier,  # type: ignore[arg-type]
            NAME,
            user_text(sentence, context.words),
            context.answer,
            label=context.label,
            group=f"{match['split']}-{match['set']}--{match['sentence']}",
        )
        key = pair if directory is None else f"{directory}/{pair}"
        return context.groups.add(split, key, tuple(images), record)


CONVERTER = NLVR2Converter
