"""Model FLOP counting (phi3v_train.planning.flops) against hand-derived figures."""

from __future__ import annotations

import pytest

from phi3v_train.model.configuration_phi3_v import Phi3VConfig
from phi3v_train.planning.flops import ModelDims, SampleShape, Training, training_flops

FULL = Training("full", "full", "full", "full")
FROZEN_VISION = Training("frozen", "full", "full", "full")
LORA = Training("lora", "lora", "lora", "lora", lora_rank=64)
FROZEN_ALL_BUT_HEAD = Training("frozen", "frozen", "frozen", "full")

# The original's average DocVQA sample: 2443 tokens, one page with a 4x4 grid (17 real crops).
DOCVQA = SampleShape(seq_len=2443, crops=17, image_tokens=2409)


def test_full_finetuning_of_a_docvqa_sample_costs_about_76_tflop():
    flops = training_flops(ModelDims(), FULL, [DOCVQA])
    assert 73e12 < flops.total < 80e12
    assert flops.backward == pytest.approx(2 * flops.forward, rel=0.02)


def test_dims_of_the_official_config():
    dims = ModelDims.from_config(Phi3VConfig())
    assert dims == ModelDims()
    assert dims.vision_layers_used == 23  # penultimate layer of 24: the last one is never run
    assert dims.patches_per_crop == 576


def test_dims_follow_a_smaller_vision_tower():
    config = Phi3VConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3},
    )
    dims = ModelDims.from_config(config)
    assert (dims.hidden_size, dims.vision_hidden_size, dims.vision_layers_used) == (64, 32, 2)


def test_language_model_matmuls_are_six_n_per_token_when_everything_trains():
    dims = ModelDims()
    text_only = SampleShape(seq_len=1000, crops=0, image_tokens=0)
    flops = training_flops(dims, FULL, [text_only])
    h, ff, v = dims.hidden_size, dims.intermediate_size, dims.vocab_size
    per_layer = h * 3 * h + h * h + h * 2 * ff + ff * h
    matmul_params = dims.num_hidden_layers * per_layer + h * v
    attention = dims.num_hidden_layers * 3 * 2 * 1000 * 1001 * h  # causal: kept pairs only
    patch_embedding = 0  # no crops
    assert flops.total == pytest.approx(6 * matmul_params * 1000 + attention + patch_embedding)


def test_frozen_parts_cost_forward_only_before_and_input_gradients_after_the_trained_part():
    dims = ModelDims()
    full = training_flops(dims, FULL, [DOCVQA]).by_part
    frozen_vision = training_flops(dims, FROZEN_VISION, [DOCVQA]).by_part
    head_only = training_flops(dims, FROZEN_ALL_BUT_HEAD, [DOCVQA]).by_part
    # Frozen CLIP before every trained weight: forward only, a third of full training.
    assert frozen_vision["vision"] == pytest.approx(full["vision"] / 3)
    assert frozen_vision["language"] == full["language"]
    # Only the head trains: nothing before it needs gradients, so everything else is forward only.
    assert head_only["language"] == pytest.approx(full["language"] / 3)
    assert head_only["lm_head"] == full["lm_head"]


def test_lora_costs_input_gradients_plus_small_adapters():
    dims = ModelDims()
    full = training_flops(dims, FULL, [DOCVQA])
    lora = training_flops(dims, LORA, [DOCVQA])
    # Base weights frozen but inside the gradient path: 4N instead of 6N, plus the adapters.
    assert 2 / 3 < lora.total / full.total < 0.75
    rank_8 = training_flops(dims, Training("lora", "lora", "lora", "lora", lora_rank=8), [DOCVQA])
    assert rank_8.total < lora.total


def test_flops_add_up_over_samples():
    dims = ModelDims()
    small = SampleShape(seq_len=800, crops=5, image_tokens=757)
    one = training_flops(dims, FULL, [small]).total
    assert training_flops(dims, FULL, [small, small, small]).total == pytest.approx(3 * one)
