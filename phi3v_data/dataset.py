"""Reading a dataset directory: its splits, its ``dataset.json`` and its records, line by line.

A dataset directory holds ``images/``, ``<name>_<split>.jsonl`` files and an optional
``dataset.json``. The dataset name comes from ``dataset.json``'s ``name``; without one, from the
folder name when every jsonl file starts with it; otherwise the ``_``-bounded prefix shared by
the most files, preferring splits that start with a usual split word (``hm_dev_seen.jsonl`` and
``hm_train.jsonl`` are splits ``dev_seen`` and ``train`` of ``hm``).

Reading rules shared by the trainer and ``phi3v-data validate`` (one definition of "valid"):
a UTF-8 byte order mark, an empty line and a line over :data:`MAX_LINE_BYTES` are defects;
``\\r\\n`` line ends are accepted (JSON whitespace); a key that repeats inside one JSON object is a
defect (:func:`duplicate_keys`: parsers silently keep the last value). :func:`iter_records` checks
the schema only; image files are checked by :mod:`phi3v_data.images`.

Every dataset file (``dataset.json``, the jsonl files) is opened with
:func:`phi3v_data.safe_io.open_regular`: a FIFO, device or folder where a file belongs is a defect
reported at once, never waited on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from phi3v_data.messages import one_line, plain_errors
from phi3v_data.safe_io import NotRegularFile, open_regular
from phi3v_data.schema import CTX_MAX_IMAGES, CTX_UNLABELED, DatasetInfo, Record

IMAGES_DIRNAME = "images"
INFO_FILENAME = "dataset.json"
#: Longest line read; a longer one is reported and skipped without being held in memory.
MAX_LINE_BYTES = 16 * 2**20
UTF8_BOM = b"\xef\xbb\xbf"
#: Bytes read at a time (lines are cut from blocks: far faster than readline per line).
READ_BLOCK_BYTES = 2**20

_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_USUAL_SPLIT = re.compile(r"^(train|val|valid|validation|dev|test|eval)", re.IGNORECASE)
_JSON_LINE = re.compile(r"at line (\d+) column")
_ERROR_LINE = re.compile(r"^(?P<path>.*):(?P<line>\d+): (?P<field>\S+): (?P<message>.*)$")
#: The end of a JSON object key: a quote, optional blanks, a colon (also matches an escaped quote
#: before a colon inside a string, so counting it gives an upper bound of the keys of a line).
_KEY_END = re.compile(rb'"[ \t\r]*:')


class DatasetError(Exception):
    """A defect at one place of a dataset; ``str()`` is ``path:line: field: message``.

    ``line`` is 1-based; 0 means the file (or folder) as a whole.
    """

    def __init__(self, path: Path | str, line: int, field: str, message: str) -> None:
        field, message = one_line(field), one_line(message)
        self.path, self.line, self.field, self.message = str(path), line, field, message
        super().__init__(f"{self.path}:{line}: {field}: {message}")


class RecordError(DatasetError, OSError):
    """A record whose data cannot be used once read for the model (an image failing to decode at
    training or evaluation time); ``str()`` is the one line ``path:line: field: message``.

    Rebuilt from that one string by pickle and by torch's DataLoader, which re-raises a worker's
    exception as ``type("Caught ... Original Traceback ...")``: only the traceback's last line
    is kept, so the main process still shows one line. An ``OSError`` (``errno`` None: not the
    machine's fault) so that every command's last net (``LazyGroup.invoke``) prints it as one
    line, exit 1, where no command catches it before.
    """

    def __init__(self, path: Path | str, line: int | None = None, field: str = "", message=""):
        if line is None:  # one string: ours, or a worker's traceback that ends with ours
            text = [row for row in str(path).splitlines() if row.strip()] or ["?"]
            last = text[-1].split(f"{type(self).__name__}: ", 1)[-1]
            match = _ERROR_LINE.match(last)
            path, line, field, message = (
                (match["path"], int(match["line"]), match["field"], match["message"])
                if match
                else ("?", 0, "(record)", last)
            )
        super().__init__(path, line, field, message)


@dataclass
class SplitFiles:
    """The jsonl files of a dataset directory, sorted into splits."""

    name: str | None
    splits: dict[str, Path] = field(default_factory=dict)
    #: jsonl files whose name is not ``<name>_<split>.jsonl``
    misnamed: list[Path] = field(default_factory=list)


def _dataset_name(data_dir: Path, stems: list[str], info: DatasetInfo) -> str | None:
    if info.name:
        return info.name
    if not stems:
        return None
    folder = data_dir.resolve().name  # also when the folder is given as "."
    if folder and all(stem.startswith(folder + "_") for stem in stems):
        return folder
    candidates = {stem[:i] for stem in stems for i, char in enumerate(stem) if char == "_" and i}

    def rank(name: str) -> tuple[int, int, int]:
        rests = [stem[len(name) + 1 :] for stem in stems if stem.startswith(name + "_")]
        usual = sum(bool(_USUAL_SPLIT.match(rest)) for rest in rests)
        return len(rests), usual, -len(name)

    return max(sorted(candidates), key=rank) if candidates else None


def scan_splits(data_dir: Path, info: DatasetInfo | None = None) -> SplitFiles:
    """Sort the ``*.jsonl`` files of ``data_dir`` into splits; misnamed files are listed apart."""
    info = info if info is not None else load_info(data_dir)
    # every entry, not only regular files: a FIFO or folder named like a split is reported when
    # read (open_regular), never skipped silently nor waited on
    files = sorted(data_dir.glob("*.jsonl"))
    name = _dataset_name(data_dir, [path.stem for path in files], info)
    found = SplitFiles(name=name)
    for path in files:
        split = path.stem[len(name) + 1 :] if name and path.stem.startswith(name + "_") else ""
        if _SPLIT.match(split):
            found.splits[split] = path
        else:
            found.misnamed.append(path)
    return found


def find_splits(data_dir: Path) -> dict[str, Path]:
    """``split -> <name>_<split>.jsonl`` of a dataset directory; raises on a misnamed file."""
    found = scan_splits(Path(data_dir))
    if found.misnamed:
        raise DatasetError(found.misnamed[0], 0, "(file name)", misnamed_message(found.name))
    return found.splits


def misnamed_message(name: str | None) -> str:
    expected = f"{name}_<split>.jsonl" if name else "<name>_<split>.jsonl"
    return f"file name does not match {expected} (set 'name' in {INFO_FILENAME} if in doubt)"


def split_of(path: Path, info: DatasetInfo | None = None) -> str | None:
    """The split a jsonl file holds, or None when its name does not say."""
    path = Path(path)
    found = scan_splits(path.parent, info)
    return next((split for split, file in found.splits.items() if file.name == path.name), None)


def images_root(data_dir: Path) -> Path:
    """The folder every image path of the dataset is relative to."""
    return Path(data_dir) / IMAGES_DIRNAME


def read_info(data_dir: Path) -> tuple[DatasetInfo, list[DatasetError]]:
    """``dataset.json`` (defaults when absent) and its defects (defaults are returned with them)."""
    path = Path(data_dir) / INFO_FILENAME
    if not path.exists() and not path.is_symlink():
        return DatasetInfo(), []
    try:
        with open_regular(path) as handle:
            raw = handle.read()
    except (NotRegularFile, FileNotFoundError) as error:  # a folder, FIFO or dangling link
        return DatasetInfo(), [DatasetError(path, 0, "(file)", error.strerror or str(error))]
    try:
        return DatasetInfo.model_validate_json(raw), []
    except ValidationError as exc:
        errors = []
        for field_name, message in plain_errors(exc):
            errors.append(
                DatasetError(path, _line_of(raw, field_name, message), field_name, message)
            )
        return DatasetInfo(), errors


def _line_of(raw: bytes, field_name: str, message: str) -> int:
    """Best guess of the line of a defect in a JSON document (for ``dataset.json``)."""
    match = _JSON_LINE.search(message)
    if match:
        return int(match.group(1))
    key = f'"{field_name.split(".")[0]}"'.encode()
    for number, line in enumerate(raw.splitlines(), 1):
        if key in line:
            return number
    return 1


def load_info(data_dir: Path) -> DatasetInfo:
    """``dataset.json`` of a dataset directory (defaults when absent); raises on a defect."""
    info, errors = read_info(data_dir)
    if errors:
        raise errors[0]
    return info


def record_context(info: DatasetInfo, split: str | None, max_images: int | None = None) -> dict:
    """The validation context of :class:`Record` for one split of a dataset."""
    limit = max_images if max_images is not None else info.max_images_per_record
    return {CTX_MAX_IMAGES: limit, CTX_UNLABELED: split in info.unlabeled_splits}


def read_lines(
    path: Path, *, start: int = 0, stop: int | None = None, max_line_bytes: int | None = None
) -> Iterator[tuple[int, bytes | None, tuple[str, str] | None]]:
    """``(line number, bytes, None)`` per line, or ``(line number, None, (field, message))``.

    Reads bytes ``start:stop`` (bounds from :func:`line_chunks`; line numbers count from 1 at
    ``start``). Memory stays bounded by ``max_line_bytes`` whatever the file holds. A BOM on the
    file's first line is reported and the rest of the line is still yielded, so that line number
    may come twice.
    """
    max_line_bytes = max_line_bytes or MAX_LINE_BYTES
    too_long = ("(line)", f"line longer than {max_line_bytes} bytes; skipped")
    number, pending, skipping = 0, b"", False
    with open_regular(path) as stream:
        stream.seek(start)
        left = stop - start if stop is not None else float("inf")
        done = False
        while not done:
            block = stream.read(int(min(READ_BLOCK_BYTES, left))) if left > 0 else b""
            left -= len(block)
            if not block:  # end of the range: end its last line as if by a newline
                if not pending and not skipping:
                    break
                block, done = b"\n", True
            lines = block.split(b"\n")
            tail = lines.pop()  # not ended by a newline (yet)
            if lines:
                if skipping:  # the first line ends the long line being skipped
                    number += 1
                    yield number, None, too_long
                    skipping = False
                    del lines[0]
                else:
                    lines[0] = pending + lines[0]
                pending = b""
            for raw in lines:
                number += 1
                if len(raw) > max_line_bytes:
                    yield number, None, too_long
                    continue
                if number == 1 and start == 0 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]
                    yield number, None, ("(encoding)", "UTF-8 byte order mark; save without BOM")
                if not raw or raw.isspace():
                    yield number, None, ("(line)", "empty line; JSON Lines allows none")
                    continue
                yield number, raw, None
            if not skipping:
                pending += tail
                if len(pending) > max_line_bytes:
                    skipping, pending = True, b""


def line_chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """``(start, stop)`` byte ranges of about ``chunk_bytes`` that cover a file, cut after a newline."""
    bounds = [0]
    with open_regular(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        while bounds[-1] + chunk_bytes < size:
            stream.seek(bounds[-1] + chunk_bytes)
            cut = size
            while block := stream.read(2**16):
                newline = block.find(b"\n")
                if newline >= 0:
                    cut = stream.tell() - len(block) + newline + 1
                    break
            if cut >= size:
                break
            bounds.append(cut)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def iter_records(
    path: Path, *, info: DatasetInfo | None = None, split: str | None = None
) -> Iterator[tuple[int, Record]]:
    """``(1-based line number, Record)`` for every line of a jsonl file, schema-checked.

    ``info`` defaults to the ``dataset.json`` beside the file, ``split`` to the one its name says
    (which decides whether empty answers are allowed). Raises :class:`DatasetError` at the first
    bad line; image files are not opened.
    """
    path = Path(path)
    info = info if info is not None else load_info(path.parent)
    split = split if split is not None else split_of(path, info)
    context = record_context(info, split)
    try:
        lines = read_lines(path)
        for number, data, problem in lines:
            if problem is not None:
                raise DatasetError(path, number, *problem)
            try:
                record = Record.model_validate_json(data, context=context)
            except ValidationError as exc:
                raise DatasetError(path, number, *plain_errors(exc)[0]) from None
            repeated = duplicate_keys(data, record)
            if repeated:
                raise DatasetError(path, number, *repeated[0])
            yield number, record
    except NotRegularFile as error:
        raise DatasetError(path, 0, "(file)", error.strerror or str(error)) from None


class _Pairs(list):
    """A JSON object as the list of its ``(key, value)`` pairs, repeats kept."""


def _count_keys(value: object) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_count_keys(item) for item in value.values())
    if isinstance(value, list):
        return sum(_count_keys(item) for item in value)
    return 0


def _repeated_keys(value: object, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, item in value:
            field_name = f"{where}.{key}" if where else key
            if key in seen:
                message = f"duplicate key {key!r}: JSON keeps only the last value; remove the other"
                yield one_line(field_name), message
            seen.add(key)
            yield from _repeated_keys(item, field_name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _repeated_keys(item, f"{where}.{index}" if where else str(index))


def duplicate_keys(data: bytes, record: Record) -> list[tuple[str, str]]:
    """``(field, message)`` for every key that repeats inside one object of a record's line.

    JSON parsers (orjson, pydantic) keep the last of two equal keys without a word. Fast path:
    the key ends counted in the text (an upper bound of the keys written) equal the keys of the
    parsed ``record``, so none repeats; only otherwise is the line parsed again, every pair kept.
    """
    written = len(_KEY_END.findall(data))
    parsed = len(record.__pydantic_fields_set__)
    for turn in record.conversations:
        parsed += len(turn.__pydantic_fields_set__)
    if record.meta:
        parsed += _count_keys(record.meta)
    if written <= parsed:
        return []
    return list(_repeated_keys(json.loads(data, object_pairs_hook=_Pairs), ""))


def iter_dataset(data_dir: Path) -> Iterator[tuple[str, int, Record]]:
    """``(split, line number, Record)`` for every record of a dataset directory, split by split
    (sorted by name), schema-checked; raises :class:`DatasetError` at the first defect."""
    data_dir = Path(data_dir)
    info = load_info(data_dir)
    for split, path in sorted(find_splits(data_dir).items()):
        for number, record in iter_records(path, info=info, split=split):
            yield split, number, record


def split_path(data_dir: Path, split: str) -> Path:
    """The jsonl file of one split; :class:`DatasetError` naming the splits found otherwise."""
    splits = find_splits(Path(data_dir))
    if split not in splits:
        known = ", ".join(sorted(splits)) or "none"
        raise DatasetError(Path(data_dir), 0, "(split)", f"no split {split!r} (found: {known})")
    return splits[split]


class SplitRecords(list):
    """The records of one split in file order, with the file (``path``) and the line each came
    from (``lines``), so that a later failure (an image at training time) can name them."""

    def __init__(self, path: Path, numbered: list[tuple[int, Record]]) -> None:
        super().__init__(record for _, record in numbered)
        self.path = Path(path)
        self.lines = [number for number, _ in numbered]


def read_split(data_dir: Path, split: str) -> SplitRecords:
    """Every record of one split of a dataset directory (schema-checked), with its lines."""
    path = split_path(data_dir, split)
    info = load_info(Path(data_dir))
    return SplitRecords(path, list(iter_records(path, info=info, split=split)))
