"""CUDA-only trainer checks (skipped without a GPU): bf16, fp16 with GradScaler, SDPA and
flash attention, QLoRA in bf16, DeepSpeed ZeRO-2 and ZeRO-3 (one process per visible GPU)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import base_args, run_cli, tiny_model, train_in_process, write_dataset

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("toy"), train=4, multi_turn_every=3)


def _run(model_dir: Path, data: Path, out: Path, **overrides: object) -> list[float]:
    options: dict = dict(
        max_steps=8,
        num_workers=2,
        report_to="tensorboard",
        skip_eval_after=False,
        gradient_checkpointing=True,
        eval_max_samples=2,
        max_new_tokens=4,
    )
    options.update(overrides)
    losses = train_in_process(model_dir, data, out, **options)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert (out / "eval_after.json").is_file()
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"bf16": True, "attn": "sdpa"}, id="bf16_sdpa"),
        pytest.param({"attn": "sdpa"}, id="fp16_gradscaler_sdpa"),
        pytest.param({"bf16": True, "attn": "eager"}, id="bf16_eager"),
        pytest.param({"bf16": True, "use_lora": True, "learning_rate": 2e-2}, id="bf16_lora"),
        pytest.param(
            {"bf16": True, "use_qlora": True, "learning_rate": 2e-2}, id="bf16_qlora_cuda"
        ),
    ],
)
def test_precisions_and_strategies_on_cuda(
    overrides: dict, tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    _run(tiny_model_dir, data_dir, tmp_path / "out", **overrides)
    assert any((tmp_path / "out" / "logs").iterdir())  # TensorBoard events


def test_use_flash_attention_picks_flash_or_sdpa(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _run(tiny_model_dir, data_dir, tmp_path / "out", bf16=True, use_flash_attention=True)
    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert f"attention: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_cuda(
    stage: str, tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    gpus = torch.cuda.device_count()
    out = tmp_path / "out"
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone"]
    launcher += [f"--nproc_per_node={gpus}", "-m", "phi3v_train"]
    args = base_args(
        tiny_model_dir, data_dir, out, batch_size=2 * gpus, batch_size_per_gpu=2, bf16=True
    )
    result = run_cli([*args, "--deepspeed", stage, "--max_steps", "6"], launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
