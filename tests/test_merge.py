"""``phi3v-train merge``: logits parity with base + adapter, the official key layout, atomicity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from phi3v_train.merge import (
    SHARED_EMBEDDING_ALIAS,
    checkpoint_shapes,
    merge_adapter,
    merge_command,
)
from phi3v_train.model.tiny import make_tiny
from phi3v_train.training.config import TrainConfig
from phi3v_train.training.strategies import apply_lora

PHI3V_TRAIN = str(Path(sys.executable).parent / "phi3v-train")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("base") / "tiny", seed=0)


def write_adapter(base: Path, out: Path, *, dora: bool = False, seed: int = 0) -> Path:
    """A LoRA/DoRA adapter over every recipe target, with non-zero B matrices (and magnitudes)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = apply_lora(model, TrainConfig(use_lora=True, use_dora=dora, lora_rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.rand(parameter.shape, generator=generator))
    peft_model.save_pretrained(out)
    return out


def sample_inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """One prompt with one image, through the model's own processor."""
    processor = AutoProcessor.from_pretrained(model_dir, num_crops=1)
    prompt = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    batch = processor(prompt, images=[image], return_tensors="pt")
    return {
        key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    }


@torch.no_grad()
def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits


def adapter_logits(base: Path, adapter: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return logits_of(PeftModel.from_pretrained(model, adapter), inputs)


def merged_logits(merged: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits_of(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), inputs)


def test_merge_command_lora_parity_and_layout(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(base_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    run = subprocess.run(
        [PHI3V_TRAIN, "merge", "--model_name_or_path", str(base_dir), "--adapter", str(adapter)]
        + ["--output_dir", str(merged)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert f"wrote {merged}" in run.stdout
    assert "note:" not in run.stderr  # no deprecated spelling used

    inputs = sample_inputs(merged)  # the merged directory carries a working processor
    expected = adapter_logits(base_dir, adapter, inputs)
    base = logits_of(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), inputs)
    assert (expected - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(merged_logits(merged, inputs), expected, atol=1e-4, rtol=1e-4)

    # standalone checkpoint: same tensors (names, shapes, dtype) as the base, nothing of PEFT
    assert checkpoint_shapes(merged) == checkpoint_shapes(base_dir)
    assert SHARED_EMBEDDING_ALIAS not in checkpoint_shapes(merged)
    weights = load_file(merged / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert config["architectures"] == ["Phi3VForCausalLM"]
    assert "peft" not in json.dumps(config).lower()
    generation = json.loads((merged / "generation_config.json").read_text())
    processor = AutoProcessor.from_pretrained(merged)
    stop_ids = processor.tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == stop_ids
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (merged / name).is_file(), name
    assert not (merged / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temp dir


def official_like_copy(base_dir: Path, reference_dir: Path, out: Path) -> Path:
    """The tiny base dressed like an official download: remote-code files and auto_map entries."""
    shutil.copytree(base_dir, out)
    (out / "modeling_phi3_v.py").write_text("# the official remote code would be here\n")
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        data = json.loads((out / name).read_text())
        official = json.loads((reference_dir / "official" / name).read_text())
        data["auto_map"] = official["auto_map"]
        (out / name).write_text(json.dumps(data))
    return out


def test_merge_dora_parity_bfloat16_and_remote_code(
    base_dir: Path, reference_dir: Path, tmp_path: Path
) -> None:
    base_dir = official_like_copy(base_dir, reference_dir, tmp_path / "official_like")
    adapter = write_adapter(base_dir, tmp_path / "dora", dora=True, seed=1)
    merged = merge_adapter(base_dir, adapter, tmp_path / "merged")
    # what trust_remote_code loaders (vLLM) need is carried over from the official-like base
    assert (merged / "modeling_phi3_v.py").is_file()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        official = json.loads((reference_dir / "official" / name).read_text())
        assert json.loads((merged / name).read_text())["auto_map"] == official["auto_map"]
    inputs = sample_inputs(base_dir)
    torch.testing.assert_close(
        merged_logits(merged, inputs),
        adapter_logits(base_dir, adapter, inputs),
        atol=1e-4,
        rtol=1e-4,
    )
    half = merge_adapter(base_dir, adapter, tmp_path / "merged_bf16", dtype="bfloat16")
    weights = load_file(half / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"


def test_merged_keys_equal_the_official_checkpoint(
    base_dir: Path, reference_dir: Path, tmp_path: Path
) -> None:
    """Base = the official implementation's tiny weights; merged key set and shapes must match."""
    from phi3v_train.model.configuration_phi3_v import Phi3VConfig
    from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM

    tiny_reference = reference_dir / "tiny_model"
    config = json.loads((tiny_reference / "config.json").read_text())
    config["img_processor"]["vision_config"] = json.loads(
        (tiny_reference / "clip_vision_config.json").read_text()
    )
    model = Phi3VForCausalLM(Phi3VConfig(**config))
    official = load_file(tiny_reference / "model.safetensors")
    missing, unexpected = model.load_state_dict(official, strict=False)
    assert not unexpected and not [key for key in missing if "position_ids" not in key]
    reference_base = tmp_path / "reference_base"
    model.save_pretrained(reference_base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, reference_base / name)
    for name in ("preprocessor_config.json", "processor_config.json"):
        shutil.copy(base_dir / name, reference_base / name)

    adapter = write_adapter(reference_base, tmp_path / "adapter")
    merged = merge_adapter(reference_base, adapter, tmp_path / "merged")
    shapes = checkpoint_shapes(merged)
    assert shapes == {key: tuple(tensor.shape) for key, tensor in official.items()}
    assert SHARED_EMBEDDING_ALIAS not in shapes
    # the merge changed the adapted weights and nothing else
    merged_weights = load_file(merged / "model.safetensors")
    changed = {key for key in official if not torch.equal(official[key], merged_weights[key])}
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed
    assert "lm_head.weight" in changed
    assert "model.vision_embed_tokens.img_projection.0.weight" in changed
    assert "model.embed_tokens.weight" not in changed
    assert all(key.endswith(".weight") for key in changed)
    # config.json names the model as the official one does
    official_config = json.loads((reference_dir / "official" / "config.json").read_text())
    written = json.loads((merged / "config.json").read_text())
    assert written["model_type"] == official_config["model_type"]
    assert written["architectures"] == official_config["architectures"]


def test_merge_errors_leave_out_untouched(base_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    out = tmp_path / "merged"
    base = ["--model_name_or_path", str(base_dir), "--output_dir", str(out)]
    result = runner.invoke(merge_command, [*base, "--adapter", str(not_adapter)])
    assert result.exit_code != 0
    assert f"{not_adapter}: adapter_config.json not found" in result.output
    assert not out.exists()

    # an adapter of another base model (MLP width 96 instead of 128) fails cleanly
    from phi3v_train.model.configuration_phi3_v import Phi3VConfig
    from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM

    config = Phi3VConfig.from_pretrained(base_dir)
    config.intermediate_size = 96
    other_base = tmp_path / "other_base"
    Phi3VForCausalLM(config).save_pretrained(other_base)
    wrong = write_adapter(other_base, tmp_path / "wrong")
    result = runner.invoke(merge_command, [*base, "--adapter", str(wrong)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert f"{wrong}: --adapter: does not fit the model: " in result.output  # loading's words
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_adapter", "other_base", "wrong"]

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    good = write_adapter(base_dir, tmp_path / "good")
    result = runner.invoke(merge_command, [*base, "--adapter", str(good)])
    assert result.exit_code != 0
    assert "already exists (pass --overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(merge_command, [*base, "--adapter", str(good), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()

    # the old spellings still work, each with a one-line note, and errors use the typed name
    old = ["--model", str(base_dir), "--out", str(out), "--adapter", str(good)]
    result = runner.invoke(merge_command, old)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "note: --model is deprecated; use --model_name_or_path",
        "note: --out is deprecated; use --output_dir",
        "Error: " + f"{out}: already exists (pass --overwrite to replace it)",
    ]
    result = runner.invoke(merge_command, [*old, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    blocked = tmp_path / "file"
    blocked.write_text("x")
    result = runner.invoke(merge_command, [*old[:2], "--out", str(blocked), *old[4:]])
    assert result.exit_code == 2 and "Invalid value for '--out'" in result.stderr
    result = runner.invoke(merge_command, ["--adapter", str(good)])
    assert result.exit_code == 2 and "--output_dir: missing" in result.output


def test_pickle_only_base_is_refused_in_the_same_words_by_train_eval_and_merge(
    base_dir: Path, tmp_path: Path
) -> None:
    """All three commands check the model through phi3v_train.loading: one identical line."""
    from test_evaluate import ucf_like

    folder = tmp_path / "pickle_only"
    folder.mkdir()
    for path in base_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    data = ucf_like(tmp_path / "data")
    train = (data / "ucf_val.jsonl").read_text().replace('"val-', '"train-')
    (data / "ucf_train.jsonl").write_text(train.replace('"val/', '"train/'))  # no id or leak
    shutil.copytree(data / "images" / "val", data / "images" / "train")
    (tmp_path / "adapter").mkdir()
    model = ["--model_name_or_path", str(folder)]
    commands = {
        "train": [*model, "--data_dir", str(data), "--output_dir", str(tmp_path / "t")],
        "eval": ["eval", *model, "--data_dir", str(data), "--split", "val"]
        + ["--output_dir", str(tmp_path / "e")],
        "merge": ["merge", *model, "--adapter", str(tmp_path / "adapter")]
        + ["--output_dir", str(tmp_path / "m")],
    }
    started = {
        name: subprocess.Popen(
            [PHI3V_TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in commands.items()
    }
    lines = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode != 0 and "Traceback" not in stderr, (name, stderr)
        lines[name] = [line for line in (stdout + stderr).splitlines() if line.startswith("Error")]
    expected = (
        f"Error: {folder}: holds only pickle weights (pytorch_model.bin); only *.safetensors are "
        "loaded (a pickle can run code): convert it to safetensors first (--model_name_or_path)"
    )
    assert lines == {name: [expected] for name in commands}
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()
    assert not any((tmp_path / "e").iterdir())  # eval proved it writable, wrote nothing
