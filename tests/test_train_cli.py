"""phi3v-train's command line: every flag documented, YAML precedence, and clear refusals (exit 2,
one line naming the problem, no traceback) before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_helpers import run_cli, write_dataset

from phi3v_train.cli import group
from phi3v_train.training.config import TrainConfig

MISSING_MODEL = "/nonexistent/model"  # reaching the model loader would fail differently


def _invoke(args: list[str]):
    return CliRunner().invoke(group, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train=4)


def test_help_documents_every_flag() -> None:
    result = run_cli(["train", "--help"])
    assert result.returncode == 0, result.stderr
    for name in TrainConfig.model_fields:
        assert f"--{name}" in result.stdout, name
    for flag in ("--config", "--no-tqdm", "--no-use_lora", "--resume"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--use_qlora", "--no-use_lora"], "use_qlora: QLoRA trains LoRA adapters"),
        (["--use_flash_attention"], "use_flash_attention: flash attention does not run in fp16"),
        (["--attn", "flash_attention_2"], "flash attention does not run in fp16"),
        (["--deepspeed", "zero2", "--use_qlora"], "deepspeed: DeepSpeed ZeRO cannot shard"),
        (["--deepspeed", "nofile.json"], "is neither zero2, zero3 nor an existing file"),
        (["--num_crops", "17"], "num_crops: must be between 1 and 16"),
        (["--freeze", "vision", "--freeze", "projector", "--freeze", "llm"], "nothing would train"),
        (["--freeze_text_embeddings_with_vision"], "only meaningful with --freeze_vision_model"),
        (["--batch_size", "3", "--batch_size_per_gpu", "2"], "batch_size: 3 is not divisible"),
        (["--resume", "/nonexistent/ckpt"], "--resume: not a complete checkpoint"),
        (["--train_split", "nope"], "--train_split: no split 'nope'"),
        (["--overwrite", "--resume"], "overwrite: --overwrite starts afresh"),
        (["--learning_rate", "inf"], "learning_rate: Input should be a finite number"),
        (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    ],
)
def test_impossible_combinations_are_refused(
    extra: list[str], message: str, data_dir: Path, tmp_path: Path
) -> None:
    args = ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out")]
    result = _invoke([*args, "--model_name_or_path", MISSING_MODEL, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_qlora_alone_turns_lora_on() -> None:
    config = TrainConfig(use_qlora=True)
    assert config.lora and config.use_lora is None
    assert "use_lora: true" in config.to_yaml()


def test_missing_data_dir_real_process(tmp_path: Path) -> None:
    result = run_cli(["--data_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 2
    assert f"{tmp_path / 'absent'}: --data_dir: no such directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_data_dir_at_all() -> None:
    result = _invoke(["--output_dir", "x"])
    assert result.exit_code == 2
    assert "--data_dir: missing" in result.output


def test_invalid_dataset_prints_the_report_before_any_model(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=3)
    train_file = data / "toy_train.jsonl"
    lines = train_file.read_text().splitlines()
    lines[1] = lines[1].replace('"assistant"', '"assitant"')
    train_file.write_text("\n".join(lines) + "\n")
    result = run_cli(
        ["--data_dir", str(data), "--output_dir", str(tmp_path / "o")]
        + ["--model_name_or_path", MISSING_MODEL]
    )
    assert result.returncode == 2
    assert f"{train_file}:2: " in result.stderr  # the validate report line
    assert "dataset is invalid (report above); nothing was trained" in result.stderr
    assert "Traceback" not in result.stderr
    assert MISSING_MODEL not in result.stderr  # the model was never looked at


def test_yaml_config_and_command_line_precedence(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 3\nbatch_size_per_gpu: 2\nnum_crops: 1\n")
    base = ["--config", str(config), "--data_dir", str(data_dir), "--output_dir", str(tmp_path)]
    base += ["--model_name_or_path", MISSING_MODEL]
    from_yaml = _invoke(base)
    assert from_yaml.exit_code == 2 and "batch_size: 3 is not divisible" in from_yaml.output
    overridden = _invoke([*base, "--batch_size", "4"])
    assert "not divisible" not in overridden.output
    assert f"{MISSING_MODEL}: --model_name_or_path" in overridden.output  # got past the checks
    assert overridden.exit_code == 2


def test_yaml_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 4\nlearning_rat: 1.0e-4\n")
    result = _invoke(["--config", str(config), "--data_dir", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{config}: learning_rat: unknown option" in result.output


def test_yaml_bad_value_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"lora_rank": "big"}))
    result = _invoke(["--config", str(config), "--data_dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "lora_rank: Input should be a valid integer" in result.output


def test_every_shipped_recipe_loads(tmp_path: Path) -> None:
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        result = _invoke(["--config", str(recipe), "--output_dir", str(tmp_path)])
        assert "--data_dir: missing" in result.output, recipe  # parsed and validated fine
