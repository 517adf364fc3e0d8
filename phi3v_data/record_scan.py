"""One pass over a byte range of a jsonl file: schema checks and figures, no shared state.

:func:`scan_chunk` is the hot loop of ``phi3v-data validate``; it runs in worker processes, one
chunk each, and returns everything the cross-record checks need in compact form: 8-byte blake2b
digests of ids and of image lists, line numbers, counters, and the first reference to each image
path it met (the files themselves are checked once per distinct path by the caller).
Line numbers are relative to the chunk (the first line of the chunk is 1).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from phi3v_data.dataset import duplicate_keys, read_lines
from phi3v_data.messages import plain_errors
from phi3v_data.schema import Record

#: Digest of "no images" in the image-list digests (text-only records take part in no leak check).
NO_IMAGES = bytes(8)
#: Distinct answers counted exactly; beyond, only the most common are kept (approximate counts).
ANSWER_COUNTER_LIMIT = 50_000


def digest(text: str) -> bytes:
    """8-byte blake2b digest of a string (ids and image lists are kept only as digests)."""
    return blake2b(text.encode(), digest_size=8).digest()


def count_range(counts: array) -> list[int]:
    """``[count, total, min, max]`` of a count over items (zeros when there are none)."""
    if not counts:
        return [0, 0, 0, 0]
    return [len(counts), sum(counts), min(counts), max(counts)]


def prune_answers(answers: Counter[str]) -> Counter[str]:
    """Keep the most common answers once there are too many distinct ones (memory stays flat)."""
    if len(answers) <= ANSWER_COUNTER_LIMIT:
        return answers
    return Counter(dict(answers.most_common(ANSWER_COUNTER_LIMIT // 10)))


@dataclass
class ChunkScan:
    """What one chunk of a jsonl file holds, in compact form."""

    lines: int = 0
    records: int = 0
    #: (line, field, message), at most ``max_problems`` of ``problem_count``
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    problem_count: int = 0
    id_digests: bytearray = field(default_factory=bytearray)
    image_digests: bytearray = field(default_factory=bytearray)
    record_lines: array = field(default_factory=lambda: array("I"))
    turns: int = 0
    images: int = 0
    images_per_record: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    user_chars: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    assistant_chars: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    answers: Counter[str] = field(default_factory=Counter)
    answers_exact: bool = True
    labels: Counter[int] = field(default_factory=Counter)
    #: (image path, line, field) of the first reference to each image path new to this chunk
    first_references: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, line: int, field_name: str, message: str, max_problems: int) -> None:
        self.problem_count += 1
        if len(self.problems) < max_problems:
            self.problems.append((line, field_name, message))


def scan_chunk(
    path: Path, start: int, stop: int, context: dict[str, Any], max_problems: int
) -> ChunkScan:
    """Schema-check every line of ``path[start:stop]`` and gather its figures."""
    scan = ChunkScan()
    validate_json = Record.__pydantic_validator__.validate_json  # model_validate_json, unwrapped
    id_digests, image_digests, record_lines = scan.id_digests, scan.image_digests, scan.record_lines
    answers, labels = scan.answers, scan.labels
    seen: set[str] = set()
    # lengths go to C arrays and are summed once at the end: cheaper than min/max per turn
    user_chars, assistant_chars, images_per_record = array("I"), array("I"), array("I")
    number = 0
    for number, data, problem in read_lines(path, start=start, stop=stop):
        if problem is not None:
            scan.add(number, *problem, max_problems)
            continue
        try:
            record = validate_json(data, context=context)
        except ValidationError as exc:
            for field_name, message in plain_errors(exc):
                scan.add(number, field_name, message, max_problems)
            continue
        for field_name, message in duplicate_keys(data, record):
            scan.add(number, field_name, message, max_problems)
        record_lines.append(number)
        id_digests += blake2b(record.id.encode(), digest_size=8).digest()
        conversation = record.conversations
        record_images = 0
        for turn_index, turn in enumerate(conversation):
            user_chars.append(len(turn.user))
            assistant_chars.append(len(turn.assistant))
            paths = turn.images
            if paths:
                record_images += len(paths)
                if not seen.issuperset(paths):
                    for image_index, relative in enumerate(paths):
                        if relative not in seen:
                            seen.add(relative)
                            where = f"conversations.{turn_index}.images.{image_index}"
                            scan.first_references.append((relative, number, where))
        images_per_record.append(record_images)
        if record_images:
            paths = conversation[0].images if len(conversation) == 1 else record.images
            image_digests += digest("\x00".join(paths))
        else:
            image_digests += NO_IMAGES
        answer = conversation[-1].assistant.strip()
        answers[answer] = answers.get(answer, 0) + 1
        if record.label is not None:
            labels[record.label] += 1
        if len(answers) > ANSWER_COUNTER_LIMIT:
            answers = scan.answers = prune_answers(answers)
            scan.answers_exact = False
    scan.lines = number
    scan.records = len(record_lines)
    scan.turns = len(user_chars)
    scan.images = sum(images_per_record)
    scan.user_chars = count_range(user_chars)
    scan.assistant_chars = count_range(assistant_chars)
    scan.images_per_record = count_range(images_per_record)
    return scan
