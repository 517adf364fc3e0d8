"""The output directory of a run: what the trainer owns there, and checks before the long work.

An OUT is never silently reused: :func:`check_output_dir` refuses one that is, is inside or contains
the base model, or holds a previous run's outputs unless ``--resume`` continues it or
``--overwrite`` replaces them (only the names in :data:`OWNED_NAMES`); :func:`prepare_output_dir`
proves OUT writable with room for the model; :func:`write_run_plan` writes ``train_config.yaml``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from phi3v_data.atomic import write_atomic
from phi3v_data.safe_io import describe_os_error
from phi3v_train.training.config import TrainConfig
from phi3v_train.training.run_plan import SCHEDULE_KEYS, RunPlan, TrainingError

#: What the trainer writes at the top of OUT: ``--overwrite`` removes these and nothing else.
OWNED_NAMES = frozenset(
    {
        "train_config.yaml",
        "trainer_state.json",
        "eval_before.json",
        "eval_after.json",
        "loss_curve.png",
        "logs",
        "wandb",
        "mlruns",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "processor_config.json",
        "preprocessor_config.json",
    }
)
#: Numbered names the trainer writes: weight shards, checkpoints (complete or not), staging.
_OWNED_NUMBERED = re.compile(r"^(model-\d+-of-\d+\.safetensors|checkpoint-\d+(\.tmp)?|\.save-\d+)$")
#: Written when a run starts, before its first checkpoint: a rerun of the same configuration with
#: --resume may continue beside them (they are this same run's).
_START_NAMES = frozenset({"train_config.yaml", "eval_before.json", "logs", "wandb", "mlruns"})


def owned_entries(out: Path) -> list[Path]:
    """What a previous run of the trainer left in ``out`` (only names the trainer writes)."""
    if not out.is_dir():
        return []
    found = {out / name for name in OWNED_NAMES if (out / name).exists()}
    found.update(path for path in out.iterdir() if _OWNED_NUMBERED.match(path.name))
    if (out / "adapter_config.json").exists() and (out / "README.md").is_file():
        found.add(out / "README.md")  # PEFT's model card beside the adapter
    return sorted(found)


def _same_run_restarted(plan: RunPlan, out: Path, used: list[Path]) -> bool:
    """Only start files are there and train_config.yaml is this very configuration (compared
    without the schedule, which is resolved once the records are counted)."""
    if {path.name for path in used} - _START_NAMES or not (out / "train_config.yaml").is_file():
        return False
    try:
        previous = yaml.safe_load((out / "train_config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    current = plan.replay_values()
    if not isinstance(previous, dict):
        return False
    for key in ("resume", *SCHEDULE_KEYS):
        previous.pop(key, None)
        current.pop(key, None)
    return previous == current


def check_output_dir(
    plan: RunPlan, resume_from: Path | None, source: str | None = None
) -> list[Path]:
    """Refuse an output_dir that would lose data; return what must be removed before starting.

    - a file where the directory belongs, or an output_dir equal to, inside or containing a local
      ``--model_name_or_path`` (the base weights would be overwritten or deleted);
    - an output_dir holding a previous run's outputs, unless ``--resume`` continues it or
      ``--overwrite`` asks to remove them (only the trainer's own files, :data:`OWNED_NAMES`);
      a resumed run removes the previous ``eval_after.json`` (a result of another state).
    """
    config = plan.config
    out = config.output_dir
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out}: --output_dir: exists and is not a directory")
    model = Path(source or config.model_name_or_path).expanduser()  # a cached hub id: its folder
    if model.is_dir():
        out_real, model_real = out.resolve(), model.resolve()
        if out_real == model_real or model_real in out_real.parents:
            raise TrainingError(
                f"{out}: --output_dir is (inside) --model_name_or_path {model}: the base model "
                "would be overwritten; choose another output directory"
            )
        if out_real in model_real.parents:
            raise TrainingError(
                f"{out}: --output_dir contains --model_name_or_path {model}: the base model would "
                "be mixed with (or removed as) the run's outputs; choose another output directory"
            )
    used = owned_entries(out)
    if not used:
        return []
    if config.overwrite:
        return used
    if resume_from is not None:
        return [path for path in used if path.name == "eval_after.json"]
    if config.resume is not None and _same_run_restarted(plan, out, used):
        return []
    names = ", ".join(path.name for path in used[:4]) + (", ..." if len(used) > 4 else "")
    found = "no complete checkpoint to resume from, and " if config.resume is not None else ""
    raise TrainingError(
        f"{out}: --output_dir: {found}holds a previous run's outputs ({names}); pass "
        + (
            "--overwrite to replace them"
            if found
            else "--resume to continue that run or "
            "--overwrite to replace them (only the trainer's own files are removed)"
        )
    )


def _free_bytes_needed(config: TrainConfig, source: str) -> int:
    """A lower bound of what the run writes: the weights once under full fine-tuning."""
    if config.lora:
        return 0
    return sum(path.stat().st_size for path in Path(source).glob("*.safetensors"))


def prepare_output_dir(config: TrainConfig, source: str, to_remove: list[Path], log) -> None:
    """Rank 0, before the long work: create OUT, prove it writable with room for the model,
    remove what ``check_output_dir`` chose (all one-line errors)."""
    import shutil
    import tempfile

    out = config.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=out, prefix=".phi3v-write-test-")
        os.close(descriptor)
        os.unlink(probe)
        needed = _free_bytes_needed(config, source)
        free = shutil.disk_usage(out).free
        if free < needed:
            raise TrainingError(
                f"{out}: --output_dir: {free / 2**20:.0f} MiB free, the trained model alone "
                f"needs {needed / 2**20:.0f} MiB"
            )
        for path in to_remove:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if to_remove and config.overwrite:
            log(f"--overwrite: removed the previous run's {len(to_remove)} output(s) from {out}")
    except OSError as error:
        raise TrainingError(f"--output_dir: cannot write: {describe_os_error(error)}") from None


def write_run_plan(plan: RunPlan) -> None:
    """``OUT/train_config.yaml``: the run plan, replayable with ``--config`` (rank 0)."""
    path = plan.config.output_dir / "train_config.yaml"
    try:
        write_atomic(path, plan.to_yaml().encode("utf-8"))
    except OSError as error:
        raise TrainingError(f"--output_dir: cannot write: {describe_os_error(error)}") from None
