"""Complete, atomic checkpoints and exact resume.

``OUT/checkpoint-N/`` holds everything needed to continue bit for bit:

- ``trainable.safetensors``: every trainable parameter (the full weights under full fine-tuning,
  the adapter weights under LoRA), by its name in the unwrapped model; LoRA runs also write
  ``adapter/`` in PEFT's format. Under DeepSpeed, ``deepspeed/`` holds the engine's own
  checkpoint (weights, sharded optimizer) instead.
- ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16 on CUDA only);
- ``rng_state_<rank>.pt``: python, numpy, torch and CUDA generator states of every rank;
- ``trainer_state.json``: optimizer step, epoch, micro-batches consumed in that epoch, seed, world
  size and the loss history. It is written last.

All ranks write into ``checkpoint-N.tmp/``; rank 0 renames it to ``checkpoint-N`` once every file is
on disk, so a directory named ``checkpoint-N`` is always complete, and a run killed while saving
leaves only a ``.tmp`` folder, which the next run removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from phi3v_data.atomic import write_atomic
from phi3v_train.distributed import DistInfo, barrier

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
DEEPSPEED_DIR = "deepspeed"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; enough to rebuild the data order after a restart."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed on each rank
    seed: int = 0
    world_size: int = 1
    losses: list[list[float]] = field(default_factory=list)  # [step, loss] pairs

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1).encode("utf-8"))

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``output_dir``, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = _CHECKPOINT_NAME.match(path.name)
            if match and path.is_dir() and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete ``checkpoint-N.tmp`` folders left by a run killed while saving (rank 0 only)."""
    removed = []
    if output_dir.is_dir():
        for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*{TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached, contiguous and on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the saved trainable parameters into ``model`` (names must match exactly)."""
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"{path}: {missing[0]}: parameter not found in the model")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def save_checkpoint(
    output_dir: Path,
    state: TrainerState,
    *,
    dist: DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
    engine: Any = None,
    save_total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically on every rank; return its final path."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state")
    elif dist.is_main:
        save_file(trainable_state_dict(model), str(tmp / TRAINABLE_FILE))
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(capture_rng_state(), tmp / f"rng_state_{dist.rank}.pt")
    barrier()
    if dist.is_main:
        state.write(tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    *,
    dist: DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
    engine: Any = None,
) -> TrainerState:
    """Restore weights, optimizer, scheduler, scaler and this rank's RNG; return the state."""
    state = TrainerState.read(path / STATE_FILE)
    if state.world_size != dist.world_size:
        raise ValueError(
            f"{path}: world_size: the checkpoint was written by {state.world_size} processes, "
            f"this run has {dist.world_size}; resume with the same number of processes"
        )
    if engine is not None:
        engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag="state")
    else:
        load_trainable(model, path / TRAINABLE_FILE)
        device = next(model.parameters()).device
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt"))
    restore_rng_state(torch.load(path / f"rng_state_{dist.rank}.pt", weights_only=False))
    return state
