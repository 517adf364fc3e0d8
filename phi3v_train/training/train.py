"""``phi3v-train``: the one training recipe, top to bottom.

1. Resolve the configuration (flags < YAML < command line), check the batch arithmetic and
   validate the dataset, all before any model is loaded (exit 2 with a one-line message or the
   validate report).
2. Join the process group (torchrun: gloo on CPU, nccl on CUDA; or DeepSpeed).
3. Load the processor and the model (attention implementation, dtype, QLoRA quantization).
4. Evaluate the untouched model (``eval_before.json``).
5. Apply the strategy: freezing or LoRA / QLoRA / DoRA; gradient checkpointing.
6. Wrap for DDP or DeepSpeed; build AdamW with parameter groups, the linear schedule and, for fp16
   on CUDA, a GradScaler.
7. Resume from a checkpoint when asked.
8. Train: deterministic data order from (seed, epoch), gradient accumulation, clipping, logging,
   atomic checkpoints every ``--save_steps``.
9. Save the model (official layout) or the adapter, the processor, the loss curve; evaluate again
   (``eval_after.json``).

Mixed batches under DDP / DeepSpeed: a micro-batch without images never runs the vision tower,
and the last CLIP layer never runs at all, so some trainable parameters get no gradient on some
ranks, which hangs or crashes gradient synchronisation. In distributed runs every trainable
parameter therefore enters the loss with weight zero (``loss + 0 * sum(p.sum())``): every rank
then produces a gradient (zero where unused) for every parameter at every step, and the result
is numerically unchanged. DeepSpeed ZeRO additionally reduces gradient buckets in the order the
gradients arrive, so under DeepSpeed a batch without images also gets one extra row holding a
dummy image with every label -100: the vision tower runs at the same place of the graph on every
rank, and the loss is unchanged (tested: ZeRO-2 matches DDP on such batches).
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from phi3v_data.atomic import write_atomic
from phi3v_data.safe_io import describe_os_error
from phi3v_train.loading import LoadingError, load_model, load_processor, model_source
from phi3v_train.training.config import (
    DEEPSPEED_PRESETS,
    DEFAULT_NUM_CROPS,
    TrainConfig,
    build_config,
    config_options,
)

#: Fault injection for the resume tests: the process SIGKILLs itself after this optimizer step.
KILL_AFTER_STEP_ENV = "PHI3V_TRAIN_KILL_AFTER_STEP"
DEEPSPEED_CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"


class TrainingError(Exception):
    """A problem found before or during set-up, reported as one line with exit status 2."""


#: Splits evaluated when --eval_split is not given, in order of preference; unlabeled ones are
#: skipped (converters write val, dev (NLVR2), dev_seen (Hateful Memes) and test).
DEFAULT_EVAL_SPLITS = ("val", "dev", "dev_seen", "test")


# ------------------------------------------------------------------------------------------------
# command
# ------------------------------------------------------------------------------------------------


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
    except (TrainingError, LoadingError) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------
# checks that need no model
# ------------------------------------------------------------------------------------------------


def gradient_accumulation_steps(config: TrainConfig, world_size: int) -> int:
    per_step = world_size * config.batch_size_per_gpu
    if config.batch_size % per_step:
        raise TrainingError(
            f"batch_size: {config.batch_size} is not divisible by world size {world_size} x "
            f"batch_size_per_gpu {config.batch_size_per_gpu} = {per_step}"
        )
    return config.batch_size // per_step


def check_dataset(config: TrainConfig, is_main: bool) -> tuple[str | None, int]:
    """Validate the dataset (print the report when invalid); return (eval split, num_crops)."""
    from phi3v_data.dataset import find_splits, load_info
    from phi3v_data.validate import validate_dataset

    data_dir = config.data_dir
    if not data_dir.is_dir():
        raise TrainingError(f"{data_dir}: --data_dir: no such directory")
    report = validate_dataset(data_dir)
    if not report.ok:
        if is_main:
            click.echo(report.format_text(), err=True)
        raise TrainingError(f"{data_dir}: dataset is invalid (report above); nothing was trained")
    splits = find_splits(data_dir)
    if config.train_split not in splits:
        known = ", ".join(sorted(splits))
        raise TrainingError(
            f"{data_dir}: --train_split: no split {config.train_split!r} (found: {known})"
        )
    info = load_info(data_dir)
    eval_split = config.eval_split
    if eval_split is None:
        labelled = [split for split in DEFAULT_EVAL_SPLITS if split not in info.unlabeled_splits]
        eval_split = next((split for split in labelled if split in splits), None)
    elif eval_split == "none":
        eval_split = None
    elif eval_split not in splits:
        raise TrainingError(f"{data_dir}: --eval_split: no split {eval_split!r}")
    num_crops = config.num_crops or info.num_crops or DEFAULT_NUM_CROPS
    return eval_split, num_crops


def resolve_attention(config: TrainConfig) -> str:
    if config.attn is not None:
        return config.attn
    if config.use_flash_attention:
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    return "sdpa"


# ------------------------------------------------------------------------------------------------
# model source and output directory (before any model is loaded)
# ------------------------------------------------------------------------------------------------

#: What the trainer writes at the top of OUT: ``--overwrite`` removes these and nothing else.
OWNED_NAMES = frozenset(
    {
        "train_config.yaml",
        "trainer_state.json",
        "eval_before.json",
        "eval_after.json",
        "loss_curve.png",
        "logs",
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
_START_NAMES = frozenset({"train_config.yaml", "eval_before.json", "logs"})


def owned_entries(out: Path) -> list[Path]:
    """What a previous run of the trainer left in ``out`` (only names the trainer writes)."""
    if not out.is_dir():
        return []
    found = {out / name for name in OWNED_NAMES if (out / name).exists()}
    found.update(path for path in out.iterdir() if _OWNED_NUMBERED.match(path.name))
    if (out / "adapter_config.json").exists() and (out / "README.md").is_file():
        found.add(out / "README.md")  # PEFT's model card beside the adapter
    return sorted(found)


def _same_run_restarted(config: TrainConfig, out: Path, used: list[Path]) -> bool:
    """Only start files are there and train_config.yaml is this very configuration."""
    if {path.name for path in used} - _START_NAMES or not (out / "train_config.yaml").is_file():
        return False
    try:
        previous = yaml.safe_load((out / "train_config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    current = yaml.safe_load(config.to_yaml())
    if not isinstance(previous, dict):
        return False
    previous.pop("resume", None)
    current.pop("resume", None)
    return previous == current


def check_output_dir(
    config: TrainConfig, resume_from: Path | None, source: str | None = None
) -> list[Path]:
    """Refuse an output_dir that would lose data; return what must be removed before starting.

    - a file where the directory belongs, or an output_dir equal to, inside or containing a local
      ``--model_name_or_path`` (the base weights would be overwritten or deleted);
    - an output_dir holding a previous run's outputs, unless ``--resume`` continues it or
      ``--overwrite`` asks to remove them (only the trainer's own files, :data:`OWNED_NAMES`);
      a resumed run removes the previous ``eval_after.json`` (a result of another state).
    """
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
    if config.resume is not None and _same_run_restarted(config, out, used):
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
    remove what ``check_output_dir`` chose, write train_config.yaml (all one-line errors)."""
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
        write_atomic(out / "train_config.yaml", config.to_yaml().encode("utf-8"))
    except OSError as error:
        raise TrainingError(f"--output_dir: cannot write: {describe_os_error(error)}") from None


# ------------------------------------------------------------------------------------------------
# data order
# ------------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """This rank's share of a (seed, epoch) permutation, from micro-batch ``skip_batches`` on.

    The permutation is padded (wrapping around) to a multiple of the world size so that every rank
    sees the same number of batches; rank r takes positions r, r + world, ...
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        skip: int = 0,
    ) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(size, generator=generator).tolist()
        padded = math.ceil(size / world_size) * world_size
        while len(order) < padded:  # fewer records than processes: wrap around again
            order += order[: padded - len(order)]
        self.indices = order[rank::world_size][skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Any, collator: Any, config: TrainConfig, sampler: EpochSampler, epoch: int
):
    return DataLoader(
        dataset,
        batch_size=config.batch_size_per_gpu,
        sampler=sampler,
        collate_fn=collator,
        num_workers=config.num_workers,
        prefetch_factor=2 if config.num_workers else None,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
        pin_memory=torch.cuda.is_available(),
    )


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to zero at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def effective_warmup(config: TrainConfig, total_steps: int) -> int:
    return min(config.warmup_steps, total_steps // 10)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def deepspeed_config(config: TrainConfig, accumulation: int, device: torch.device) -> dict:
    import json

    name = config.deepspeed
    path = DEEPSPEED_CONFIG_DIR / f"{name}.json" if name in DEEPSPEED_PRESETS else Path(name)
    ds = json.loads(path.read_text(encoding="utf-8"))
    ds["train_micro_batch_size_per_gpu"] = config.batch_size_per_gpu
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = config.batch_size
    ds["gradient_clipping"] = config.max_grad_norm
    cuda = device.type == "cuda"
    ds.setdefault("fp16", {})["enabled"] = cuda and not config.bf16
    ds.setdefault("bf16", {})["enabled"] = config.bf16
    return ds


def zero_weighted_parameters(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """0 x the sum of every trainable parameter: a gradient (of zeros) for each on every rank."""
    return sum(param.sum() for param in parameters) * 0.0


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> None:  # noqa: C901 - the recipe reads top to bottom on purpose
    from phi3v_data.dataset import images_root, read_split
    from phi3v_train.data import (
        TrainCollator,
        TrainDataset,
        add_dummy_image_row,
        dummy_image_example,
    )
    from phi3v_train.distributed import (
        all_reduce_mean,
        barrier,
        cleanup_distributed,
        setup_distributed,
    )
    from phi3v_train.training import checkpointing as ckpt
    from phi3v_train.training.strategies import (
        apply_freezing,
        apply_lora,
        param_groups,
        trainable_summary,
    )

    # 1. checks that need no model ---------------------------------------------------------
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    accumulation = gradient_accumulation_steps(config, world_size)
    eval_split, num_crops = check_dataset(config, is_main)
    attn = resolve_attention(config)
    resume_from = _resume_path(config)
    source = model_source(config)
    to_remove = check_output_dir(config, resume_from, source)

    # 2. processes ---------------------------------------------------------------------------
    dist = setup_distributed(use_deepspeed=bool(config.deepspeed))
    log = _logger(dist.is_main)
    out = config.output_dir
    if dist.is_main:
        prepare_output_dir(config, source, to_remove, log)
        for stale in ckpt.remove_incomplete(out):
            log(f"removed incomplete checkpoint {stale}")
    barrier()
    if config.use_flash_attention:
        log(f"attention: {attn}" + ("" if attn == "flash_attention_2" else " (flash_attn absent)"))
    _seed_everything(config.seed)

    # 3. processor, data and model ---------------------------------------------------------
    processor = load_processor(source, num_crops, name=config.model_name_or_path)
    records = read_split(config.data_dir, config.train_split)
    dataset = TrainDataset(
        records, processor, images_root(config.data_dir), max_seq_len=config.max_seq_len
    )
    skipped = dataset.drop_overlong()
    if skipped:
        log(
            f"max_seq_len {config.max_seq_len}: skipped {len(skipped)} record(s) whose image "
            f"tokens or answer do not fit: {', '.join(skipped[:10])}"
            + (" ..." if len(skipped) > 10 else "")
        )
    if len(dataset) == 0:
        raise TrainingError(f"{config.data_dir}: no training record left to train on")
    collator = TrainCollator(pad_token_id=processor.tokenizer.pad_token_id)

    model = load_model(config, attn, dist.device, source)
    if not config.use_qlora:
        model.to(dist.device)
    autocast = _autocast(config, dist.device, deepspeed=bool(config.deepspeed))

    # 4. evaluation before training ----------------------------------------------------------
    if eval_split and not config.skip_eval_before and not (out / "eval_before.json").exists():
        _evaluate(model, processor, config, eval_split, out / "eval_before.json", autocast, log)

    # 5. strategy ----------------------------------------------------------------------------
    if config.lora:
        model = apply_lora(model, config)
    else:
        apply_freezing(model, config)
    if config.gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    model.config.use_cache = False
    log(f"strategy: {_strategy_name(config)}; {trainable_summary(model)}")
    trainable = [param for param in model.parameters() if param.requires_grad]

    # 6. wrapping, optimizer, schedule ---------------------------------------------------------
    per_rank = math.ceil(len(dataset) / dist.world_size)
    batches_per_epoch = math.ceil(per_rank / config.batch_size_per_gpu)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(
        param_groups(model, config), lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-7
    )
    scheduler = linear_schedule(optimizer, effective_warmup(config, total_steps), total_steps)
    engine = None
    scaler = None
    if config.deepspeed:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, accumulation, dist.device),
        )
        train_model = engine
    elif dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
        )
    else:
        train_model = model
    if dist.device.type == "cuda" and not config.bf16 and not config.deepspeed:
        scaler = torch.amp.GradScaler("cuda")
    touch_all = dist.distributed and config.deepspeed != "zero3"
    dummy_image = dummy_image_example(processor) if config.deepspeed and dist.distributed else None

    # 7. resume ------------------------------------------------------------------------------
    state = ckpt.TrainerState(seed=config.seed, world_size=dist.world_size)
    if resume_from is not None:
        try:
            state = ckpt.load_checkpoint(
                resume_from,
                dist=dist,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                engine=engine,
            )
        except ValueError as error:  # CheckpointError: one line naming the file
            raise TrainingError(str(error)) from None
        log(f"resumed from {resume_from} at step {state.global_step}")
    elif config.resume == "auto":
        log(f"--resume auto: no complete checkpoint in {out}, starting from step 0")

    # 8. train -------------------------------------------------------------------------------
    log(
        f"training: {len(dataset)} records, {dist.world_size} process(es), micro-batch "
        f"{config.batch_size_per_gpu}, accumulation {accumulation}, global batch "
        f"{config.batch_size}, {total_steps} optimizer steps"
    )
    writer = _tensorboard(config, out) if dist.is_main else None
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)
    progress = _progress(config, dist.is_main, total_steps, state.global_step)
    train_model.train()
    started = time.monotonic()
    while state.global_step < total_steps and state.epoch < num_epochs:
        sampler = EpochSampler(
            len(dataset),
            seed=config.seed,
            epoch=state.epoch,
            rank=dist.rank,
            world_size=dist.world_size,
            skip=state.batches_done * config.batch_size_per_gpu,
        )
        loader = make_loader(dataset, collator, config, sampler, state.epoch)
        window_losses: list[float] = []
        for batch in loader:
            window_start = state.batches_done - state.batches_done % accumulation
            window = min(accumulation, batches_per_epoch - window_start)
            state.batches_done += 1
            boundary = state.batches_done == window_start + window
            if batch["pixel_values"] is None and dummy_image is not None:
                batch = add_dummy_image_row(batch, dummy_image, collator.pad_token_id)
            batch = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if batch["pixel_values"] is None:  # text-only micro-batch
                del batch["pixel_values"], batch["image_sizes"]
            sync = nullcontext()
            if engine is None and dist.distributed and not boundary:
                sync = train_model.no_sync()
            with sync:
                with autocast:
                    loss = train_model(**batch).loss
                window_losses.append(float(loss.detach()))
                scaled = loss / window
                if touch_all:
                    scaled = scaled + zero_weighted_parameters(trainable)
                if engine is not None:
                    engine.set_gradient_accumulation_boundary(boundary)
                    engine.backward(scaled, scale_wrt_gas=False)
                elif scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if not boundary:
                continue
            step_loss = all_reduce_mean(sum(window_losses) / len(window_losses), dist.device)
            window_losses = []
            if not math.isfinite(step_loss):  # same value on every rank: all stop together
                raise TrainingError(
                    f"step {state.global_step + 1}: the training loss is {step_loss}; stopped "
                    "before the optimizer step, nothing of this step was saved (lower "
                    "--learning_rate, try --bf16 or check the data)"
                )
            if engine is not None:
                engine.step()
            else:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.losses.append([state.global_step, step_loss])
            lr = scheduler.get_last_lr()[0]
            if writer is not None:
                writer.add_scalar("train/loss", step_loss, state.global_step)
                writer.add_scalar("train/learning_rate", lr, state.global_step)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}")
            if state.global_step % config.logging_steps == 0 or state.global_step == total_steps:
                log(f"step {state.global_step}/{total_steps} loss {step_loss:.4f} lr {lr:.3g}")
            if state.batches_done >= batches_per_epoch:
                state.epoch += 1
                state.batches_done = 0
            if config.save_steps and state.global_step % config.save_steps == 0:
                path = _save_checkpoint(
                    ckpt,
                    out,
                    state,
                    dist=dist,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    engine=engine,
                    save_total_limit=config.save_total_limit,
                )
                log(f"saved {path}")
            if kill_after and state.global_step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if state.global_step >= total_steps or state.epoch >= num_epochs:
                break
            if state.batches_done == 0:
                break  # the epoch ended with this step: rebuild the loader for the next one
    if progress is not None:
        progress.close()
    log(f"trained {state.global_step} steps in {time.monotonic() - started:.1f}s")

    # 9. outputs and evaluation after training -------------------------------------------------
    final_model = engine.module if engine is not None else model
    _save_outputs(final_model, processor, config, state, out, dist, engine, log)
    if writer is not None:
        writer.close()
    if eval_split and not config.skip_eval_after:
        if config.deepspeed == "zero3":
            log("evaluation after training skipped under ZeRO-3 (parameters are sharded)")
        else:
            final_model.config.use_cache = True
            _evaluate(
                final_model, processor, config, eval_split, out / "eval_after.json", autocast, log
            )
    barrier()
    cleanup_distributed()


# ------------------------------------------------------------------------------------------------
# helpers of the recipe
# ------------------------------------------------------------------------------------------------


def _resume_path(config: TrainConfig) -> Path | None:
    from phi3v_train.training.checkpointing import STATE_FILE, latest_checkpoint

    if config.resume is None:
        return None
    if config.resume == "auto":
        return latest_checkpoint(config.output_dir)
    path = Path(config.resume)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"{path}: --resume: not a complete checkpoint (no {STATE_FILE})")
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


def _autocast(config: TrainConfig, device: torch.device, *, deepspeed: bool):
    if deepspeed:
        return nullcontext()
    if config.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


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


def _tensorboard(config: TrainConfig, out: Path):
    if config.report_to != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "logs"))


def _progress(config: TrainConfig, is_main: bool, total: int, done: int):
    if not (config.tqdm and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step")


def _evaluate(model, processor, config, split, path, autocast, log) -> None:
    from phi3v_train.evaluation.evaluate import evaluate_split

    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        result = evaluate_split(
            model,
            processor,
            config.data_dir,
            split,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
            max_samples=config.eval_max_samples,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            result.write_json(path)
        except OSError as error:
            raise TrainingError(f"cannot write {path.name}: {describe_os_error(error)}") from None
        log(f"{path.stem} ({split}):\n{result.format_table()}")
    model.train(was_training)


def _save_checkpoint(ckpt, out: Path, state, **options) -> Path:
    """``ckpt.save_checkpoint`` with a write failure (disk full, read-only) as one line."""
    try:
        return ckpt.save_checkpoint(out, state, **options)
    except OSError as error:
        partial = out / f"{ckpt.CHECKPOINT_PREFIX}{state.global_step}{ckpt.TMP_SUFFIX}"
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(
            f"step {state.global_step}: cannot write the checkpoint: {describe_os_error(error)}"
        ) from None


def _save_outputs(model, processor, config, state, out, dist, engine, log) -> None:
    """Model (official layout) or adapter, processor files, loss curve: atomically per file.

    Everything is written into ``OUT/.save-<pid>/`` first and then renamed into OUT file by file,
    so a failure (disk full, read-only) leaves either the previous file or the new one.
    """
    import shutil

    from phi3v_train.distributed import barrier

    state_dict = None
    if engine is not None and config.deepspeed == "zero3":
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if dist.is_main:
        options = {"save_embedding_layers": False} if config.lora else {}
        if state_dict is not None:
            options["state_dict"] = state_dict
        staging = out / f".save-{os.getpid()}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(str(staging), **options)
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
        log(f"saved the {kind}, processor, loss_curve.png and train_config.yaml to {out}")
    barrier()


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
