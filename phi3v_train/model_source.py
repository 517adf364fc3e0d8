"""Where a model comes from, checked once before anything loads: the source checks of
:mod:`phi3v_train.loading` (its only user; train, eval, merge and plan go through it).

:func:`resolve_model_source` answers, in at most a few seconds and with one line on failure:

- a **local directory** must hold ``config.json`` and ``*.safetensors`` weights. A directory whose
  only weights are pickles (``pytorch_model.bin``, ``*.pt``, ...) is refused: loading a pickle can
  run code, and only safetensors are ever loaded.
- a **hub id** (``org/name``) is looked up in the local Hugging Face cache first (no network). When
  it is not cached, offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) refuses it at once,
  and otherwise the hub is probed once (a TCP connection with a 3 s timeout, then one metadata call
  with a 10 s timeout) instead of letting the download retry for minutes. A hub repository without
  safetensors weights is refused like a local folder.
- a **LoRA/DoRA adapter** directory (:func:`check_adapter`) must hold ``adapter_config.json`` and
  ``adapter_model.safetensors``; ``adapter_model.bin`` alone is refused.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from phi3v_data.safe_io import is_regular_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
CONNECT_TIMEOUT_S = 3.0
METADATA_TIMEOUT_S = 10.0


class LoadingError(ValueError):
    """A model, adapter, processor or config that cannot be loaded; ``str()`` is one line naming
    the source, the option it came from and the reason (re-exported by :mod:`phi3v_train.loading`)."""


def offline_mode() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in OFFLINE_ENVS
    )


def weights_problem(directory: Path, names: list[str]) -> str | None:
    """Why the files ``names`` of ``directory`` hold no loadable (safetensors) weights, or None."""
    if any(name.endswith(".safetensors") for name in names):
        return None
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        return (
            f"{directory}: holds only pickle weights ({pickles[0]}); only *.safetensors are "
            "loaded (a pickle can run code): convert it to safetensors first"
        )
    return f"{directory}: no *.safetensors weights found"


def _check_local(path: Path, what: str) -> str:
    if not path.exists():
        raise LoadingError(f"{path}: {what}: no such directory")
    if not path.is_dir():
        raise LoadingError(f"{path}: {what}: not a directory")
    if not is_regular_file(path / "config.json"):
        raise LoadingError(f"{path}: {what}: no config.json (not a model directory)")
    problem = weights_problem(path, [entry.name for entry in path.iterdir() if entry.is_file()])
    if problem:
        raise LoadingError(f"{problem} ({what})")
    return str(path)


def looks_like_path(name: str) -> bool:
    """A name meant as a folder: absolute, relative with ./ or ../, ~, or more than one '/'."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or Path(name).exists()
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return None


def _hub_reachable() -> str | None:
    """None when the hub answers a TCP connection, else why not (one probe, a few seconds)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None  # a proxy decides; the metadata call below has its own timeout
    from huggingface_hub import constants

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as error:
        return f"{endpoint.hostname}:{port} unreachable ({error.strerror or error})"


def _check_hub(repo_id: str, what: str) -> str:
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return _check_local(cached, what)
    if offline_mode():
        raise LoadingError(
            f"{repo_id}: {what}: not a local directory, not in the Hugging Face cache, and "
            "offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
        )
    problem = _hub_reachable()
    if problem:
        raise LoadingError(
            f"{repo_id}: {what}: not a local directory, not in the Hugging Face cache, and the "
            f"hub cannot be reached: {problem}"
        )
    from huggingface_hub import model_info

    try:
        info = model_info(repo_id, timeout=METADATA_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - hub errors come in many types
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise LoadingError(f"{repo_id}: {what}: hub lookup failed: {reason}") from None
    names = [sibling.rfilename for sibling in info.siblings or []]
    problem = weights_problem(Path(repo_id), [name for name in names if "/" not in name])
    if problem:
        raise LoadingError(f"{problem} ({what})")
    return repo_id


def resolve_model_source(name: str | Path, *, what: str = "--model_name_or_path") -> str:
    """The local directory or hub id to load ``name`` from, checked; else LoadingError.

    A hub id found in the local cache resolves to the cached snapshot folder, so loading it needs
    no network at all.
    """
    text = str(name)
    if not text.strip():
        raise LoadingError(f"{what}: empty")
    if looks_like_path(text):
        return _check_local(Path(text).expanduser(), what)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise LoadingError(f"{text}: {what}: no such directory, and not a valid hub id") from None
    return _check_hub(text, what)


def check_adapter(adapter: str | Path, *, what: str = "--adapter") -> Path:
    """A PEFT adapter directory with safetensors weights; else LoadingError."""
    path = Path(adapter)
    if not path.is_dir():
        raise LoadingError(f"{path}: {what}: no such directory")
    if not is_regular_file(path / "adapter_config.json"):
        raise LoadingError(
            f"{path}: adapter_config.json not found (not a LoRA/DoRA adapter directory; {what})"
        )
    names = [entry.name for entry in path.iterdir() if entry.is_file()]
    problem = weights_problem(path, names)
    if problem:
        raise LoadingError(f"{problem} ({what})")
    return path
