"""recipes/*.yaml: each parses into TrainConfig with the published values; two run on the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

# dataset builders shared with the evaluation tests (tests/ is on sys.path under pytest)
from test_evaluate import PHI3V_TRAIN, docvqa_like, ucf_like

from phi3v_train.evaluation.evaluate import eval_command
from phi3v_train.model.tiny import make_tiny
from phi3v_train.training.config import TrainConfig, load_yaml

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


# ------------------------------------------------------------------------------------------------
# recipes run a few steps on the tiny model (CPU overrides on the command line)
# ------------------------------------------------------------------------------------------------

#: The CPU overrides a user adds to any recipe (no bf16 / flash attention on a CPU).
CPU_OVERRIDES = ["--no-bf16", "--no-use_flash_attention", "--num_workers", "0", "--no-tqdm"]
QUICK = ["--max_steps", "2", "--batch_size", "2", "--num_crops", "1", "--report_to", "none"]


def add_train_split(data_dir: Path, name: str) -> None:
    """A train split from the val records, with their own ids and image files (no val leak)."""
    records = []
    for line in (data_dir / f"{name}_val.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["id"] = f"train-{record['id']}"
        for turn in record["conversations"]:
            turn["images"] = [f"train/{image}" for image in turn["images"]]
            for image in turn["images"]:
                (data_dir / "images" / image).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 30), (len(image) * 7 % 256, 90, 30)).save(
                    data_dir / "images" / image
                )
        records.append(json.dumps(record) + "\n")
    (data_dir / f"{name}_train.jsonl").write_text("".join(records))


#: recipe -> (dataset builder, dataset name, extra flags)
RUNS = {
    "docvqa-lora": (docvqa_like, "docvqa", ["--skip_eval_before", "--eval_max_samples", "2"]),
    "ucf101-frozen-vision": (ucf_like, "ucf", ["--skip_eval_before", "--skip_eval_after"]),
}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both recipes trained for 2 steps on the tiny model, as concurrent subprocesses."""
    root = tmp_path_factory.mktemp("recipe_runs")
    tiny = make_tiny(root / "tiny", seed=0)
    started = {}
    for recipe, (build, name, extra) in RUNS.items():
        data_dir = build(root / f"data-{recipe}")
        add_train_split(data_dir, name)
        out = root / f"out-{recipe}"
        command = [PHI3V_TRAIN, "--config", str(recipe_path(*recipe.split("-", 1)))]
        command += ["--data_dir", str(data_dir), "--model_name_or_path", str(tiny)]
        command += ["--output_dir", str(out), *CPU_OVERRIDES, *QUICK, *extra]
        command += ["--max_new_tokens", "2"]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started[recipe] = (process, out, data_dir)
    runs = {}
    for recipe, (process, out, data_dir) in started.items():
        output, _ = process.communicate(timeout=900)
        runs[recipe] = {"returncode": process.returncode, "output": output, "out": out}
        runs[recipe].update(data_dir=data_dir, tiny=tiny)
    return runs


@pytest.mark.parametrize("recipe", list(RUNS))
def test_recipe_runs_two_steps_on_the_tiny_model(recipe_runs: dict, recipe: str) -> None:
    run = recipe_runs[recipe]
    assert run["returncode"] == 0, run["output"][-3000:]
    out = run["out"]
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    published = TrainConfig.model_validate(load_yaml(recipe_path(*recipe.split("-", 1))))
    # the recipe's hyperparameters reached the run; the command line overrode the rest
    assert resolved["learning_rate"] == pytest.approx(published.learning_rate)
    assert resolved["lora_rank"] == published.lora_rank
    assert resolved["freeze_vision_model"] == published.freeze_vision_model
    assert (resolved["bf16"], resolved["use_flash_attention"]) == (False, False)
    assert (resolved["max_steps"], resolved["batch_size"], resolved["num_crops"]) == (2, 2, 1)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    if recipe == "docvqa-lora":
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 32
        assert "anls" in json.loads((out / "eval_after.json").read_text())["metrics"]
    else:
        assert (out / "model.safetensors").is_file()


def test_lora_recipe_output_evaluates_with_adapter(recipe_runs: dict, tmp_path: Path) -> None:
    """``phi3v-train eval --adapter OUT`` reproduces the trainer's own eval_after.json."""
    run = recipe_runs["docvqa-lora"]
    assert run["returncode"] == 0, run["output"][-3000:]
    out_json = tmp_path / "eval.json"
    arguments = ["--model", str(run["tiny"]), "--adapter", str(run["out"])]
    arguments += ["--data_dir", str(run["data_dir"]), "--split", "val", "--max_samples", "2"]
    arguments += ["--max_new_tokens", "2", "--num_crops", "1", "--out", str(out_json)]
    result = CliRunner().invoke(eval_command, arguments)
    assert result.exit_code == 0, result.output
    after = json.loads((run["out"] / "eval_after.json").read_text())
    mine = json.loads(out_json.read_text())
    assert [e["prediction"] for e in mine["examples"]] == [
        e["prediction"] for e in after["examples"]
    ]
    assert mine["metrics"] == pytest.approx(after["metrics"])


def test_merged_lora_recipe_output_scores_like_the_adapter(recipe_runs: dict, tmp_path: Path):
    """Train (recipe) -> merge -> evaluate the merged directory: the trainer's eval_after again."""
    from phi3v_train.evaluation.evaluate import evaluate_split, load_for_inference
    from phi3v_train.merge import merge_adapter

    run = recipe_runs["docvqa-lora"]
    assert run["returncode"] == 0, run["output"][-3000:]
    merged = merge_adapter(run["tiny"], run["out"], tmp_path / "merged")
    model, processor = load_for_inference(merged, num_crops=1)
    result = evaluate_split(
        model, processor, run["data_dir"], "val", max_samples=2, max_new_tokens=2
    )
    after = json.loads((run["out"] / "eval_after.json").read_text())
    assert [e.prediction for e in result.examples] == [e["prediction"] for e in after["examples"]]
    assert result.metrics == pytest.approx(after["metrics"])
