"""``sharegpt``: LLaMA-Factory multimodal ShareGPT and OpenAI chat messages, JSON or JSON lines.

SRC is one ``.json`` (a JSON array) or ``.jsonl`` file, or a folder of them (read recursively, in
sorted order). Two shapes, detected per file from its first record (``--format`` forces one):

- ``sharegpt`` (LLaMA-Factory): ``conversations`` of ``{"from", "value"}`` (``human``/``gpt``) or
  ``messages`` of ``{"role", "content"}`` with string content (``user``/``assistant``), plus
  ``images`` and ``videos`` lists consumed in tag order across the turns (``<image>``,
  ``<video>``; their counts must equal the lists' lengths). A leading ``system`` message or a
  ``system`` column is the record's system prompt.
- ``openai``: ``messages`` whose content is a string or a list of blocks: ``{"type": "text",
  "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` where the url is a path relative to
  the image folder or a ``data:`` URI (decoded), ``{"type": "image"}`` (its own path, or the next
  entry of the record's ``images`` list). http(s) URLs are refused, never fetched.

Media paths are relative to ``--image_folder`` (default: beside the file, then SRC) and may not
leave it. Output: ``sharegpt_<split>.jsonl``; record id ``<file stem>-<line|index>``; images
``images/<split>/<path>`` (data: URIs under ``_embedded/``, named by content); videos become
``--num_frames`` frames. Tags that all open a turn give the old images-first layout; tags anywhere
else are kept in place as ``<image>`` placeholders (``inline_images``). Unusable rows are listed in
convert_report.json with their ``file:line`` or index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from ._chat_import import (
    IMAGE_TAG,
    VIDEO_TAG,
    ChatImporter,
    ChatRecord,
    MediaQueue,
    MediaResolver,
    RowProblem,
    SourceRow,
    assemble_turns,
    block_messages,
    common_options,
    json_rows,
    media_roots,
    path_option,
    record_id,
    required_list,
    role_text_messages,
    source_files,
    tagged_messages,
)
from ._image_records import help_from_docstring

NAME = "sharegpt"
SUFFIXES = (".json", ".jsonl")
FORMATS = ("auto", "sharegpt", "openai")


def detect_format(data: Any) -> str:
    """``openai`` when a message's content is a list of blocks, else ``sharegpt``."""
    messages = data.get("messages") if isinstance(data, Mapping) else None
    if isinstance(messages, list) and any(
        isinstance(message, Mapping) and isinstance(message.get("content"), list)
        for message in messages
    ):
        return "openai"
    return "sharegpt"


def sharegpt_messages(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``conversations`` (from/value) or ``messages`` (role/content) as ``[(role, text)]``."""
    for column in ("conversations", "messages"):
        messages = data.get(column)
        if isinstance(messages, list) and messages and isinstance(messages[0], Mapping):
            keys = ("role", "content") if "role" in messages[0] else ("from", "value")
            return role_text_messages(messages, *keys, column)
    raise RowProblem("no `conversations` or `messages` list")


class ShareGPTConverter(ChatImporter):
    name = NAME
    help = help_from_docstring(
        "LLaMA-Factory ShareGPT (images/videos lists, <image> tags) or OpenAI chat messages.",
        __doc__,
    )
    options = [
        *common_options(
            image_folder_help="Folder the media paths are relative to (default: beside the file)."
        ),
        click.Option(
            ["--format", "input_format"],
            type=click.Choice(FORMATS),
            default="auto",
            show_default=True,
            help="The shape of the records; auto: detected per file from its first record.",
        ),
    ]

    def rows(self, src: Path, options: Mapping[str, Any]) -> Iterator[tuple[SourceRow, Any]]:
        folder = path_option(options, "image_folder")
        num_frames = int(options.get("num_frames") or 8)
        forced = options.get("input_format") or "auto"
        for path in source_files(src, SUFFIXES):
            resolver = MediaResolver(media_roots(folder, path, src), num_frames)
            shape = None if forced == "auto" else forced
            for row in json_rows(src, path):
                if shape is None and not row.problem:
                    shape = detect_format(row.data)
                yield row, (resolver, shape or "sharegpt")

    def build(self, row: SourceRow, context: Any, taken: set[str]) -> ChatRecord:
        resolver, shape = context
        data = row.data
        if required_list(data, "audios"):
            raise RowProblem("audios: audio is not supported")
        queue = MediaQueue(
            resolver,
            {IMAGE_TAG: required_list(data, "images"), VIDEO_TAG: required_list(data, "videos")},
        )
        if shape == "openai":
            messages = block_messages(data.get("messages"), queue, "messages")
        else:
            messages = tagged_messages(sharegpt_messages(data), queue)
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise RowProblem("system: expected a string")
        system, turns = assemble_turns(messages, system)
        identifier, meta = record_id(row, taken)
        meta["format"] = shape
        return ChatRecord(identifier, NAME, turns, system, meta)


CONVERTER = ShareGPTConverter
