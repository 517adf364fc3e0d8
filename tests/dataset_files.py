"""Real files for dataset tests: image bytes made with Pillow, records, dataset folders."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def image_bytes(fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> bytes:
    """A real image file; noisy pixels so that the entropy-coded data spans many bytes."""
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "CMYK": 4, "RGBA": 4, "LA": 2}.get(mode, 1)
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels[..., :3]).convert(mode)
    stream = io.BytesIO()
    image.save(stream, fmt)
    return stream.getvalue()


def png16_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = (np.arange(size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0]) * 60).astype(
        np.uint16
    )
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, "PNG")
    return stream.getvalue()


def animated_bytes(fmt: str = "GIF", frames: int = 3) -> bytes:
    images = [
        Image.new("RGB", (16, 16), (80 * index, 0, 255 - 80 * index)) for index in range(frames)
    ]
    stream = io.BytesIO()
    images[0].save(stream, fmt, save_all=True, append_images=images[1:], duration=100)
    return stream.getvalue()


def _png(width: int, height: int, idat: bytes, bit_depth: int = 1, color: int = 0) -> bytes:
    """A PNG of one IDAT chunk holding ``idat``, every chunk with a correct CRC."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds one tiny valid IDAT."""
    return _png(width, height, zlib.compress(b"\x00" * 16))  # 1-bit greyscale


def png_corrupt_stream(size: tuple[int, int] = (64, 48)) -> bytes:
    """An RGB PNG whose chunks and CRCs are all valid but whose compressed pixel stream is not."""
    rows = b"".join(b"\x00" + bytes(range(256)) * (3 * size[0] // 256 + 1) for _ in range(size[1]))
    stream = bytearray(zlib.compress(rows))
    stream[len(stream) // 3 : len(stream) // 3 + 24] = b"\xff" * 24
    return _png(*size, bytes(stream), bit_depth=8, color=2)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` of a file: the header survives, the pixel data does not."""
    return data[: int(len(data) * keep)]


def record(
    record_id: str,
    images: list[str] | None = None,
    *,
    user: str = "What is shown?",
    assistant: str = "a cat",
    **extra: Any,
) -> dict[str, Any]:
    turn = {"images": images if images is not None else [], "user": user, "assistant": assistant}
    return {"id": record_id, "source": "test", "conversations": [turn], **extra}


def write_jsonl(path: Path, rows: list[dict[str, Any] | str | bytes]) -> Path:
    """One line per row: dicts as JSON, str and bytes as they are (for broken lines)."""
    lines = []
    for row in rows:
        if isinstance(row, dict):
            row = json.dumps(row)
        lines.append(row if isinstance(row, bytes) else row.encode())
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def write_dataset(
    root: Path,
    splits: dict[str, list[dict[str, Any] | str | bytes]],
    *,
    images: dict[str, bytes] | None = None,
    info: dict[str, Any] | None = None,
    name: str = "toy",
) -> Path:
    """A dataset folder ``root`` with ``images/``, ``<name>_<split>.jsonl`` and ``dataset.json``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for relative, data in (images or {}).items():
        (root / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / relative).write_bytes(data)
    for split, rows in splits.items():
        write_jsonl(root / f"{name}_{split}.jsonl", rows)
    if info is not None:
        (root / "dataset.json").write_text(json.dumps(info))
    return root
