"""FSDP2 as one more engine: ``fully_shard`` per layer, then the root; sharded checkpoints.

:meth:`FSDPEngine.shard` applies torch's ``fully_shard`` to every ``Phi3DecoderLayer`` and every
``CLIPEncoderLayer`` (the model's declared wrap list), then to the whole model, with a
``MixedPrecisionPolicy`` of bf16 parameters and gradient reductions under ``--bf16`` (fp32
otherwise). Gradients are reduce-scattered only on the accumulation boundary.

Checkpoints: torch.distributed.checkpoint's ``.metadata`` file is a pickle, so it is not used.
Every rank writes its own local shards instead, ``shards/rank_<r>.safetensors`` (trainable
weights) plus ``shards/rank_<r>.json`` (each weight's global shape, local shape and placements),
and its optimizer state as a JSON + safetensors tree (``shards/optimizer_rank_<r>``); a resume
with the same number of processes copies each local shard back in place. Nothing is unpickled.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from phi3v_data.atomic import write_atomic
from phi3v_train.distributed import DistInfo
from phi3v_train.training import checkpointing as ckpt
from phi3v_train.training.engines import Engine
from phi3v_train.training.run_plan import RunPlan

#: Module classes sharded on their own before the root (the model's ``_no_split_modules``).
LAYER_CLASSES = ("Phi3DecoderLayer", "CLIPEncoderLayer")


def _local(value: Any) -> Any:
    """A DTensor's local shard (other values unchanged), recursively through dicts and lists."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().detach().contiguous()
    if isinstance(value, dict):
        return {key: _local(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_local(item) for item in value)
    return value


class FSDPEngine(Engine):
    """torch FSDP2 (``fully_shard``) over a process group; CPU (gloo) and CUDA (nccl)."""

    name = "fsdp"
    can_generate = False  # parameters are sharded; every rank would have to generate alike

    @staticmethod
    def shard(model: nn.Module, plan: RunPlan) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if plan.config.bf16:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for module in list(model.modules()):
            if type(module).__name__ in LAYER_CLASSES:
                fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # the mixed precision policy casts

    def accumulate(self, boundary: bool) -> AbstractContextManager:
        self.model.set_requires_gradient_sync(boundary)
        return nullcontext()

    # --- checkpoints: every rank its own shards ---------------------------------------------
    def _trainable(self) -> dict[str, nn.Parameter]:
        named = self.unwrapped.named_parameters()
        return {name: param for name, param in named if param.requires_grad}

    def save(self, folder: Path, dist: DistInfo) -> None:
        shards = folder / ckpt.SHARDS_DIR
        shards.mkdir(exist_ok=True)
        tensors, layout = {}, {}
        for name, param in self._trainable().items():
            tensors[name] = _local(param.detach()).to("cpu").contiguous()
            layout[name] = {
                "shape": list(param.shape),
                "local_shape": list(tensors[name].shape),
                "placements": [str(p) for p in getattr(param, "placements", ())],
            }
        save_file(tensors, str(shards / f"rank_{dist.rank}.safetensors"))
        write_atomic(shards / f"rank_{dist.rank}.json", json.dumps(layout, indent=1).encode())
        ckpt.save_tree(shards, f"optimizer_rank_{dist.rank}", _local(self.optimizer.state_dict()))
        if dist.is_main:
            ckpt.save_tree(folder, "scheduler", self.scheduler.state_dict())

    def load(self, folder: Path, dist: DistInfo) -> None:
        ckpt.refuse_foreign(folder, ckpt.SHARDS_DIR)
        shards = folder / ckpt.SHARDS_DIR
        if not shards.is_dir():
            raise ckpt.CheckpointError(f"{shards}: missing (not an FSDP checkpoint)")
        _load_local_shards(self._trainable(), shards / f"rank_{dist.rank}.safetensors")
        tree = ckpt.load_tree(shards, f"optimizer_rank_{dist.rank}")
        try:
            self.optimizer.load_state_dict(self._as_dtensors(tree))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise ckpt.CheckpointError(
                f"{shards}/optimizer_rank_{dist.rank}.json: does not match this model's "
                f"optimizer ({ckpt.error_line(error)})"
            ) from None
        ckpt.load_simple(self.scheduler, folder, "scheduler")

    def _as_dtensors(self, tree: dict[str, Any]) -> dict[str, Any]:
        """Optimizer state read back: tensors shaped like a sharded parameter become DTensors."""
        from torch.distributed.tensor import DTensor

        params = [param for group in self.optimizer.param_groups for param in group["params"]]
        for index, values in tree.get("state", {}).items():
            param = params[int(index)]
            for key, value in values.items():
                local_shape = param.to_local().shape if isinstance(param, DTensor) else None
                if torch.is_tensor(value) and local_shape is not None and value.dim():
                    if value.shape != local_shape:
                        raise ValueError(f"state {key} of parameter {index} has the wrong shape")
                    values[key] = DTensor.from_local(
                        value.to(param.device),
                        param.device_mesh,
                        param.placements,
                        shape=param.shape,
                        stride=param.stride(),
                    )
        return tree

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.unwrapped, options=options)


def _load_local_shards(params: dict[str, nn.Parameter], path: Path) -> None:
    """Copy this rank's saved shards into the local shards of ``params`` (names and local shapes
    must match exactly: another model, strategy or world size is refused naming the file)."""
    saved = ckpt.read_safetensors(path)
    extra, absent = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
    if extra or absent:
        name, what = (extra[0], "not a trainable parameter") if extra else (absent[0], "missing")
        raise ckpt.CheckpointError(f"{path}: {name}: {what} (a checkpoint of another model)")
    with torch.no_grad():
        for name, tensor in saved.items():
            local = _local_view(params[name])
            if tuple(tensor.shape) != tuple(local.shape):
                raise ckpt.CheckpointError(
                    f"{path}: {name}: shard shape {tuple(tensor.shape)}, this rank holds "
                    f"{tuple(local.shape)} (another model or number of processes)"
                )
            local.copy_(tensor.to(local.device, local.dtype))


def _local_view(param: nn.Parameter) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param._local_tensor if isinstance(param, DTensor) else param.data
