"""Complete, atomic checkpoints, exact resume, and nothing unpickled on the way back.

``OUT/checkpoint-N/`` holds everything needed to continue bit for bit:

- ``trainable.safetensors``: every trainable parameter (the full weights under full fine-tuning,
  the adapter weights under LoRA), by its name in the unwrapped model; LoRA runs also write
  ``adapter/`` in PEFT's format. Under DeepSpeed, ``deepspeed/`` holds the engine's own
  checkpoint (weights, sharded optimizer) instead, plus ``deepspeed.json`` (see below).
- Under ``--fsdp``, ``shards/rank_<r>.{safetensors,json}`` hold every rank's local shards of the
  weights and optimizer state, and their placements (:mod:`phi3v_train.training.fsdp`).
- ``optimizer``, ``scheduler``, ``scaler`` (fp16 on CUDA only) and ``rng_state_<rank>`` (python,
  numpy, torch and CUDA generator states of every rank): each a ``NAME.json`` holding every
  non-tensor value, and a ``NAME.safetensors`` holding the tensors the JSON refers to
  (:func:`save_tree` / :func:`load_tree`). Nothing is pickled, so a crafted checkpoint cannot run
  code: the worst it can do is be refused with one line naming the file (:class:`CheckpointError`).
- ``trainer_state.json``: optimizer step, epoch, micro-batches consumed in that epoch, seed, world
  size and the loss history. It is written last and read strictly (unknown or missing keys, wrong
  types are refused).

DeepSpeed's own checkpoint files are pickles (DeepSpeed loads them with ``weights_only=False``).
They are therefore only loaded when ``deepspeed.json`` lists the SHA-256 of every file under
``deepspeed/`` and carries an HMAC of that list made with this user's key
(``~/.config/phi3v/checkpoint.key``, created 0600 on first save; ``PHI3V_CHECKPOINT_KEY_FILE``
names another, e.g. one shared by the nodes of a multi-node run). A DeepSpeed folder that this
user's trainer did not write, or any file of it changed since, is refused before DeepSpeed reads it.

All ranks write into ``checkpoint-N.tmp/``; rank 0 renames it to ``checkpoint-N`` once every file is
on disk, so a directory named ``checkpoint-N`` is always complete, and a run killed while saving
leaves only a ``.tmp`` folder, which the next run removes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from phi3v_data.atomic import write_atomic
from phi3v_data.safe_io import is_regular_file, read_regular_text
from phi3v_train.distributed import DistInfo, barrier

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_MANIFEST = "deepspeed.json"
SHARDS_DIR = "shards"  # FSDP: every rank's local shards (phi3v_train.training.fsdp)
TREE_FORMAT = "phi3v-state/1"
KEY_FILE_ENV = "PHI3V_CHECKPOINT_KEY_FILE"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; ``str()`` is one line naming the file."""


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
        """Read strictly: exactly the known keys, each of the right type (else CheckpointError)."""
        data = _read_json(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        known = [item.name for item in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise CheckpointError(f"{path}: unknown key {unknown[0]!r}")
        missing = [name for name in known if name not in data]
        if missing:
            raise CheckpointError(f"{path}: missing key {missing[0]!r}")
        for name in known[:-1]:
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{path}: {name}: a non-negative integer is expected")
        losses = data["losses"]
        if not isinstance(losses, list) or not all(
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            for pair in losses
        ):
            raise CheckpointError(f"{path}: losses: a list of [step, loss] pairs is expected")
        return cls(**data)


def _read_json(path: Path) -> Any:
    """A JSON file (regular files only: a FIFO is refused, never waited on), or CheckpointError."""
    try:
        return json.loads(read_regular_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text (corrupt)") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
    if not is_regular_file(path):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a valid safetensors file (truncated or corrupt): {reason}"
        ) from None


# ------------------------------------------------------------------------------------------------
# state trees: JSON for everything but tensors, safetensors for the tensors
# ------------------------------------------------------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors) for item in value]}
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors) for key, item in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, path) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        key = value["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError(f"{path}: refers to tensor {key!r}, absent from its safetensors")
        return tensors[key]
    if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
        return tuple(_decode(item, tensors, path) for item in value["__tuple__"])
    if set(value) == {"__items__"} and isinstance(value["__items__"], list):
        items = value["__items__"]
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in items):
            raise CheckpointError(f"{path}: __items__: [key, value] pairs expected")
        try:
            return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in items}
        except TypeError:
            raise CheckpointError(f"{path}: a dictionary key is not hashable") from None
    if any(key.startswith("__") for key in value):
        raise CheckpointError(f"{path}: unknown marker {sorted(value)[0]!r}")
    return {key: _decode(item, tensors, path) for key, item in value.items()}


def save_tree(directory: Path, name: str, tree: Any) -> None:
    """Write ``tree`` (dicts, lists, tuples, scalars, tensors) as ``NAME.json`` (+ tensors in
    ``NAME.safetensors``), each atomically."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    document = {"format": TREE_FORMAT, "tensors": bool(tensors), "tree": encoded}
    write_atomic(directory / f"{name}.json", json.dumps(document).encode("utf-8"))


def load_tree(directory: Path, name: str) -> Any:
    """Read what :func:`save_tree` wrote; :class:`CheckpointError` naming the file otherwise."""
    path = directory / f"{name}.json"
    document = _read_json(path)
    if (
        not isinstance(document, dict)
        or document.get("format") != TREE_FORMAT
        or set(document) != {"format", "tensors", "tree"}
    ):
        raise CheckpointError(f"{path}: not a {TREE_FORMAT} state file")
    tensors = read_safetensors(directory / f"{name}.safetensors") if document["tensors"] else {}
    return _decode(document["tree"], tensors, path)


# ------------------------------------------------------------------------------------------------
# checkpoint folders
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# RNG states as JSON + uint8 tensors
# ------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Any, path: Path) -> None:
    try:
        python, numpy_state = state["python"], state["numpy"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        np.random.set_state(
            (
                numpy_state["kind"],
                np.asarray(numpy_state["keys"], dtype=np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a valid RNG state ({error_line(error)})") from None


def error_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------
# weights, optimizer
# ------------------------------------------------------------------------------------------------


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached, contiguous and on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the saved trainable parameters into ``model``: the names and shapes must be exactly
    this model's trainable parameters (a checkpoint of another model or strategy is refused)."""
    saved = read_safetensors(path)
    params = dict(model.named_parameters())
    trainable = {name for name, param in params.items() if param.requires_grad}
    extra = sorted(set(saved) - trainable)
    if extra:
        raise CheckpointError(
            f"{path}: {extra[0]}: not a trainable parameter of this model (a checkpoint of "
            "another model or strategy)"
        )
    absent = sorted(trainable - set(saved))
    if absent:
        raise CheckpointError(
            f"{path}: {absent[0]}: missing (a checkpoint of another model or strategy)"
        )
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{path}: {name}: shape {tuple(tensor.shape)}, the model has "
                f"{tuple(params[name].shape)} (a checkpoint of another model)"
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    path = directory / "optimizer.json"
    state = load_tree(directory, "optimizer")
    try:
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for index, values in state["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value) and value.dim() and value.shape != params[index].shape:
                    raise ValueError(f"state {key} of parameter {index} has the wrong shape")
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: does not match this model's optimizer ({error_line(error)})"
        ) from None


def load_simple(target: Any, directory: Path, name: str) -> None:
    state = load_tree(directory, name)
    try:
        target.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{directory / name}.json: {error_line(error)}") from None


# ------------------------------------------------------------------------------------------------
# DeepSpeed folders: pickles, so only loaded when signed by this user's key
# ------------------------------------------------------------------------------------------------


def _key_file() -> Path:
    configured = os.environ.get(KEY_FILE_ENV)
    return Path(configured) if configured else Path.home() / ".config" / "phi3v" / "checkpoint.key"


def _signing_key(create: bool) -> bytes | None:
    path = _key_file()
    if not path.is_file() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_hex(32).encode("ascii"))
    return path.read_bytes().strip() if is_regular_file(path) else None


def _digests(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or (path.exists() and not path.is_dir() and not path.is_file()):
            raise CheckpointError(f"{path}: not a regular file")
        if path.is_file():
            found[path.relative_to(folder).as_posix()] = hashlib.sha256(
                path.read_bytes()
            ).hexdigest()
    return found


def _signature(key: bytes, digests: dict[str, str]) -> str:
    return hmac.new(key, json.dumps(digests, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def sign_deepspeed(checkpoint: Path) -> None:
    key = _signing_key(create=True)
    digests = _digests(checkpoint / DEEPSPEED_DIR)
    document = {"files": digests, "hmac": _signature(key, digests)}
    write_atomic(checkpoint / DEEPSPEED_MANIFEST, json.dumps(document, indent=1).encode())


def verify_deepspeed(checkpoint: Path) -> None:
    """Refuse a DeepSpeed folder unless this user's trainer wrote it, unchanged since."""
    manifest = checkpoint / DEEPSPEED_MANIFEST
    document = _read_json(manifest)
    key = _signing_key(create=False)
    if key is None:
        raise CheckpointError(f"{manifest}: no checkpoint key at {_key_file()}: not ours; refused")
    digests = _digests(checkpoint / DEEPSPEED_DIR)
    if not isinstance(document, dict) or document.get("files") != digests:
        raise CheckpointError(
            f"{checkpoint / DEEPSPEED_DIR}: files differ from {manifest}: refused (DeepSpeed "
            "files are pickles and are only loaded as this trainer wrote them)"
        )
    if not hmac.compare_digest(str(document.get("hmac")), _signature(key, digests)):
        raise CheckpointError(
            f"{manifest}: signature does not match this user's key: not written by this "
            "trainer; refused (DeepSpeed files are pickles)"
        )


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def save_plain_state(
    directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any
) -> None:
    """Rank 0 of a plain or DDP run: trainable weights (+ PEFT adapter), optimizer, scheduler,
    and the GradScaler when it is enabled (fp16 on CUDA)."""
    save_file(trainable_state_dict(model), str(directory / TRAINABLE_FILE))
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(directory / "adapter"), save_embedding_layers=False)
    save_tree(directory, "optimizer", optimizer.state_dict())
    save_tree(directory, "scheduler", scheduler.state_dict())
    if scaler is not None and scaler.is_enabled():
        save_tree(directory, "scaler", scaler.state_dict())


def refuse_foreign(path: Path, own: str | None) -> None:
    """A checkpoint written by another engine (DeepSpeed or FSDP folder) is refused by name."""
    if own != DEEPSPEED_DIR and (path / DEEPSPEED_DIR).exists():
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint; resume it with --deepspeed")
    if own != SHARDS_DIR and (path / SHARDS_DIR).exists():
        raise CheckpointError(f"{path}: an FSDP (sharded) checkpoint; resume it with --fsdp")


def load_plain_state(
    path: Path, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any
) -> None:
    """Inverse of :func:`save_plain_state` (every rank loads the same files)."""
    refuse_foreign(path, None)
    load_trainable(model, path / TRAINABLE_FILE)
    _load_optimizer(optimizer, path)
    load_simple(scheduler, path, "scheduler")
    if scaler is not None and scaler.is_enabled():
        load_simple(scaler, path, "scaler")


def save_deepspeed_state(directory: Path, engine: Any, dist: DistInfo) -> None:
    """DeepSpeed's own checkpoint under ``deepspeed/``, signed by rank 0 once complete."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state")
    barrier()
    if dist.is_main:
        sign_deepspeed(directory)


def load_deepspeed_state(path: Path, engine: Any) -> None:
    if not (path / DEEPSPEED_DIR).is_dir():
        raise CheckpointError(f"{path / DEEPSPEED_DIR}: missing (not a DeepSpeed checkpoint)")
    verify_deepspeed(path)
    engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag="state")


def save_checkpoint(
    output_dir: Path,
    state: TrainerState,
    *,
    engine: Any,
    dist: DistInfo,
    save_total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically on every rank; return its final path.

    ``engine.save(folder, dist)`` writes the engine's files (weights, optimizer, scheduler...);
    this function adds every rank's RNG state and, last, ``trainer_state.json``.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp, dist)
    save_tree(tmp, f"rng_state_{dist.rank}", capture_rng_state())
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


def load_checkpoint(path: Path, *, engine: Any, dist: DistInfo) -> TrainerState:
    """Restore the engine's state and this rank's RNG; return the trainer state.

    Every problem is a :class:`CheckpointError` naming the file; nothing is unpickled.
    """
    state = TrainerState.read(path / STATE_FILE)
    if state.world_size != dist.world_size:
        raise CheckpointError(
            f"{path}: world_size: the checkpoint was written by {state.world_size} processes, "
            f"this run has {dist.world_size}; resume with the same number of processes"
        )
    rng = load_tree(path, f"rng_state_{dist.rank}")  # read (and checked) before anything changes
    engine.load(path, dist)
    restore_rng_state(rng, path / f"rng_state_{dist.rank}.json")
    return state
