"""Where training metrics go besides the console: ``--report_to tensorboard|wandb|mlflow|none``.

One small interface, :class:`Reporter` (``log_config``, ``log_metrics``, ``close``), with one
implementation per tracker, each through the tracker's own library:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``OUT/logs/``;
- ``wandb``: ``wandb.init`` / ``run.log`` / ``run.finish``, files in ``OUT/wandb/``. W&B runs
  **offline** unless ``WANDB_MODE`` is set or an API key is configured (``WANDB_API_KEY`` or a
  ``.netrc`` entry for the W&B host), so a run never stops at a login prompt; upload an offline run
  later with ``wandb sync OUT/wandb/offline-run-*``. ``WANDB_PROJECT`` (default ``phi3v``) and the
  other ``WANDB_*`` variables are honoured;
- ``mlflow``: ``MlflowClient`` (no global active run) on ``MLFLOW_TRACKING_URI``, default the local
  file store ``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``); experiment
  ``MLFLOW_EXPERIMENT_NAME`` (default ``phi3v``); the configuration as params.

Several trackers at once: the option is repeatable (``--report_to tensorboard --report_to wandb``);
YAML takes a list or one name (a comma-separated string is accepted too). ``none`` means no tracker
and cannot be combined with one.

:func:`require_trackers` checks at start-up, before any model loads and on every rank, that each
tracker's library imports; a missing one is one line naming the extra to install.
:func:`build_reporters` makes the reporters on rank 0 only (other ranks get a reporter that does
nothing), wrapped in one :class:`MultiReporter`.
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

ReportTarget = Literal["tensorboard", "wandb", "mlflow", "none"]
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")
NONE = "none"
DEFAULT_PROJECT = "phi3v"
#: tracker -> (module imported, how to install it)
_LIBRARIES = {
    "tensorboard": ("tensorboard", "the tensorboard package: pip install tensorboard"),
    "wandb": ("wandb", "the wandb extra: pip install 'phi3v[wandb]'"),
    "mlflow": ("mlflow", "the mlflow extra: pip install 'phi3v[mlflow]'"),
}
_MLFLOW_PARAM_LIMIT = 6000  # characters of one param value (MLflow's limit)
_MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit)


class ReportingError(Exception):
    """A tracker that cannot be used: one line, reported before training starts."""


class Reporter(Protocol):
    """What the training loop calls; every tracker implements it."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self, *, ok: bool = True) -> None: ...


# ------------------------------------------------------------------------------------------------
# the option's value
# ------------------------------------------------------------------------------------------------


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """Normalise ``--report_to``: a name, a comma list or a list -> the trackers, in order.

    ``none`` (alone) gives ``[]``; unknown names and ``none`` mixed with a tracker raise
    ``ValueError`` (one line, for a pydantic ``field_validator``: the field name is added there).
    Repeated names count once.
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected tracker names, got {item!r}")
        name = item.strip().lower()
        if name and name not in names:
            names.append(name)
    unknown = [name for name in names if name not in (*TRACKERS, NONE)]
    if unknown:
        raise ValueError(
            f"unknown tracker {unknown[0]!r} (choose from {', '.join(TRACKERS)}, none)"
        )
    if NONE in names:
        if len(names) > 1:
            others = ", ".join(name for name in names if name != NONE)
            raise ValueError(f"none cannot be combined with {others}")
        return []
    return names


def require_trackers(names: Iterable[str]) -> None:
    """Import each tracker's library now; a missing one is one :class:`ReportingError` line."""
    for name in names:
        module, install = _LIBRARIES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ReportingError(f"--report_to {name} needs {install}") from None


# ------------------------------------------------------------------------------------------------
# the reporters
# ------------------------------------------------------------------------------------------------


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of ``metrics`` as floats (None, text and booleans are left out)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class TensorBoardReporter:
    """Scalars into ``OUT/logs`` (as before), the configuration as a text summary."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2, default=str)
        # Markdown: indented lines render as a code block in TensorBoard's text tab.
        self.writer.add_text("config", "\n".join(f"    {line}" for line in text.splitlines()))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self, *, ok: bool = True) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """``None`` when ``WANDB_MODE`` decides; else ``online`` with an API key, ``offline`` without."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if _wandb_api_key_configured() else "offline"


def _wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbReporter:
    """A W&B run in ``OUT/wandb`` (offline unless configured otherwise, see :func:`wandb_mode`)."""

    def __init__(self, output_dir: Path, run_name: str) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_name,
            dir=str(output_dir),
            mode=wandb_mode(),
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(json.loads(json.dumps(dict(config), default=str)))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self, *, ok: bool = True) -> None:
        import wandb

        self.run.finish(exit_code=0 if ok else 1)
        wandb.teardown()  # waits until the service has written the run files (else at exit)


def mlflow_tracking_uri(output_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the file store ``OUT/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()


class MlflowReporter:
    """An MLflow run through ``MlflowClient``: no process-global tracking URI or active run."""

    def __init__(self, output_dir: Path, run_name: str) -> None:
        from mlflow import MlflowClient

        uri = mlflow_tracking_uri(output_dir)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow >= 3.7 refuses the file store unless asked: it is this run's own local log.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(
                key,
                (value if isinstance(value, str) else json.dumps(value, default=str))[
                    :_MLFLOW_PARAM_LIMIT
                ],
            )
            for key, value in config.items()
        ]
        for start in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + _MLFLOW_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(key, value, now, step) for key, value in _numbers(metrics).items()]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def close(self, *, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class MultiReporter:
    """Every chosen reporter behind one; also a context manager (closes with ``ok`` = no error).

    A tracker failing while training runs is not worth losing the run: after its first error
    that reporter is dropped, the error kept in :attr:`errors` and passed to ``warn`` (one line).
    """

    def __init__(
        self, reporters: Iterable[Reporter] = (), warn: Callable[[str], None] | None = None
    ) -> None:
        self.reporters = list(reporters)
        self.errors: list[str] = []
        self.warn = warn

    def __bool__(self) -> bool:
        return bool(self.reporters)

    def _each(self, call: str, *args: Any, **kwargs: Any) -> None:
        for reporter in list(self.reporters):
            try:
                getattr(reporter, call)(*args, **kwargs)
            except Exception as error:  # a tracker's failure never stops training
                self.reporters.remove(reporter)
                message = f"{type(reporter).__name__}.{call}: {error}"
                self.errors.append(message)
                if self.warn is not None:
                    self.warn(f"report_to: {message}; that tracker is off for the rest of the run")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", config)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def close(self, *, ok: bool = True) -> None:
        self._each("close", ok=ok)
        self.reporters = []

    def __enter__(self) -> MultiReporter:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self.close(ok=kind is None)


_FACTORIES = {
    "tensorboard": lambda output_dir, run_name: TensorBoardReporter(output_dir / "logs"),
    "wandb": WandbReporter,
    "mlflow": MlflowReporter,
}


def build_reporters(
    names: Iterable[str],
    output_dir: Path,
    run_name: str,
    config: Mapping[str, Any] | None = None,
    *,
    is_main: bool = True,
    warn: Callable[[str], None] | None = None,
) -> MultiReporter:
    """The reporters named (rank 0 only), each started and given ``config``.

    A tracker that cannot start (bad tracking URI, W&B error) closes the ones already started and
    raises one :class:`ReportingError` line.
    """
    multi = MultiReporter(warn=warn)
    if not is_main:
        return multi
    names = list(names)
    require_trackers(names)
    for name in names:
        try:
            multi.reporters.append(_FACTORIES[name](output_dir, run_name))
        except Exception as error:
            multi.close(ok=False)
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ReportingError(
                f"--report_to {name}: cannot start: {first or type(error).__name__}"
            ) from None
    if config is not None:
        multi.log_config(config)
    return multi
