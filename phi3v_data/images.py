"""The one way every command reaches an image file: where it resolves, what it is, how it decodes.

:func:`load_image` is the single image-access path of ``phi3v-data validate``, training and
``phi3v-train eval``: the path resolves (symlinks included) to a regular file inside the dataset's
``images/`` folder (:func:`image_file`), is opened without blocking (a FIFO or device is refused,
never waited on: :func:`phi3v_data.safe_io.open_regular`), decoded and converted to RGB. Anything
wrong raises :class:`ImageError`, which names the image. ``validate`` applies the same rules
through :func:`check_image_path`, with a cheaper check for JPEG:

==============================  ===========================================================
header check (default)          JPEG: Pillow reads format, mode and size, and the file must
                                end with its end-of-image marker, else it is decoded to tell
                                trailing bytes from truncation. Every other format (PNG, BMP,
                                TIFF, GIF, WebP...) is fully decoded as training will decode it:
                                their headers cannot show a truncated or corrupt pixel stream.
                                PNG chunks are also verified up to IEND (CRCs).
deep check                      every image, JPEG included, is fully decoded to RGB.
zero-byte file, not an image    reported.
decompression bomb              more than :data:`MAX_IMAGE_PIXELS` pixels: reported, never
                                decoded.
CMYK, palette (P), L, LA, RGBA  accepted: converted to RGB (alpha is dropped).
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
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from phi3v_data.safe_io import is_inside, open_regular

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


class ImageError(ValueError):
    """One image cannot be used; ``str()`` is ``image: problem``. Pickles (worker processes)."""

    def __init__(self, image: str, problem: str, facts: ImageFacts | None = None) -> None:
        super().__init__(image, problem, facts)
        self.image, self.problem, self.facts = image, problem, facts

    def __str__(self) -> str:
        return f"{self.image}: {self.problem}"


def image_file(root: Path, relative: str) -> Path:
    """The regular file ``relative`` names below ``root``, resolved; :class:`ImageError` else.

    ``root`` must already be resolved (``os.path.realpath``). Nothing is opened.
    """
    if os.path.isabs(relative) or ".." in relative.split("/") or "\\" in relative:
        raise ImageError(relative, "not a relative POSIX path without '..'")
    if "\x00" in relative:
        raise ImageError(relative, "contains a NUL character")
    joined = os.path.join(root, relative)
    resolved = os.path.realpath(joined)
    if not is_inside(root, resolved):
        raise ImageError(relative, f"resolves to {resolved}, outside images/ (symlink?)")
    if not os.path.exists(resolved):
        if os.path.islink(joined) or resolved != os.path.normpath(joined):
            raise ImageError(relative, f"is a broken symlink (to {resolved})")
        raise ImageError(relative, "does not exist in images/")
    if not os.path.isfile(resolved):
        raise ImageError(relative, "is not a regular file (a folder, FIFO or device)")
    return Path(resolved)


def load_image(root: Path, relative: str) -> Image.Image:
    """The image ``relative`` (below the ``images/`` folder ``root``) decoded and in RGB.

    The one image-access path of validate, training and evaluation: :func:`image_file`, a
    non-blocking open of a regular file only, a full decode. Raises :class:`ImageError`.
    """
    path = image_file(Path(os.path.realpath(root)), relative)
    _, rgb = _examine(path, relative, full=True)
    assert rgb is not None
    return rgb


def _jpeg_is_complete(handle: BinaryIO, size: int) -> bool:
    handle.seek(max(0, size - JPEG_TAIL_BYTES))
    tail = handle.read().rstrip(b"\x00\r\n\t ")
    handle.seek(0)
    return tail.endswith(b"\xff\xd9")


def _examine(path: Path, name: str, *, full: bool) -> tuple[ImageFacts, Image.Image | None]:
    """Open and check one file: ``full`` decodes every format to RGB (returned); otherwise JPEG
    gets the header and end-marker check and every other format is still decoded (not returned).
    Raises :class:`ImageError` naming ``name``."""
    facts = None
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise ImageError(name, "empty file (0 bytes)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    facts = ImageFacts(
                        format=image.format or "?",
                        mode=image.mode,
                        width=image.width,
                        height=image.height,
                        frames=getattr(image, "n_frames", 1),
                    )
                    problem = _facts_problem(facts)
                    if problem:
                        raise ImageError(name, problem, facts)
                    if facts.format == "JPEG" and not full:
                        if not _jpeg_is_complete(handle, size):
                            image.draft(
                                "RGB", (max(1, facts.width // 8), max(1, facts.height // 8))
                            )
                            image.load()
                        return facts, None
                    if facts.format == "PNG":
                        image.verify()  # chunk CRCs up to IEND; verify() spends the image
                    else:
                        return facts, _decode(image, full)
                handle.seek(0)
                with Image.open(handle) as image:
                    return facts, _decode(image, full)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        message = "not an image file Pillow can read (a text file, or a format it does not know)"
        raise ImageError(name, message) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # opening failed
            raise ImageError(name, f"cannot be read: {exc.strerror or exc}") from None
        message = f"cannot be decoded ({type(exc).__name__}: {exc}); truncated or corrupt?"
        raise ImageError(name, message, facts) from None
    except Exception as exc:  # a corrupt file may raise anything inside a Pillow plugin
        raise ImageError(name, f"cannot be decoded ({type(exc).__name__}: {exc})", facts) from None


def _decode(image: Image.Image, keep: bool) -> Image.Image | None:
    """Decode every pixel (a truncated or corrupt stream raises here) and convert to RGB."""
    image.load()
    rgb = image.convert("RGB")
    return rgb if keep else None


def inspect_image(path: Path, *, deep: bool = False) -> tuple[ImageFacts | None, str | None]:
    """``(facts, None)`` for a usable image file, ``(facts or None, problem)`` otherwise.

    The content rules of :func:`load_image` on one file (``deep``: decode JPEG too).
    """
    try:
        facts, _ = _examine(Path(path), str(path), full=deep)
    except ImageError as error:
        return error.facts, error.problem
    return facts, None


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

    ``root`` must already be resolved; ``content="none"`` checks the path only. The problem is
    ``str(ImageError)``: ``image: what is wrong``, as training and evaluation report it.
    """
    try:
        resolved = image_file(root, relative)
        if content == "none":
            return None, None
        return _examine(resolved, relative, full=content == "deep")[0], None
    except ImageError as error:
        return error.facts, str(error)


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
