"""The options training and ``eval`` share, declared once, and click options generated from them.

:class:`SharedOptions` holds the fields both commands take (same names, types, defaults and
help): ``TrainConfig`` inherits it and ``phi3v-train eval`` generates its options from it with
:func:`click_options` (``only=`` picks the ones a command takes). Each default lives here and
nowhere else, :data:`DEFAULT_NUM_CROPS` included.

- :func:`click_options`: a decorator adding one click option per field of a pydantic model
  (booleans get ``--no-`` forms, ``Literal`` becomes a choice, ``list[Literal]`` a repeatable
  choice); ``aliases`` adds hidden old spellings of an option (deprecated names kept for scripts).
- :func:`command_line_values`: the values the user actually typed (not click's defaults), so that
  YAML < command line precedence works and pydantic applies the defaults.
- :func:`format_validation_error`: a pydantic error as ``source: field: message`` lines.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import click
from click.core import ParameterSource
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from phi3v_data.schema import DEFAULT_NUM_CROPS, MAX_NUM_CROPS

AttnImpl = Literal["sdpa", "flash_attention_2", "eager"]
DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"


class SharedOptions(BaseModel):
    """Options of both ``phi3v-train`` (training) and ``phi3v-train eval``."""

    # allow_inf_nan=False: every float option refuses inf / nan (a NaN model would be saved).
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    data_dir: Path | None = Field(
        default=None,
        description="Dataset directory (conversations-jsonl; checked with `phi3v-data validate` "
        "before any model is loaded). Required.",
    )
    model_name_or_path: str = Field(
        default=DEFAULT_MODEL,
        description="Model directory (or hub id) in the official Phi-3.5-vision layout.",
    )
    output_dir: Path = Field(default=Path("./output/"), description="Where everything is written.")
    num_crops: int | None = Field(
        default=None,
        description=f"Max HD crops per image (1..{MAX_NUM_CROPS}; default: dataset.json's "
        f"num_crops, else {DEFAULT_NUM_CROPS}).",
    )
    attn: AttnImpl | None = Field(
        default=None,
        description="Attention implementation (default: sdpa, or what --use_flash_attention picks).",
    )
    bf16: bool = Field(
        default=False,
        description="bf16 mixed precision. Without it: fp16 autocast with fp32 master weights and "
        "a GradScaler on CUDA, plain fp32 on CPU.",
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=2**32 - 1,
        description="Seed of weights init, data order and dropout (0..2**32-1).",
    )
    eval_max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many samples of the eval split."
    )
    eval_batch_size: int = Field(default=8, ge=1, description="Generation batch per process.")
    max_new_tokens: int = Field(default=64, ge=1, description="Generation length in evaluation.")

    @model_validator(mode="after")
    def _check_shared(self) -> SharedOptions:
        if self.num_crops is not None and not 1 <= self.num_crops <= MAX_NUM_CROPS:
            raise ValueError(f"num_crops: must be between 1 and {MAX_NUM_CROPS}")
        return self


# ------------------------------------------------------------------------------------------------
# click options generated from a model
# ------------------------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _option_kwargs(name: str, field: Any) -> tuple[list[str], dict[str, Any]]:
    """Declarations and keyword arguments of the click option of one field."""
    annotation = _unwrap_optional(field.annotation)
    default = field.get_default(call_default_factory=True)
    help_text = field.description or ""
    if default not in (None, [], False):
        help_text += f"  [default: {default}]"
    flag = f"--{name}"
    common: dict[str, Any] = {"default": None, "help": help_text}
    if annotation is bool:
        return [f"{flag}/--no-{name}", name], {**common, "show_default": False}
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        choice = click.Choice(list(typing.get_args(item)))
        return [flag, name], {**common, "type": choice, "multiple": True}
    if typing.get_origin(annotation) is Literal:
        return [flag, name], {**common, "type": click.Choice(list(typing.get_args(annotation)))}
    if name == "resume":  # `--resume` alone means auto; `--resume PATH` names a checkpoint
        return [flag, name], {**common, "type": str, "is_flag": False, "flag_value": "auto"}
    click_type = {int: int, float: float, Path: click.Path(path_type=Path)}.get(annotation, str)
    return [flag, name], {**common, "type": click_type}


def click_option(name: str, field: Any) -> click.Option:
    """The click option of one pydantic field (destination: the field name)."""
    declarations, kwargs = _option_kwargs(name, field)
    return click.Option(declarations, **kwargs)


def _hidden_alias(name: str, field: Any, alias: str) -> click.Option:
    declarations, kwargs = _option_kwargs(name, field)
    first = declarations[0].replace(f"--{name}", f"--{alias}")
    kwargs["help"] = f"Deprecated spelling of --{name}."
    return click.Option([first, f"{ALIAS_PREFIX}{name}"], hidden=True, **kwargs)


#: Destination prefix of a hidden deprecated alias (merged by :func:`command_line_values`).
ALIAS_PREFIX = "_alias__"


def add_param(func: Any, param: click.Parameter) -> Any:
    """Attach a click parameter to a command function (as the decorators do)."""
    if not hasattr(func, "__click_params__"):
        func.__click_params__ = []
    func.__click_params__.append(param)
    return func


def click_options(
    model: type[BaseModel],
    *,
    only: typing.Iterable[str] | None = None,
    aliases: dict[str, str] | None = None,
):
    """Decorator: one click option per field of ``model`` (or of ``only``, in field order).

    ``aliases`` maps a field to a hidden, deprecated spelling (``{"model_name_or_path":
    "model"}`` keeps ``--model`` working); :func:`command_line_values` folds it into the field.
    """
    wanted = set(model.model_fields) if only is None else set(only)
    unknown = wanted - set(model.model_fields)
    if unknown:
        raise ValueError(f"click_options: {model.__name__} has no field {sorted(unknown)[0]}")

    def decorate(func: Any) -> Any:
        for name, field in reversed(list(model.model_fields.items())):
            if name not in wanted:
                continue
            if aliases and name in aliases:
                func = add_param(func, _hidden_alias(name, field, aliases[name]))
            func = add_param(func, click_option(name, field))
        return func

    return decorate


def command_line_values(
    ctx: click.Context, params: dict[str, Any], model: type[BaseModel]
) -> dict[str, Any]:
    """The fields of ``model`` given on the command line (deprecated aliases folded in)."""
    values: dict[str, Any] = {}
    for name in model.model_fields:
        for key in (f"{ALIAS_PREFIX}{name}", name):  # the new spelling wins over the old
            if key in params and ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE:
                value = params[key]
                values[name] = list(value) if isinstance(value, tuple) else value
    return values


def format_validation_error(error: ValidationError, source: str) -> str:
    """``source: field: message`` per problem (pydantic's ``Value error,`` prefix dropped)."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {field}: {message}" if item["loc"] else f"{source}: {message}")
    return "\n".join(lines)
