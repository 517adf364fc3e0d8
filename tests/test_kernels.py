"""``--liger_kernel`` and ``--compile`` (issue 14): the refusals, and that the patched or compiled
tiny model gives the loss and gradients of the eager one (CPU: compile in fp32 with LoRA and
non-reentrant gradient checkpointing; CUDA: Liger in fp32 / bf16, with LoRA, and compile)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import base_args, run_cli, tiny_model, write_dataset
from transformers import AutoModelForCausalLM, AutoProcessor

import phi3v_train  # noqa: F401  (registers phi3_v with the Auto classes)
from phi3v_train.training.config import TrainConfig
from phi3v_train.training.kernels import (
    LigerPhi3MLP,
    LigerPhi3RMSNorm,
    apply_kernels,
    check_kernels,
)
from phi3v_train.training.run_plan import PlanError
from phi3v_train.training.strategies import apply_lora

PROMPT = "<|user|>\n{image}What colour is it?<|end|>\n<|assistant|>\nred<|end|>"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


def _config(tmp_path: Path, **overrides: object) -> TrainConfig:
    return TrainConfig(data_dir=tmp_path, output_dir=tmp_path / "out", **overrides)


def _batch(tiny_dir: Path, *, image: bool) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(tiny_dir, num_crops=1)
    if image:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (300, 400, 3), generator=generator, dtype=torch.uint8)
        batch = processor(
            PROMPT.format(image="<|image_1|>\n"), images=[Image.fromarray(pixels.numpy())]
        )
    else:
        batch = processor(PROMPT.format(image=""))
    batch = dict(batch)
    batch["labels"] = batch["input_ids"].clamp(min=0)
    return batch


def _model(tiny_dir: Path, config: TrainConfig, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The tiny model as training sets it up: LoRA if asked, non-reentrant checkpointing."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa")
    model.to(device=device, dtype=dtype).train()
    if config.lora:
        torch.manual_seed(0)  # the same LoRA init in both models
        model = apply_lora(model, config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _step(model, batch, device: str, autocast: torch.dtype | None):
    """One forward/backward: the loss and the gradient of every trainable parameter."""
    batch = {key: value.to(device) for key, value in batch.items()}
    enabled = autocast is not None
    with torch.autocast(device_type=device, dtype=autocast or torch.bfloat16, enabled=enabled):
        loss = model(**batch).loss
    loss.backward()
    grads = {
        name: param.grad.float().clone()
        for name, param in model.named_parameters()
        if param.grad is not None
    }
    return loss.detach().float().item(), grads


def _assert_close(reference, candidate, *, loss_tol: float, grad_tol: float) -> None:
    (loss0, grads0), (loss1, grads1) = reference, candidate
    assert math.isfinite(loss1) and abs(loss1 - loss0) <= loss_tol, (loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads0.values()))
    assert total > 0
    for name, grad0 in grads0.items():
        error = float((grads1[name] - grad0).norm())
        scale = max(float(grad0.norm()), 1e-3 * total)
        assert error <= grad_tol * scale, (name, error, scale)


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------


def test_check_kernels_refuses_liger_without_cuda(tmp_path: Path) -> None:
    check_kernels(_config(tmp_path), torch.device("cpu"))  # no flag: nothing to check
    check_kernels(_config(tmp_path, compile=True), torch.device("cpu"))  # compile runs on CPU
    with pytest.raises(PlanError) as error:
        check_kernels(_config(tmp_path, liger_kernel=True), torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message and "--liger_kernel" in message and "CUDA" in message


def test_check_kernels_names_the_extra_when_liger_is_missing(tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "liger_kernel" else real(name, *args),
    )
    with pytest.raises(PlanError, match=r"pip install 'phi3v\[gpu\]'") as error:
        check_kernels(_config(tmp_path, liger_kernel=True), torch.device("cuda"))
    assert "\n" not in str(error.value)


def test_no_flag_changes_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert apply_kernels(model, _config(tmp_path)) == []
    assert not any(
        hasattr(module, "_compiled_call_impl") and module._compiled_call_impl
        for module in model.modules()
    )


def test_liger_flag_on_cpu_is_one_line_exit_2(tiny_dir: Path, tmp_path: Path) -> None:
    """Passes once train.py calls check_kernels before loading the model."""
    data = write_dataset(tmp_path / "data", train=2)
    args = base_args(tiny_dir, data, tmp_path / "out", max_steps=1, liger_kernel=True)
    result = run_cli(args, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--liger_kernel" in errors[0] and "CUDA" in errors[0], errors


class _ReferenceRMSNorm:
    """Liger's ``LigerRMSNormFunction.apply`` signature and "llama" semantics, in torch."""

    @staticmethod
    def apply(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
        assert offset == 0.0 and casting_mode == "llama"
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (weight + offset) * normed.to(x.dtype)


class _ReferenceSiLUMul:
    """``LigerSiLUMulFunction.apply(a, b)`` = silu(a) * b, in torch."""

    @staticmethod
    def apply(a, b, *multipliers):
        return torch.nn.functional.silu(a) * b


def test_liger_patch_wiring_on_cpu(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The re-classed modules call Liger's ops with the right arguments (gate first) and still
    call PEFT's LoRA projections: with torch stand-ins for the two Triton ops, the patched
    model gives the eager loss and gradients."""
    import sys
    import types

    fake = types.ModuleType("liger_kernel.ops")
    fake.LigerRMSNormFunction = _ReferenceRMSNorm
    fake.LigerSiLUMulFunction = _ReferenceSiLUMul
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", fake)
    config = _config(tmp_path, use_lora=True, lora_rank=4, liger_kernel=True)
    batch = _batch(tiny_dir, image=False)
    reference = _step(_model(tiny_dir, config, "cpu", torch.float32), batch, "cpu", None)

    patched = _model(tiny_dir, config, "cpu", torch.float32)
    names = set(patched.state_dict())
    assert apply_kernels(patched, config) == ["liger: 5 RMSNorm, 2 SwiGLU MLP"]
    assert set(patched.state_dict()) == names
    mlps = [module for module in patched.modules() if isinstance(module, LigerPhi3MLP)]
    assert len(mlps) == 2 and all(hasattr(mlp.gate_up_proj, "lora_A") for mlp in mlps)
    candidate = _step(patched, batch, "cpu", None)
    assert any("lora_B" in name and "mlp" in name for name in candidate[1])
    _assert_close(reference, candidate, loss_tol=1e-5, grad_tol=1e-5)


def test_compile_leaves_evaluation_eager(tiny_dir: Path, tmp_path: Path) -> None:
    """Generation (KV cache, one shape per step) would recompile per layer: eval mode is eager."""
    from torch._dynamo.utils import counters

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    batch = _batch(tiny_dir, image=True)
    batch.pop("labels")
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert apply_kernels(model, _config(tmp_path, compile=True))
    counters.clear()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)
    assert counters["frames"]["total"] == 0  # dynamo never ran


def test_compile_matches_eager_with_lora_and_checkpointing(tiny_dir: Path, tmp_path) -> None:
    """Inductor on CPU (gcc): one step of the compiled tiny model (LoRA on every linear of the
    decoder, non-reentrant checkpointing) gives the eager loss and gradients within 1e-4."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = _config(tmp_path, use_lora=True, lora_rank=4, compile=True)
    batch = _batch(tiny_dir, image=False)
    eager = _model(tiny_dir, config, "cpu", torch.float32)
    reference = _step(eager, batch, "cpu", None)

    compiled = _model(tiny_dir, config, "cpu", torch.float32)
    assert apply_kernels(compiled, config) == ["compiled 2 decoder layers, 3 CLIP encoder layers"]
    layers = compiled.base_model.model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    with inductor_config.patch(compile_threads=1):  # no worker pool on a small CI machine
        candidate = _step(compiled, batch, "cpu", None)
    assert counters["stats"]["unique_graphs"] == 1  # both decoder layers share one graph
    assert any("lora_B" in name for name in candidate[1])
    _assert_close(reference, candidate, loss_tol=1e-4, grad_tol=1e-4)


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "autocast", "lora", "tol"),
    [
        pytest.param(torch.float32, None, False, 1e-3, id="fp32"),
        pytest.param(torch.float32, torch.bfloat16, True, 5e-2, id="autocast_bf16_lora"),
        pytest.param(torch.bfloat16, None, False, 1e-1, id="bf16_weights"),
    ],
)
def test_liger_matches_eager_on_cuda(tiny_dir, tmp_path, dtype, autocast, lora, tol) -> None:
    pytest.importorskip("liger_kernel")
    config = _config(tmp_path, use_lora=lora, lora_rank=4, liger_kernel=True)
    check_kernels(config, torch.device("cuda"))
    batch = _batch(tiny_dir, image=False)
    reference = _step(_model(tiny_dir, config, "cuda", dtype), batch, "cuda", autocast)

    patched = _model(tiny_dir, config, "cuda", dtype)
    assert apply_kernels(patched, config) == ["liger: 5 RMSNorm, 2 SwiGLU MLP"]
    mlps = [module for module in patched.modules() if isinstance(module, LigerPhi3MLP)]
    assert len(mlps) == 2
    assert sum(isinstance(m, LigerPhi3RMSNorm) for m in patched.modules()) == 5
    if lora:  # the fused MLP still calls PEFT's LoRA layers
        assert all(hasattr(mlp.gate_up_proj, "lora_A") for mlp in mlps)
    candidate = _step(patched, batch, "cuda", autocast)
    if lora:
        assert any("lora_B" in name and "mlp" in name for name in candidate[1])
    _assert_close(reference, candidate, loss_tol=tol, grad_tol=tol)


@pytest.mark.gpu
def test_compile_with_liger_and_lora_matches_eager_on_cuda(tiny_dir: Path, tmp_path: Path) -> None:
    """Compiled decoder layers around Liger's kernels and LoRA, under bf16 autocast (text only:
    one graph to compile; the CPU test covers compile alone, the throughput benchmark CLIP)."""
    pytest.importorskip("liger_kernel")
    config = _config(tmp_path, use_lora=True, lora_rank=4, compile=True, liger_kernel=True)
    batch = _batch(tiny_dir, image=False)
    reference = _step(
        _model(tiny_dir, config, "cuda", torch.float32), batch, "cuda", torch.bfloat16
    )

    compiled = _model(tiny_dir, config, "cuda", torch.float32)
    assert apply_kernels(compiled, config) == [
        "liger: 5 RMSNorm, 2 SwiGLU MLP",
        "compiled 2 decoder layers, 3 CLIP encoder layers",
    ]
    candidate = _step(compiled, batch, "cuda", torch.bfloat16)
    _assert_close(reference, candidate, loss_tol=5e-2, grad_tol=5e-2)
