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

NAME = "hateful_memes"
SPLITS = ["train", "dev_seen", "dev_unseen", "test_seen", "test_unseen", "dev", "test"]
METRICS = ["auroc", "accuracy"]
NUM_CROPS = 16
ID_DIGITS = 5


def user_text(text: str | None, words: Mapping[str, str]) -> str:
    """The question of one meme: its text (when it has one), then the yes/no question."""
    question = f"Is this meme hateful? Answer {words['1']} or {words['0']}."
    return f"Meme text: {text}\n{question}" if text else question


def find_annotation_files(src: Path) -> dict[str, Path]:
    """split -> jsonl file, in SRC or one folder below (the first level that has any)."""
    for pattern in ("{}.jsonl", "*/{}.jsonl"):
        found: dict[str, list[Path]] = {}
        for split in SPLITS:
            paths = [path for path in sorted(src.glob(pattern.format(split))) if path.is_file()]
            if paths:
                found[split] = paths
        if found:
            break
    else:
        raise SourceError(
            src,
            "no Hateful Memes annotations: expected train.jsonl, dev_seen.jsonl, dev_unseen.jsonl, "
            "test_seen.jsonl or test_unseen.jsonl in it or one folder below",
        )
    for split, paths in found.items():
        if len(paths) > 1:
            raise SourceError(
                src, f"several {split}.jsonl files: " + ", ".join(str(p) for p in paths)
            )
    return {split: paths[0] for split, paths in found.items()}


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
        relative = img.replace("\\", "/")
        parts = relative.split("/")
        if not relative.startswith("/") and ".." not in parts:
            for base in dict.fromkeys((annotation.parent, self.src)):
                if (base / relative).is_file():
                    return base / relative
        folders = [self.images_dir] if self.images_dir else []
        folders += [annotation.parent / "img", self.src / "img"]
        for folder in dict.fromkeys(folders):
            if (folder / parts[-1]).is_file():
                return folder / parts[-1]
        return None


class HatefulMemesConverter(ImageRecordsConverter):
    name = NAME
    help = (
        "Hateful Memes: train/dev_seen/dev_unseen/test_seen/test_unseen.jsonl and img/.\n\n"
        + __doc__.split("\n\n", 1)[1]
    )
    options = [
        click.Option(
            ["--images_dir"],
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder holding the meme images (img/) when `img` does not resolve in SRC.",
        ),
        answer_words_option("not hateful, hateful"),
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
    """Add one meme; returns why it is skipped instead, if it is."""
    if row.problem:
        return row.problem
    img = text_field(row, "img")
    if img is None:
        return "img: missing or empty (the image is never guessed from the id)"
    identifier = meme_id(row.data.get("id")) or Path(img).stem
    label = parse_label(row.data.get("label"))
    if isinstance(label, str):
        return f"{label} (id {identifier})"
    if label is None and labeled:
        return f"label: missing, in a labelled split (id {identifier})"
    text = row.data.get("text")
    text = text.strip() if isinstance(text, str) else None
    found = finder.find(row.path, img)
    if found is None:
        return f"image: missing {img} (id {identifier})"
    name = Path(img.replace("\\", "/")).stem
    record = make_record(
        f"{split}-{identifier}",
        NAME,
        user_text(text, words),
        words[str(label)] if label is not None else "",
        label=label,
    )
    return groups.add(split, name, ((f"{split}/{name}", ImageFile(str(found))),), record)


CONVERTER = HatefulMemesConverter
