"""Plain one-line messages for pydantic's validation errors.

pydantic says ``String should match pattern '^(?:[^/.\\\\...'``; a user needs ``absolute path: image
paths are relative to images/``. :func:`plain_errors` turns a :class:`pydantic.ValidationError` into
``(field, message)`` pairs where ``field`` is a dotted path such as ``conversations.0.images.2``.
Pseudo-fields in parentheses name what is not a key: ``(json)`` for syntax errors, ``(encoding)``
for bytes that are not UTF-8, ``(record)`` for a line that is valid JSON but not an object.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from phi3v_data.schema import RELATIVE_POSIX_PATH

_RELATIVE_POSIX_PATH = re.compile(RELATIVE_POSIX_PATH)
#: A value error raised by a model validator that names its field: ``"conversations: ..."``.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.DOTALL)

_JSON_TYPES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true/false",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so that a problem stays on one line."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def _field_part(part: str | int) -> str:
    """A key as it can stand in a field path: quoted, without whitespace, when not a name."""
    text = str(part)
    if text.isidentifier() or text.isdigit():
        return text
    quoted = json.dumps(text if len(text) <= 40 else text[:37] + "...")
    return re.sub(r"\s", lambda match: f"\\u{ord(match.group()):04x}", quoted)


def json_type(value: Any) -> str:
    """How a parsed JSON value is called in a message: ``an array``, ``null``, ..."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def shorten(value: Any, limit: int = 60) -> str:
    """``repr`` of a value, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def why_not_relative_posix(path: str) -> str:
    """The reason an image path breaks the relative-POSIX rule (empty string when it does not)."""
    if not isinstance(path, str):
        return f"must be a string, got {json_type(path)}"
    if _RELATIVE_POSIX_PATH.match(path):
        return ""
    if path == "":
        return "empty image path"
    if "\x00" in path:
        return f"image path {shorten(path)} contains a NUL character"
    if "\\" in path:
        return f"image path {shorten(path)} contains a backslash; use '/' as separator"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return f"image path {shorten(path)} is absolute; write it relative to images/"
    parts = path.split("/")
    if ".." in parts:
        return f"image path {shorten(path)} contains '..'; it must stay inside images/"
    if "." in parts:
        return f"image path {shorten(path)} contains a '.' component; write it without './'"
    if "" in parts:
        return f"image path {shorten(path)} has an empty component ('//' or a trailing '/')"
    return f"image path {shorten(path)} is not a relative POSIX path"


_LINE_COLUMN = re.compile(r" at line 1 column (\d+)$")


def _json_syntax(error: dict[str, Any]) -> tuple[str, str]:
    detail = str(error.get("ctx", {}).get("error", error["msg"]))
    detail = _LINE_COLUMN.sub(r" at column \1", detail)
    if "unicode" in detail or "utf-8" in detail.lower():
        return "(encoding)", f"not valid UTF-8 text or a broken \\u escape ({detail})"
    return "(json)", f"invalid JSON: {detail}"


def _message(error: dict[str, Any]) -> str:
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx", {})
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown key (misspelt? free-form data belongs under 'meta')"
    if kind == "string_pattern_mismatch":
        return why_not_relative_posix(value)
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must hold at least {ctx.get('min_length', 1)} item(s), got {len(value or [])}"
    if kind in {"string_type", "list_type", "dict_type", "int_type", "model_type", "bool_type"}:
        wanted = {
            "bool_type": "true or false",
            "string_type": "a string",
            "list_type": "an array",
            "dict_type": "an object",
            "int_type": "an integer",
            "model_type": "an object",
        }[kind]
        return f"must be {wanted}, got {json_type(value)}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the allowed values')}, got {shorten(value)}"
    if kind in {"value_error", "assertion_error"}:
        return str(ctx.get("error", error["msg"]))
    if kind == "string_unicode":
        return "not valid UTF-8 text"
    return f"{error['msg']} (got {shorten(value)})"


def plain_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` for every error of ``exc``, in pydantic's order."""
    plain = []
    for error in exc.errors(include_url=False):
        if error["type"] == "json_invalid":
            plain.append(_json_syntax(error))
            continue
        loc = [_field_part(part) for part in error["loc"]]
        message = _message(error)
        if not loc:
            match = _FIELD_PREFIX.match(message)
            if match and error["type"] == "value_error":
                loc, message = [match.group(1)], match.group(2)
            else:
                loc = ["(record)"]
        plain.append((".".join(loc), message))
    return plain
