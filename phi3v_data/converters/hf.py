"""``hf``: Hugging Face datasets on disk: parquet shards or a ``datasets`` ``save_to_disk`` folder.

SRC is a folder of ``.parquet`` files, a ``save_to_disk`` folder (``data-*.arrow`` with
``state.json`` / ``dataset_info.json``; a DatasetDict's split folders are all read), or one such
file; read with pyarrow, in sorted order. Images are ``{bytes, path}`` structs (HF ``Image``), a
list of them, raw bytes, or a path relative to ``--image_folder`` (default: SRC) when there are no
bytes. Layouts, by the columns present (options override):

- the_cauldron (default): ``images`` and ``texts: [{user, assistant, source}]``: one record per
  row, one turn per text, the row's images before the first turn;
- messages: ``--messages_column`` (default ``messages`` or ``conversations``) of
  ``{role, content}`` / ``{from, value}``; content a string (``<image>`` tags consume the images
  in order; without any tag the images open the first turn) or content blocks (``{"type":
  "image"}`` takes the next image, ``{"type": "text", "text"}``);
- question/answer: ``--user_column`` and ``--assistant_column`` (an answer list keeps every
  answer as ``answers``, the first one is trained on).

``--image_column`` names the images (default ``images``, else ``image``); ``--system_column`` a
system prompt (default ``system`` when present). Output: ``hf_<split>.jsonl``; record id
``<file stem>-<row>``; embedded images ``images/<split>/_embedded/<sha256[:16]><suffix>`` (named by
content, so a repeated image is stored once). Unusable rows are listed in convert_report.json as
``<file>: row N``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from phi3v_data.convert import ImageWriter, SkipItem, SourceError

from ._chat_import import (
    IMAGE_TAG,
    VIDEO_TAG,
    ChatImporter,
    ChatRecord,
    ChatTurn,
    MediaQueue,
    MediaResolver,
    RowProblem,
    SourceRow,
    assemble_turns,
    block_messages,
    common_options,
    path_option,
    record_id,
    relative_name,
    role_text_messages,
    source_files,
    tagged_messages,
    write_embedded,
)
from ._image_records import help_from_docstring

NAME = "hf"
SUFFIXES = (".parquet", ".arrow")

#: Columns of the row group / record batch a worker read last: (path, batch, column) -> values.
_BATCH_CACHE: dict[tuple[str, int, str], list[Any]] = {}


def _open_arrow(path: Path) -> Any:
    """The record batches of an Arrow IPC stream (``save_to_disk``) or file, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path))
        reader = pa.ipc.open_file(source)
        return iter(reader.get_batch(i) for i in range(reader.num_record_batches))


def read_batches(path: Path, columns: list[str] | None = None) -> Iterator[Any]:
    """Record batches (parquet: one per row group), in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            parquet = pq.ParquetFile(str(path))
            names = set(parquet.schema_arrow.names)
            wanted = None if columns is None else [c for c in columns if c in names]
            for group in range(parquet.num_row_groups):
                yield from parquet.read_row_group(group, columns=wanted).to_batches(
                    max_chunksize=None
                ) or [pa.record_batch([], schema=pa.schema([]))]
        else:
            for batch in _open_arrow(path):
                yield (
                    batch
                    if columns is None
                    else batch.select([c for c in columns if c in batch.schema.names])
                )
    except (OSError, pa.ArrowException) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(path, f"not a readable parquet/arrow file ({first})") from None


def _batch_column(path: str, batch: int, column: str) -> list[Any]:
    key = (path, batch, column)
    if key not in _BATCH_CACHE:
        _BATCH_CACHE.clear()  # items arrive in plan order: keep one batch only
        for index, values in enumerate(read_batches(Path(path), [column])):
            if index == batch:
                _BATCH_CACHE[key] = values.column(column).to_pylist()
                break
        else:
            raise SkipItem(f"{path}: batch {batch} is gone")
    return _BATCH_CACHE[key]


@dataclass(frozen=True)
class TableImage:
    """Image bytes stored in a table cell (``position``: index in a list cell, or -1)."""

    path: str
    batch: int
    row: int
    column: str
    position: int
    digest: str

    def key(self) -> str:
        return f"sha256:{self.digest}"

    def write(self, images: ImageWriter, split: str) -> list[str]:
        value = _batch_column(self.path, self.batch, self.column)[self.row]
        if self.position >= 0:
            value = value[self.position]
        data = _image_bytes(value)
        if not data:
            raise SkipItem(f"{self.describe()}: no image bytes")
        return [write_embedded(images, split, data, self.describe())]

    def describe(self) -> str:
        return f"{Path(self.path).name}: {self.column} of row {self.row} in batch {self.batch}"


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, Mapping):
        value = value.get("bytes")
    return value if isinstance(value, bytes | bytearray) and value else None


def table_images(value: Any, where: tuple[str, int, int, str], resolver: MediaResolver) -> list:
    """The media of one image cell: a struct, a list of structs, bytes, a path, or None."""
    path, batch, row, column = where
    cells = value if isinstance(value, list) else [] if value is None else [value]
    found = []
    for position, cell in enumerate(cells):
        data = _image_bytes(cell)
        if data is not None:
            index = position if isinstance(value, list) else -1
            digest = hashlib.sha256(data).hexdigest()
            found.append(TableImage(path, batch, row, column, index, digest))
            continue
        name = cell.get("path") if isinstance(cell, Mapping) else cell
        if not isinstance(name, str) or not name.strip():
            raise RowProblem(f"{column}[{position}]: no image bytes and no path")
        found.append(resolver.resolve(name, IMAGE_TAG))
    return found


def data_files(src: Path) -> list[Path]:
    """The table files of SRC; a folder with ``state.json`` lists its own ``_data_files``."""
    files = source_files(src, SUFFIXES)
    chosen = []
    for path in files:
        state = path.parent / "state.json"
        if path.suffix.lower() == ".arrow" and state.is_file():
            try:
                listed = {
                    entry["filename"] for entry in json.loads(state.read_text())["_data_files"]
                }
            except (OSError, ValueError, KeyError, TypeError):
                raise SourceError(state, "not a datasets state.json (no _data_files)") from None
            if path.name not in listed:
                continue  # a cache file beside the saved data
        chosen.append(path)
    return chosen


@dataclass(frozen=True)
class Layout:
    kind: str  # cauldron | messages | qa
    image_column: str | None
    text_column: str | None = None  # texts / messages
    user_column: str | None = None
    assistant_column: str | None = None
    system_column: str | None = None


def choose_layout(columns: list[str], options: Mapping[str, Any], path: Path) -> Layout:
    """The layout of a table from its columns and the options (SourceError when none fits)."""
    present = set(columns)

    def pick(option: str, defaults: tuple[str, ...]) -> str | None:
        wanted = options.get(option)
        if wanted:
            if wanted not in present:
                raise SourceError(
                    path, f"--{option} {wanted!r}: no such column ({_names(columns)})"
                )
            return str(wanted)
        return next((name for name in defaults if name in present), None)

    image = pick("image_column", ("images", "image"))
    system = pick("system_column", ("system",))
    if options.get("user_column") or options.get("assistant_column"):
        user, assistant = pick("user_column", ()), pick("assistant_column", ())
        if not user or not assistant:
            raise SourceError(path, "--user_column and --assistant_column go together")
        return Layout(
            "qa", image, user_column=user, assistant_column=assistant, system_column=system
        )
    messages = pick("messages_column", ("messages", "conversations"))
    if messages:
        return Layout("messages", image, text_column=messages, system_column=system)
    if "texts" in present:
        return Layout("cauldron", image, text_column="texts", system_column=system)
    raise SourceError(
        path,
        f"no known layout in columns {_names(columns)}: expected the_cauldron's images/texts, "
        "a messages column, or give --messages_column / --user_column and --assistant_column",
    )


def _names(columns: list[str]) -> str:
    return ", ".join(columns) or "none"


def _answer(value: Any, name: str) -> tuple[str, list[str] | None]:
    if isinstance(value, list):
        answers = [item.strip() for item in value if isinstance(item, str) and item.strip()]
        if not answers:
            raise RowProblem(f"{name}: empty answer")
        return answers[0], answers if len(answers) > 1 else None
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(f"{name}: empty answer")
    return value.strip(), None


class HfConverter(ChatImporter):
    name = NAME
    help = help_from_docstring(
        "HF parquet shards or a datasets save_to_disk folder (the_cauldron layout by default).",
        __doc__,
    )
    options = [
        *common_options(
            image_folder_help="Folder that image paths (cells without bytes) are relative to "
            "(default: SRC).",
            videos=False,
        ),
        click.Option(["--image_column"], default=None, help="Column of the images."),
        click.Option(["--messages_column"], default=None, help="Column of chat messages."),
        click.Option(["--user_column"], default=None, help="Column of the question (one turn)."),
        click.Option(["--assistant_column"], default=None, help="Column of the answer(s)."),
        click.Option(["--system_column"], default=None, help="Column of a system prompt."),
    ]

    def rows(self, src: Path, options: Mapping[str, Any]) -> Iterator[tuple[SourceRow, Any]]:
        folder = path_option(options, "image_folder")
        root = folder or (src if src.is_dir() else src.parent)
        resolver = MediaResolver([root])
        for path in data_files(src):
            name = relative_name(src, path)
            index = 0
            layout = None
            for batch_number, batch in enumerate(read_batches(path)):
                if layout is None:
                    layout = choose_layout(batch.schema.names, options, path)
                table = {
                    column: batch.column(column).to_pylist()
                    for column in batch.schema.names
                    if column
                    in {
                        layout.image_column,
                        layout.text_column,
                        layout.user_column,
                        layout.assistant_column,
                        layout.system_column,
                    }
                }
                for row in range(batch.num_rows):
                    data = {column: values[row] for column, values in table.items()}
                    where = (str(path), batch_number, row)
                    source = SourceRow(f"{name}: row {index}", str(index), name, data)
                    yield source, (layout, resolver, where)
                    index += 1

    def build(self, row: SourceRow, context: Any, taken: set[str]) -> ChatRecord:
        layout, resolver, (path, batch, number) = context
        data = row.data
        media: list[Any] = []
        if layout.image_column:
            cell = (path, batch, number, layout.image_column)
            media = table_images(data.get(layout.image_column), cell, resolver)
        system = data.get(layout.system_column) if layout.system_column else None
        if system is not None and not isinstance(system, str):
            raise RowProblem(f"{layout.system_column}: expected a string")
        answers = None
        if layout.kind == "cauldron":
            texts = data.get(layout.text_column)
            if not isinstance(texts, list) or not texts:
                raise RowProblem("texts: expected a non-empty list of {user, assistant}")
            messages = []
            for text in texts:
                text = text if isinstance(text, Mapping) else {}
                messages += [("user", text.get("user")), ("assistant", text.get("assistant"))]
            if any(not isinstance(value, str) for _, value in messages):
                raise RowProblem("texts: every entry needs string user and assistant")
        elif layout.kind == "qa":
            user = data.get(layout.user_column)
            if not isinstance(user, str):
                raise RowProblem(f"{layout.user_column}: expected a string")
            answer, answers = _answer(data.get(layout.assistant_column), layout.assistant_column)
            messages = [("user", user), ("assistant", answer)]
        else:
            raw = data.get(layout.text_column)
            queue = MediaQueue(resolver, {IMAGE_TAG: media, VIDEO_TAG: []})
            blocks = isinstance(raw, list) and any(
                isinstance(m, Mapping) and isinstance(m.get("content"), list) for m in raw
            )
            if blocks:
                system, turns = assemble_turns(
                    block_messages(raw, queue, layout.text_column), system
                )
                return self._record(row, taken, turns, system, answers)
            first = raw[0] if isinstance(raw, list) and raw else {}
            keys = (
                ("role", "content")
                if isinstance(first, Mapping) and "role" in first
                else (
                    "from",
                    "value",
                )
            )
            messages = role_text_messages(raw, *keys, layout.text_column)
        if any(IMAGE_TAG in text for _, text in messages):
            queue = MediaQueue(resolver, {IMAGE_TAG: media, VIDEO_TAG: []})
            system, turns = assemble_turns(tagged_messages(messages, queue), system)
        else:  # no tags: the images open the first user turn
            system, turns = assemble_turns(messages, system)
            if media:
                first_turn = turns[0]
                turns = (ChatTurn((*media, *first_turn.parts), first_turn.assistant), *turns[1:])
        return self._record(row, taken, turns, system, answers)

    def _record(
        self,
        row: SourceRow,
        taken: set[str],
        turns: tuple[ChatTurn, ...],
        system: str | None,
        answers: list[str] | None,
    ) -> ChatRecord:
        identifier, meta = record_id(row, taken)
        return ChatRecord(identifier, NAME, turns, system, meta, tuple(answers or ()) or None)


CONVERTER = HfConverter
