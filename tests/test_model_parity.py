"""Parity of the native model with the official implementation: every model case (A-F) of
../shared/reference/phi35v with both weight sets (std 0.02 and 0.1), at the README's tolerances."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from phi3v_train.model.configuration_phi3_v import Phi3VConfig
from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM

WEIGHT_SETS = {
    "std0.02": ("model.safetensors", "model_cases"),
    "std0.1": ("model_std0.1.safetensors", "model_cases_std0.1"),
}


def reference_tiny_config(reference_dir: Path) -> Phi3VConfig:
    """The reference tiny config with its CLIP dims folded into img_processor.vision_config."""
    tiny = reference_dir / "tiny_model"
    config = json.loads((tiny / "config.json").read_text())
    config["img_processor"]["vision_config"] = json.loads(
        (tiny / "clip_vision_config.json").read_text()
    )
    return Phi3VConfig.from_dict(config)


def load_reference_model(reference_dir: Path, weights: str) -> Phi3VForCausalLM:
    model = Phi3VForCausalLM(reference_tiny_config(reference_dir)).eval()
    state = load_file(reference_dir / "tiny_model" / weights)
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def inputs(reference_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "model_cases.safetensors")


@pytest.fixture(scope="module", params=sorted(WEIGHT_SETS))
def case(request, reference_dir: Path):
    """(model, expected tensors, expected json) for one weight set."""
    weights, stem = WEIGHT_SETS[request.param]
    model = load_reference_model(reference_dir, weights)
    expected = load_file(reference_dir / f"{stem}.safetensors")
    meta = json.loads((reference_dir / f"{stem}.json").read_text())
    return model, expected, meta


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def image_kwargs(inputs: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {
        "input_ids": inputs[f"{name}.input_ids"],
        "attention_mask": inputs[f"{name}.attention_mask"],
        "pixel_values": inputs[f"{name}.pixel_values"],
        "image_sizes": inputs[f"{name}.image_sizes"],
    }


def test_rope_tables_short_and_long(reference_dir: Path, inputs) -> None:
    model = load_reference_model(reference_dir, "model.safetensors")
    rotary = model.model.rotary_emb
    assert math.isclose(rotary.attention_scaling, 1.1547005383792515, rel_tol=1e-7)
    x = torch.zeros(1, dtype=torch.float32)
    for name, length in (("A", 769), ("C", 40)):
        positions = torch.arange(length)[None]
        cos, sin = rotary(x, positions, kv_length=length)
        assert max_abs(cos[0], inputs[f"{name}.rope_cos"]) <= 1e-6
        assert max_abs(sin[0], inputs[f"{name}.rope_sin"]) <= 1e-6
    # The switch is on the key/value length, not on the positions: 512 short, 513 long.
    positions = torch.arange(40)[None]
    short, _ = rotary(x, positions, kv_length=512)
    long, _ = rotary(x, positions, kv_length=513)
    assert max_abs(short[0], inputs["C.rope_cos"]) <= 1e-6
    assert max_abs(long[0], inputs["A.rope_cos"][:40]) <= 1e-6
    assert max_abs(short, long) > 1e-3


def test_case_a_one_image_long_rope(case, inputs) -> None:
    model, expected, meta = case
    kwargs = image_kwargs(inputs, "A")
    with torch.no_grad():
        vision = model.model.vision_embed_tokens
        crops = kwargs["pixel_values"].flatten(0, 1)
        assert max_abs(vision.img_processor(crops), expected["A.clip_patch_features"]) <= 1e-5
        image_embeds = vision(kwargs["pixel_values"], kwargs["image_sizes"])
        assert max_abs(image_embeds, expected["A.image_embeds"]) <= 1e-5
        embeds = model.model.embed_inputs(
            kwargs["input_ids"], kwargs["pixel_values"], kwargs["image_sizes"]
        )
        assert max_abs(embeds, expected["A.inputs_embeds"]) <= 1e-5
        out = model(**kwargs, labels=inputs["A.labels"])
    logits = out.logits[0, inputs["A.logit_positions"]]
    assert max_abs(logits, expected["A.logits"][0]) <= 1e-4
    assert abs(out.loss.item() - meta["A"]["loss"]) <= 1e-5


def test_zero_padding_crops_are_skipped_with_identical_outputs(case, inputs) -> None:
    """Case A re-padded to num_crops 16 (12 extra zero crops): CLIP sees only the 5 real crops
    and the reference outputs still hold; running CLIP on every crop gives the same numbers."""
    model, expected, meta = case
    kwargs = image_kwargs(inputs, "A")
    real = kwargs["pixel_values"]
    kwargs["pixel_values"] = torch.cat([real, real.new_zeros(1, 12, *real.shape[2:])], dim=1)
    vision = model.model.vision_embed_tokens
    batch_sizes: list[int] = []
    hook = vision.img_processor.register_forward_hook(
        lambda module, args, output: batch_sizes.append(args[0].shape[0])
    )
    outputs = {}
    try:
        with torch.no_grad():
            for skip in (True, False):
                vision.skip_padding_crops = skip
                outputs[skip] = model(**kwargs, labels=inputs["A.labels"])
    finally:
        vision.skip_padding_crops = True
        hook.remove()
    assert batch_sizes == [5, 17]
    for out in outputs.values():
        logits = out.logits[0, inputs["A.logit_positions"]]
        assert max_abs(logits, expected["A.logits"][0]) <= 1e-4
        assert abs(out.loss.item() - meta["A"]["loss"]) <= 1e-5
    assert max_abs(outputs[True].logits, outputs[False].logits) <= 1e-6


def test_case_b_batch_of_two_right_padded(case, inputs) -> None:
    model, expected, meta = case
    kwargs = image_kwargs(inputs, "B")
    with torch.no_grad():
        out = model(**kwargs, labels=inputs["B.labels"])
        image_embeds = model.model.vision_embed_tokens(
            kwargs["pixel_values"], kwargs["image_sizes"]
        )
    rows, cols = inputs["B.logit_index"].unbind(-1)
    assert max_abs(out.logits[rows, cols], expected["B.logits"]) <= 1e-4
    assert abs(out.loss.item() - meta["B"]["loss"]) <= 1e-5
    assert max_abs(image_embeds, expected["B.image_embeds"]) <= 1e-5

    # Sample 0 alone (470 <= 512 tokens) runs on the short factors, unlike in the batch.
    length = meta["B"]["sample0_alone"]["seq_len"]
    with torch.no_grad():
        alone = model(
            input_ids=kwargs["input_ids"][:1, :length],
            pixel_values=kwargs["pixel_values"][:1],
            image_sizes=kwargs["image_sizes"][:1],
        )
    positions = inputs["B.sample0_alone_logit_positions"]
    assert max_abs(alone.logits[0, positions], expected["B.sample0_alone_logits"]) <= 1e-4


def test_case_b_pad_rows_primary_weights(reference_dir: Path, inputs) -> None:
    model = load_reference_model(reference_dir, "model.safetensors")
    with torch.no_grad():
        out = model(**image_kwargs(inputs, "B"))
    rows, cols = inputs["B.pad_logit_index"].unbind(-1)
    assert max_abs(out.logits[rows, cols], inputs["B.pad_logits"]) <= 1e-4


def test_case_c_text_only_ignores_pixel_values(case, inputs) -> None:
    model, expected, meta = case
    ids, labels = inputs["C.input_ids"], inputs["C.labels"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=inputs["C.attention_mask"], labels=labels)
        with_pixels = model(
            input_ids=ids,
            pixel_values=inputs["A.pixel_values"],
            image_sizes=inputs["A.image_sizes"],
        )
    assert max_abs(out.logits, expected["C.logits"]) <= 1e-4
    assert abs(out.loss.item() - meta["C"]["loss"]) <= 1e-5
    assert torch.equal(out.logits, with_pixels.logits)


def test_case_d_gradients(case, inputs) -> None:
    model, expected, meta = case
    model.zero_grad(set_to_none=True)
    out = model(**image_kwargs(inputs, "A"), labels=inputs["A.labels"])
    out.loss.backward()
    grads = dict(model.named_parameters())
    if "grad_l2_norms" in meta["D"]:
        assert set(meta["D"]["grad_l2_norms"]) == set(model.state_dict())
        for name, norm in meta["D"]["grad_l2_norms"].items():
            grad = grads[name].grad
            if norm is None:
                assert grad is None or not grad.any(), name
                continue
            ours = grad.double().norm().item()
            if norm < 1e-6:
                assert abs(ours - norm) <= 1e-8, name
            else:
                assert abs(ours - norm) <= 1e-4 * norm, (name, ours, norm)
    for key in expected:
        if key.startswith("D.grad."):
            name = key.removeprefix("D.grad.")
            grad = grads[name].grad
            scale = expected[key].abs().max().item()
            assert max_abs(grad, expected[key]) <= 1e-4 * max(scale, 1e-3), name
    assert grads["model.embed_tokens.weight"].grad[0].abs().max().item() == 0.0
    model.zero_grad(set_to_none=True)


def test_case_d2_padding_row_gets_no_gradient(case, inputs) -> None:
    model, expected, meta = case
    ids = inputs["D2.input_ids"]
    assert (ids[0, [10, 20, 30]] == model.config.pad_token_id).all()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert abs(out.loss.item() - meta["D2"]["loss"]) <= 1e-5
    grad = model.model.embed_tokens.weight.grad
    reference = expected["D2.grad.model.embed_tokens.weight"]
    assert max_abs(grad, reference) <= 1e-4 * reference.abs().max().item()
    assert grad[model.config.pad_token_id].abs().max().item() == 0.0
    assert model.lm_head.weight.grad[model.config.pad_token_id].norm().item() > 0
    model.zero_grad(set_to_none=True)


def test_case_e_rope_switch_boundary(case, inputs) -> None:
    model, expected, _ = case
    with torch.no_grad():
        for name in ("E512", "E513"):
            logits = model(input_ids=inputs[f"{name}.input_ids"]).logits[0]
            positions = inputs[f"{name}.logit_positions"]
            assert max_abs(logits[positions], expected[f"{name}.logits"]) <= 1e-4, name


@pytest.mark.parametrize("name", ["A", "F"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
def test_greedy_generation(case, inputs, name: str, use_cache: bool) -> None:
    """A: one image (images re-encoded every step without cache); F: the cached run crosses the
    LongRoPE boundary at step 6 and must re-encode the whole sequence to stay identical."""
    model, expected, _ = case
    kwargs = image_kwargs(inputs, "A") if name == "A" else {"input_ids": inputs["F.input_ids"]}
    greedy = GenerationConfig(
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,  # eos disabled: always 8 tokens
        pad_token_id=0,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    out = model.generate(**kwargs, generation_config=greedy)
    suffix = "use_cache" if use_cache else "no_cache"
    new_ids = out.sequences[:, kwargs["input_ids"].shape[1] :]
    assert new_ids.tolist() == expected[f"{name}.generated_ids_{suffix}"].tolist()
    scores = torch.cat(out.logits)
    assert max_abs(scores, expected[f"{name}.generation_scores_{suffix}"]) <= 1e-4
