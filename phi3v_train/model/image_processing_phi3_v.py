"""Image processor of Phi-3 / Phi-3.5-vision: the HD crop transform.

Per image (../shared/reference/phi35v/README.md §2.3, bit-exact with the official processor):
1. Pillow `convert("RGB")` (alpha is dropped, not composited);
2. portrait images (w < h) are transposed and processed in that working frame;
3. the largest scale s with s * ceil(s / ratio) <= num_crops; resize with Pillow BILINEAR to
   (s*336, int(s*336 / ratio)); pad the height with white to a multiple of 336 (top gets half);
   transpose back;
4. uint8 / 255, CLIP mean/std normalisation (float32);
5. global view: PyTorch bicubic (no antialias) of the whole padded, normalised image to 336x336;
6. local crops in row-major order; [global, crops...] zero-padded to num_crops + 1.

Outputs `pixel_values` [N, num_crops+1, 3, 336, 336], `image_sizes` [N, 2] (padded HD [h, w]) and
`num_img_tokens` [N] = (rows*cols + 1)*144 + 1 + (rows + 1)*12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SIZE = 336


def hd_grid_scale(width: int, height: int, num_crops: int) -> int:
    """Largest s >= 1 with s * ceil(s / ratio) <= num_crops, ratio = long side / short side."""
    ratio = max(width, height) / min(width, height)
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return max(scale - 1, 1)


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Padded HD size [h, w] (multiples of 336) of a width x height image, without resizing."""
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    new_long = hd_grid_scale(width, height, num_crops) * CROP_SIZE
    new_short = max(int(new_long / ratio), 1)
    padded_short = math.ceil(new_short / CROP_SIZE) * CROP_SIZE
    return (new_long, padded_short) if transposed else (padded_short, new_long)


def num_image_tokens(hd_height: int, hd_width: int, tokens_per_crop: int = 144) -> int:
    """Placeholder count of an image whose padded HD size is [hd_height, hd_width]."""
    rows, cols = hd_height // CROP_SIZE, hd_width // CROP_SIZE
    per_row = math.isqrt(tokens_per_crop)
    return (rows * cols + 1) * tokens_per_crop + 1 + (rows + 1) * per_row


def hd_transform(image: Image.Image, num_crops: int) -> np.ndarray:
    """RGB image -> white-padded HD uint8 array [H, W, 3] with H, W multiples of 336."""
    image = image.convert("RGB")
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    width, height = image.size
    ratio = width / height
    new_width = hd_grid_scale(width, height, num_crops) * CROP_SIZE
    new_height = max(int(new_width / ratio), 1)
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    padded_height = math.ceil(new_height / CROP_SIZE) * CROP_SIZE
    canvas = Image.new("RGB", (new_width, padded_height), (255, 255, 255))
    canvas.paste(resized, (0, (padded_height - new_height) // 2))
    array = np.asarray(canvas)
    return array.transpose(1, 0, 2) if transposed else array


class Phi3VImageProcessor(BaseImageProcessor):
    """HD transform + CLIP normalisation; `num_crops` is a constructor/load-time/call-time option."""

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        num_crops: int = 1,
        num_img_tokens: int = 144,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_convert_rgb: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_crops = int(num_crops)
        self.num_img_tokens = int(num_img_tokens)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb

    def calc_num_image_tokens(self, image: Image.Image, num_crops: int | None = None) -> int:
        height, width = hd_size(image.width, image.height, num_crops or self.num_crops)
        return num_image_tokens(height, width, self.num_img_tokens)

    def process_one(self, image: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int]]:
        """One image -> ([num_crops+1, 3, 336, 336] float32, [h, w])."""
        hd = torch.from_numpy(np.array(hd_transform(image, num_crops), copy=True))
        tensor = hd.permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        tensor = (tensor - mean) / std
        _, height, width = tensor.shape
        rows, cols = height // CROP_SIZE, width // CROP_SIZE
        global_view = F.interpolate(
            tensor[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False
        )
        crops = tensor.reshape(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4)
        crops = crops.reshape(rows * cols, 3, CROP_SIZE, CROP_SIZE)
        out = torch.zeros(num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=torch.float32)
        out[0] = global_view[0]
        out[1 : 1 + rows * cols] = crops
        return out, [height, width]

    def preprocess(
        self,
        images: Image.Image | Sequence[Image.Image],
        num_crops: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        num_crops = int(num_crops or self.num_crops)
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        pixel_values, image_sizes = [], []
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected PIL images, got {type(image).__name__}")
            values, size = self.process_one(image, num_crops)
            pixel_values.append(values)
            image_sizes.append(size)
        if pixel_values:
            stacked = torch.stack(pixel_values)
        else:
            stacked = torch.zeros(0, num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        sizes = torch.tensor(image_sizes, dtype=torch.long).view(-1, 2)
        tokens = [num_image_tokens(h, w, self.num_img_tokens) for h, w in image_sizes]
        return BatchFeature(
            data={
                "pixel_values": stacked,
                "image_sizes": sizes,
                "num_img_tokens": torch.tensor(tokens, dtype=torch.long),
            }
        )

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["Phi3VImageProcessor", "hd_transform", "hd_size", "num_image_tokens"]
