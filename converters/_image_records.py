"""The shared half of the image-dataset converters (docvqa, nlvr2, hateful_memes).

Their ``plan`` reads the annotations and groups the records by the images they show (many DocVQA
questions share a page; the two NLVR2 sentences of a pair share both images), giving one
:class:`~phi3v_data.convert.Item` per group whose payload is a :class:`RecordGroup`. The common
``convert`` below then exports each image once (``_image_files.export_image``: kept byte for byte
when it is a plain PNG/JPEG, under the suffix of its real format) and returns the group's records
with their image paths filled in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from phi3v_data.convert import Converter, ImageWriter, Item, SkipItem

from ._image_files import UnusableImage, export_image


@dataclass(frozen=True)
class ImageFile:
    """An image read from a file of the raw release."""

    path: str

    def read(self) -> bytes:
        try:
            return Path(self.path).read_bytes()
        except FileNotFoundError:
            raise UnusableImage(f"missing image {self.path}") from None
        except OSError as error:
            raise UnusableImage(f"cannot read {self.path}: {error.strerror or error}") from None

    def describe(self) -> str:
        return self.path


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


def path_option(options: Mapping[str, Any], name: str) -> Path | None:
    """An optional path option (the runner hands options over as JSON-ready strings)."""
    value = options.get(name)
    return Path(value) if value else None
