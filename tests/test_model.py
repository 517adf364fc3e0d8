"""The native model beyond parity: save/load, official key names, batching, text-only input,
images in a later turn, Auto classes on an official directory, attention implementations,
gradient checkpointing and the padded-crop skip (issue 8 item 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
)

import phi3v_train  # noqa: F401  (registers phi3_v with the Auto classes)
from phi3v_train.model.configuration_phi3_v import Phi3VConfig
from phi3v_train.model.image_processing_phi3_v import Phi3VImageProcessor
from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM, image_placeholder_mask
from phi3v_train.model.processing_phi3_v import Phi3VProcessor
from phi3v_train.model.tiny import make_tiny

PROMPT = "<|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    return model, processor


def picture(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_save_load_round_trip_without_duplicates(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert config["architectures"] == ["Phi3VForCausalLM"]
    assert config["rope_scaling"]["type"] == "longrope"  # what vLLM's native Phi-3-V reads
    assert len(config["rope_scaling"]["long_factor"]) == 8
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert keys == set(model.state_dict())
    assert "model.vision_embed_tokens.wte.weight" not in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert any(
        key.startswith("model.vision_embed_tokens.img_processor.vision_model.") for key in keys
    )

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    batch = processor(PROMPT.format(question="What?"), images=[picture(400, 300, 0)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_checkpoint_with_wte_alias_and_position_ids_loads(tiny, tiny_dir: Path, tmp_path):
    """Official checkpoints may store the embedding alias and CLIP's position_ids buffer."""
    model, _ = tiny
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    state = {key: value.clone().contiguous() for key, value in model.state_dict().items()}
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"].clone()
    prefix = "model.vision_embed_tokens.img_processor.vision_model.embeddings."
    state[prefix + "position_ids"] = torch.arange(577)[None]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["error_msgs"]
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_reference_checkpoint_keys_are_ours(reference_dir: Path) -> None:
    with safe_open(reference_dir / "tiny_model" / "model.safetensors", "pt") as handle:
        official = set(handle.keys())
    config = json.loads((reference_dir / "tiny_model" / "config.json").read_text())
    config["img_processor"]["vision_config"] = json.loads(
        (reference_dir / "tiny_model" / "clip_vision_config.json").read_text()
    )
    model = Phi3VForCausalLM(Phi3VConfig.from_dict(config))
    assert set(model.state_dict()) == official


def shrunk_official_dir(reference_dir: Path, out: Path) -> Path:
    """Official config + tokenizer files, the config shrunk (48 RoPE factors kept: head_dim 96),
    with random tiny weights written under the official key names (wte alias included)."""
    for path in (reference_dir / "official").iterdir():
        shutil.copy(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    config.update(
        hidden_size=192,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
    )
    config["img_processor"].update(
        image_dim_out=32,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = Phi3VForCausalLM(Phi3VConfig.from_dict(config))
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_auto_classes_on_an_official_directory(reference_dir: Path, tmp_path: Path) -> None:
    directory = shrunk_official_dir(reference_dir, tmp_path)
    config = AutoConfig.from_pretrained(directory)
    assert isinstance(config, Phi3VConfig)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.vision_config.hidden_size == 32
    assert config.pad_token_id == 32000
    assert isinstance(AutoImageProcessor.from_pretrained(directory), Phi3VImageProcessor)
    processor = AutoProcessor.from_pretrained(directory, num_crops=16)
    assert isinstance(processor, Phi3VProcessor)
    assert processor.image_processor.num_crops == 16
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert isinstance(model, Phi3VForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.embed_tokens.padding_idx == 32000
    batch = processor(PROMPT.format(question="What is it?"), images=[picture(500, 700, 1)])
    assert batch["pixel_values"].shape[1] == 17
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"].clamp(min=0))
    assert out.logits.shape == (1, batch["input_ids"].shape[1], 32064)
    assert torch.isfinite(out.loss)
    # Defaults of the official file: bf16 weights (dtype "auto") and no flash-attn needed on CPU.
    assert AutoModelForCausalLM.from_pretrained(directory).dtype == torch.bfloat16


def test_batch_of_two_different_grids_matches_single_runs(tiny) -> None:
    model, processor = tiny
    images = [picture(640, 300, 1), picture(200, 700, 2)]
    prompts = [PROMPT.format(question="Wide?"), PROMPT.format(question="Tall and thin?")]
    batch = processor(prompts, images=images, num_crops=4)
    assert batch["image_sizes"].tolist() == [[336, 672], [1008, 336]]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            single = processor(prompt, images=[image], num_crops=4)
            alone = model(**single).logits[0]
            assert (logits[row, : alone.shape[0]] - alone).abs().max().item() <= 1e-5


def test_text_only_input_never_touches_clip(tiny, monkeypatch) -> None:
    model, processor = tiny
    batch = processor("<|user|>\nJust text<|end|>\n<|assistant|>\n")
    assert "pixel_values" not in batch
    with torch.no_grad():
        plain = model(**batch).logits

    def fail(*args, **kwargs):
        raise AssertionError("CLIP ran on a text-only input")

    monkeypatch.setattr(model.model.vision_embed_tokens.img_processor, "forward", fail)
    pixels = processor(PROMPT.format(question="x"), images=[picture(336, 336, 3)])
    with torch.no_grad():
        ignored = model(
            **batch, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"]
        ).logits
    assert torch.equal(plain, ignored)


def test_images_in_a_later_turn(tiny) -> None:
    model, processor = tiny
    prompt = (
        "<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
        "<|user|>\n<|image_1|>\nWhat is in this picture?<|end|>\n<|assistant|>\n"
    )
    batch = processor(prompt, images=[picture(300, 300, 4)])
    ids = batch["input_ids"][0]
    positions = image_placeholder_mask(ids).nonzero().flatten()
    first = positions[0].item()
    assert first > 10 and positions[-1].item() - first + 1 == positions.numel() == 757
    assert ids[first + 757].item() == processor.tokenizer.bos_token_id  # BOS after the run
    with torch.no_grad():
        embeds = model.model.embed_inputs(
            batch["input_ids"], batch["pixel_values"], batch["image_sizes"]
        )
        image_embeds = model.model.vision_embed_tokens(batch["pixel_values"], batch["image_sizes"])
        text_embeds = model.model.embed_tokens(ids[:first])
    assert torch.equal(embeds[0, positions], image_embeds)
    assert torch.equal(embeds[0, :first], text_embeds)


def test_placeholder_count_mismatch_is_a_clear_error(tiny) -> None:
    model, processor = tiny
    batch = processor(PROMPT.format(question="x"), images=[picture(336, 336, 5)], num_crops=4)
    with pytest.raises(ValueError, match="image placeholders but the images give"):
        model(
            input_ids=batch["input_ids"][:, :-200],
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
        )
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])


def test_attention_implementations_agree_and_reach_clip(tiny_dir: Path, tiny) -> None:
    model, processor = tiny
    batch = processor(PROMPT.format(question="Same?"), images=[picture(500, 400, 6)])
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    clip_config = sdpa.model.vision_embed_tokens.img_processor.vision_model.config
    assert clip_config._attn_implementation == "sdpa"
    assert (
        model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation
        == "eager"
    )
    with torch.no_grad():
        difference = (sdpa(**batch).logits - model(**batch).logits).abs().max().item()
    assert difference <= 1e-5
    assert {"Phi3DecoderLayer", "CLIPEncoderLayer"} <= set(model._no_split_modules)
    assert model._supports_sdpa and model._supports_flash_attn


def test_gradient_checkpointing_non_reentrant_gives_the_same_gradients(tiny_dir: Path, tiny):
    _, processor = tiny
    batch = processor(PROMPT.format(question="Grad?"), images=[picture(336, 672, 7)])
    labels = batch["input_ids"].clamp(min=-100).masked_fill(batch["input_ids"] < 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.model.layers[0].gradient_checkpointing
            clip_layer = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[
                0
            ]
            assert clip_layer.gradient_checkpointing
        model(**batch, labels=labels).loss.backward()
        grads.append(
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_clip_runs_only_on_real_crops_with_identical_outputs(tiny) -> None:
    """Issue 8 item 2: 1 + rows*cols crops per image go through CLIP, not num_crops + 1."""
    model, processor = tiny
    images = [picture(640, 300, 8), picture(336, 336, 9), picture(300, 900, 10)]
    batch = processor(["<|image_1|><|image_2|><|image_3|>"], images=images, num_crops=16)
    grids = [(h // 336, w // 336) for h, w in batch["image_sizes"].tolist()]
    vision = model.model.vision_embed_tokens
    seen: list[int] = []
    hook = vision.img_processor.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    try:
        with torch.no_grad():
            vision.skip_padding_crops = True
            skipped = vision(batch["pixel_values"], batch["image_sizes"])
            vision.skip_padding_crops = False
            everything = vision(batch["pixel_values"], batch["image_sizes"])
    finally:
        vision.skip_padding_crops = True
        hook.remove()
    assert seen == [sum(1 + rows * cols for rows, cols in grids), 3 * 17]
    assert seen[0] < seen[1]
    assert (skipped - everything).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"return_tensors": "np"}, "PyTorch tensors only"),
        ({"padding": "max_length"}, "padding must be"),
        ({"padding_side": "middle"}, "padding_side must be"),
        ({"text": None}, "needs text"),
        ({"images": []}, "1 image tags but 0 images"),
    ],
)
def test_processor_rejects_what_it_cannot_do(tiny, kwargs, message) -> None:
    _, processor = tiny
    call = {"text": PROMPT.format(question="x"), "images": [picture(336, 336, 11)], **kwargs}
    with pytest.raises(ValueError, match=message):
        processor(**call)
