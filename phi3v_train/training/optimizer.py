"""The trainer's AdamW: fused on CUDA, and fp32 master weights for bf16 models (``--bf16_weights``).

:func:`build_optimizer` makes AdamW over the parameter groups of
:func:`phi3v_train.training.strategies.param_groups` (betas 0.9 / 0.95, eps 1e-7). The plain and
DDP engines on CUDA get ``fused=True``: one kernel per step and no fp32 scratch copy of the largest
group (PyTorch's default *foreach* AdamW allocates one, ``_foreach_sqrt`` of v). DeepSpeed wraps
the optimizer itself and FSDP2 steps DTensor shards: both keep PyTorch's default.

With ``--bf16_weights`` the model's weights are bf16 and :class:`MasterWeightAdamW` keeps an fp32
master copy of every trainable 16-bit parameter (fp32 ones, e.g. LoRA adapters, are their own
master). Each step: the bf16 gradient becomes the master's fp32 gradient (clipping acts on these,
see :meth:`MasterWeightAdamW.master_grads`), AdamW updates the master in fp32, and the master is
rounded back into the bf16 parameter. The masters are in ``state_dict()`` (key ``master`` of each
parameter's state, beside ``exp_avg`` / ``exp_avg_sq`` / ``step``), so a checkpoint (safetensors +
JSON) restores them exactly and a resumed run is bit-identical. Gradients of micro-batches are
accumulated in the parameters' own dtype (bf16) before the step turns them into fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from phi3v_train.training.config import TrainConfig

#: AdamW's hyper-parameters besides the learning rate (those of the original recipe).
BETAS = (0.9, 0.95)
EPS = 1e-7
#: Engines whose optimizer runs fused on CUDA (DeepSpeed and FSDP keep PyTorch's default).
FUSED_ENGINES = ("plain", "ddp")
MASTER_KEY = "master"


def build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device, engine_name: str
) -> torch.optim.Optimizer:
    """AdamW over the parameter groups of ``model``; fp32 masters under ``config.bf16_weights``."""
    from phi3v_train.training.strategies import param_groups

    options: dict[str, Any] = {"lr": config.learning_rate, "betas": BETAS, "eps": EPS}
    if device.type == "cuda" and engine_name in FUSED_ENGINES:
        options["fused"] = True
    groups = param_groups(model, config)
    if config.bf16_weights:
        return MasterWeightAdamW(groups, **options)
    return torch.optim.AdamW(groups, **options)


def _master_of(param: torch.Tensor) -> torch.Tensor:
    """The fp32 copy AdamW updates; an fp32 parameter is its own master."""
    if param.dtype == torch.float32:
        return param
    return param.detach().to(torch.float32, copy=True)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of 16-bit parameters (see the module docstring).

    ``param_groups`` hold the masters (so the learning-rate scheduler, ``state`` and fused kernels
    see fp32 tensors); ``pairs`` lists ``(model parameter, master)`` in that same order.
    """

    def __init__(self, groups: list[dict[str, Any]], **options: Any) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        master_groups = []
        for group in groups:
            masters = []
            for param in group["params"]:
                master = _master_of(param)
                self.pairs.append((param, master))
                masters.append(master)
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **options)

    @torch.no_grad()
    def master_grads(self) -> list[torch.Tensor]:
        """Move each 16-bit gradient onto its master as fp32 (idempotent); return every master.

        Called by the engine before clipping, so the norm and the clipped gradients are fp32."""
        for param, master in self.pairs:
            if master is param or param.grad is None:
                continue
            grad = param.grad.to(torch.float32)
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None
        return [master for _, master in self.pairs]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self.master_grads()
        updated = [(p, m) for p, m in self.pairs if m is not p and m.grad is not None]
        loss = super().step(closure)
        if updated:
            params, masters = zip(*updated, strict=True)
            torch._foreach_copy_(list(params), list(masters))  # rounds to the parameters' dtype
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param, master in self.pairs:
            if master is not param:
                param.grad = None

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state plus, for each parameter with a distinct master, ``master``."""
        state = super().state_dict()
        per_param = dict(state["state"])
        for index, (param, master) in enumerate(self.pairs):
            if master is not param:
                per_param[index] = {**per_param.get(index, {}), MASTER_KEY: master}
        return {**state, "state": per_param}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore AdamW's state and the masters (then rounded into the parameters); a master
        absent from ``state_dict`` is taken from its (already restored) parameter."""
        saved: dict[int, torch.Tensor] = {}
        per_param = {}
        for index, values in state_dict["state"].items():
            values = dict(values)
            if MASTER_KEY in values:
                saved[index] = values.pop(MASTER_KEY)
            per_param[index] = values
        for index in saved:
            if not 0 <= index < len(self.pairs) or self.pairs[index][1] is self.pairs[index][0]:
                raise ValueError(f"parameter {index} has no fp32 master copy in this optimizer")
        super().load_state_dict({**state_dict, "state": per_param})
        with torch.no_grad():
            for index, (param, master) in enumerate(self.pairs):
                if master is param:
                    continue
                if index in saved:
                    master.copy_(saved[index].to(master.device))
                    param.copy_(master)
                else:
                    master.copy_(param)
