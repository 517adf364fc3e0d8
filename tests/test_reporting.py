"""``--report_to``: each tracker writes through its own library and the values are read back."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from phi3v_train.training.reporting import (
    MultiReporter,
    ReportingError,
    build_reporters,
    mlflow_tracking_uri,
    parse_report_to,
    require_trackers,
    wandb_mode,
)

CONFIG = {"learning_rate": 4e-5, "freeze": ["vision"], "eval_split": None, "lora": True}
STEPS = [(1, {"train/loss": 2.5, "train/learning_rate": 1e-5}), (2, {"train/loss": 1.75})]


def _log_steps(reporter) -> None:
    for step, metrics in STEPS:
        reporter.log_metrics(metrics, step)
    reporter.log_metrics({"eval/accuracy": 0.5, "eval/auroc": None, "eval/split": "val"}, 2)


@pytest.fixture
def mlflow_file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracking URI and no file-store opt-in: the reporter's defaults decide (undone after)."""
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "placeholder")  # recorded, so the deletion below is undone
        monkeypatch.delenv(name)


@pytest.fixture
def wandb_unconfigured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WANDB_MODE, no API key, no .netrc: what a fresh machine looks like."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


# ------------------------------------------------------------------------------------------------
# the option's value and the start-up check
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tensorboard", ["tensorboard"]),
        ("none", []),
        ("NONE", []),
        (None, []),
        ("tensorboard,wandb", ["tensorboard", "wandb"]),
        (" mlflow , tensorboard ", ["mlflow", "tensorboard"]),
        (["wandb", "mlflow", "wandb"], ["wandb", "mlflow"]),
        (("none",), []),
    ],
)
def test_parse_report_to(value, expected) -> None:
    assert parse_report_to(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "comet",
            "unknown tracker 'comet' (choose from tensorboard, wandb, mlflow, none)",
        ),
        (["none", "wandb"], "none cannot be combined with wandb"),
        ([3], "expected tracker names, got 3"),
    ],
)
def test_parse_report_to_refuses(value, message) -> None:
    with pytest.raises(ValueError) as caught:
        parse_report_to(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("tracker", "extra"),
    [("wandb", "pip install 'phi3v[wandb]'"), ("mlflow", "pip install 'phi3v[mlflow]'")],
)
def test_missing_library_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tracker: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now raises ImportError
    expected = f"--report_to {tracker} needs the {tracker} extra: {extra}"
    with pytest.raises(ReportingError) as caught:
        require_trackers(["tensorboard", tracker])
    assert str(caught.value) == expected
    with pytest.raises(ReportingError) as caught:  # the factory checks first as well
        build_reporters([tracker], tmp_path, "run", CONFIG)
    assert str(caught.value) == expected
    assert list(tmp_path.iterdir()) == []


def test_wandb_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wandb_unconfigured) -> None:
    assert wandb_mode() == "offline"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # key is for another host
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # wandb reads WANDB_MODE itself


def test_other_ranks_report_nothing(tmp_path: Path) -> None:
    reporter = build_reporters(["tensorboard"], tmp_path, "run", CONFIG, is_main=False)
    assert not reporter
    _log_steps(reporter)
    reporter.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# each tracker, read back through its own reader
# ------------------------------------------------------------------------------------------------


def _tensorboard_scalars(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
    return scalars, events


def test_tensorboard(tmp_path: Path) -> None:
    with build_reporters(["tensorboard"], tmp_path, "run", CONFIG) as reporter:
        _log_steps(reporter)
    scalars, events = _tensorboard_scalars(tmp_path / "logs")
    assert scalars == {
        "train/loss": [(1, 2.5), (2, 1.75)],
        "train/learning_rate": [(1, pytest.approx(1e-5))],
        "eval/accuracy": [(2, 0.5)],
    }
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 4e-05' in text and '"vision"' in text


def test_mlflow_local_file_store(tmp_path: Path, mlflow_file_store) -> None:
    from mlflow import MlflowClient

    with build_reporters(["mlflow"], tmp_path, "my-run", CONFIG) as reporter:
        _log_steps(reporter)
        run_id = reporter.reporters[0].run_id
    assert mlflow_tracking_uri(tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 1.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy")] == [
        (2, 0.5)
    ]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "my-run"
    assert client.get_experiment(run.info.experiment_id).name == "phi3v"
    assert run.data.params == {
        "learning_rate": "4e-05",
        "freeze": '["vision"]',
        "eval_split": "null",
        "lora": "true",
    }
    assert set(run.data.metrics) == {"train/loss", "train/learning_rate", "eval/accuracy"}


def _wandb_records(run_file: Path) -> list:
    """The records of W&B's offline transaction log (LevelDB log format: 32 KiB blocks of
    CRC32 + length + type chunks after a 7-byte ``:W&B`` header), parsed with wandb's protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    records, chunks, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _wandb_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb stores "train/loss" as a nested key


def test_wandb_offline(tmp_path: Path, wandb_unconfigured) -> None:
    pytest.importorskip("wandb")
    with build_reporters(["wandb"], tmp_path, "my-run", CONFIG) as reporter:
        _log_steps(reporter)
    assert reporter.errors == []  # close() returned with the run files complete
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(run_file)
    history = [
        {_wandb_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    logged = [
        (row["_step"], {k: v for k, v in row.items() if not k.startswith("_")}) for row in history
    ]
    assert logged == [
        (1, {"train/loss": 2.5, "train/learning_rate": 1e-5}),
        (2, {"train/loss": 1.75, "eval/accuracy": 0.5}),
    ]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "my-run" and run.project == "phi3v"
    config = {
        _wandb_key(item): json.loads(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }
    assert {k: config[k] for k in CONFIG} == CONFIG
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]


# ------------------------------------------------------------------------------------------------
# several at once, failures
# ------------------------------------------------------------------------------------------------


def test_several_trackers_and_a_failed_run(tmp_path: Path, mlflow_file_store) -> None:
    from mlflow import MlflowClient

    reporter = build_reporters(["tensorboard", "mlflow"], tmp_path, "run", CONFIG)
    with pytest.raises(RuntimeError), reporter:
        _log_steps(reporter)
        run_id = reporter.reporters[1].run_id
        raise RuntimeError("training crashed")
    assert _tensorboard_scalars(tmp_path / "logs")[0]["train/loss"] == [(1, 2.5), (2, 1.75)]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [2.5, 1.75]
    assert client.get_run(run_id).info.status == "FAILED"


class _Broken:
    def log_config(self, config) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        raise OSError("disk full")

    def close(self, *, ok: bool = True) -> None:
        pass


class _Recorder(_Broken):
    def __init__(self) -> None:
        self.logged: list = []
        self.closed: bool | None = None

    def log_metrics(self, metrics, step) -> None:
        self.logged.append((step, dict(metrics)))

    def close(self, *, ok: bool = True) -> None:
        self.closed = ok


def test_a_failing_tracker_is_dropped_and_the_others_go_on() -> None:
    recorder = _Recorder()
    warnings: list[str] = []
    multi = MultiReporter([_Broken(), recorder], warn=warnings.append)
    _log_steps(multi)
    multi.close()
    assert multi.errors == ["_Broken.log_metrics: disk full"]
    assert warnings == [
        "report_to: _Broken.log_metrics: disk full; that tracker is off for the rest of the run"
    ]
    assert [step for step, _ in recorder.logged] == [1, 2, 2] and recorder.closed is True


def test_a_tracker_that_cannot_start_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_file_store
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/path")
    with pytest.raises(ReportingError) as caught:
        build_reporters(["tensorboard", "mlflow"], tmp_path, "run", CONFIG)
    message = str(caught.value)
    assert message.startswith("--report_to mlflow: cannot start: ") and "\n" not in message
    # the TensorBoard writer started first was closed: its event file is complete and readable
    assert _tensorboard_scalars(tmp_path / "logs")[0] == {}


def test_training_reports_loss_and_eval_to_every_tracker_named(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_file_store
) -> None:
    """The trainer end to end: `--report_to mlflow --report_to tensorboard` on a tiny run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_helpers import logged_losses, tiny_model, train_in_process, write_dataset

    data = write_dataset(tmp_path / "data", train=2, val=2, text_only_every=2)
    out = tmp_path / "out"
    train_in_process(
        tiny_model(tmp_path_factory),
        data,
        out,
        max_steps=2,
        report_to=["mlflow", "tensorboard"],
        skip_eval_after=False,
        eval_max_samples=2,
        max_new_tokens=4,
    )
    losses = [loss for _, loss in logged_losses(out)]
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("phi3v")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [2]
    assert run.data.params["max_steps"] == "2"
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)
