"""The native model on a CUDA GPU: reference parity in fp32, bf16 attention implementations
(eager / sdpa / flash_attention_2 when installed) agreeing with each other on the tiny preset,
padded batched generation, and a bf16 training step with gradient checkpointing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

import phi3v_train  # noqa: F401  (registers phi3_v with the Auto classes)
from phi3v_train.model.tiny import make_tiny

pytestmark = pytest.mark.gpu

PROMPT = "<|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n"
ATTENTIONS = ["eager", "sdpa"] + (
    ["flash_attention_2"] if importlib.util.find_spec("flash_attn") is not None else []
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def picture(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_reference_case_a_fp32_on_gpu(reference_dir: Path) -> None:
    from test_model_parity import load_reference_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_reference_model(reference_dir, "model.safetensors").cuda()
    cases = load_file(reference_dir / "model_cases.safetensors")
    names = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "labels")
    kwargs = {name: cases[f"A.{name}"].cuda() for name in names}
    with torch.no_grad():
        out = model(**kwargs)
    logits = out.logits[0, cases["A.logit_positions"].cuda()].cpu()
    assert (logits - cases["A.logits"][0]).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - cases["A.loss"].item()) <= 1e-4


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bf16_attention_implementations_agree(tiny_dir: Path, attention: str) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir)
    batch = processor(
        [PROMPT.format(question="Wide?"), PROMPT.format(question="A tall one, longer prompt?")],
        images=[picture(900, 300, 0), picture(300, 900, 1)],
        padding_side="right",
    ).to("cuda")
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, attn_implementation="eager"
    ).cuda()
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.bfloat16, attn_implementation=attention
    ).cuda()
    vision_config = model.model.vision_embed_tokens.img_processor.vision_model.config
    assert vision_config._attn_implementation == attention
    with torch.no_grad():
        expected = reference(**batch).logits
        logits = model(**batch).logits.float()
    real = batch["attention_mask"].bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 5e-2

    left = processor(
        [PROMPT.format(question="Wide?"), PROMPT.format(question="A tall one, longer prompt?")],
        images=[picture(900, 300, 0), picture(300, 900, 1)],
        padding_side="left",
    ).to("cuda")
    generated = model.generate(**left, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2
    assert left["input_ids"].shape[1] < generated.shape[1] <= left["input_ids"].shape[1] + 4


def test_bf16_training_step_with_checkpointing(tiny_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir, num_crops=16)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).cuda()
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    batch = processor(PROMPT.format(question="Total?"), images=[picture(1654, 2339, 2)]).to("cuda")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] < 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.vision_embed_tokens.img_projection[0].weight.grad is not None
