"""Engines: how a model is wrapped, how gradients are made and applied, how that state is saved.

One small interface (:class:`Engine`), chosen once at start-up by :func:`build_engine` from the
run plan; the training loop calls only these methods and never asks which engine it has:

- ``model``: what the loop calls forward on; ``unwrapped``: the model to save and evaluate;
- ``prepare(batch)``: the batch on the device (plus a masked dummy image row where every rank
  must run the vision tower: DeepSpeed and FSDP in distributed runs);
- ``accumulate(boundary)``: the context of one micro-batch (DDP's ``no_sync`` off the boundary);
- ``backward(loss)`` and ``step()`` (clipping, optimizer, scheduler, zero_grad), ``lr()``;
- ``save(folder, dist)`` / ``load(folder, dist)``: the engine's part of a checkpoint;
- ``full_state_dict()``: the whole model for the final save (None: the model's own).

Engines: :class:`PlainEngine` (one process; fp16 on CUDA through an enabled GradScaler, a
disabled one elsewhere), :class:`DDPEngine`, :class:`DeepSpeedEngine` and FSDP2
(:class:`phi3v_train.training.fsdp.FSDPEngine`).

Mixed batches under DDP / DeepSpeed: a micro-batch without images never runs the vision tower,
and the last CLIP layer never runs at all, so some trainable parameters get no gradient on some
ranks, which hangs or crashes gradient synchronisation. DDP and ZeRO-2 therefore add every
trainable parameter to the loss with weight zero (``loss + 0 * sum(p.sum())``): every rank then
produces a gradient (zero where unused) for every parameter at every step, and the result is
numerically unchanged. DeepSpeed ZeRO additionally reduces gradient buckets in the order the
gradients arrive, and FSDP gathers each layer's shards when it runs, so there a batch without
images also gets one extra row holding a dummy image with every label -100: the vision tower runs
at the same place of the graph on every rank, and the loss is unchanged.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phi3v_train.distributed import DistInfo
from phi3v_train.training import checkpointing as ckpt
from phi3v_train.training.optimizer import MasterWeightAdamW, build_optimizer
from phi3v_train.training.run_plan import RunPlan

DEEPSPEED_CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
DEEPSPEED_PRESETS = ("zero2", "zero3")


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to zero at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def zero_weighted_parameters(parameters: list[nn.Parameter]) -> torch.Tensor:
    """0 x the sum of every trainable parameter: a gradient (of zeros) for each on every rank."""
    return sum(param.sum() for param in parameters) * 0.0


class Engine:
    """Plain PyTorch: the base every engine refines (see the module docstring)."""

    name = "plain"
    can_generate = True  # evaluation after training can run generate on ``unwrapped``

    def __init__(self, plan: RunPlan, model: nn.Module, dist: DistInfo, optimizer, scheduler):
        self.plan = plan
        self.unwrapped = model
        self.model = model
        self.dist = dist
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.trainable = [param for param in model.parameters() if param.requires_grad]
        self.touch_all = False
        self.dummy_image: dict[str, Any] | None = None
        self.pad_token_id = 0

    def autocast(self) -> AbstractContextManager:
        device = self.dist.device
        if self.plan.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if self.plan.precision == "fp16":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        from phi3v_train.data import add_dummy_image_row
        from phi3v_train.training.packing import add_dummy_image_sample, is_packed

        if batch["pixel_values"] is None and self.dummy_image is not None:
            if is_packed(batch):  # the dummy is one more sample of the row
                batch = add_dummy_image_sample(batch, self.dummy_image)
            else:
                batch = add_dummy_image_row(batch, self.dummy_image, self.pad_token_id)
        device = self.dist.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if batch["pixel_values"] is None:  # text-only micro-batch
            del batch["pixel_values"], batch["image_sizes"]
        return batch

    def accumulate(self, boundary: bool) -> AbstractContextManager:
        return nullcontext()

    def _loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss + zero_weighted_parameters(self.trainable) if self.touch_all else loss

    def backward(self, loss: torch.Tensor) -> None:
        self._loss_for_backward(loss).backward()

    def clip(self) -> None:
        """Clip the gradient norm; under ``--bf16_weights`` on the masters' fp32 gradients."""
        params = self.trainable
        if isinstance(self.optimizer, MasterWeightAdamW):
            params = self.optimizer.master_grads()
        torch.nn.utils.clip_grad_norm_(params, self.plan.config.max_grad_norm)

    def step(self) -> None:
        self.clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, dist: DistInfo) -> None:
        if dist.is_main:
            ckpt.save_plain_state(folder, self.unwrapped, self.optimizer, self.scheduler, None)

    def load(self, folder: Path, dist: DistInfo) -> None:
        ckpt.load_plain_state(folder, self.unwrapped, self.optimizer, self.scheduler, None)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None


class PlainEngine(Engine):
    """One process; under fp16 (CUDA) a GradScaler scales the loss and unscales before clipping."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        fp16 = self.plan.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=fp16)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(self._loss_for_backward(loss)).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        self.clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path, dist: DistInfo) -> None:
        if dist.is_main:
            args = (self.unwrapped, self.optimizer, self.scheduler, self.scaler)
            ckpt.save_plain_state(folder, *args)

    def load(self, folder: Path, dist: DistInfo) -> None:
        ckpt.load_plain_state(folder, self.unwrapped, self.optimizer, self.scheduler, self.scaler)


class DDPEngine(PlainEngine):
    """torch DistributedDataParallel; gradients synchronised only on the accumulation boundary."""

    name = "ddp"

    def __init__(self, *args: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(*args)
        cuda = self.dist.device.type == "cuda"
        ids = [self.dist.local_rank] if cuda else None
        self.model = DistributedDataParallel(self.unwrapped, device_ids=ids)
        self.touch_all = True

    def accumulate(self, boundary: bool) -> AbstractContextManager:
        return nullcontext() if boundary else self.model.no_sync()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3: its engine does backward, accumulation, clipping and the step."""

    name = "deepspeed"

    def __init__(self, *args: Any) -> None:
        import deepspeed

        super().__init__(*args)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.unwrapped,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(self.plan, self.dist.device),
        )
        zero3 = self.plan.config.deepspeed == "zero3"
        self.touch_all = self.dist.distributed and not zero3
        self.can_generate = not zero3  # parameters are sharded
        self._boundary = True

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # DeepSpeed casts itself

    def accumulate(self, boundary: bool) -> AbstractContextManager:
        self._boundary = boundary
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.set_gradient_accumulation_boundary(self._boundary)
        self.model.backward(self._loss_for_backward(loss), scale_wrt_gas=False)

    def step(self) -> None:
        self.model.step()

    def save(self, folder: Path, dist: DistInfo) -> None:
        ckpt.save_deepspeed_state(folder, self.model, dist)

    def load(self, folder: Path, dist: DistInfo) -> None:
        ckpt.load_deepspeed_state(folder, self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.plan.config.deepspeed == "zero3":
            return self.model._zero3_consolidated_16bit_state_dict()
        return None


def deepspeed_config(plan: RunPlan, device: torch.device) -> dict:
    config = plan.config
    name = config.deepspeed
    path = DEEPSPEED_CONFIG_DIR / f"{name}.json" if name in DEEPSPEED_PRESETS else Path(name)
    ds = json.loads(path.read_text(encoding="utf-8"))
    ds["train_micro_batch_size_per_gpu"] = config.batch_size_per_gpu
    ds["gradient_accumulation_steps"] = plan.accumulation
    ds["train_batch_size"] = config.batch_size
    ds["gradient_clipping"] = config.max_grad_norm
    cuda = device.type == "cuda"
    ds.setdefault("fp16", {})["enabled"] = cuda and not config.bf16
    ds.setdefault("bf16", {})["enabled"] = config.bf16
    return ds


def _engine_class(name: str) -> type[Engine]:
    if name == "fsdp":
        from phi3v_train.training.fsdp import FSDPEngine

        return FSDPEngine
    return {"plain": PlainEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine}[name]


def build_engine(plan: RunPlan, model: nn.Module, dist: DistInfo, processor: Any) -> Engine:
    """The engine of ``plan.engine`` around ``model``: AdamW with the parameter groups and the
    linear schedule (:mod:`.optimizer`), wrapped as that engine needs (chosen once, here)."""
    from phi3v_train.data import dummy_image_example

    config = plan.config
    cls = _engine_class(plan.engine)
    model = cls.shard(model, plan) if hasattr(cls, "shard") else model
    optimizer = build_optimizer(model, config, dist.device, plan.engine)
    scheduler = linear_schedule(optimizer, plan.warmup, plan.total_steps)
    engine = cls(plan, model, dist, optimizer, scheduler)
    engine.pad_token_id = processor.tokenizer.pad_token_id
    if dist.distributed and plan.engine in ("deepspeed", "fsdp"):
        engine.dummy_image = dummy_image_example(processor)
    return engine
