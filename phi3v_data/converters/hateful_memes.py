"""``hateful_memes``: Facebook's Hateful Memes, from the competition zip or the HF mirror.

Inputs found in SRC (or one folder below, e.g. the zip's ``data/``): ``train.jsonl``,
``dev_seen.jsonl``, ``dev_unseen.jsonl``, ``test_seen.jsonl``, ``test_unseen.jsonl`` (phase-1
``dev.jsonl`` / ``test.jsonl`` too), in either serialisation: integer ids that lost their leading
zero (``8291``) or zero-padded strings (``"08291"``). The image is always the row's ``img``
(``img/08291.png``) relative to the folder of its jsonl file, else looked up by file name in
``--images_dir`` and ``img/``; it is never rebuilt from the id.

Output: one split per file (``train``, ``dev_seen``, ...); record id ``<split>-<5-digit id>``;
image ``images/<split>/<name>.png`` (suffix of its real format). The user text gives the meme's
text and asks whether the meme is hateful; the assistant answers ``no`` for label 0 and ``yes`` for
label 1 (``--answer_words``, also written to dataset.json ``answer_words`` for AUROC), and ``label``
keeps 0/1. Unlabelled rows: a file without any label (the competition's ``test_unseen.jsonl``) is
written as an unlabeled split (empty assistant texts, no ``label``, declared in
``unlabeled_splits``, for inference only); a row without a label in a labelled file is skipped and
listed in convert_report.json with the other unusable rows (missing image, bad label).
"""

from __future__ import annotations

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

NAME = "hateful_memes"
SPLITS = ["train", "dev_seen", "dev_unseen", "test_seen", "test_unseen", "dev", "test"]
METRICS = ["auroc", "accuracy"]
NUM_CROPS = 16
ID_DIGITS = 5


def user_text(text: str | None, words: Mapping[str, str]) -> str:
    """The question of one meme: its text (when it has one), then the yes/no question."""
    question = f"Is this meme hateful? Answer {words['1']} or {words['0']}."
    return f"Meme text: {text}\n{question}" if text else question


def meme_id(value: Any) -> str | None:
    """The id as a zero-padded 5-digit string (int ids lost their leading zero); None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return str(value).zfill(ID_DIGITS)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return text.zfill(ID_DIGITS) if text.isdigit() else text
    return None


def parse_label(value: Any) -> int | None | str:
    """0/1 (also ``"0"``/``"1"``) -> int; None when absent; otherwise the reason it is unusable."""
    if value is None:
        return None
    if isinstance(value, bool):
        return f"label: {value!r} is not 0 or 1"
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return f"label: {value!r} is not 0 or 1"


class ImageFinder:
    """Resolves ``img`` beside the jsonl file, else by file name in ``--images_dir`` and ``img/``."""

    def __init__(self, src: Path, images_dir: Path | None):
        self.src, self.images_dir = src, images_dir

    def find(self, annotation: Path, img: str) -> Path | None:
        """The image file; raises UnsafePath when ``img`` leads outside the folders searched."""
        relative = img.replace("\\", "/")  # Windows separators in hand-edited files
        for base in dict.fromkeys((annotation.parent, self.src)):
            if found := source_file(base, relative, what="img"):
                return found
        folders = [self.images_dir] if self.images_dir else []
        folders += [annotation.parent / "img", self.src / "img"]
        for folder in dict.fromkeys(folders):
            if found := source_file(folder, relative.split("/")[-1], what="img"):
                return found
        return None


class HatefulMemesConverter(LabeledRowsConverter):
    name = NAME
    help = help_from_docstring(
        "Hateful Memes: train/dev_seen/dev_unseen/test_seen/test_unseen.jsonl and img/.", __doc__
    )
    options = [
        images_dir_option("Folder holding the meme images (img/) when `img` does not resolve."),
        answer_words_option("not hateful, hateful"),
    ]
    splits = SPLITS
    suffix = ".jsonl"
    search_depth = 1
    metrics = METRICS
    num_crops = NUM_CROPS
    parse_label = staticmethod(parse_label)
    finder_class = ImageFinder

    def plan_row(self, row: RawRow, context: RowContext) -> str | None:
        split, finder = context.split, context.finder
        img = text_field(row, "img")
        if img is None:
            return "img: missing or empty (the image is never guessed from the id)"
        identifier = meme_id(row.data.get("id")) or Path(img).stem
        found = finder.find(row.path, img)
        if found is None:
            return f"image: missing {img} (id {identifier})"
        text = row.data.get("text")
        name = Path(img.replace("\\", "/")).stem
        record = make_record(
            f"{split}-{identifier}",
            NAME,
            user_text(text.strip() if isinstance(text, str) else None, context.words),
            context.answer,
            label=context.label,
        )
        return context.groups.add(
            split, name, ((f"{split}/{name}", ImageFile(str(found))),), record
        )


CONVERTER = HatefulMemesConverter
