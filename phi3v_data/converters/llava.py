"""``llava``: LLaVA-1.5 / LLaVA-NeXT / OneVision conversation JSON or JSON lines.

SRC is one ``.json`` (a JSON array) or ``.jsonl`` file, or a folder of them (read recursively, in
sorted order). Each record has ``id``, ``image`` (a path relative to ``--image_folder``, or a list of
them), optionally ``video`` (OneVision: a path; its ``<image>`` tags then stand for the video when
the record has no image and no ``<video>`` tag) and ``conversations``: ``{"from": "human"|"gpt",
"value": ...}`` turns, human first, with one ``<image>`` tag per image in the human texts.
Text-only records simply have no ``image``.

Output: ``llava_<split>.jsonl``; record id = the source ``id`` (a repeated or missing one becomes
``<file stem>-<index>``, the source id kept in ``meta``); images ``images/<split>/<path>``. A turn
whose tags all open its text is written images-first (LLaVA's own layout); tags elsewhere are kept
where they are as ``<image>`` placeholders (``inline_images``). Videos become ``--num_frames``
frames. Rows with a missing image, tags that do not match the images, turns out of order or an
empty answer are skipped and listed in convert_report.json with their ``file:line`` or index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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

NAME = "llava"
SUFFIXES = (".json", ".jsonl")


class LlavaConverter(ChatImporter):
    name = NAME
    help = help_from_docstring(
        "LLaVA conversation JSON/JSONL (id, image, conversations from human/gpt).", __doc__
    )
    options = common_options(
        image_folder_help="Folder the `image` paths are relative to (default: beside the file)."
    )

    def rows(self, src: Path, options: Mapping[str, Any]) -> Iterator[tuple[SourceRow, Any]]:
        folder = path_option(options, "image_folder")
        num_frames = int(options.get("num_frames") or 8)
        for path in source_files(src, SUFFIXES):
            resolver = MediaResolver(media_roots(folder, path, src), num_frames)
            for row in json_rows(src, path):
                yield row, resolver

    def build(self, row: SourceRow, context: MediaResolver, taken: set[str]) -> ChatRecord:
        data = row.data
        messages = role_text_messages(data.get("conversations"), "from", "value", "conversations")
        images = required_list(data, "image")
        videos = required_list(data, "video")
        if videos and not images and not any(VIDEO_TAG in text for _, text in messages):
            messages = [(role, text.replace(IMAGE_TAG, VIDEO_TAG)) for role, text in messages]
        queue = MediaQueue(context, {IMAGE_TAG: images, VIDEO_TAG: videos})
        system, turns = assemble_turns(tagged_messages(messages, queue), None)
        identifier, meta = record_id(row, taken, data.get("id"))
        if not turns:
            raise RowProblem("no turns")
        return ChatRecord(identifier, NAME, turns, system, meta)


CONVERTER = LlavaConverter
