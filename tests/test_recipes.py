"""recipes/*.yaml: every file parses into TrainConfig and carries the original's published values."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3v_train.config import TrainConfig, load_yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DATASETS = ("docvqa", "hateful_memes", "nlvr2", "ucf101")
MODES = ("full", "frozen-vision", "lora", "qlora")

#: (dataset, mode) -> (learning rate, epochs, LoRA alpha or None): original_recipe.md §2-§4 tables.
PUBLISHED = {
    ("docvqa", "full"): (5e-6, 2, None),
    ("docvqa", "frozen-vision"): (1e-4, 2, None),
    ("docvqa", "lora"): (2e-4, 2, 16),
    ("docvqa", "qlora"): (2e-4, 2, 16),
    ("hateful_memes", "full"): (5e-5, 2, None),
    ("hateful_memes", "frozen-vision"): (1e-4, 3, None),
    ("hateful_memes", "lora"): (2e-4, 2, 256),
    ("hateful_memes", "qlora"): (2e-4, 2, 256),
    ("nlvr2", "full"): (1e-5, 3, None),
    ("nlvr2", "frozen-vision"): (2e-5, 2, None),
}


def recipe_path(dataset: str, mode: str) -> Path:
    return RECIPES / f"{dataset}-{mode}.yaml"


def test_one_recipe_per_dataset_and_mode() -> None:
    expected = {recipe_path(d, m).name for d in DATASETS for m in MODES}
    assert {path.name for path in RECIPES.glob("*.yaml")} == expected


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("mode", MODES)
def test_recipe_parses_into_train_config(dataset: str, mode: str) -> None:
    path = recipe_path(dataset, mode)
    config = TrainConfig.model_validate(load_yaml(path))
    assert config.batch_size == 64
    assert config.bf16 and config.use_flash_attention
    assert config.num_crops == (4 if dataset == "ucf101" else 16)
    assert config.lora == (mode in ("lora", "qlora"))
    assert config.use_qlora == (mode == "qlora")
    assert ("vision" in config.frozen_parts) == (mode == "frozen-vision")
    text = path.read_text(encoding="utf-8")
    # every recipe states its published score, or says that none was published
    assert "# Published score: " in text
    if (dataset, mode) in PUBLISHED:
        learning_rate, epochs, alpha = PUBLISHED[dataset, mode]
        assert config.learning_rate == pytest.approx(learning_rate)
        assert config.num_train_epochs == epochs
        if alpha is not None:
            assert config.lora_alpha == alpha
        assert "# Published score: none" not in text
    else:
        assert "# Published score: none." in text
