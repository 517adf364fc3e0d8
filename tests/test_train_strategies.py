"""Every strategy trains in-process on the toy colour task: the loss falls, exactly the intended
parts change, and the outputs have the promised layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import base_args, run_cli, tiny_model, train_in_process, write_dataset

from phi3v_train.training.config import TrainConfig
from phi3v_train.training.strategies import (
    CLIP_LORA_TARGETS,
    lora_target_modules,
    quantization_config,
)

CLIP_WEIGHT = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"
PROJECTOR_WEIGHT = "model.vision_embed_tokens.img_projection.0.weight"
SEPARATOR = "model.vision_embed_tokens.glb_GN"
EMBEDDINGS = "model.embed_tokens.weight"
DECODER_WEIGHT = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("toy"), train=4, text_only_every=4)


def _train(model_dir: Path, data: Path, out: Path, **overrides: object) -> list[float]:
    losses = train_in_process(model_dir, data, out, **overrides)
    assert len(losses) == overrides.get("max_steps", 6)
    return losses


def _assert_learns(losses: list[float]) -> None:
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.3, losses


def _changed(before: dict, after: dict, key: str) -> bool:
    return not torch.equal(before[key], after[key])


@pytest.mark.parametrize(
    ("overrides", "trains", "frozen"),
    [
        pytest.param(
            {"gradient_checkpointing": True, "report_to": "tensorboard"},
            [CLIP_WEIGHT, PROJECTOR_WEIGHT, SEPARATOR, EMBEDDINGS, DECODER_WEIGHT],
            [],
            id="full",
        ),
        pytest.param(
            {"freeze_vision_model": True},
            [PROJECTOR_WEIGHT, SEPARATOR, EMBEDDINGS, DECODER_WEIGHT],
            [CLIP_WEIGHT],
            id="frozen_vision",
        ),
        pytest.param(
            {"freeze_vision_model": True, "freeze_text_embeddings_with_vision": True},
            [DECODER_WEIGHT],
            [CLIP_WEIGHT, PROJECTOR_WEIGHT, SEPARATOR, EMBEDDINGS],
            id="original_frozen_vision",
        ),
        pytest.param(
            {"freeze": ["llm", "projector"], "vision_lr": 3e-2},
            [CLIP_WEIGHT],
            [PROJECTOR_WEIGHT, SEPARATOR, EMBEDDINGS, DECODER_WEIGHT],
            id="vision_only_own_lr",
        ),
    ],
)
def test_full_finetuning_strategies(
    overrides: dict,
    trains: list[str],
    frozen: list[str],
    tiny_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    losses = _train(tiny_model_dir, data_dir, out, **overrides)
    if "freeze" not in overrides:  # the vision-only run is about what moves, not the loss
        _assert_learns(losses)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()  # official key names, nothing added or lost
    for key in trains:
        assert _changed(before, after, key), f"{key} should train"
    for key in frozen:
        assert not _changed(before, after, key), f"{key} should stay frozen"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    if overrides.get("report_to") == "tensorboard":
        assert list((out / "logs").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert TrainConfig.model_validate(resolved).max_steps == 6


@pytest.mark.parametrize(
    ("overrides", "clip_targets"),
    [
        pytest.param({"use_lora": True}, True, id="lora"),
        pytest.param(
            {"use_lora": True, "freeze_vision_model": True}, False, id="lora_frozen_vision"
        ),
        pytest.param({"use_dora": True}, True, id="dora"),
    ],
)
def test_adapter_strategies(
    overrides: dict, clip_targets: bool, tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    losses = _train(tiny_model_dir, data_dir, out, lora_rank=8, learning_rate=2e-2, **overrides)
    _assert_learns(losses)
    adapter = json.loads((out / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert adapter["init_lora_weights"] == "gaussian"
    assert adapter["use_dora"] == bool(overrides.get("use_dora"))
    assert any(t.endswith("qkv_proj") for t in targets) and "lm_head" in targets
    # frozen vision drops the CLIP adapters only: the projector keeps its own (--freeze projector)
    assert any(t.endswith("img_projection.2") for t in targets)
    # PEFT may store the shortest suffixes that select the same modules
    assert bool({t.rsplit(".", 1)[-1] for t in targets} & set(CLIP_LORA_TARGETS)) == clip_targets
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("lora" in key for key in weights)  # no base weights in the adapter
    assert not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()


def test_qlora_trains_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=2, text_only_every=2)
    out = tmp_path / "out"
    losses = _train(
        tiny_model_dir,
        data,
        out,
        use_qlora=True,
        lora_rank=8,
        learning_rate=2e-2,
        max_steps=4,
    )
    _assert_learns(losses)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" in adapter["target_modules"]
    assert (out / "adapter_model.safetensors").is_file()


def test_lora_targets_skip_the_clip_layers_that_never_run(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    targets = lora_target_modules(model, TrainConfig(use_lora=True))
    tower = model.model.vision_embed_tokens.img_processor
    last = len(tower.vision_model.encoder.layers) - 1
    assert tower.num_layers_used == last  # the penultimate layer's output is the feature
    assert any(f"encoder.layers.{last - 1}.self_attn.q_proj" in t for t in targets)
    assert not any(f"encoder.layers.{last}." in t for t in targets)
    assert "model.vision_embed_tokens.img_projection.0" in targets
    assert sum(t.endswith("qkv_proj") for t in targets) == model.config.num_hidden_layers


def test_qlora_keeps_layers_narrower_than_a_block_unquantized(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = TrainConfig(model_name_or_path=str(tiny_model_dir), use_qlora=True, bf16=False)
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    quantization = quantization_config(config, torch.device("cpu"), model_config)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    clip_q = (
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.self_attn.q_proj"
    )
    assert kinds[clip_q] == "Linear"  # 32 wide: below the 64-weight nf4 block
    assert kinds["model.layers.0.self_attn.qkv_proj"] == "Linear4bit"  # 64 wide: quantized
    assert kinds["lm_head"] == "Linear"


def test_qlora_trains_and_evaluates_the_tiny_preset(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The user path that crashed: --use_qlora on make-tiny, with evaluation before and after."""
    data = write_dataset(tmp_path / "data", train=2, val=2, text_only_every=2)
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, data, out, use_qlora=True, lora_rank=8, max_steps=1)
    args = [a for a in args if a not in ("--skip_eval_before", "--skip_eval_after")]
    result = run_cli([*args, "--eval_max_samples", "2", "--max_new_tokens", "4"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "FutureWarning" not in result.stderr
    for name in ("eval_before.json", "eval_after.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
