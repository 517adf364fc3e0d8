"""Reading the annotation files of raw releases: JSON documents and JSON-lines files.

Errors that make a whole file unusable (unreadable, a malformed JSON document, a top level of the
wrong type) raise the runner's :class:`~phi3v_data.convert.SourceError` (``path:line: field:
message``, exit 2). A single bad
row (a malformed JSON line, an entry that is not an object) is not an error of the file: it comes
back with its ``problem`` so that the converter skips it and reports the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from phi3v_data.convert import SourceError
from phi3v_data.safe_io import read_regular_bytes


@dataclass(frozen=True)
class RawRow:
    """One annotation row and where it came from: its 1-based line, or its index in a list."""

    path: Path
    line: int | None
    index: int | None
    data: dict[str, Any]
    #: Why the row could not be parsed (malformed JSON line, not an object); data is then empty.
    problem: str | None = None

    @property
    def where(self) -> str:
        """``path:line`` for JSON lines, ``path: data[i]`` for a record of a JSON document."""
        if self.line is not None:
            return f"{self.path}:{self.line}"
        return f"{self.path}: record {self.index}"


def _read_bytes(path: Path) -> bytes:
    try:
        return read_regular_bytes(path)  # a FIFO or device is refused, never waited on
    except OSError as error:
        raise SourceError(path, f"cannot read: {error.strerror or error}") from None


def read_json_document(path: Path) -> Any:
    """The parsed JSON document in ``path`` (UTF-8, an optional BOM is accepted)."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise SourceError(path, error.msg, line=error.lineno, field="(json)") from None


def iter_json_lines(path: Path) -> Iterator[RawRow]:
    """The objects of a JSON-lines file, one per non-blank line (a final newline is optional)."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            yield RawRow(path, number, None, {}, f"malformed JSON ({error.msg})")
            continue
        if isinstance(value, dict):
            yield RawRow(path, number, None, value)
        else:
            yield RawRow(path, number, None, {}, f"expected an object, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def document_rows(path: Path, records: Any, field: str) -> list[RawRow]:
    """The records of a JSON document's list; a non-list raises :class:`SourceError`.

    Entries that are not objects are kept, with a ``problem``, so that converters report them.
    """
    if not isinstance(records, list):
        raise SourceError(path, f"expected a list of records, got {_kind(records)}", field=field)
    return [
        RawRow(path, None, index, record)
        if isinstance(record, dict)
        else RawRow(path, None, index, {}, f"expected an object, got {_kind(record)}")
        for index, record in enumerate(records)
    ]


def text_field(row: RawRow, name: str) -> str | None:
    """A string field stripped of surrounding whitespace, or None when absent, null or blank."""
    value = row.data.get(name)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None
