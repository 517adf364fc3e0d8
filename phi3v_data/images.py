"""Checks of the image files a dataset names: where they resolve, and whether they decode.

Path rules: an image path resolves (symlinks included) to a regular file inside the dataset's
``images/`` folder. Content rules, decided per case:

==============================  ===========================================================
header check (default)          Pillow opens the file and reads format, mode and size; PNG
                                chunks are verified up to IEND (CRCs); a JPEG must end with
                                its end-of-image marker, else it is decoded to tell trailing
                                bytes from truncation. Other formats are fully checked only
                                with ``deep``.
deep check                      the first frame is fully decoded and converted to RGB.
zero-byte file, not an image    reported.
decompression bomb              more than :data:`MAX_IMAGE_PIXELS` pixels: reported, never
                                decoded.
CMYK, palette (P), L, LA, RGBA  accepted: Pillow converts them to RGB (alpha is dropped).
16/32-bit (I;16, I, F)          reported: ``convert("RGB")`` clips them to a white image.
animated GIF / PNG / WebP       reported: only the first frame would reach the model; save
                                frames as separate images.
==============================  ===========================================================

:class:`ImageChecker` caches one verdict per distinct path: real datasets name a few thousand
images many times.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: Largest accepted image, in pixels (Pillow's own warning threshold, about 9459 x 9459). Phi-3-V
#: never sees more than 16 crops of 336 x 336, so a larger image only costs memory.
MAX_IMAGE_PIXELS = 89_478_485
#: Modes that Pillow's convert("RGB") clips instead of scaling.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: How far before the end of a JPEG its end-of-image marker is looked for.
JPEG_TAIL_BYTES = 64


#: How much of an image file is checked: nothing but its path, its header, or a full decode.
CONTENT_CHECKS = ("none", "header", "deep")


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the header says about one image file."""

    format: str
    mode: str
    width: int
    height: int
    frames: int


def resolve_inside(root: Path, relative: str) -> tuple[Path | None, str | None]:
    """``(resolved file, None)`` or ``(None, problem)`` for an image path below ``root``.

    ``root`` must already be resolved (``os.path.realpath``).
    """
    if os.path.isabs(relative) or ".." in relative.split("/") or "\\" in relative:
        return None, f"{relative!r} is not a relative POSIX path without '..'"
    joined = os.path.join(root, relative)
    resolved = os.path.realpath(joined)
    if resolved != str(root) and not resolved.startswith(str(root) + os.sep):
        return None, f"{relative} resolves to {resolved}, outside images/ (symlink?)"
    if not os.path.exists(resolved):
        if os.path.islink(joined) or resolved != os.path.normpath(joined):
            return None, f"{relative} is a broken symlink (to {resolved})"
        return None, f"{relative} does not exist in images/"
    if not os.path.isfile(resolved):
        return None, f"{relative} is not a regular file"
    return Path(resolved), None


def _jpeg_is_complete(path: Path, size: int) -> bool:
    with path.open("rb") as stream:
        stream.seek(max(0, size - JPEG_TAIL_BYTES))
        tail = stream.read().rstrip(b"\x00\r\n\t ")
    return tail.endswith(b"\xff\xd9")


def inspect_image(path: Path, *, deep: bool = False) -> tuple[ImageFacts | None, str | None]:
    """``(facts, None)`` for a usable image file, ``(facts or None, problem)`` otherwise."""
    try:
        size = path.stat().st_size
        if size == 0:
            return None, "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                facts = ImageFacts(
                    format=image.format or "?",
                    mode=image.mode,
                    width=image.width,
                    height=image.height,
                    frames=getattr(image, "n_frames", 1),
                )
                problem = _facts_problem(facts)
                if problem:
                    return facts, problem
                if deep:
                    image.load()
                    image.convert("RGB")
                elif facts.format == "PNG":
                    image.verify()
                elif facts.format == "JPEG" and not _jpeg_is_complete(path, size):
                    image.draft("RGB", (max(1, facts.width // 8), max(1, facts.height // 8)))
                    image.load()
        return facts, None
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {exc}"
    except UnidentifiedImageError:
        return None, "not an image file Pillow can read (a text file, or a format it does not know)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return None, f"cannot be decoded ({type(exc).__name__}: {exc}); truncated or corrupt?"
    except Exception as exc:  # a corrupt file may raise anything inside a Pillow plugin
        return None, f"cannot be decoded ({type(exc).__name__}: {exc})"


def _facts_problem(facts: ImageFacts) -> str | None:
    pixels = facts.width * facts.height
    if facts.width < 1 or facts.height < 1:
        return f"image has no pixels ({facts.width}x{facts.height})"
    if pixels > MAX_IMAGE_PIXELS:
        return (
            f"decompression bomb: {facts.width}x{facts.height} = {pixels:,} pixels, "
            f"more than the {MAX_IMAGE_PIXELS:,} allowed"
        )
    if facts.mode in WIDE_MODES:
        return f"{facts.mode} image: converting it to RGB clips it to white; save it as 8-bit"
    if facts.frames > 1:
        return (
            f"animated {facts.format} ({facts.frames} frames): only the first frame would be "
            "used; save frames as separate images"
        )
    return None


def check_image_path(
    root: Path, relative: str, content: str = "header"
) -> tuple[ImageFacts | None, str | None]:
    """Path rules, then (``content`` ``"header"`` or ``"deep"``) content rules of one image.

    ``root`` must already be resolved; ``content="none"`` checks the path only.
    """
    resolved, problem = resolve_inside(root, relative)
    if resolved is None or content == "none":
        return None, problem
    return inspect_image(resolved, deep=content == "deep")


class ImageChecker:
    """Checks image paths of one dataset, once per distinct path.

    ``content`` is ``"none"`` (paths only), ``"header"`` (default) or ``"deep"``.
    """

    def __init__(self, root: Path, *, content: str = "header") -> None:
        if content not in CONTENT_CHECKS:
            raise ValueError(f"content must be none, header or deep, got {content!r}")
        self.root = Path(os.path.realpath(root))
        self.content = content
        self.verdicts: dict[str, str | None] = {}
        self.formats: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()

    def check(self, relative: str) -> str | None:
        """The problem of one image path, or None; computed once per distinct path."""
        try:
            return self.verdicts[relative]
        except KeyError:
            pass
        facts, problem = check_image_path(self.root, relative, self.content)
        self.record(relative, facts, problem)
        return problem

    def record(self, relative: str, facts: ImageFacts | None, problem: str | None) -> None:
        """Store the verdict on one path (checked here or by a worker process)."""
        if facts is not None:
            self.formats[facts.format] += 1
            self.modes[facts.mode] += 1
        self.verdicts[relative] = problem
