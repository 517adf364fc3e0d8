"""Raw image files of the image datasets: check that they decode, export them under their real format.

Raw releases mislabel formats (NLVR2's ``.png`` files are often JPEG or GIF) and contain truncated
or non-image files. :func:`export_image` decodes the bytes once, fully, and returns what to write:

- a single-frame PNG or JPEG in a mode every tool converts to RGB is kept **byte for byte**, under
  the extension of its real format (``.png`` / ``.jpg``);
- anything else that decodes (GIF, WebP, BMP, animated files, CMYK or 16-bit images) is re-encoded
  as a PNG of its first frame, in RGB (16/32-bit grey is scaled to 8 bits, not clipped), which is
  deterministic for a given Pillow version; so every written image passes ``phi3v-data validate``
  (which rejects animated and 16-bit files, see ``phi3v_data.images``);
- anything that does not decode, or has more pixels than the validator accepts (decompression
  bomb), raises :class:`UnusableImage` with a one-line reason for ``convert_report.json``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from phi3v_data.images import MAX_IMAGE_PIXELS, WIDE_MODES

#: Formats whose bytes are kept as they are, with the extension written for them.
KEPT_FORMATS = {"PNG": ".png", "JPEG": ".jpg"}
#: Pillow modes that convert to RGB without loss of meaning; other modes are re-encoded.
KEPT_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}


class UnusableImage(Exception):
    """The bytes are not an image this toolkit can train on; ``str()`` is the reason."""


@dataclass(frozen=True)
class ExportedImage:
    """Bytes to write for one image and the file suffix that matches their format."""

    data: bytes
    suffix: str
    width: int
    height: int


def export_image(data: bytes) -> ExportedImage:
    """Decode ``data`` fully and return the bytes to write (see the module docstring)."""
    if not data:
        raise UnusableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnusableImage(
                    f"decompression bomb: {width}x{height} pixels, more than {MAX_IMAGE_PIXELS:,}"
                )
            image_format = image.format or "unknown"
            frames = getattr(image, "n_frames", 1)
            image.load()
            if image_format in KEPT_FORMATS and frames == 1 and image.mode in KEPT_MODES:
                return ExportedImage(data, KEPT_FORMATS[image_format], width, height)
            buffer = io.BytesIO()
            _to_rgb(image).save(buffer, format="PNG")
            return ExportedImage(buffer.getvalue(), ".png", width, height)
    except UnusableImage:
        raise
    except Image.UnidentifiedImageError:
        raise UnusableImage("not an image (no known image format)") from None
    except Image.DecompressionBombError as error:
        raise UnusableImage(f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnusableImage(f"not a decodable image ({reason})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """The (first frame of the) image in RGB; wide grey modes are scaled down to 8 bits."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 256.0  # 16-bit range (also what PNG's 16-bit grey opens as "I")
        grey = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")
