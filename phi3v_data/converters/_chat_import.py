"""The shared half of the chat importers (``llava``, ``sharegpt``, ``hf``).

Each importer's ``plan`` turns one source row into a :class:`ChatRecord` (or the one-line reason it
is skipped), with every check that needs no pixels done there so that the report names the row's
``file:line``: turn order, tag count = media count, empty answers, missing or escaping files, http
URLs. This module then assigns splits (``--split``, and ``--val_size`` held out by groups of
records that share an image) and gives one :class:`~phi3v_data.convert.Item` per record;
``convert`` writes the record's media and builds its turns.

Media and output names (the runner's ImageWriter checks each with ``join_inside``):

- an image file under the image folder: ``<split>/<its relative path>`` (byte for byte when it is a
  plain PNG/JPEG whose suffix says so; otherwise the real suffix is appended, ``a.gif.png``);
- embedded bytes (``data:`` URI, parquet ``{bytes, path}``): ``<split>/_embedded/<sha256[:16]><suffix>``;
- a video: ``num_frames`` JPEG frames ``<split>/<its relative path>.<k>.jpg`` (the UCF-101
  converter's sampler), shown where the video's tag was, one image per frame.

Image placement: a turn whose media tags all sit at the very start of the user text is written in
the old form (tags stripped, images first); otherwise with ``inline_images: true`` and one
``<image>`` placeholder per image where the source had its tag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import urllib.parse
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from phi3v_data.convert import Converter, ImageWriter, Item, Plan, SkipItem, Skipped, SourceError
from phi3v_data.safe_io import UnsafePath, is_regular_file, join_inside, read_regular_bytes

from ._image_files import UnusableImage, export_image

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
EMBEDDED_DIRNAME = "_embedded"
DEFAULT_NUM_FRAMES = 8
#: Roles of the sources, by what they mean.
USER_ROLES = frozenset({"user", "human"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt"})
SYSTEM_ROLES = frozenset({"system"})
_KEPT_SUFFIXES = {".png": (".png",), ".jpg": (".jpg", ".jpeg")}


# --------------------------------------------------------------------------- media


def _export(data: bytes, describe: str) -> Any:
    try:
        return export_image(data)
    except UnusableImage as error:
        raise SkipItem(f"{describe}: {error}") from None


@dataclass(frozen=True)
class FileImage:
    """An image file found under the image folder (``name``: its path relative to that folder)."""

    path: str
    name: str

    def key(self) -> str:
        return f"file:{self.path}"

    def write(self, images: ImageWriter, split: str) -> list[str]:
        try:
            data = read_regular_bytes(self.path)
        except OSError as error:
            raise SkipItem(f"{self.name}: cannot read ({error.strerror or error})") from None
        exported = _export(data, self.name)
        suffix = Path(self.name).suffix.lower()
        name = self.name
        if suffix not in _KEPT_SUFFIXES.get(exported.suffix, ()):
            name += exported.suffix  # re-encoded, or a JPEG named .png: never a clash
        return [images.save_bytes(f"{split}/{name}", exported.data)]


@dataclass(frozen=True)
class EmbeddedImage:
    """Image bytes carried by the source itself (a ``data:`` URI); named by their content."""

    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def key(self) -> str:
        return f"sha256:{self.digest}"

    def write(self, images: ImageWriter, split: str) -> list[str]:
        return [write_embedded(images, split, self.data, "embedded image")]


def write_embedded(images: ImageWriter, split: str, data: bytes, describe: str) -> str:
    """Write image bytes of an embedded image under its content name; returns the name."""
    exported = _export(data, describe)
    digest = hashlib.sha256(data).hexdigest()[:16]
    return images.save_bytes(f"{split}/{EMBEDDED_DIRNAME}/{digest}{exported.suffix}", exported.data)


@dataclass(frozen=True)
class VideoFile:
    """A video under the image folder, shown as ``num_frames`` sampled frames."""

    path: str
    name: str
    num_frames: int

    def key(self) -> str:
        return f"file:{self.path}"

    def write(self, images: ImageWriter, split: str) -> list[str]:
        from .ucf101 import read_sampled_frames

        _, _, frames = read_sampled_frames(Path(self.path), self.num_frames)
        written = []
        for index, frame in enumerate(frames):
            written.append(images.save(f"{split}/{self.name}.{index}.jpg", frame))
        return written


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ChatTurn:
    """One user message as text pieces and media (in order) and the assistant's answer."""

    parts: tuple[Any, ...]
    assistant: str


@dataclass(frozen=True)
class ChatRecord:
    """A planned record: everything but its written image paths."""

    id: str
    source: str
    turns: tuple[ChatTurn, ...]
    system: str | None = None
    meta: Mapping[str, Any] | None = None
    #: every acceptable answer of the last turn, when the source has several
    answers: tuple[str, ...] | None = None

    def media(self) -> list[Any]:
        return [part for turn in self.turns for part in turn.parts if not isinstance(part, str)]


def turn_dict(parts: Sequence[Any], written: Sequence[list[str]], assistant: str) -> dict:
    """The record turn of ``parts`` whose media were written as ``written`` (one list each)."""
    paths = [path for names in written for path in names]
    texts = [part for part in parts if isinstance(part, str)]
    first_text = next(
        (i for i, part in enumerate(parts) if isinstance(part, str) and part.strip()), len(parts)
    )
    leading = all(isinstance(part, str) for part in parts[first_text:])
    text = "".join(texts).strip()
    if not paths or (leading and text):
        return {"images": paths, "user": text, "assistant": assistant}
    if any(IMAGE_TAG in part for part in texts):
        raise SkipItem(f"the user text holds a literal {IMAGE_TAG} beside images placed inline")
    pieces, media = [], iter(written)
    for part in parts:
        pieces.append(part if isinstance(part, str) else IMAGE_TAG * len(next(media)))
    return {
        "images": paths,
        "inline_images": True,
        "user": "".join(pieces).strip(),
        "assistant": assistant,
    }


def convert_record(record: ChatRecord, split: str, images: ImageWriter) -> dict[str, Any]:
    """Write the record's media and return its dict (a media written twice is written once)."""
    done: dict[Any, list[str]] = {}
    turns = []
    for turn in record.turns:
        written = []
        for part in turn.parts:
            if isinstance(part, str):
                continue
            if part not in done:
                done[part] = part.write(images, split)
            written.append(done[part])
        turns.append(turn_dict(turn.parts, written, turn.assistant))
    data: dict[str, Any] = {"id": record.id, "source": record.source}
    if record.system is not None:
        data["system"] = record.system
    data["conversations"] = turns
    if record.answers:
        data["answers"] = list(record.answers)
    if record.meta:
        data["meta"] = dict(record.meta)
    return data


# --------------------------------------------------------------------------- text and tags


class RowProblem(Exception):
    """A row cannot be imported; ``str()`` is the one-line reason for convert_report.json."""


def split_tags(text: str, tags: Iterable[str]) -> list[str]:
    """``text`` cut at every tag, tags kept as their own pieces (empty pieces dropped)."""
    pattern = "(" + "|".join(re.escape(tag) for tag in tags) + ")"
    return [piece for piece in re.split(pattern, text) if piece]


@dataclass
class MediaQueue:
    """The media lists of one row, consumed in tag order across its turns."""

    resolver: MediaResolver
    lists: dict[str, list[Any]]  # tag -> raw entries
    used: dict[str, int] = field(default_factory=dict)

    def take(self, tag: str) -> Any:
        entries = self.lists.get(tag, [])
        index = self.used.get(tag, 0)
        self.used[tag] = index + 1
        if index >= len(entries):
            return None  # counted in check(), which names both numbers
        return self.resolver.resolve(entries[index], tag)

    def check(self) -> None:
        for tag, entries in self.lists.items():
            used = self.used.get(tag, 0)
            if used != len(entries):
                kind = "images" if tag == IMAGE_TAG else "videos"
                raise RowProblem(
                    f"{used} {tag} tag(s) but {len(entries)} {kind}: each {kind[:-1]} needs "
                    "exactly one tag"
                )


def text_parts(text: str, queue: MediaQueue) -> tuple[Any, ...]:
    """A user text cut at its tags, each tag replaced by the media it consumes."""
    parts: list[Any] = []
    for piece in split_tags(text, queue.lists):
        parts.append(queue.take(piece) if piece in queue.lists else piece)
    return tuple(parts)


def tagged_messages(
    messages: Sequence[tuple[str, str]], queue: MediaQueue
) -> list[tuple[str, Any]]:
    """User texts cut at their tags (each tag -> the media it consumes, in order across turns);
    a tag outside a user message, or a count that differs from the media lists, is a RowProblem."""
    result: list[tuple[str, Any]] = []
    for position, (role, text) in enumerate(messages, start=1):
        if role in USER_ROLES:
            result.append((role, text_parts(text, queue)))
            continue
        for tag in queue.lists:
            if tag in text:
                raise RowProblem(f"message {position} ({role}) holds a {tag} tag")
        result.append((role, text))
    queue.check()
    return result


def role_text_messages(
    messages: Any, role_key: str, text_key: str, field_name: str
) -> list[tuple[str, str]]:
    """``[(role, text)]`` of a list of ``{role_key: ..., text_key: ...}`` objects."""
    if not isinstance(messages, list) or not messages:
        raise RowProblem(f"{field_name}: expected a non-empty list of messages")
    result = []
    for position, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise RowProblem(f"{field_name}[{position}]: expected an object")
        role, text = message.get(role_key), message.get(text_key)
        if not isinstance(role, str) or not isinstance(text, str):
            raise RowProblem(
                f"{field_name}[{position}]: expected string {role_key!r} and {text_key!r}"
            )
        role = role.strip().lower()
        if role not in USER_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES:
            raise RowProblem(f"{field_name}[{position}]: unsupported role {role!r}")
        result.append((role, text))
    return result


def block_messages(messages: Any, queue: MediaQueue, field_name: str) -> list[tuple[str, Any]]:
    """``[(role, content)]`` of OpenAI chat messages: ``content`` a string or content blocks
    (``text``; ``image_url`` with a relative path or ``data:`` URI; ``image`` with its path, or
    bare, taking the row's next image; ``video``/``video_url``). User content becomes parts;
    other roles must hold text only."""
    if not isinstance(messages, list) or not messages:
        raise RowProblem(f"{field_name}: expected a non-empty list of messages")
    result: list[tuple[str, Any]] = []
    for position, message in enumerate(messages, start=1):
        where = f"{field_name}[{position}]"
        if not isinstance(message, Mapping):
            raise RowProblem(f"{where}: expected an object")
        role = message.get("role")
        role = role.strip().lower() if isinstance(role, str) else role
        role = "system" if role == "developer" else role
        if role not in USER_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES:
            raise RowProblem(f"{where}: unsupported role {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            parts: list[Any] = [content]
        elif isinstance(content, list):
            parts = [_block_part(block, queue, f"{where}.content") for block in content]
        else:
            raise RowProblem(f"{where}: content must be a string or a list of blocks")
        if role in USER_ROLES:
            result.append((role, tuple(part for part in parts if part != "")))
        elif all(isinstance(part, str) for part in parts):
            result.append((role, "".join(parts)))
        else:
            raise RowProblem(f"{where}: a {role} message holds media")
    queue.check()
    return result


def _block_part(block: Any, queue: MediaQueue, where: str) -> Any:
    if not isinstance(block, Mapping):
        raise RowProblem(f"{where}: expected content blocks (objects with a type)")
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise RowProblem(f"{where}: a text block without a string 'text'")
        return text
    if kind in ("image_url", "video_url"):
        value = block.get(kind)
        url = value.get("url") if isinstance(value, Mapping) else value
        return queue.resolver.resolve(url, VIDEO_TAG if kind == "video_url" else IMAGE_TAG)
    if kind in ("image", "video"):
        tag = IMAGE_TAG if kind == "image" else VIDEO_TAG
        value = block.get(kind)
        if value is None or value == "":
            return queue.take(tag)  # bare block: the row's next image (HF layout)
        return queue.resolver.resolve(value, tag)
    raise RowProblem(f"{where}: unsupported content block type {kind!r}")


def assemble_turns(
    messages: Sequence[tuple[str, Any]], system: str | None
) -> tuple[str | None, tuple[ChatTurn, ...]]:
    """(system, turns) from ``(role, content)`` messages; content: a str or a parts tuple.

    An optional system message comes first; then user and assistant alternate, starting with the
    user and ending with the assistant; answers must not be empty.
    """
    messages = list(messages)
    if messages and messages[0][0] in SYSTEM_ROLES:
        content = messages.pop(0)[1]
        if not isinstance(content, str):
            raise RowProblem("the system message holds media")
        if content.strip():
            if system is not None and system.strip() and system.strip() != content.strip():
                raise RowProblem("two different system prompts (a system column and message)")
            system = content
    system = system.strip() if isinstance(system, str) and system.strip() else None
    if not messages:
        raise RowProblem("no messages")
    turns = []
    for position in range(0, len(messages), 2):
        role, content = messages[position]
        if role not in USER_ROLES:
            raise RowProblem(
                f"turns out of order: message {position + 1} is {role!r}, not the user"
            )
        if position + 1 >= len(messages):
            raise RowProblem(f"turns out of order: message {position + 1} (user) has no answer")
        answer_role, answer = messages[position + 1]
        if answer_role not in ASSISTANT_ROLES:
            raise RowProblem(
                f"turns out of order: message {position + 2} is {answer_role!r}, not the assistant"
            )
        if not isinstance(answer, str):
            raise RowProblem(f"message {position + 2}: the assistant's answer holds media")
        if not answer.strip():
            raise RowProblem(f"message {position + 2}: empty answer")
        parts = (content,) if isinstance(content, str) else tuple(content)
        if not any(isinstance(p, str) and p.strip() for p in parts) and not any(
            not isinstance(p, str) for p in parts
        ):
            raise RowProblem(f"message {position + 1}: empty user text")
        turns.append(ChatTurn(parts, answer.strip()))
    return system, tuple(turns)


# --------------------------------------------------------------------------- media references


@dataclass
class MediaResolver:
    """Turns a media entry of a row (a relative path, a ``data:`` URI) into a media object.

    Paths are looked up under each of ``roots`` in turn (the first where the file exists), always
    through ``join_inside``; http(s) URLs are refused, never fetched.
    """

    roots: Sequence[Path]
    num_frames: int = DEFAULT_NUM_FRAMES

    def resolve(self, entry: Any, tag: str = IMAGE_TAG) -> Any:
        kind = "video" if tag == VIDEO_TAG else "image"
        if hasattr(entry, "write"):  # already a media object (embedded in a table)
            return entry
        if isinstance(entry, Mapping):  # {"path": ...} or {"url": ...}
            entry = entry.get("path") or entry.get("url")
        if not isinstance(entry, str) or not entry.strip():
            raise RowProblem(f"{kind}: expected a path, got {entry!r}")
        value = entry.strip()
        lowered = value[:8].lower()
        if lowered.startswith(("http://", "https://")):
            raise RowProblem(f"{kind}: http(s) URL refused, never fetched: {value[:200]}")
        if lowered.startswith("data:"):
            if kind == "video":
                raise RowProblem("video: data: URIs are not supported for videos")
            return EmbeddedImage(decode_data_uri(value))
        if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
            raise RowProblem(f"{kind}: URL scheme refused: {value[:200]}")
        name = value.replace("\\", "/") if "\\" in value and "/" not in value else value
        last_error = None
        for root in self.roots:
            try:
                path = join_inside(root, name, what=kind)
            except UnsafePath as error:
                last_error = error
                continue
            if is_regular_file(path):
                if kind == "video":
                    return VideoFile(str(path), name, self.num_frames)
                return FileImage(str(path), name)
        if last_error is not None:
            raise RowProblem(f"{kind}: {last_error} (paths must stay inside the image folder)")
        where = ", ".join(str(root) for root in self.roots)
        raise RowProblem(f"{kind}: missing {name} (looked in {where})")


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URI; RowProblem when malformed."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise RowProblem("image: malformed data: URI (no comma)")
    try:
        if header.lower().endswith(";base64"):
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise RowProblem("image: data: URI is not valid base64") from None
    if not data:
        raise RowProblem("image: empty data: URI")
    return data


# --------------------------------------------------------------------------- options


def _check_val_size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        parse_val_size(value)
    return value


def parse_val_size(value: str | None) -> float | int | None:
    """``"200"`` -> 200 records, ``"0.05"`` -> 5 %; click.BadParameter otherwise."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if 0 < number < 1:
        return number
    raise click.BadParameter(
        f"{value!r}: expected a record count (e.g. 200) or a fraction in (0, 1) (e.g. 0.05)",
        param_hint="--val_size",
    )


def common_options(*, image_folder_help: str, videos: bool = True) -> list[click.Option]:
    """``--image_folder``, ``--split``, ``--val_size`` and (``videos``) ``--num_frames``."""
    options = [
        click.Option(
            ["--image_folder"],
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help=image_folder_help,
        ),
        click.Option(
            ["--split"],
            default="train",
            show_default=True,
            help="Split that every record goes to (besides the --val_size hold-out).",
        ),
        click.Option(
            ["--val_size"],
            default=None,
            callback=_check_val_size,
            help="Hold out N records, or a FRACTION of them, as split 'val' (deterministic; "
            "records that share an image stay together).",
        ),
    ]
    if not videos:
        return options
    return [
        *options,
        click.Option(
            ["--num_frames"],
            type=click.IntRange(min=1),
            default=DEFAULT_NUM_FRAMES,
            show_default=True,
            help="Frames sampled from each video (UCF-101 sampler), shown as that turn's images.",
        ),
    ]


def path_option(options: Mapping[str, Any], name: str) -> Path | None:
    value = options.get(name)
    return Path(value) if value else None


# --------------------------------------------------------------------------- the base class


@dataclass(frozen=True)
class SourceRow:
    """One row of a source file: where it is (``file:line`` / ``file: record i``) and its data."""

    where: str
    ordinal: str  # line number or index, for ids
    file: str  # path relative to SRC (or the file name when SRC is a file)
    data: Any
    problem: str | None = None


def source_files(src: Path, suffixes: Sequence[str]) -> list[Path]:
    """SRC itself when it is a file, else its files with one of ``suffixes`` (recursive, sorted)."""
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise SourceError(src, "is neither a file nor a folder")
    found = sorted(
        path
        for path in src.rglob("*")
        if path.suffix.lower() in suffixes
        and is_regular_file(path)
        and not any(part.startswith(".") for part in path.relative_to(src).parts)
    )
    if not found:
        raise SourceError(src, f"no {' / '.join(suffixes)} file found")
    return found


def relative_name(src: Path, path: Path) -> str:
    return path.name if src.is_file() else path.relative_to(src).as_posix()


def json_rows(src: Path, path: Path) -> Iterator[SourceRow]:
    """The rows of a JSON array (``file: record i``) or a JSON-lines file (``file:line``)."""
    from ._raw_tables import document_rows, iter_json_lines, read_json_document

    name = relative_name(src, path)
    head = read_regular_bytes(path, 4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        for row in document_rows(path, read_json_document(path), "(top level)"):
            yield SourceRow(
                f"{name}: record {row.index}", str(row.index), name, row.data, row.problem
            )
        return
    for row in iter_json_lines(path):
        yield SourceRow(f"{name}:{row.line}", str(row.line), name, row.data, row.problem)


def record_id(row: SourceRow, taken: set[str], wanted: Any = None) -> tuple[str, dict[str, Any]]:
    """A unique id: the source's own id when it has a free one, else ``<file stem>-<line|index>``;
    plus the meta that says where the record came from."""
    meta: dict[str, Any] = {"file": row.file, "row": row.ordinal}
    candidate = (
        str(wanted).strip()
        if isinstance(wanted, str | int) and not isinstance(wanted, bool)
        else ""
    )
    if candidate and candidate not in taken:
        taken.add(candidate)
        return candidate, meta
    if candidate:
        meta["source_id"] = candidate
    stem = row.file.rsplit(".", 1)[0] if "." in row.file.rsplit("/", 1)[-1] else row.file
    identifier, suffix = f"{stem}-{row.ordinal}", 1
    while identifier in taken:
        suffix += 1
        identifier = f"{stem}-{row.ordinal}-{suffix}"
    taken.add(identifier)
    return identifier, meta


class ChatImporter(Converter):
    """Base class of the importers: ``rows`` and ``build`` per format, the rest shared here."""

    @abstractmethod
    def rows(self, src: Path, options: Mapping[str, Any]) -> Iterator[tuple[SourceRow, Any]]:
        """Every source row with its per-file context (resolver, format...), in file order."""

    @abstractmethod
    def build(self, row: SourceRow, context: Any, taken: set[str]) -> ChatRecord:
        """The planned record of one row; raises :class:`RowProblem` when it is unusable."""

    def plan(self, src: Path, options: Mapping[str, Any]) -> Plan:
        split = str(options.get("split") or "train")
        val_size = parse_val_size(options.get("val_size"))
        if val_size is not None and split == "val":
            raise SourceError(src, "--val_size holds out 'val'; choose another --split")
        planned: list[tuple[str, ChatRecord]] = []
        skipped: list[Skipped] = []
        taken: set[str] = set()
        for row, context in self.rows(src, options):
            try:
                if row.problem:
                    raise RowProblem(row.problem)
                planned.append((row.where, self.build(row, context, taken)))
            except RowProblem as problem:
                skipped.append(Skipped(split, row.where, str(problem)))
        splits = assign_splits([record for _, record in planned], split, val_size, src)
        items = [
            Item(record_split, where, record)
            for (where, record), record_split in zip(planned, splits, strict=True)
        ]
        return Plan(items=items, skipped=skipped)

    def convert(self, item: Item, images: ImageWriter) -> list[dict[str, Any]]:
        return [convert_record(item.payload, item.split, images)]


def assign_splits(
    records: Sequence[ChatRecord], split: str, val_size: float | int | None, src: Path
) -> list[str]:
    """``split`` for every record, except groups held out as ``val`` (records sharing an image
    form one group; groups are taken in the order of a hash of their first record's id)."""
    if val_size is None:
        return [split] * len(records)
    parent = list(range(len(records)))

    def find(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[str, int] = {}
    for index, record in enumerate(records):
        for media in record.media():
            first = owner.setdefault(media.key(), index)
            parent[find(index)] = find(first)
    groups: dict[int, list[int]] = {}
    for index in range(len(records)):
        groups.setdefault(find(index), []).append(index)
    target = val_size if isinstance(val_size, int) else max(1, round(val_size * len(records)))
    if target >= len(records):
        raise SourceError(
            src, f"--val_size {val_size} holds out {target} of {len(records)} records: none left"
        )
    order = sorted(
        groups.values(),
        key=lambda members: hashlib.sha256(records[members[0]].id.encode()).digest(),
    )
    held: set[int] = set()
    for members in order:
        if len(held) >= target:
            break
        if len(held) + len(members) >= len(records):
            continue
        held.update(members)
    return ["val" if index in held else split for index in range(len(records))]


def media_roots(image_folder: Path | None, annotation: Path, src: Path) -> list[Path]:
    """Where relative media paths are looked up: ``--image_folder``, else beside the file, then SRC."""
    if image_folder is not None:
        return [image_folder]
    roots = [annotation.parent]
    if src.is_dir() and src != annotation.parent:
        roots.append(src)
    return roots


def describe_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def required_list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RowProblem(f"{key}: expected a list, got {describe_kind(value)}")
    return value
