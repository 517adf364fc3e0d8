"""The one loading path: model, processor, adapter, config, 4-bit quantization and dtype rules.

Training, ``eval``, ``merge``, ``plan`` and the benchmarks load through here and nowhere else:

- every source is checked first (:mod:`phi3v_train.model_source`: a local folder needs
  ``config.json`` and ``*.safetensors``; a hub id is taken from the cache or fails fast offline;
  an adapter folder needs ``adapter_model.safetensors``), and weights are read with
  ``use_safetensors=True`` only: a pickle is never loaded. ``trust_remote_code`` is never passed:
  ``phi3_v`` is registered with the Auto classes by importing :mod:`phi3v_train`.
- every failure is a :class:`LoadingError` whose ``str()`` is one line
  (``source: option: reason``), so each command prints it and exits non-zero.
- dtype rules live here: :func:`training_dtype` (the trainer's), :func:`inference_dtype`
  (``--dtype auto``: bf16 on a GPU that supports it) and :func:`checkpoint_dtype` (a saved model's).
- :func:`load_config` reads a model's ``config.json`` alone, without weights (``plan``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from phi3v_train.model_source import LoadingError, check_adapter, resolve_model_source

if TYPE_CHECKING:
    from phi3v_train.training.config import TrainConfig

__all__ = [
    "DTYPES",
    "STOP_TOKENS",
    "LoadingError",
    "attach_adapter",
    "check_adapter",
    "check_model",
    "checkpoint_dtype",
    "has_processor",
    "inference_dtype",
    "load_config",
    "load_for_inference",
    "load_model",
    "load_pretrained",
    "load_processor",
    "loading_error",
    "model_source",
    "stop_token_ids",
    "training_dtype",
]

#: The option a model source comes from, named in every error (training and eval spell it alike).
MODEL_OPTION = "--model_name_or_path"
#: ``--dtype`` names (``auto`` is resolved by :func:`inference_dtype` / :func:`checkpoint_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Generation stops at the end of the assistant turn or at the end of text.
STOP_TOKENS = ("<|end|>", "<|endoftext|>")
#: Files the trainer saves beside an adapter when it saves the processor there too.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _register() -> None:
    import phi3v_train  # noqa: F401  (registers phi3_v with the Auto classes)


def error_headline(error: Exception) -> str:
    """One line for a library exception: its headline, plus the first detail after a ':'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def loading_error(name: str | Path, what: str, error: Exception) -> LoadingError:
    """A library exception as one line: ``name: what: headline``."""
    return LoadingError(f"{name}: {what}: {error_headline(error)}")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids of :data:`STOP_TOKENS`: generation ends at the end of the turn or of the text."""
    return [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------


def check_model(name: str | Path, what: str = MODEL_OPTION) -> str:
    """The local folder or hub id to load ``name`` from, checked (see :mod:`model_source`)."""
    return resolve_model_source(name, what=what)


def model_source(config: TrainConfig) -> str:
    """The checked source of a training run's ``--model_name_or_path``."""
    return check_model(config.model_name_or_path)


def load_config(source: str | Path, what: str = MODEL_OPTION) -> Any:
    """A model's configuration from its ``config.json`` alone: no weights are read or needed."""
    from transformers import AutoConfig

    _register()
    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise LoadingError(f"{source}: {what}: no config.json (not a model directory)")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else str(source))
    except (OSError, ValueError, KeyError) as error:
        raise loading_error(source, what, error) from None


# ------------------------------------------------------------------------------------------------
# dtype rules
# ------------------------------------------------------------------------------------------------


def training_dtype(config: TrainConfig) -> torch.dtype:
    """Frozen LoRA bases run in bf16 under ``--bf16``, and so does every weight under
    ``--bf16_weights`` (the optimizer keeps fp32 masters); otherwise fp32 weights."""
    bf16 = config.bf16 and (config.lora or config.bf16_weights)
    return torch.bfloat16 if bf16 else torch.float32


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` for inference: ``auto`` is bf16 on a GPU that supports it, else float32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def checkpoint_dtype(model_config: Any) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's ``dtype``), float32 when unknown."""
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# ------------------------------------------------------------------------------------------------
# model, adapter, processor
# ------------------------------------------------------------------------------------------------


def load_pretrained(
    source: str,
    *,
    dtype: torch.dtype,
    attn: str | None = None,
    quantization: Any = None,
    device: torch.device | None = None,
    name: str | Path | None = None,
    what: str = MODEL_OPTION,
) -> torch.nn.Module:
    """``from_pretrained`` of a checked ``source``: safetensors only, never remote code.

    With ``quantization`` (a ``BitsAndBytesConfig``) the weights are placed on ``device`` while
    loading (bitsandbytes quantizes them there). ``name`` is what the user typed (for errors).
    """
    from transformers import AutoModelForCausalLM

    _register()
    options: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if attn is not None:
        options["attn_implementation"] = attn
    if quantization is not None:
        options["quantization_config"] = quantization
        options["device_map"] = {"": device or torch.device("cpu")}
    try:
        return AutoModelForCausalLM.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        raise loading_error(name or source, what, error) from None


def load_model(
    config: TrainConfig, attn: str, device: torch.device, source: str | None = None
) -> torch.nn.Module:
    """The model a training run starts from (4-bit nf4 under ``--use_qlora``, placed on device)."""
    from phi3v_train.training.strategies import quantization_config

    source = source or model_source(config)
    quantization = None
    if config.use_qlora:
        quantization = quantization_config(config, device, load_config(source))
    return load_pretrained(
        source,
        dtype=training_dtype(config),
        attn=attn,
        quantization=quantization,
        device=device,
        name=config.model_name_or_path,
    )


def attach_adapter(model: torch.nn.Module, adapter: str | Path, what: str = "--adapter") -> Any:
    """``model`` with the LoRA/DoRA adapter of a checked folder (safetensors only), for inference."""
    from peft import PeftModel

    adapter = check_adapter(adapter, what=what)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise loading_error(adapter, f"{what}: does not fit the model", error) from None


def has_processor(directory: str | Path) -> bool:
    """Whether ``directory`` holds processor files (the trainer saves them beside an adapter)."""
    return any((Path(directory) / name).is_file() for name in PROCESSOR_FILES)


def load_processor(
    source: str | Path,
    num_crops: int | None = None,
    *,
    adapter: str | Path | None = None,
    name: str | Path | None = None,
    what: str = MODEL_OPTION,
) -> Any:
    """The processor of ``source`` (of ``adapter`` when the trainer saved one there).

    ``num_crops`` overrides the one in ``preprocessor_config.json``.
    """
    from transformers import AutoProcessor

    _register()
    where = adapter if adapter is not None and has_processor(adapter) else source
    options = {"num_crops": num_crops} if num_crops is not None else {}
    try:
        return AutoProcessor.from_pretrained(where, **options)
    except (OSError, ValueError) as error:
        raise loading_error(name or where, what, error) from None


def load_for_inference(
    model_path: str | Path,
    *,
    adapter: str | Path | None = None,
    num_crops: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    what: str = MODEL_OPTION,
) -> tuple[torch.nn.Module, Any]:
    """A checked model (plus an optional adapter) and its processor, in eval mode on ``device``."""
    source = check_model(model_path, what)
    if adapter is not None:
        check_adapter(adapter)
    model = load_pretrained(source, dtype=dtype or torch.float32, name=model_path, what=what)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    processor = load_processor(source, num_crops, adapter=adapter, name=model_path, what=what)
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor
