"""Merge a LoRA / DoRA adapter into its base model: ``phi3v-train merge``.

vLLM serves Phi-3.5-vision but cannot load LoRA adapters for it, so a fine-tune is served as a
merged, standalone checkpoint. The output is the official layout: ``config.json`` (``model_type``
``phi3_v``, ``architectures`` ``["Phi3VForCausalLM"]``), safetensors with the official key names
and the token embedding stored once (no ``model.vision_embed_tokens.wte.weight`` copy), the
tokenizer and processor files, and a ``generation_config.json`` that stops at ``<|end|>`` and
``<|endoftext|>`` (the official one names id 2, which the model never emits).

The merge runs in float32 (PEFT ``merge_and_unload``) and the result is cast to ``--dtype``
(default: the base checkpoint's dtype). A QLoRA adapter is merged into the unquantized base, as
the original recipe evaluates it. When the base is a local directory with the official remote code
(``*.py`` + ``auto_map``), both are carried over, so loaders that use ``trust_remote_code`` (vLLM)
read the merged directory like the official one. The directory is written under a temporary name
and renamed into place, so ``--out`` is either the complete checkpoint or untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import click
import torch
from click.core import ParameterSource
from safetensors import safe_open

from phi3v_data.safe_io import describe_os_error
from phi3v_train.loading import (
    DTYPES,
    LoadingError,
    attach_adapter,
    check_adapter,
    check_model,
    checkpoint_dtype,
    error_headline,
    load_pretrained,
    load_processor,
    stop_token_ids,
)
from phi3v_train.options import SharedOptions

#: The alias of ``model.embed_tokens.weight`` that the official code exposes; never written.
SHARED_EMBEDDING_ALIAS = "model.vision_embed_tokens.wte.weight"
#: Files whose ``auto_map`` (remote-code class paths) the official checkpoint carries.
AUTO_MAP_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
)


#: The options naming the base model and the output folder: training's names.
MODEL_OPTION = "--model_name_or_path"
OUT_OPTION = "--output_dir"


class MergeError(Exception):
    """A merge that cannot run; ``str()`` names the path and the reason."""


def merge_adapter(
    base: str | Path,
    adapter: Path,
    out: Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    model_option: str = MODEL_OPTION,
    out_option: str = OUT_OPTION,
) -> Path:
    """Write ``base`` + ``adapter`` merged into ``out`` (atomically); return ``out``.

    The model source and the adapter are checked first (safetensors only; a hub id fails fast
    when the hub cannot be reached), then ``out`` is proved writable, all before any load.
    Errors name the options as the user spelled them (``model_option``, ``out_option``).
    """
    adapter, out = Path(adapter), Path(out)
    try:  # safetensors only, no hub hang: one line before anything loads
        source = check_model(base, what=model_option)
        check_adapter(adapter)
    except LoadingError as error:
        raise MergeError(str(error)) from None
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out}: {out_option}: exists and is not a directory")
    if out.exists() and not overwrite:
        raise MergeError(f"{out}: already exists (pass --overwrite to replace it)")
    for name, folder in ((model_option, Path(source)), ("--adapter", adapter)):
        if folder.is_dir() and (
            out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents
        ):
            raise MergeError(
                f"{out}: {out_option} is or contains {name} {folder}: it would be replaced"
            )

    temporary = out.with_name(f".{out.name}.merge-{os.getpid()}")
    try:  # prove the destination writable before the long load and merge
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    except OSError as error:
        raise MergeError(f"{out}: {out_option}: cannot write: {describe_os_error(error)}") from None
    try:
        _merge_into(source, adapter, out, temporary, dtype, model_option)
    except OSError as error:
        raise MergeError(
            f"{out}: cannot write the merged model: {describe_os_error(error)}"
        ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out


def _merge_into(
    base: str, adapter: Path, out: Path, temporary: Path, dtype: str, model_option: str
) -> None:
    model = load_pretrained(base, dtype=torch.float32, what=model_option)
    saved_dtype = checkpoint_dtype(model.config) if dtype == "auto" else DTYPES[dtype]
    merged = attach_adapter(model, adapter).merge_and_unload()
    merged.to(saved_dtype)
    merged.config.dtype = saved_dtype

    processor = load_processor(base, adapter=adapter, what=model_option)
    tokenizer = processor.tokenizer
    generation = merged.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id

    merged.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    processor.image_processor.save_pretrained(temporary)  # preprocessor_config.json, official
    _check_no_alias(temporary)
    keep_remote_code(base, temporary)
    _replace_dir(temporary, out)


def keep_remote_code(base: str | Path, model_dir: Path) -> None:
    """Carry a local base directory's remote-code files (``*.py``) and ``auto_map`` entries over.

    phi3v_train loads without them, but tools that load the official model with
    ``trust_remote_code`` (vLLM's config and processor loading among them) need both.
    """
    base = Path(base)
    if not base.is_dir():
        return
    for source in sorted(base.glob("*.py")):
        shutil.copy2(source, model_dir / source.name)
    for name in AUTO_MAP_FILES:
        source, target = base / name, model_dir / name
        if not (source.is_file() and target.is_file()):
            continue
        auto_map = json.loads(source.read_text(encoding="utf-8")).get("auto_map")
        if auto_map:
            data = json.loads(target.read_text(encoding="utf-8"))
            data["auto_map"] = auto_map
            target.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a safetensors checkpoint directory with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _check_no_alias(model_dir: Path) -> None:
    keys = checkpoint_shapes(model_dir)
    if not keys:
        raise MergeError(f"{model_dir}: no safetensors written")
    if SHARED_EMBEDDING_ALIAS in keys:
        raise MergeError(f"{model_dir}: {SHARED_EMBEDDING_ALIAS} duplicates model.embed_tokens")
    leftovers = [key for key in keys if "lora_" in key or "base_layer" in key]
    if leftovers:
        raise MergeError(f"{model_dir}: adapter weights left after merging: {leftovers[0]}")


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is removed only after the move."""
    if not target.exists():
        source.replace(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.replace(old)
    source.replace(target)
    shutil.rmtree(old, ignore_errors=True)


#: Old spellings kept for scripts (hidden; each use prints a one-line deprecation note).
DEPRECATED = {"--model": MODEL_OPTION, "--out": OUT_OPTION}


def _typed(ctx: click.Context, new: str, old: str) -> str:
    """The spelling of an option the user typed (the old one is noted as deprecated)."""
    if ctx.get_parameter_source(old.lstrip("-")) == ParameterSource.COMMANDLINE:
        click.echo(f"note: {old} is deprecated; use {new}", err=True)
        return old
    return new


@click.command("merge")
@click.option(
    MODEL_OPTION,
    "base",
    default=SharedOptions.model_fields["model_name_or_path"].default,
    show_default=True,
    help="Base model directory (or hub id): the one the adapter was trained on.",
)
@click.option("--model", hidden=True, help="Deprecated: --model_name_or_path.")
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="LoRA/DoRA adapter directory written by phi3v-train.",
)
@click.option(
    OUT_OPTION,
    "output_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the merged checkpoint (written atomically). Required.",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), hidden=True, help="Deprecated."
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default="auto",
    show_default=True,
    help="dtype of the saved weights; auto keeps the base checkpoint's.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.pass_context
def merge_command(ctx: click.Context, base: str, model: str | None, **params: Any) -> None:
    """Merge a LoRA/DoRA adapter into its base model as a standalone checkpoint (for vLLM).

    \b
      phi3v-train merge --model_name_or_path microsoft/Phi-3.5-vision-instruct \\
          --adapter OUT --output_dir MERGED
    """
    model_option, out_option = (_typed(ctx, new, old) for old, new in DEPRECATED.items())
    base = model if model_option == "--model" else base
    out = params["out"] if out_option == "--out" else params["output_dir"]
    if out is None:
        raise click.UsageError(f"{OUT_OPTION}: missing (the directory to write the merged model)")
    adapter = params["adapter"]
    try:
        merge_adapter(base, adapter, out, dtype=params["dtype"], overwrite=params["overwrite"],
                      model_option=model_option, out_option=out_option)  # fmt: skip
    except (MergeError, LoadingError) as error:
        raise click.ClickException(str(error)) from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise click.ClickException(
            f"{adapter}: cannot merge into {base}: {error_headline(error)}"
        ) from None
    click.echo(f"merged {adapter} into {base}: wrote {out}")
