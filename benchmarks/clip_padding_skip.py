"""What skipping CLIP on the zero-padded crops saves on DocVQA-like pages (issue 8 item 2).

The official model pads every image to num_crops + 1 crops and runs CLIP on all of them; ours runs
CLIP only on the 1 + rows*cols real crops (`Phi3VImageEmbedding.skip_padding_crops`, on by
default). This script prints, for a mix of document page shapes at num_crops 16:
- the crop grid, real crops vs num_crops + 1, and the share of CLIP work skipped;
- the measured CPU time (process time, best of --repeats, one thread by default so that a busy
  shared machine disturbs it little) of the image embedding (CLIP + HD transform + projector)
  with the skip on and off, side by side in one run, on a scaled CLIP (the ratio is what matters);
- the forward FLOPs that ViT-L/14-336 (the real tower, 23 of 24 layers used) saves per page.

    python benchmarks/clip_padding_skip.py                 # default mix, scaled CLIP, CPU
    python benchmarks/clip_padding_skip.py --repeats 5 --hidden 512 --layers 8

The page mix is an assumption stated in the table (DocVQA pages are mostly letter/A4 portrait
scans, with some landscape pages, receipts and wide tables); each shape's own figures are printed
so any other mix can be weighed from them.
"""

from __future__ import annotations

import platform
import time
from datetime import UTC, datetime

import click
import torch

from phi3v_train.model.configuration_phi3_v import Phi3VConfig
from phi3v_train.model.image_processing_phi3_v import CROP_SIZE, hd_size
from phi3v_train.model.modeling_phi3_v import Phi3VImageEmbedding

# (label, width, height, share of pages in the assumed mix)
PAGES = [
    ("letter portrait 1700x2200", 1700, 2200, 0.50),
    ("A4 portrait 1654x2339", 1654, 2339, 0.20),
    ("letter landscape 2200x1700", 2200, 1700, 0.10),
    ("receipt / long form 1000x2600", 1000, 2600, 0.08),
    ("wide table 2400x1200", 2400, 1200, 0.07),
    ("slide 16:9 1920x1080", 1920, 1080, 0.05),
]


def vit_l_forward_flops_per_crop(
    layers_used: int = 23, dim: int = 1024, tokens: int = 577
) -> float:
    """Forward FLOPs of one 336x336 crop through ViT-L/14 up to the feature layer."""
    per_layer = 24 * tokens * dim * dim + 4 * tokens * tokens * dim
    return float(layers_used * per_layer)


def scaled_embedding(hidden: int, layers: int, seed: int) -> Phi3VImageEmbedding:
    config = Phi3VConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=256,
        vocab_size=32064,
        pad_token_id=32000,
        rope_scaling=None,
        img_processor={
            "image_dim_out": hidden,
            "num_img_tokens": 144,
            "vision_config": {
                "hidden_size": hidden,
                "intermediate_size": 4 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": max(hidden // 64, 1),
            },
        },
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return Phi3VImageEmbedding(config).eval()


def page_inputs(width: int, height: int, num_crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Processor-shaped inputs of one page: random real crops, zero padding crops."""
    hd_h, hd_w = hd_size(width, height, num_crops)
    used = 1 + (hd_h // CROP_SIZE) * (hd_w // CROP_SIZE)
    pixel_values = torch.zeros(1, num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
    pixel_values[:, :used] = torch.randn(1, used, 3, CROP_SIZE, CROP_SIZE)
    return pixel_values, torch.tensor([[hd_h, hd_w]])


def time_embedding(module, pixel_values, image_sizes, skip: bool) -> float:
    module.skip_padding_crops = skip
    start = time.process_time()  # CPU time of this process: robust on a shared, busy machine
    with torch.no_grad():
        module(pixel_values, image_sizes)
    return time.process_time() - start


@click.command()
@click.option("--num-crops", default=16, show_default=True)
@click.option("--hidden", default=64, show_default=True, help="Scaled CLIP hidden size.")
@click.option("--layers", default=4, show_default=True, help="Scaled CLIP layers.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per page and setting.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch intra-op threads.")
def main(num_crops: int, hidden: int, layers: int, repeats: int, seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    module = scaled_embedding(hidden, layers, seed)
    flops_per_crop = vit_l_forward_flops_per_crop()
    print(
        f"# CLIP padded-crop skip, num_crops {num_crops}, scaled CLIP hidden {hidden} x "
        f"{layers} layers, torch {torch.__version__}, {platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
    )
    print(
        "| page | share | grid | CLIP crops (ours / official) | work skipped "
        "| CPU s skip on | CPU s skip off | speed-up | ViT-L TFLOP saved |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {"used": 0.0, "all": 0.0, "on": 0.0, "off": 0.0}
    for label, width, height, share in PAGES:
        pixel_values, image_sizes = page_inputs(width, height, num_crops)
        hd_h, hd_w = image_sizes[0].tolist()
        rows, cols = hd_h // CROP_SIZE, hd_w // CROP_SIZE
        used, everything = 1 + rows * cols, num_crops + 1
        time_embedding(module, pixel_values, image_sizes, True)  # warm-up
        on, off = [], []
        for _ in range(repeats):  # alternate so that machine noise hits both settings alike
            on.append(time_embedding(module, pixel_values, image_sizes, True))
            off.append(time_embedding(module, pixel_values, image_sizes, False))
        t_on, t_off = min(on), min(off)  # the least-disturbed run of each setting
        saved = (everything - used) * flops_per_crop / 1e12
        print(
            f"| {label} | {share:.0%} | {rows}x{cols} | {used} / {everything} "
            f"| {1 - used / everything:.1%} | {t_on:.3f} | {t_off:.3f} | {t_off / t_on:.2f}x "
            f"| {saved:.2f} |"
        )
        totals["used"] += share * used
        totals["all"] += share * everything
        totals["on"] += share * t_on
        totals["off"] += share * t_off
    saved_mix = (totals["all"] - totals["used"]) * flops_per_crop / 1e12
    print(
        f"| **assumed mix** | 100% | | {totals['used']:.2f} / {totals['all']:.0f} "
        f"| {1 - totals['used'] / totals['all']:.1%} | {totals['on']:.3f} | {totals['off']:.3f} "
        f"| {totals['off'] / totals['on']:.2f}x | {saved_mix:.2f} |"
    )
    print(
        f"\nViT-L/14-336 forward per crop (23 layers used): {flops_per_crop / 1e12:.3f} TFLOP; "
        "a training step adds about twice that again in the backward pass when CLIP is trained."
    )


if __name__ == "__main__":
    main()
