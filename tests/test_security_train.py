"""Issue 12, the trainer's share: every class attacked through every command it applies to.

1. Pickle: nothing a checkpoint or model folder holds is ever unpickled (a crafted pickle that
   would create a marker file never runs); pickle-only model / adapter folders are refused.
2. Hangs: a hub id on an offline machine (or with the hub unreachable) fails fast, one line.
3. Silent data loss: output_dir vs model_name_or_path, a used output_dir, --overwrite.
4. One line, never a traceback: output_dir a file, seed range, unwritable or full output,
   corrupt / mismatched checkpoints (each naming the file).
5. Bad input: non-finite float options refused when parsed; a non-finite loss stops the run
   naming the step and saves nothing of it.

Trainings run in-process (tiny model, CPU); one real subprocess checks the whole CLI path.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_helpers import base_args, run_cli, tiny_model, train_in_process, write_dataset

from phi3v_train.cli import group
from phi3v_train.training.train import TrainingError

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "nobody-here/no-such-model-4711"


class _Exploit:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def write_pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": _Exploit(marker)}))


def invoke(args: list[str]):
    return CliRunner().invoke(group, [str(arg) for arg in args], catch_exceptions=False)


def one_line_error(output: str) -> str:
    """The single ``Error: ...`` line of a failed command (asserting there is exactly one)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, output
    return lines[0]


def train_args(model: object, data_dir: Path, out: Path, *extra: object) -> list:
    """``phi3v-train`` arguments of a small CPU run (then ``extra``)."""
    options = ["--model_name_or_path", model, "--data_dir", data_dir, "--output_dir", out]
    return [*options, "--num_crops", "1", "--batch_size", "2", *extra]


def every_command(model: object, data_dir: Path, adapter: Path, tmp_path: Path) -> dict:
    """train, eval and merge of ``model`` (outputs under tmp_path: o, m)."""
    return {
        "train": train_args(model, data_dir, tmp_path / "o"),
        "eval": ["eval", "--model", model, "--data_dir", data_dir, "--split", "val"],
        "merge": ["merge", "--model", model, "--adapter", adapter, "--out", tmp_path / "m"],
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train=4, val=2)


@pytest.fixture(scope="module")
def lora_options() -> dict:
    return dict(use_lora=True, lora_rank=4, max_steps=2, save_steps=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir: Path, data_dir: Path, lora_options: dict) -> Path:
    """A finished LoRA run with checkpoint-1 and checkpoint-2 (the corruption tests' source)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train_in_process(model_dir, data_dir, out, **lora_options)
    return out


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def _resume(model_dir: Path, data_dir: Path, out: Path, lora_options: dict, resume: str) -> str:
    """Resume in-process; return the TrainingError's message (it must fail)."""
    with pytest.raises(TrainingError) as caught:
        train_in_process(model_dir, data_dir, out, **{**lora_options, "resume": resume})
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------
# 1. pickle
# ------------------------------------------------------------------------------------------------


def _unpickling_sites(path: Path) -> list[str]:
    """Calls and imports that unpickle: torch.load, pickle/dill/joblib, weights_only=False,
    allow_pickle=True (found in the syntax tree, so prose in docstrings does not count)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] + [getattr(node, "module", "") or ""]
            if any(name.split(".")[0] in PICKLERS for name in names):
                found.append(f"{path.name}:{node.lineno}: imports a pickler")
        elif isinstance(node, ast.Call):
            text = ast.unparse(node.func)
            if text == "torch.load" or text.split(".")[0] in PICKLERS:
                found.append(f"{path.name}:{node.lineno}: {text}()")
            for keyword in node.keywords:
                value = ast.unparse(keyword.value)
                if (keyword.arg, value) in (("weights_only", "False"), ("allow_pickle", "True")):
                    found.append(f"{path.name}:{node.lineno}: {keyword.arg}={value}")
    return found


PICKLERS = ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "_pickle")


def test_product_code_never_unpickles() -> None:
    offenders = []
    for package in ("phi3v_train", "phi3v_data", "converters", "benchmarks"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            offenders += _unpickling_sites(path)
    assert offenders == []


def test_checkpoint_holds_no_pickle_and_resume_is_exact(
    trained: Path, model_dir: Path, data_dir: Path, lora_options: dict, tmp_path: Path
) -> None:
    checkpoint = trained / "checkpoint-1"
    names = sorted(path.name for path in checkpoint.iterdir())
    assert not [name for name in names if name.endswith((".pt", ".bin", ".pkl"))], names
    assert "rng_state_0.json" in names and "optimizer.safetensors" in names
    rng = json.loads((checkpoint / "rng_state_0.json").read_text())
    assert rng["format"] == "phi3v-state/1"
    out = _copy_run(trained, tmp_path)
    losses = train_in_process(
        model_dir, data_dir, out, **{**lora_options, "resume": str(out / "checkpoint-1")}
    )
    assert losses == [
        loss for _, loss in json.loads((trained / "trainer_state.json").read_text())["losses"]
    ]
    adapter = "adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (trained / adapter).read_bytes()


@pytest.mark.parametrize(
    "planted",
    ["rng_state_0.pt", "rng_state_0.json", "optimizer.json", "optimizer.safetensors"],
)
def test_crafted_pickle_in_a_checkpoint_never_runs(
    planted: str,
    trained: Path,
    model_dir: Path,
    data_dir: Path,
    lora_options: dict,
    tmp_path: Path,
) -> None:
    out = _copy_run(trained, tmp_path)
    checkpoint = out / "checkpoint-2"
    marker = tmp_path / "pwned"
    write_pickle_bomb(checkpoint / planted, marker)
    if planted.endswith(".pt"):  # the old format's file beside ours: ignored, never loaded
        (checkpoint / "rng_state_0.json").unlink()
    message = _resume(model_dir, data_dir, out, lora_options, "auto")
    assert str(checkpoint) in message
    assert not marker.exists()


def test_planted_folder_picked_by_resume_auto_fails_in_one_line(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A real process: an old-format (pickle) checkpoint dropped into OUT, picked by --resume."""
    out = tmp_path / "out"
    planted = out / "checkpoint-99"
    planted.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (planted / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 99,
                "epoch": 0,
                "batches_done": 0,
                "seed": 0,
                "world_size": 1,
                "losses": [],
            }
        )
    )
    for name in ("rng_state_0.pt", "optimizer.pt", "scheduler.pt"):
        write_pickle_bomb(planted / name, marker)
    args = base_args(model_dir, data_dir, out, use_lora=True, lora_rank=4, max_steps=1)
    result = run_cli([*args, "--resume"], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line_error(result.stderr)
    assert str(planted) in line
    assert not marker.exists()


@pytest.fixture
def pickle_model(model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose only weights are a crafted pytorch_model.bin; and its marker."""
    folder = tmp_path / "pickle_model"
    folder.mkdir()
    for path in model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, folder / path.name)
    marker = tmp_path / "pwned"
    write_pickle_bomb(folder / "pytorch_model.bin", marker)
    return folder, marker


def test_pickle_only_model_folder_refused_by_train_eval_merge(
    pickle_model: tuple[Path, Path], data_dir: Path, trained: Path, tmp_path: Path
) -> None:
    folder, marker = pickle_model
    commands = every_command(folder, data_dir, trained, tmp_path)
    for name, args in commands.items():
        result = invoke(args)
        assert result.exit_code != 0, (name, result.output)
        line = one_line_error(result.output)
        assert "pickle weights (pytorch_model.bin)" in line, (name, line)
    assert not marker.exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_pickle_only_adapter_refused_by_eval_and_merge(
    model_dir: Path, data_dir: Path, trained: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(trained / "adapter_config.json", adapter)
    marker = tmp_path / "pwned"
    write_pickle_bomb(adapter / "adapter_model.bin", marker)
    for args in (
        [
            "eval",
            "--model",
            model_dir,
            "--adapter",
            adapter,
            "--data_dir",
            data_dir,
            "--split",
            "val",
        ],
        ["merge", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "m"],
    ):
        result = invoke(args)
        assert result.exit_code != 0, result.output
        assert "adapter_model.bin" in one_line_error(result.output)
    assert not marker.exists()


def test_deepspeed_folder_not_signed_by_us_is_refused(tmp_path: Path, monkeypatch) -> None:
    from phi3v_train.training import checkpointing as ckpt

    monkeypatch.setenv(ckpt.KEY_FILE_ENV, str(tmp_path / "key"))
    checkpoint = tmp_path / "checkpoint-1"
    (checkpoint / "deepspeed" / "state").mkdir(parents=True)
    (checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="deepspeed.json: missing"):
        ckpt.verify_deepspeed(checkpoint)
    ckpt.sign_deepspeed(checkpoint)
    ckpt.verify_deepspeed(checkpoint)  # ours, unchanged: accepted
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    (checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"evil")
    with pytest.raises(ckpt.CheckpointError, match="files differ"):
        ckpt.verify_deepspeed(checkpoint)
    ckpt.sign_deepspeed(checkpoint)
    (tmp_path / "key").write_text("someone else's key")
    with pytest.raises(ckpt.CheckpointError, match="signature does not match"):
        ckpt.verify_deepspeed(checkpoint)


# ------------------------------------------------------------------------------------------------
# 2. hangs: hub ids when the hub cannot be reached
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_hub_id_without_hub_fails_fast_everywhere(
    mode: str, data_dir: Path, trained: Path, tmp_path: Path, monkeypatch
) -> None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    if mode == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on discard
    commands = every_command(HUB_ID, data_dir, trained, tmp_path)
    for name, args in commands.items():
        started = time.monotonic()
        result = invoke(args)
        assert time.monotonic() - started < 10, name
        assert result.exit_code != 0, (name, result.output)
        line = one_line_error(result.output)
        assert HUB_ID in line
        assert ("offline mode" if mode == "offline" else "cannot be reached") in line, line


# ------------------------------------------------------------------------------------------------
# 3. silent data loss
# ------------------------------------------------------------------------------------------------


def test_output_dir_overlapping_the_model_is_refused(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    before = {path.name: path.read_bytes() for path in model_dir.iterdir()}
    outer = tmp_path / "outer"
    shutil.copytree(model_dir, outer / "model")
    for out, model, words in (
        (model_dir, model_dir, "is (inside) --model_name_or_path"),
        (model_dir / "sub", model_dir, "is (inside) --model_name_or_path"),
        (outer, outer / "model", "contains --model_name_or_path"),
    ):
        result = invoke(train_args(model, data_dir, out, "--overwrite"))
        assert result.exit_code == 2, result.output
        assert words in one_line_error(result.output)
    assert {path.name: path.read_bytes() for path in model_dir.iterdir()} == before
    assert not (model_dir / "sub").exists()


def test_used_output_dir_is_refused_then_overwrite_removes_only_owned_files(
    trained: Path, model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = _copy_run(trained, tmp_path)
    (out / "eval_before.json").write_text('{"stale": true}')
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-notes.txt").write_text("mine too")
    args = train_args(
        model_dir,
        data_dir,
        out,
        "--batch_size_per_gpu",
        "2",
        "--max_steps",
        "1",
        "--num_workers",
        "0",
        "--report_to",
        "none",
        "--no-tqdm",
        "--skip_eval_before",
        "--skip_eval_after",
        "--no-gradient_checkpointing",
    )
    result = invoke(args)
    assert result.exit_code == 2
    line = one_line_error(result.output)
    assert "holds a previous run's outputs" in line and "--overwrite" in line
    assert (out / "eval_before.json").read_text() == '{"stale": true}'

    # --resume without a checkpoint of this run (another configuration): refused too
    shutil.rmtree(out / "checkpoint-1")
    shutil.rmtree(out / "checkpoint-2")
    result = invoke([*args, "--resume"])
    assert result.exit_code == 2
    assert "no complete checkpoint to resume from" in one_line_error(result.output)

    result = invoke([*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "eval_before.json").exists()  # the stale result is gone
    assert not (out / "adapter_config.json").exists()  # the previous run was LoRA, this one not
    assert (out / "notes.txt").read_text() == "mine"  # not the trainer's: kept
    assert (out / "checkpoint-notes.txt").read_text() == "mine too"
    assert (out / "model.safetensors").is_file()


def test_merge_out_overlapping_its_inputs_is_refused(
    model_dir: Path, trained: Path, tmp_path: Path
) -> None:
    for out in (model_dir, trained):
        result = invoke(
            ["merge", "--model", model_dir, "--adapter", trained, "--out", out, "--overwrite"]
        )
        assert result.exit_code != 0
        assert "it would be replaced" in one_line_error(result.output)
    assert (model_dir / "model.safetensors").is_file()
    assert (trained / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# 4. one line, never a traceback
# ------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    result = invoke(train_args(model_dir, data_dir, target))
    assert result.exit_code == 2
    assert "exists and is not a directory" in one_line_error(result.output)
    assert target.read_text() == "x"


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999999"])
def test_seed_out_of_range_train_and_make_tiny(seed: str, data_dir: Path, tmp_path: Path) -> None:
    result = invoke(["--data_dir", data_dir, "--output_dir", tmp_path / "o", "--seed", seed])
    assert result.exit_code == 2
    assert "seed" in one_line_error(result.output)
    result = invoke(["make-tiny", tmp_path / "t", "--seed", seed])
    assert result.exit_code == 2
    assert "--seed" in one_line_error(result.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, __import__("os").strerror(code), "/the/failing/file")

    return fail


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_unwritable_output_train_merge_make_tiny(
    code: int, model_dir: Path, data_dir: Path, trained: Path, tmp_path: Path, monkeypatch
) -> None:
    import os
    import tempfile

    import phi3v_train.merge
    import phi3v_train.model.tiny

    reason = os.strerror(code)
    # train: proved writable before any model loads
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", _fail_with(code))
        result = invoke(train_args(model_dir, data_dir, tmp_path / "o"))
    assert result.exit_code == 2
    line = one_line_error(result.output)
    assert "--output_dir: cannot write" in line and reason in line
    # merge: the destination is proved writable first; a failure while writing is one line too
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder belongs")
    result = invoke(["merge", "--model", model_dir, "--adapter", trained, "--out", blocked / "m"])
    assert "--out: cannot write" in one_line_error(result.output)
    with monkeypatch.context() as patch:
        patch.setattr(phi3v_train.merge, "_merge_into", _fail_with(code))
        result = invoke(
            ["merge", "--model", model_dir, "--adapter", trained, "--out", tmp_path / "m"]
        )
    assert result.exit_code != 0
    assert reason in one_line_error(result.output)
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.merge-")]
    # make-tiny
    with monkeypatch.context() as patch:
        patch.setattr(phi3v_train.model.tiny, "write_tiny", _fail_with(code))
        result = invoke(["make-tiny", tmp_path / "t"])
    assert result.exit_code != 0
    assert reason in one_line_error(result.output)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("where", ["checkpoint", "outputs"])
def test_disk_full_while_training_is_one_line_and_leaves_no_partial(
    where: str, model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from phi3v_train.training import checkpointing, train

    if where == "checkpoint":
        monkeypatch.setattr(checkpointing, "save_tree", _fail_with(errno.ENOSPC))
        expected = r"step 1: cannot write the checkpoint: .*No space"
    else:
        monkeypatch.setattr(train, "_plot_losses", _fail_with(errno.ENOSPC))
        expected = r"cannot save the trained model: /the/failing/file: No space"
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=expected):
        train_in_process(
            model_dir, data_dir, out, use_lora=True, lora_rank=4, max_steps=1,
            save_steps=1 if where == "checkpoint" else None,
        )  # fmt: skip
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".save-*"))


def _corrupt(checkpoint: Path, case: str) -> Path:
    """Damage ``checkpoint`` one way; return the file the error must name."""
    if case == "extra_state_key":
        path = checkpoint / "trainer_state.json"
        data = json.loads(path.read_text())
        data["surprise"] = 1
        path.write_text(json.dumps(data))
    elif case == "corrupt_state_json":
        path = checkpoint / "trainer_state.json"
        path.write_text('{"global_step": 2, ')
    elif case == "truncated_trainable":
        path = checkpoint / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif case == "truncated_optimizer_tensors":
        path = checkpoint / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:-50])
    elif case == "garbage_optimizer":
        path = checkpoint / "optimizer.json"
        path.write_bytes(b"\x00\xffgarbage")
    elif case == "missing_rng_state":
        path = checkpoint / "rng_state_0.json"
        path.unlink()
    elif case == "missing_scheduler":
        path = checkpoint / "scheduler.json"
        path.unlink()
    elif case == "different_model":
        from safetensors.torch import load_file, save_file

        path = checkpoint / "trainable.safetensors"
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].new_zeros(tensors[name].shape[0] + 1, 3)
        save_file(tensors, str(path))
    elif case == "optimizer_of_another_model":
        path = checkpoint / "optimizer.json"
        data = json.loads(path.read_text())
        data["tree"]["param_groups"] = data["tree"]["param_groups"][:1]
        path.write_text(json.dumps(data))
    else:  # pragma: no cover
        raise AssertionError(case)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "extra_state_key",
        "corrupt_state_json",
        "truncated_trainable",
        "truncated_optimizer_tensors",
        "garbage_optimizer",
        "missing_rng_state",
        "missing_scheduler",
        "different_model",
        "optimizer_of_another_model",
    ],
)
def test_corrupt_checkpoint_is_one_line_naming_the_file(
    case: str, trained: Path, model_dir: Path, data_dir: Path, lora_options: dict, tmp_path: Path
) -> None:
    out = _copy_run(trained, tmp_path)
    checkpoint = out / "checkpoint-2"
    damaged = _corrupt(checkpoint, case)
    message = _resume(model_dir, data_dir, out, lora_options, str(checkpoint))
    assert str(damaged) in message, message


# ------------------------------------------------------------------------------------------------
# 5. bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--learning_rate", "inf"),
        ("--learning_rate", "nan"),
        ("--wd", "nan"),
        ("--max_grad_norm", "inf"),
        ("--vision_lr", "-inf"),
        ("--lora_alpha_ratio", "NaN"),
    ],
)
def test_non_finite_float_options_refused_at_parse_time(
    option: str, value: str, data_dir: Path, tmp_path: Path
) -> None:
    result = invoke(["--data_dir", data_dir, "--output_dir", tmp_path / "o", option, value])
    assert result.exit_code == 2
    assert "finite number" in one_line_error(result.output)
    assert not (tmp_path / "o").exists()


def test_non_finite_float_in_yaml_refused(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: .inf\n")
    result = invoke(["--config", config, "--data_dir", data_dir, "--output_dir", tmp_path / "o"])
    assert result.exit_code == 2
    assert "learning_rate: Input should be a finite number" in one_line_error(result.output)


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(
        TrainingError, match=r"^step (\d+): the training loss is (nan|-?inf)"
    ) as caught:
        train_in_process(
            model_dir, data_dir, out, learning_rate=1e30, max_steps=4, save_steps=1, warmup_steps=0
        )
    step = int(re.match(r"step (\d+)", str(caught.value)).group(1))
    assert step >= 2
    assert not (out / f"checkpoint-{step}").exists()
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()
