"""Evaluate a model on one split by greedy generation: ``phi3v-train eval`` and :func:`evaluate_split`.

The evaluation of the original recipe, batched: every record becomes the recipe's generation
prompt (all turns but the last with their answers, the last user turn with the generation prompt;
:func:`phi3v_train.data.encode_for_generation`), batches are left-padded, decoding is greedy and
stops at ``<|end|>`` or ``<|endoftext|>``, and the text after the prompt is the prediction.

Under ``torch.distributed`` every rank evaluates the strided shard ``records[rank::world]`` and the
per-example results are gathered on every rank (so rank 0 holds them all) before the metrics are
computed. Which metrics: ``dataset.json`` ``metrics`` unless overridden (:mod:`phi3v_train.evaluation.metrics`).
For AUROC the probability of the positive answer word (``answer_words["1"]``) is read from the
logits of the first generated position.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson
import torch
from click.core import ParameterSource
from pydantic import ValidationError
from torch.utils.data import DataLoader

from phi3v_data.atomic import write_atomic
from phi3v_data.dataset import (
    INFO_FILENAME,
    DatasetError,
    images_root,
    iter_records,
    load_info,
    split_path,
)
from phi3v_data.safe_io import describe_os_error
from phi3v_data.schema import DatasetInfo, Record
from phi3v_train.data import GenerationCollator, GenerationDataset
from phi3v_train.distributed import DistInfo, cleanup_distributed, setup_distributed
from phi3v_train.evaluation import metrics as metric_fns
from phi3v_train.loading import (
    DTYPES,
    LoadingError,
    check_adapter,
    inference_dtype,
    load_for_inference,
    stop_token_ids,
)
from phi3v_train.options import (
    ALIAS_PREFIX,
    SharedOptions,
    click_options,
    command_line_values,
    format_validation_error,
)
from phi3v_train.training.run_plan import resolve_num_crops

#: The shared options' defaults (eval batch size, generation length), declared in one place.
SHARED_DEFAULTS = SharedOptions()


@dataclass
class ExampleResult:
    """One evaluated example: what was asked for, what came out, and its score."""

    id: str
    prediction: str
    references: list[str]
    score: float | None
    label: int | None = None
    group: str | None = None
    positive_prob: float | None = None


@dataclass
class EvalResult:
    """Metrics of one split plus the per-example results they were computed from."""

    split: str
    metrics: dict[str, float]
    examples: list[ExampleResult] = field(default_factory=list)
    score_name: str | None = "accuracy"

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_examples": len(self.examples),
            "metrics": {name: _finite_or_none(value) for name, value in self.metrics.items()},
            "score": self.score_name,
            "examples": [
                {key: value for key, value in asdict(example).items() if value is not None}
                for example in self.examples
            ],
        }

    def write_json(self, path: Path) -> None:
        """Write the result to ``path`` atomically (a temporary name, then a rename)."""
        write_atomic(Path(path), orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2) + b"\n")

    def format_table(self) -> str:
        """A small text table: one line per metric, values in percent like the original README."""
        heading = f"split {self.split}: {len(self.examples)} examples"
        if not self.metrics:
            return f"{heading}, unlabeled: predictions only, no metric"
        width = max([len("metric"), *(len(name) for name in self.metrics)])
        lines = [heading, f"{'metric':<{width}}  value"]
        for name, value in self.metrics.items():
            shown = "n/a" if math.isnan(value) else f"{100 * value:.2f}"
            lines.append(f"{name:<{width}}  {shown}")
        return "\n".join(lines)


def evaluate_split(
    model: torch.nn.Module,
    processor: Any,
    data_dir: Path,
    split: str,
    *,
    batch_size: int = SHARED_DEFAULTS.eval_batch_size,
    max_new_tokens: int = SHARED_DEFAULTS.max_new_tokens,
    max_samples: int | None = None,
    metrics: Sequence[str] | None = None,
    num_workers: int = 0,
    dist: DistInfo | None = None,
) -> EvalResult:
    """Generate an answer for every record of ``split`` and score it.

    ``metrics`` overrides ``dataset.json``'s list; ``num_workers`` DataLoader processes decode
    images. A split listed in ``unlabeled_splits`` gets predictions only (no metric, score None),
    e.g. for a test-server submission. ``dist`` says which shard this process evaluates
    (default: :func:`setup_distributed`'s answer). Raises :class:`DatasetError` for bad data.
    """
    data_dir = Path(data_dir)
    info = load_info(data_dir)
    names = metric_fns.resolve_metric_names(metrics or info.metrics)
    if split in info.unlabeled_splits:
        names = []
    jsonl_path = split_path(data_dir, split)
    numbered = list(iter_records(jsonl_path, info=info, split=split))
    if max_samples is not None:
        numbered = numbered[:max_samples]
    _check_metric_inputs(names, numbered, info, data_dir, jsonl_path)
    records = [record for _, record in numbered]

    tokenizer = processor.tokenizer
    positive_token = None
    if "auroc" in names:
        positive_token = answer_token_id(tokenizer, info.answer_words["1"])

    dist = dist or setup_distributed()
    rank, world = dist.rank, dist.world_size
    shard = list(range(len(records)))[rank::world]
    dataset = GenerationDataset(
        [records[index] for index in shard],
        processor,
        images_root(data_dir),
        source=jsonl_path,
        lines=[numbered[index][0] for index in shard],
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=GenerationCollator(tokenizer.pad_token_id),
        num_workers=num_workers,
    )
    texts: list[str] = []
    probs: list[float | None] = []
    for batch in loader:
        batch_texts, batch_probs = generate_batch(
            model, tokenizer, batch, max_new_tokens=max_new_tokens, positive_token=positive_token
        )
        texts.extend(batch_texts)
        probs.extend(batch_probs)
    local = list(zip(shard, texts, probs, strict=True))
    gathered = _gather(local, world)
    predictions = {index: (text, prob) for index, text, prob in gathered}

    score_name = ("anls" if "anls" in names else "accuracy") if names else None
    examples = [
        _example(record, *predictions[index], score_name) for index, record in enumerate(records)
    ]
    return EvalResult(split, compute_metrics(names, examples), examples, score_name)


def _example(
    record: Record, text: str, prob: float | None, score_name: str | None
) -> ExampleResult:
    """One record's result, scored by ``score_name`` (anls, accuracy, or None: unlabeled)."""
    references = record.references
    score = None
    if score_name == "anls":
        score = metric_fns.anls_score(text, references)
    elif score_name == "accuracy":
        score = metric_fns.exact_match(text, references)
    return ExampleResult(
        id=record.id,
        prediction=text,
        references=references,
        score=score,
        label=record.label,
        group=record.group,
        positive_prob=prob,
    )


def answer_token_id(tokenizer: Any, word: str) -> int:
    """The first token of ``word`` as the first answer token of a training target.

    Targets are tokenized without special tokens right after ``<|assistant|>`` (which strips the
    newline), so the word is tokenized alone the same way (``"yes"`` -> ``"▁yes"``).
    """
    return tokenizer(word, add_special_tokens=False).input_ids[0]


def compute_metrics(names: Sequence[str], examples: Sequence[ExampleResult]) -> dict[str, float]:
    """The named metrics over per-example results (names already resolved)."""
    predictions = [example.prediction for example in examples]
    references = [example.references for example in examples]
    results: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            results[name] = metric_fns.accuracy(predictions, references)
        elif name == "anls":
            results[name] = metric_fns.anls(predictions, references)
        elif name == "auroc":
            labels = [int(example.label) for example in examples]
            results[name] = metric_fns.auroc(labels, [ex.positive_prob for ex in examples])
        elif name == "consistency":
            groups = [example.group or f"id:{example.id}" for example in examples]
            correct = [
                metric_fns.exact_match(p, r) for p, r in zip(predictions, references, strict=True)
            ]
            results[name] = metric_fns.consistency(groups, correct)
    return results


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    batch: dict[str, Any],
    *,
    max_new_tokens: int = 64,
    positive_token: int | None = None,
) -> tuple[list[str], list[float | None]]:
    """Greedy answers for one left-padded batch, and P(positive token) at the first step."""
    inputs = _to_model(batch, model)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=positive_token is not None,
    )
    new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(
        new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    if positive_token is None:
        return texts, [None] * len(texts)
    first_step = output.logits[0].float().softmax(dim=-1)[:, positive_token]
    return texts, first_step.tolist()


def _to_model(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {}
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        value = batch.get(key)
        if value is None:
            continue
        value = value.to(device)
        if key == "pixel_values" and dtype.is_floating_point:
            value = value.to(dtype)
        inputs[key] = value
    return inputs


def _check_metric_inputs(
    names: Sequence[str],
    numbered: Sequence[tuple[int, Record]],
    info: DatasetInfo,
    data_dir: Path,
    jsonl_path: Path,
) -> None:
    """Fail early, naming file, line and field, when the data cannot give a requested metric."""
    if "auroc" not in names:
        return
    if not info.answer_words or "1" not in info.answer_words:
        raise DatasetError(
            data_dir / INFO_FILENAME, 0, "answer_words", "auroc needs answer_words['1']"
        )
    for line, record in numbered:
        if record.label is None:
            raise DatasetError(jsonl_path, line, "label", "auroc needs a label on every record")


def _gather(local: list[Any], world: int) -> list[Any]:
    if world == 1:
        return local
    shards: list[list[Any] | None] = [None] * world
    torch.distributed.all_gather_object(shards, local)
    return [item for shard in shards for item in shard or []]


def check_writable(path: Path) -> None:
    """Raise ``OSError`` (or ``IsADirectoryError``) unless a file can be written at ``path``.

    Run before an evaluation so that its results are never lost to a read-only, full or missing
    output folder: a probe file with one block of data is created beside ``path`` and removed.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not the JSON file to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.write(descriptor, b"\0" * 4096)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        os.unlink(probe)


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


#: The options ``eval`` shares with training: declared once in :class:`SharedOptions`.
SHARED = (
    "data_dir",
    "model_name_or_path",
    "output_dir",
    "num_crops",
    "eval_max_samples",
    "eval_batch_size",
    "max_new_tokens",
)
#: Old spellings kept for scripts (hidden; each use prints a one-line deprecation note).
DEPRECATED = {"model_name_or_path": "model", "eval_batch_size": "batch_size"}
DEPRECATED["eval_max_samples"] = "max_samples"


def _shared_options(ctx: click.Context, params: dict[str, Any]) -> SharedOptions:
    """The shared options as typed (deprecated spellings folded in, each noted on stderr)."""
    for name, alias in DEPRECATED.items():
        if ctx.get_parameter_source(f"{ALIAS_PREFIX}{name}") == ParameterSource.COMMANDLINE:
            click.echo(f"note: --{alias} is deprecated; use --{name}", err=True)
    try:
        return SharedOptions.model_validate(command_line_values(ctx, params, SharedOptions))
    except ValidationError as error:
        raise click.UsageError(format_validation_error(error, "eval").replace("\n", "; ")) from None


def _results_path(options: SharedOptions, out: Path | None, split: str) -> tuple[Path, str]:
    """Where the results go and the option that said so (``--out FILE`` is deprecated)."""
    if out is None:
        return options.output_dir / f"eval_{split}.json", "--output_dir"
    click.echo(
        "note: --out FILE is deprecated; use --output_dir DIR (DIR/eval_<split>.json)", err=True
    )
    return out, "--out"


def _check_inputs(data_dir: Path | None, split: str, adapter: Path | None) -> DatasetInfo:
    """dataset.json, the split file and the adapter, checked before anything loads."""
    if data_dir is None:
        raise click.UsageError("--data_dir: missing (the dataset directory to evaluate on)")
    try:
        info = load_info(data_dir)
        split_path(data_dir, split)
        if adapter is not None:
            check_adapter(adapter)
    except (DatasetError, LoadingError) as error:
        raise click.ClickException(str(error)) from None
    return info


def _metric_names(metric_list: str | None) -> list[str] | None:
    if not metric_list:
        return None
    names = [name.strip() for name in metric_list.split(",") if name.strip()]
    try:
        metric_fns.resolve_metric_names(names)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--metrics") from None
    return names


def _write_results(result: EvalResult, path: Path, option: str) -> None:
    click.echo(result.format_table())  # shown first: the metrics survive a failed write
    try:
        result.write_json(path)
    except OSError as error:
        message = f"{option}: cannot write the results: {describe_os_error(error)}"
        raise click.ClickException(message) from None
    click.echo(f"wrote {path}")


@click.command("eval")
@click_options(SharedOptions, only=SHARED, aliases=DEPRECATED)
@click.option(
    "--adapter",
    type=click.Path(file_okay=False, path_type=Path),
    help="LoRA/DoRA adapter directory written by phi3v-train.",
)
@click.option("--split", required=True, help="Split to evaluate, e.g. val.")
@click.option(
    "--metrics",
    "metric_list",
    help="Comma-separated metrics overriding dataset.json: "
    + ", ".join(metric_fns.METRIC_NAMES)
    + ".",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    hidden=True,
    help="Deprecated: the JSON file to write (use --output_dir).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default="auto",
    show_default=True,
    help="auto: bfloat16 on a GPU that supports it, else float32.",
)
@click.pass_context
def eval_command(ctx: click.Context, **params: Any) -> None:
    """Evaluate a model (optionally with an adapter) on one split; print a table, write
    OUTPUT_DIR/eval_<split>.json. Options shared with training have training's names.

    \b
      phi3v-train eval --model_name_or_path OUT --data_dir DIR --split val --output_dir OUT
      torchrun --nproc_per_node=4 --no-python phi3v-train eval --model_name_or_path M \\
          --data_dir D --split val
    """
    options = _shared_options(ctx, params)
    split, adapter = params["split"], params["adapter"]
    names = _metric_names(params["metric_list"])
    info = _check_inputs(options.data_dir, split, adapter)
    out, out_option = _results_path(options, params["out"], split)
    try:
        check_writable(out)
    except OSError as error:
        message = f"{out_option}: cannot write the results: {describe_os_error(error)}"
        raise click.ClickException(message) from None
    where = setup_distributed()
    try:
        model, processor = load_for_inference(
            options.model_name_or_path,
            adapter=adapter,
            num_crops=resolve_num_crops(options.num_crops, info),
            dtype=inference_dtype(params["dtype"], where.device),
            device=where.device,
        )
        result = evaluate_split(
            model,
            processor,
            options.data_dir,
            split,
            batch_size=options.eval_batch_size,
            max_new_tokens=options.max_new_tokens,
            max_samples=options.eval_max_samples,
            metrics=names,
            dist=where,
        )
    except (LoadingError, DatasetError) as error:  # RecordError too: an image, also in a worker
        raise click.ClickException(str(error)) from None
    if where.is_main:
        _write_results(result, out, out_option)
    cleanup_distributed()
