"""Packing (issue 14): a packed row gives the same loss and gradients as the padded batch of the
same samples under eager and sdpa, with multi-image, text-only and multi-turn samples; LongRoPE
picks its factors per sample (a packed row longer than original_max_position_embeddings made of
short samples stays short; one long sample is long alone); step-level loss normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from phi3v_data.schema import Record
from phi3v_train.data import IGNORE_INDEX, TrainCollator, encode_for_training
from phi3v_train.model.configuration_phi3_v import Phi3VConfig
from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM, packed_sample_lengths
from phi3v_train.model.tiny import make_tiny
from phi3v_train.training.packing import (
    PackingCollator,
    add_dummy_image_sample,
    sample_lengths,
    step_loss_sum_and_count,
    step_scaled_loss,
    step_token_count,
    supervised_tokens,
    token_loss_sum,
)

BOUNDARY = 400  # original_max_position_embeddings override: the long regime starts cheaply


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, object, dict[str, dict]]:
    root = tmp_path_factory.mktemp("packing")
    tiny = make_tiny(root / "model", seed=0)
    processor = AutoProcessor.from_pretrained(tiny)
    processor.image_processor.num_crops = 1  # 313 tokens per image
    for name, rgb in (("a", (200, 20, 20)), ("b", (20, 20, 200))):
        Image.new("RGB", (336, 336), rgb).save(root / f"{name}.png")
    records = {
        "two_images": [{"images": ["a.png", "b.png"], "user": "Compare.", "assistant": "same"}],
        "text": [{"user": "Say yes.", "assistant": "yes yes"}],
        "multi_turn": [
            {"user": "Hello there.", "assistant": "hi"},
            {"images": ["b.png"], "user": "Colour?", "assistant": "blue"},
        ],
        "one_image": [{"images": ["a.png"], "user": "Colour?", "assistant": "red"}],
    }
    examples = {
        key: encode_for_training(Record(id=key, source="t", conversations=turns), processor, root)
        for key, turns in records.items()
    }
    return tiny, processor, examples


def load(tiny: Path, attn: str) -> Phi3VForCausalLM:
    config = Phi3VConfig.from_pretrained(tiny, original_max_position_embeddings=BOUNDARY)
    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(tiny, config=config, attn_implementation=attn)
    assert model.model.rotary_emb.original_max_position_embeddings == BOUNDARY
    return model.train()


def loss_and_grads(model, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    total, count = step_loss_sum_and_count(model, batches, reduce=lambda n: n)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total / count, grads


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert a[1].keys() == b[1].keys()
    worst = max(float((a[1][k] - b[1][k]).abs().max()) for k in a[1])
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_row_of_short_samples_matches_padded(setup, attn: str) -> None:
    tiny, processor, examples = setup
    samples = [examples["text"], examples["multi_turn"], examples["one_image"]]
    assert all(ex["input_ids"].numel() <= BOUNDARY for ex in samples)
    packed = PackingCollator(0)(samples)
    assert packed["input_ids"].shape[1] > BOUNDARY  # the row is long, every sample short
    assert not bool((packed_sample_lengths(packed["position_ids"]) > BOUNDARY).any())
    padded = TrainCollator(processor.tokenizer.pad_token_id)(samples)
    model = load(tiny, attn)
    assert_same(loss_and_grads(model, [packed]), loss_and_grads(model, [padded]))


@pytest.mark.parametrize("attn", ["sdpa"])
def test_long_sample_uses_long_factors_alone(setup, attn: str) -> None:
    tiny, _, examples = setup
    samples = [examples["multi_turn"], examples["two_images"], examples["text"]]
    assert samples[1]["input_ids"].numel() > BOUNDARY >= samples[0]["input_ids"].numel()
    packed = PackingCollator(0)(samples)
    long = packed_sample_lengths(packed["position_ids"])[0] > BOUNDARY
    n0, n1 = (ex["input_ids"].numel() for ex in samples[:2])
    assert not long[:n0].any() and long[n0 : n0 + n1].all() and not long[n0 + n1 :].any()
    model = load(tiny, attn)
    alone = [PackingCollator(0)([ex]) for ex in samples]  # each sample on its own row
    reference = loss_and_grads(model, alone)
    assert_same(loss_and_grads(model, [packed]), reference)
    # The row-level choice (what padding does) gives other numbers: the test can see the trap.
    row_level = loss_and_grads(model, [TrainCollator(0)(samples)])[1]
    assert max(float((row_level[k] - reference[1][k]).abs().max()) for k in row_level) > 1e-3


def test_packed_labels_positions_and_images(setup) -> None:
    _, _, examples = setup
    samples = [examples["two_images"], examples["text"], examples["one_image"]]
    packed = PackingCollator(0)(samples)
    lengths = [ex["input_ids"].numel() for ex in samples]
    assert sample_lengths(packed) == lengths
    assert "attention_mask" not in packed
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(int(packed["position_ids"][0, s]) == 0 for s in starts)
    assert all(int(packed["labels"][0, s]) == IGNORE_INDEX for s in starts)
    assert packed["pixel_values"].shape[0] == 3  # two images, then one, in sample order
    assert torch.equal(packed["pixel_values"][2], examples["one_image"]["pixel_values"][0])
    padded = TrainCollator(0)(samples)
    assert supervised_tokens(packed["labels"]) == supervised_tokens(padded["labels"])


def test_dummy_image_sample_adds_no_supervised_token(setup) -> None:
    _, _, examples = setup
    packed = PackingCollator(0)([examples["text"], examples["multi_turn"]])
    dummy = {**examples["one_image"]}
    dummy["labels"] = torch.full_like(dummy["labels"], IGNORE_INDEX)
    with_dummy = add_dummy_image_sample(packed, dummy)
    assert torch.equal(with_dummy["pixel_values"][0], packed["pixel_values"][0])
    assert sample_lengths(with_dummy) == [*sample_lengths(packed), dummy["input_ids"].numel()]
    assert supervised_tokens(with_dummy["labels"]) == supervised_tokens(packed["labels"])
    assert with_dummy["pixel_values"].shape[0] == packed["pixel_values"].shape[0] + 1


def test_step_mean_is_over_all_supervised_tokens_of_the_step() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 9, 5, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, 4, -100, -100, 0, 1]])
    whole = token_loss_sum(logits, labels) / supervised_tokens(labels)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    # The same tokens split into two micro-batches of 4 and 2 tokens, on two simulated ranks.
    micro = [{"labels": labels[:, :5]}, {"labels": labels[:, 4:]}]
    counts = [supervised_tokens(b["labels"]) for b in micro]
    assert counts == [4, 2]
    step = step_token_count(micro, reduce=lambda n: n)
    assert step == 6
    parts = [(logits[:, :5], micro[0]["labels"]), (logits[:, 4:], micro[1]["labels"])]
    ranks = [step_scaled_loss(token_loss_sum(lg, lb), step, world_size=2) for lg, lb in parts]
    ddp_mean = sum(ranks) / 2  # DDP averages the ranks' gradients
    (grad_split,) = torch.autograd.grad(ddp_mean, logits)
    assert float(ddp_mean) == pytest.approx(float(whole), rel=1e-6)
    assert torch.allclose(grad_split, grad_whole, atol=1e-7)
    mean_of_means = (
        sum(token_loss_sum(lg, lb) / c for (lg, lb), c in zip(parts, counts, strict=True)) / 2
    )
    assert abs(float(mean_of_means) - float(whole)) > 1e-4  # what per-micro-batch means give


@pytest.mark.gpu
def test_flash_attention_packed_row_matches_padded_on_gpu(setup) -> None:
    pytest.importorskip("flash_attn")
    tiny, processor, examples = setup
    samples = [examples["text"], examples["multi_turn"], examples["one_image"]]
    model = load(tiny, "flash_attention_2").to("cuda", torch.bfloat16)

    def on_gpu(batch: dict) -> dict:
        return {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}

    packed = on_gpu(PackingCollator(0)(samples))
    padded = on_gpu(TrainCollator(processor.tokenizer.pad_token_id)(samples))
    packed_loss, _ = loss_and_grads(model, [packed])
    padded_loss, _ = loss_and_grads(model, [padded])
    assert packed_loss == pytest.approx(padded_loss, rel=2e-2)
