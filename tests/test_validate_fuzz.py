"""Property tests: whatever bytes a dataset holds, only structured one-line problems come out."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from dataset_files import image_bytes, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3v_data.dataset import DatasetError, iter_records
from phi3v_data.images import inspect_image
from phi3v_data.validate import validate_dataset

PROBLEM_LINE = re.compile(r"^(?P<path>[^\n]+?):(?P<line>\d+): (?P<field>[^\s]+): (?P<message>.+)$")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
GOOD_LINE = json.dumps(record("good", ["a.jpg"], answers=["a cat"], label=1)).encode()


@st.composite
def mutated_lines(draw) -> bytes:
    """A valid record line with bytes cut, inserted or a field replaced by any JSON value."""
    kind = draw(st.sampled_from(["cut", "insert", "replace", "drop"]))
    if kind == "cut":
        start = draw(st.integers(0, len(GOOD_LINE)))
        return GOOD_LINE[:start] + GOOD_LINE[draw(st.integers(start, len(GOOD_LINE))) :]
    if kind == "insert":
        where = draw(st.integers(0, len(GOOD_LINE)))
        return GOOD_LINE[:where] + draw(st.binary(min_size=1, max_size=8)) + GOOD_LINE[where:]
    document = json.loads(GOOD_LINE)
    target = draw(st.sampled_from([document, document["conversations"][0]]))
    key = draw(st.sampled_from(sorted(target)))
    if kind == "drop":
        del target[key]
    else:
        target[key] = draw(json_values)
    return json.dumps(document).encode()


lines = st.one_of(
    st.binary(max_size=80),
    mutated_lines(),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.just(GOOD_LINE),
)


def check_dataset(rows: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        (root / "images" / "a.jpg").write_bytes(image_bytes())
        path = root / "fuzz_train.jsonl"
        path.write_bytes(b"\n".join(rows))
        line_count = path.read_bytes().count(b"\n") + 1
        report = validate_dataset(root, jobs=1)
        text = report.format_text()
        json.dumps(report.to_json())
        for problem in report.problems:
            match = PROBLEM_LINE.match(str(problem))
            assert match, str(problem)
            assert 0 <= problem.line <= line_count
            assert str(problem) in text
        try:
            for _ in iter_records(path):
                pass
        except DatasetError as error:
            assert PROBLEM_LINE.match(str(error)), str(error)


@FUZZ
@given(st.lists(lines, min_size=1, max_size=6))
def test_random_and_mutated_lines_give_only_structured_problems(rows: list[bytes]) -> None:
    check_dataset(rows)


@FUZZ
@given(st.sampled_from(["JPEG", "PNG", "GIF", "WEBP"]), st.data())
def test_damaged_image_files_give_problems_not_exceptions(fmt: str, data) -> None:
    original = image_bytes(fmt, size=(40, 30))
    start = data.draw(st.integers(0, len(original)))
    stop = data.draw(st.integers(start, len(original)))
    damaged = original[:start] + data.draw(st.binary(max_size=16)) + original[stop:]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x.{fmt.lower()}"
        path.write_bytes(damaged)
        for deep in (False, True):
            facts, problem = inspect_image(path, deep=deep)
            assert problem is None or ("\n" not in problem and problem)
            assert facts is not None or problem is not None


def expected_lines(content: bytes, max_line_bytes: int) -> list[tuple]:
    """What read_lines must yield, computed the obvious way on the whole content."""
    lines = content.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for number, raw in enumerate(lines, 1):
        if len(raw) > max_line_bytes:
            out.append((number, None, "(line)"))
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
            out.append((number, None, "(encoding)"))
        out.append((number, raw, None) if raw.strip() else (number, None, "(line)"))
    return out


@FUZZ
@given(
    st.lists(st.sampled_from([b"\n", b"{}", b"ab", b" ", b"\xef\xbb\xbf", b"x" * 9]), max_size=30),
    st.integers(1, 12),
    st.integers(1, 40),
    st.integers(4, 12),
)
def test_read_lines_matches_a_plain_split(parts, block, chunk, max_line) -> None:
    from phi3v_data import dataset

    content = b"".join(parts)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.jsonl"
        path.write_bytes(content)
        saved, dataset.READ_BLOCK_BYTES = dataset.READ_BLOCK_BYTES, block
        try:
            got, offset = [], 0
            for start, stop in dataset.line_chunks(path, chunk):
                chunk_lines = list(
                    dataset.read_lines(path, start=start, stop=stop, max_line_bytes=max_line)
                )
                got += [(offset + n, data, p and p[0]) for n, data, p in chunk_lines]
                offset += max((n for n, _, _ in chunk_lines), default=0)
        finally:
            dataset.READ_BLOCK_BYTES = saved
    assert got == expected_lines(content, max_line)
