"""``--liger_kernel`` and ``--compile``: faster kernels for the loaded model (issue 14).

- :func:`check_kernels` runs before any model loads: ``--liger_kernel`` needs a CUDA device and
  the ``liger_kernel`` package (``pip install 'phi3v[gpu]'``), else one line (:class:`PlanError`).
- :func:`apply_kernels` runs on the loaded model after LoRA / freezing and gradient checkpointing
  are set up and before the engine wraps it (DDP, DeepSpeed, FSDP2):

  * ``--liger_kernel``: every ``Phi3RMSNorm`` (the decoder's two per layer and the final norm) and
    every ``Phi3MLP`` becomes a fused Triton kernel (Liger's ``LigerRMSNormFunction`` and
    ``LigerSiLUMulFunction``). Instances are re-classed in place (``__class__`` swap to a subclass
    that only overrides ``forward``): parameters, state-dict names and the MLP's
    ``gate_up_proj`` / ``down_proj`` submodules stay, so PEFT's LoRA layers on them keep
    working. Liger's own ``apply_liger_kernel_to_phi3`` is not used: it also patches
    ``transformers.models.phi3`` globally (rotary embedding, which our per-sample LongRoPE must
    not get, and the causal-LM forward for fused linear cross-entropy, which our model's
    forward does not use). Inside a layer that ``--compile`` compiled, the modules run their
    plain torch code instead (dynamo never traces the Triton launches; inductor generates its own
    fused kernels there), so Liger speeds up what stays eager: the final norm, and every layer
    without ``--compile``.
  * ``--compile``: ``torch.compile`` of each decoder layer and each CLIP encoder layer in place
    (as ``nn.Module.compile``), in training mode only (evaluation and generation stay eager).
    transformers' ``GradientCheckpointingLayer.__call__`` wraps the compiled call, so
    non-reentrant checkpointing recomputes the compiled region. Layers of one class share one
    compiled graph (parameters are graph inputs); sequence lengths vary, so the second shape seen
    marks them dynamic.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3MLP, Phi3RMSNorm

from phi3v_train.training.config import TrainConfig
from phi3v_train.training.run_plan import PlanError

__all__ = ["apply_kernels", "check_kernels", "compile_layers", "patch_liger"]

INSTALL_HINT = "pip install 'phi3v[gpu]'"


def check_kernels(config: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line, a ``--liger_kernel`` run that cannot use the kernels."""
    if not config.liger_kernel:
        return
    if device.type != "cuda":
        raise PlanError(
            f"--liger_kernel: Liger's Triton kernels need a CUDA device (this run is on "
            f"{device.type}); drop the flag"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise PlanError(
            f"--liger_kernel: the liger_kernel package is not installed: {INSTALL_HINT}"
        )
    try:
        import liger_kernel.ops  # noqa: F401  (imports triton)
    except Exception as error:  # a broken triton / CUDA install
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PlanError(f"--liger_kernel: liger_kernel cannot be imported: {first}") from None


def apply_kernels(model: nn.Module, config: TrainConfig) -> list[str]:
    """Apply what ``--liger_kernel`` / ``--compile`` ask to ``model`` in place; return one short
    description per change for the log (empty when neither flag is set)."""
    done: list[str] = []
    if config.liger_kernel:
        norms, mlps = patch_liger(model)
        done.append(f"liger: {norms} RMSNorm, {mlps} SwiGLU MLP")
    if config.compile:
        decoder, vision = compile_layers(model)
        done.append(f"compiled {decoder} decoder layers, {vision} CLIP encoder layers")
    return done


# ------------------------------------------------------------------------------------------------
# Liger
# ------------------------------------------------------------------------------------------------


class LigerPhi3RMSNorm(Phi3RMSNorm):
    """``Phi3RMSNorm`` computed by Liger's fused kernel ("llama" casting: the inverse RMS in
    fp32, the normalised input cast back to the input dtype, then scaled by the weight)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inside a --compile'd layer: inductor fuses it
            return super().forward(hidden_states)
        from liger_kernel.ops import LigerRMSNormFunction

        # offset 0, "llama" casting; in_place=False: dY is not overwritten with dX (one extra
        # buffer, no aliasing risk).
        return LigerRMSNormFunction.apply(
            hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False
        )


class LigerPhi3MLP(Phi3MLP):
    """``Phi3MLP`` with SiLU(gate) * up fused by Liger; the projections are still called as
    modules (LoRA layers on ``gate_up_proj`` / ``down_proj`` keep working)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(hidden_states)
        from liger_kernel.ops import LigerSiLUMulFunction

        gate, up_states = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(LigerSiLUMulFunction.apply(gate, up_states))


def patch_liger(model: nn.Module) -> tuple[int, int]:
    """Re-class every ``Phi3RMSNorm`` / ``Phi3MLP`` of ``model`` (a PEFT wrapper included) to
    its Liger version; return (norms, MLPs) patched. An MLP whose activation is not SiLU stays."""
    norms = mlps = 0
    for module in model.modules():
        if type(module) is Phi3RMSNorm:
            module.__class__ = LigerPhi3RMSNorm
            norms += 1
        elif type(module) is Phi3MLP and module.config.hidden_act in ("silu", "swish"):
            module.__class__ = LigerPhi3MLP
            mlps += 1
    return norms, mlps


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def compile_layers(model: nn.Module) -> tuple[int, int]:
    """``torch.compile`` each decoder and CLIP encoder layer in place, for training; return
    their counts."""
    decoder = vision = 0
    for module in model.modules():
        if isinstance(module, Phi3DecoderLayer):
            _compile_for_training(module)
            decoder += 1
        elif isinstance(module, CLIPEncoderLayer):
            _compile_for_training(module)
            vision += 1
    if decoder:
        # Training shares one graph between the layers of a class (no per-layer guard), but leave
        # room for one entry per layer so that a per-layer specialisation never falls back to
        # eager silently.
        # (cache_size_limit: recompile_limit's name before torch 2.7, an alias since)
        limit = torch._dynamo.config.cache_size_limit
        torch._dynamo.config.cache_size_limit = max(limit, decoder + 8)
    return decoder, vision


def _compile_for_training(module: nn.Module) -> None:
    """``module.compile()`` (``_compiled_call_impl``, which ``nn.Module.__call__`` prefers), but
    eager in eval mode: generation with a KV cache specialises on each layer's index and on
    every prefill/decode shape, so compiling it would cost far more than it saves."""
    compiled = torch.compile(module._call_impl)
    eager = module._call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        return (compiled if module.training else eager)(*args, **kwargs)

    module._compiled_call_impl = call
