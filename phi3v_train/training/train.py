"""``phi3v-train``: the one training recipe, as a short sequence of phases.

1. :func:`open_run`: resolve the run plan (:mod:`.run_plan`: eval split, num_crops, attention,
   accumulation, engine, precision...) over the dataset handle, opened and validated once on
   rank 0 (:mod:`phi3v_train.dataset_handle`), and check OUT, all before any model is loaded
   (exit 2 with one line or the validate report). The process group is joined first (torchrun:
   gloo on CPU, nccl on CUDA; or DeepSpeed) so that rank 0's verdict can be shared.
2. :func:`load_data`: the processor and the training records (over-long ones dropped); the
   schedule is then known and ``OUT/train_config.yaml`` is written from the plan.
3. :func:`load_and_evaluate`: the model (attention, dtype, QLoRA), evaluated untouched
   (``eval_before.json``).
4. :func:`apply_strategy`: freezing or LoRA / QLoRA / DoRA; gradient checkpointing.
5. :func:`build_engine` (:mod:`.engines`): plain, DDP, DeepSpeed or FSDP2 with AdamW and the
   linear schedule; :func:`resume` restores a checkpoint into it.
6. :func:`run_loop`: :func:`.loop.train_loop` with logging, checkpoints every ``--save_steps``.
7. :func:`finish`: the model (official layout) or the adapter, the processor, the loss curve;
   evaluation again (``eval_after.json``).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from phi3v_data.atomic import write_atomic
from phi3v_data.safe_io import describe_os_error
from phi3v_train.dataset_handle import DatasetHandle, DatasetInvalid
from phi3v_train.distributed import DistInfo, barrier, cleanup_distributed, setup_distributed
from phi3v_train.loading import LoadingError, load_model, load_processor, model_source
from phi3v_train.training import checkpointing as ckpt
from phi3v_train.training.config import TrainConfig, build_config, config_options
from phi3v_train.training.engines import Engine, build_engine
from phi3v_train.training.kernels import apply_kernels, check_kernels
from phi3v_train.training.loop import EpochSampler, StepResult, epoch_batch_sampler, train_loop
from phi3v_train.training.output_dir import (
    OWNED_NAMES,
    check_output_dir,
    prepare_output_dir,
    write_run_plan,
)
from phi3v_train.training.reporting import (
    MultiReporter,
    ReportingError,
    build_reporters,
    require_trackers,
)
from phi3v_train.training.run_plan import (
    RunPlan,
    TrainingError,
    resolve_accumulation,
    resolve_plan,
)

__all__ = ["OWNED_NAMES", "EpochSampler", "TrainingError", "train", "train_command"]

#: Fault injection for the resume tests: the process SIGKILLs itself after this optimizer step.
KILL_AFTER_STEP_ENV = "PHI3V_TRAIN_KILL_AFTER_STEP"


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.pass_context
def train_command(ctx: click.Context, **params: Any) -> None:
    """Fine-tune Phi-3.5-vision on a dataset directory.

    \b
      phi3v-train --data_dir DIR --output_dir OUT [options]
      phi3v-train --config recipes/docvqa-lora.yaml --data_dir DIR --output_dir OUT
      torchrun --nproc_per_node=N --no-python phi3v-train --data_dir DIR ...

    Other commands: `phi3v-train eval`, `phi3v-train merge`, `phi3v-train make-tiny`
    (each with --help).
    """
    config = build_config(ctx, params)
    if config.data_dir is None:
        raise click.UsageError("--data_dir: missing (the dataset directory to train on)")
    try:
        train(config)
    except (TrainingError, LoadingError, ReportingError) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the phases share: the plan, where this process sits, the dataset, the log."""

    plan: RunPlan
    dist: DistInfo
    handle: DatasetHandle
    source: str
    resume_from: Path | None
    log: Any
    reporter: MultiReporter

    @property
    def config(self) -> TrainConfig:
        return self.plan.config

    @property
    def out(self) -> Path:
        return self.plan.config.output_dir


def train(config: TrainConfig) -> None:
    """The recipe: every phase below, in order (see the module docstring)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
    run = open_run(config)
    with run.reporter:  # closed at the end; an exception marks the tracked runs failed
        processor, dataset, collator = load_data(run)
        model = load_and_evaluate(run, processor)
        model = apply_strategy(run, model)
        engine = build_engine(run.plan, model, run.dist, processor)
        state = resume(run, engine)
        run_loop(run, engine, dataset, collator, state)
        finish(run, engine, processor, state)


def open_run(config: TrainConfig) -> Run:
    """Checks that need no model: resume target, model source, dataset, plan, OUT."""
    dist = setup_distributed(use_deepspeed=bool(config.deepspeed))
    log = _logger(dist.is_main)
    resolve_accumulation(config.batch_size, config.batch_size_per_gpu, dist.world_size)
    try:
        handle = DatasetHandle.open(config.data_dir)
    except DatasetInvalid as error:
        if dist.is_main and error.report:
            click.echo(error.report, err=True)
        raise TrainingError(str(error)) from None
    cuda = dist.device.type == "cuda"
    plan = resolve_plan(config, handle.info, handle.splits, dist.world_size, cuda=cuda)
    require_trackers(config.report_to)  # a missing extra is one line, before any model loads
    check_kernels(config, dist.device)
    resume_from = _resume_path(config)
    source = model_source(config)
    to_remove = check_output_dir(plan, resume_from, source)
    if dist.is_main:
        prepare_output_dir(config, source, to_remove, log)
        for stale in ckpt.remove_incomplete(config.output_dir):
            log(f"removed incomplete checkpoint {stale}")
    barrier()
    if config.use_flash_attention:
        attn = plan.attn
        log(f"attention: {attn}" + ("" if attn == "flash_attention_2" else " (flash_attn absent)"))
    _seed_everything(config.seed)
    run_name = config.output_dir.resolve().name
    reporter = build_reporters(
        config.report_to, config.output_dir, run_name, None, is_main=dist.is_main, warn=log
    )
    return Run(plan, dist, handle, source, resume_from, log, reporter)


def load_data(run: Run) -> tuple[Any, Any, Any]:
    """Processor, training dataset and collator; the schedule is resolved and the plan written."""
    from phi3v_train.data import TrainCollator, TrainDataset
    from phi3v_train.training.packing import PackingCollator

    config = run.config
    processor = load_processor(run.source, run.plan.num_crops, name=config.model_name_or_path)
    records = run.handle.records(config.train_split)
    dataset = TrainDataset(
        records, processor, run.handle.images_root, max_seq_len=config.max_seq_len
    )
    skipped = dataset.drop_overlong()
    if skipped:
        run.log(
            f"max_seq_len {config.max_seq_len}: skipped {len(skipped)} record(s) whose image "
            f"tokens or answer do not fit: {', '.join(skipped[:10])}"
            + (" ..." if len(skipped) > 10 else "")
        )
    if len(dataset) == 0:
        raise TrainingError(f"{config.data_dir}: no training record left to train on")
    batches = None
    if config.max_tokens_per_batch:
        sampler = epoch_batch_sampler(dataset, run.plan, epoch=0, rank=run.dist.rank)
        batches = len(sampler)
    run.plan = run.plan.with_schedule(len(dataset), batches)
    if run.dist.is_main:
        write_run_plan(run.plan)
    run.reporter.log_config(run.plan.replay_values())
    collate = PackingCollator if config.packing else TrainCollator
    return processor, dataset, collate(pad_token_id=processor.tokenizer.pad_token_id)


def load_and_evaluate(run: Run, processor: Any) -> torch.nn.Module:
    """The model on its device, evaluated before training unless skipped or already done."""
    config = run.config
    model = load_model(config, run.plan.attn, run.dist.device, run.source)
    if not config.use_qlora:
        model.to(run.dist.device)
    path = run.out / "eval_before.json"
    if run.plan.eval_split and not config.skip_eval_before and not path.exists():
        _evaluate(run, model, processor, path, _eval_autocast(run), step=0)
    return model


def apply_strategy(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """Freezing or LoRA / QLoRA / DoRA, then gradient checkpointing."""
    from phi3v_train.training.strategies import apply_freezing, apply_lora, trainable_summary

    config = run.config
    if config.lora:
        model = apply_lora(model, config)
    else:
        apply_freezing(model, config)
    if config.gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    model.config.use_cache = False
    run.log(f"strategy: {_strategy_name(config)}; {trainable_summary(model)}")
    for line in apply_kernels(model, config):
        run.log(line)
    return model


def resume(run: Run, engine: Engine) -> ckpt.TrainerState:
    """The trainer state of ``--resume``'s checkpoint (restored into the engine), or a new one."""
    if run.resume_from is None:
        if run.config.resume == "auto":
            run.log(f"--resume auto: no complete checkpoint in {run.out}, starting from step 0")
        return ckpt.TrainerState(seed=run.config.seed, world_size=run.dist.world_size)
    try:
        state = ckpt.load_checkpoint(run.resume_from, engine=engine, dist=run.dist)
    except ValueError as error:  # CheckpointError: one line naming the file
        raise TrainingError(str(error)) from None
    run.log(f"resumed from {run.resume_from} at step {state.global_step}")
    return state


def run_loop(run: Run, engine: Engine, dataset: Any, collator: Any, state) -> None:
    """The training loop with this run's logging, checkpoints and fault injection."""
    plan, config = run.plan, run.config
    run.log(
        f"training: {len(dataset)} records, {plan.world_size} process(es), engine "
        f"{plan.engine}, precision {plan.precision}, micro-batch {_micro_batch(config)}, "
        f"accumulation {plan.accumulation}, global batch {config.batch_size}, "
        f"{plan.total_steps} optimizer steps"
    )
    progress = _progress(config, run.dist.is_main, plan.total_steps, state.global_step)
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)

    def on_step(state: ckpt.TrainerState, result: StepResult) -> None:
        step, lr, loss, tokens = state.global_step, engine.lr(), result.loss, result.tokens
        metrics = {
            "train/loss": loss,
            "train/learning_rate": lr,
            "train/tokens": tokens.real_tokens,
        }
        metrics["train/padding_share"] = tokens.padding_share
        run.reporter.log_metrics(metrics, step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
        if step % config.logging_steps == 0 or step == plan.total_steps:
            run.log(
                f"step {step}/{plan.total_steps} loss {loss:.4f} lr {lr:.3g} {tokens.describe()}"
            )
        if config.save_steps and step % config.save_steps == 0:
            run.log(f"saved {_save_checkpoint(run, engine, state)}")
        if kill_after and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    started = time.monotonic()
    train_loop(engine, plan, dataset, collator, state, on_step)
    if progress is not None:
        progress.close()
    run.log(f"trained {state.global_step} steps in {time.monotonic() - started:.1f}s")


def finish(run: Run, engine: Engine, processor: Any, state: ckpt.TrainerState) -> None:
    """Save the outputs, evaluate after training, leave the process group."""
    _save_outputs(run, engine, processor, state)
    if run.plan.eval_split and not run.config.skip_eval_after:
        if not engine.can_generate:
            run.log(f"evaluation after training skipped under {run.plan.engine} (sharded)")
        else:
            engine.unwrapped.config.use_cache = True
            path = run.out / "eval_after.json"
            autocast = engine.autocast()
            _evaluate(run, engine.unwrapped, processor, path, autocast, step=state.global_step)
    barrier()
    cleanup_distributed()


# ------------------------------------------------------------------------------------------------
# helpers of the phases
# ------------------------------------------------------------------------------------------------


def _micro_batch(config: TrainConfig) -> str:
    if config.max_tokens_per_batch:
        return f"<= {config.max_tokens_per_batch} tokens" + (" packed" if config.packing else "")
    return str(config.batch_size_per_gpu) + (" packed" if config.packing else "")


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        return ckpt.latest_checkpoint(config.output_dir)
    path = Path(config.resume)
    if not (path / ckpt.STATE_FILE).is_file():
        raise TrainingError(f"{path}: --resume: not a complete checkpoint (no {ckpt.STATE_FILE})")
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _logger(is_main: bool):
    def log(message: str) -> None:
        if is_main:
            click.echo(f"[phi3v-train] {message}", err=True)

    return log


def _eval_autocast(run: Run):
    """The autocast of evaluation before training (the model is not wrapped yet)."""
    device, precision = run.dist.device, run.plan.precision
    if precision == "bf16" and run.plan.engine != "deepspeed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    from contextlib import nullcontext

    return nullcontext()


def _evaluate(run: Run, model, processor, path: Path, autocast, *, step: int) -> None:
    from phi3v_train.evaluation.evaluate import evaluate_split

    config, split = run.config, run.plan.eval_split
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        result = evaluate_split(
            model,
            processor,
            run.handle.root,
            split,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
            max_samples=config.eval_max_samples,
            dist=run.dist,
        )
    if run.dist.is_main:
        try:
            result.write_json(path)
        except OSError as error:
            raise TrainingError(f"cannot write {path.name}: {describe_os_error(error)}") from None
        run.log(f"{path.stem} ({split}):\n{result.format_table()}")
    run.reporter.log_metrics({f"eval/{k}": v for k, v in result.metrics.items()}, step)
    model.train(was_training)


def _save_checkpoint(run: Run, engine: Engine, state: ckpt.TrainerState) -> Path:
    """``ckpt.save_checkpoint`` with a write failure (disk full, read-only) as one line."""
    try:
        return ckpt.save_checkpoint(
            run.out,
            state,
            engine=engine,
            dist=run.dist,
            save_total_limit=run.config.save_total_limit,
        )
    except OSError as error:
        partial = run.out / f"{ckpt.CHECKPOINT_PREFIX}{state.global_step}{ckpt.TMP_SUFFIX}"
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(
            f"step {state.global_step}: cannot write the checkpoint: {describe_os_error(error)}"
        ) from None


def _save_outputs(run: Run, engine: Engine, processor: Any, state: ckpt.TrainerState) -> None:
    """Model (official layout) or adapter, processor files, loss curve: atomically per file.

    Everything is written into ``OUT/.save-<pid>/`` first and then renamed into OUT file by file,
    so a failure (disk full, read-only) leaves either the previous file or the new one.
    """
    config, out = run.config, run.out
    state_dict = engine.full_state_dict()  # a collective for sharded engines: every rank
    if run.dist.is_main:
        options: dict[str, Any] = {"save_embedding_layers": False} if config.lora else {}
        if state_dict is not None:
            options["state_dict"] = state_dict
        staging = out / f".save-{os.getpid()}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            engine.unwrapped.save_pretrained(str(staging), **options)
            processor.save_pretrained(str(staging))
            for entry in sorted(staging.iterdir()):
                target = out / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            _plot_losses(state.losses, out / "loss_curve.png")
            state.write(out / "trainer_state.json")
        except OSError as error:
            raise TrainingError(
                f"cannot save the trained model: {describe_os_error(error)}"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        kind = "adapter" if config.lora else "model"
        run.log(f"saved the {kind}, processor, loss_curve.png and train_config.yaml to {out}")
    barrier()


# ------------------------------------------------------------------------------------------------
# helpers of the recipe
# ------------------------------------------------------------------------------------------------


def _strategy_name(config: TrainConfig) -> str:
    if config.use_qlora:
        name = "QLoRA (nf4)"
    elif config.use_dora:
        name = "DoRA"
    elif config.lora:
        name = "LoRA"
    else:
        name = "full fine-tuning"
    if config.lora:
        name += f" r={config.lora_rank} alpha={config.lora_alpha}"
    frozen = sorted(config.frozen_parts)
    if frozen:
        name += f", frozen: {', '.join(frozen)}"
    if config.freeze_text_embeddings_with_vision:
        name += " (+ projector and text embeddings, as the original)"
    return name


def _progress(config: TrainConfig, is_main: bool, total: int, done: int):
    if not (config.tqdm and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step")


def _plot_losses(losses: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    if losses:
        steps, values = zip(*losses, strict=True)
        axis.plot(steps, values)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title("phi3v-train")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    plt.close(figure)
    write_atomic(path, image.getvalue())
