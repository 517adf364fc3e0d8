"""The built-in tiny preset: deterministic files, the make-tiny CLI, a tokenizer that behaves like
the official one (special tokens, BOS, newline pieces, chat template) and a model that trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

import phi3v_train  # noqa: F401  (registers phi3_v with the Auto classes)
from phi3v_train.model.tiny import CHAT_TEMPLATE, make_tiny, official_added_tokens

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    return AutoProcessor.from_pretrained(tiny_dir)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    names = {path.name for path in tiny_dir.iterdir()}
    assert names >= EXPECTED_FILES
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert (tiny_dir / "model.safetensors").read_bytes() != (
        other / "model.safetensors"
    ).read_bytes()
    assert (tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phi3v_train", "make-tiny", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_make_tiny_cli_refuses_to_clobber(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    first = run_cli(str(target), "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert {path.name for path in target.iterdir()} >= EXPECTED_FILES
    before = (target / "model.safetensors").read_bytes()

    second = run_cli(str(target))
    assert second.returncode != 0
    assert "Traceback" not in second.stderr
    error_lines = [line for line in second.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and "not an empty directory" in error_lines[0]
    assert (target / "model.safetensors").read_bytes() == before  # nothing lost

    third = run_cli(str(target), "--seed", "4", "--overwrite")
    assert third.returncode == 0, third.stderr
    assert (target / "model.safetensors").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny.")]  # no staging left


def test_config_is_the_documented_tiny_architecture(tiny_dir: Path, processor) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (
        64,
        2,
        4,
    )
    assert config["original_max_position_embeddings"] == 4096
    assert config["pad_token_id"] == processor.tokenizer.pad_token_id
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= len(processor.tokenizer)
    vision = config["img_processor"]["vision_config"]
    assert vision["hidden_size"] == 32 and vision["num_hidden_layers"] == 3
    assert processor.image_processor.num_crops == 4


def test_tokenizer_has_the_official_special_tokens_and_template(processor) -> None:
    tokenizer = processor.tokenizer
    base = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for offset, (token, _) in enumerate(official_added_tokens()):
        assert tokenizer.convert_tokens_to_ids(token) == base + offset, token
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == 1
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_tokenizer_cuts_like_the_official_one(processor) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer("What is shown?").input_ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert tokenizer("What", add_special_tokens=False).input_ids[0] != 1
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("<|user|>\nHi\nthere").input_ids)
    assert pieces[:4] == ["<s>", "<|user|>", "▁", "<0x0A>"]  # "\n" after a special token
    assert "<0x0A>" in pieces[4:] and pieces[pieces.index("<0x0A>", 4) - 1] != "▁"
    assistant = tokenizer("<|assistant|>\n", add_special_tokens=False).input_ids
    assert assistant == [tokenizer.convert_tokens_to_ids("<|assistant|>")]  # rstrip eats "\n"
    assert tokenizer("a </s> b", add_special_tokens=False).input_ids.count(2) == 1
    text = "Ça coûte 12€ — 日本語 🙂"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_official_chat_template_is_reproduced(reference_dir: Path) -> None:
    official = json.loads((reference_dir / "official" / "tokenizer_config.json").read_text())
    assert official["chat_template"] == CHAT_TEMPLATE


def test_tiny_model_trains_on_cpu(tiny_dir: Path, processor) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    model.train()
    image = Image.new("RGB", (320, 240), (200, 30, 30))
    prompt = "<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\n"
    batch = processor(prompt, images=[image])
    answer = processor.tokenizer("red<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
    input_ids = torch.cat([batch["input_ids"], torch.tensor([answer])], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[0, -len(answer) :] = torch.tensor(answer)
    inputs = {
        "input_ids": input_ids,
        "pixel_values": batch["pixel_values"],
        "image_sizes": batch["image_sizes"],
        "labels": labels,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
