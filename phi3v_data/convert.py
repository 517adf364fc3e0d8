"""``phi3v-data convert``: converter plugins and the runner that gives them all one behaviour.

Calling form::

    phi3v-data convert --list
    phi3v-data convert NAME --help
    phi3v-data convert NAME SRC --out_dir OUT [--workers N] [--overwrite] [converter options]

Writing a converter
-------------------
A converter is a subclass of :class:`Converter` with three class attributes and two methods::

    class MyConverter(Converter):
        name = "mydata"                         # the NAME on the command line, the jsonl prefix
        help = "One line for --list.\\n\\nMore text for --help."
        options = [click.Option(["--fold"], type=int, default=1, help="...")]

        def plan(self, src: Path, options: dict) -> Plan:
            # Runs once, in the main process. Read the annotation files found in SRC by their
            # official names (raise SourceError when they are missing or malformed), decide the
            # splits and return one Item per unit of work, in a deterministic (sorted) order.
            # Rows that cannot be used (no label, ...) go into Plan.skipped with a reason.
            ...

        def convert(self, item: Item, images: ImageWriter) -> list[dict]:
            # Runs in a worker process, once per item. Write the item's image files with
            # images.save(...) / images.save_bytes(...) / images.copy(...) (paths relative to
            # OUT/images/, starting with the split) and return the item's records as plain dicts
            # of phi3v_data.schema.Record (usually one; several when records share images).
            # Raise SkipItem("reason") when the input is unusable (unreadable video, missing image).
            ...

    CONVERTER = MyConverter          # module attribute the discovery looks for

Built-in converters are the modules of the ``phi3v_data.converters`` package. Third-party packages
register theirs under the entry-point group ``phi3v.converters``
(``mydata = "my_package.my_module:MyConverter"``). Import heavy libraries (OpenCV, pyarrow) inside
``plan``/``convert`` so that ``--list`` stays fast.

What the runner does for every converter
----------------------------------------
- Layout: ``OUT/images/<split>/...``, ``OUT/<name>_<split>.jsonl`` (one per split that has
  records), ``OUT/dataset.json`` (:class:`~phi3v_data.schema.DatasetInfo` from ``Plan.info`` plus
  the converter's name and options), ``OUT/convert_report.json`` (counts and every skipped input
  with its reason) and ``OUT/.phi3v-convert/manifest.json`` (converter, options, source).
- Deterministic: records are written in plan order, JSON without timestamps, so the same input and
  options give byte-identical files whatever ``--workers`` is.
- Atomic: every file is written under a temporary name and renamed; image temporaries live in
  ``OUT/.phi3v-convert/partial/`` so no half-written file ever sits under its final name.
- Resumable: each finished item is appended to ``OUT/.phi3v-convert/journal.jsonl`` after its
  images are in place; a rerun of the same command skips journaled items and assembles the jsonl
  files from the journal, giving the same bytes as an uninterrupted run.
- Safe: refuses a non-empty OUT that was not produced by the same converter, options and SRC,
  unless ``--overwrite`` (which empties OUT first).
- Every record is validated with :class:`~phi3v_data.schema.Record`; an item that fails, raises
  :class:`SkipItem` or any other error is skipped and reported, never fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pkgutil
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import click
import orjson
from pydantic import ValidationError

from phi3v_data.atomic import LockHeld, atomic_open, exclusive_lock, write_atomic
from phi3v_data.dataset import IMAGES_DIRNAME, INFO_FILENAME, record_context
from phi3v_data.messages import plain_errors
from phi3v_data.safe_io import (
    UnsafePath,
    describe_os_error,
    is_environment_error,
    join_inside,
    open_regular,
    read_regular_text,
)
from phi3v_data.schema import DatasetInfo, Record
from phi3v_data.workers import worker_pool

ENTRY_POINT_GROUP = "phi3v.converters"
BUILTIN_PACKAGE = "phi3v_data.converters"
STATE_DIRNAME = ".phi3v-convert"
MANIFEST_FILENAME = "manifest.json"
JOURNAL_FILENAME = "journal.jsonl"
PARTIAL_DIRNAME = "partial"
REPORT_FILENAME = "convert_report.json"
#: Exclusive lock of OUT held by a running convert (removed when it ends; never part of a dataset)
LOCK_FILENAME = ".convert.lock"
#: JPEG quality of every frame or image a converter re-encodes (fixed: part of the output bytes).
JPEG_QUALITY = 95
#: Runner options; a converter must not declare options with these names.
RUNNER_PARAMS = ("src", "out_dir", "workers", "overwrite")


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


class SourceError(Exception):
    """SRC is unusable as a whole (official file missing or malformed): exit 2, one line."""

    def __init__(
        self, path: Path | str, message: str, *, line: int | None = None, field: str | None = None
    ):
        self.path, self.message, self.line, self.field = str(path), message, line, field
        super().__init__(str(self))

    def __str__(self) -> str:
        location = self.path if self.line is None else f"{self.path}:{self.line}"
        field = f" {self.field}:" if self.field else ""
        return f"{location}:{field} {self.message}"


class SkipItem(Exception):
    """Raised by :meth:`Converter.convert`: this input is unusable; skip and report it."""


@dataclass(frozen=True)
class Item:
    """One unit of work: produces the records of ``split`` that share these inputs.

    ``key`` names the input in the report and the journal (e.g. the source file's relative path);
    it must be unique within the plan. ``payload`` is anything picklable ``convert`` needs.
    """

    split: str
    key: str
    payload: Any = None


@dataclass(frozen=True)
class Skipped:
    """An input left out, and why (listed in convert_report.json)."""

    split: str
    key: str
    reason: str


@dataclass
class Plan:
    """What :meth:`Converter.plan` returns."""

    items: list[Item]
    #: inputs rejected while planning (unlabeled row, unknown class, ...)
    skipped: list[Skipped] = field(default_factory=list)
    #: DatasetInfo fields (metrics, unlabeled_splits, num_crops, answer_words, ...)
    info: dict[str, Any] = field(default_factory=dict)


class Converter(ABC):
    """Base class of every converter plugin (see the module docstring)."""

    name: ClassVar[str]
    help: ClassVar[str]
    options: ClassVar[Sequence[click.Option]] = ()

    @abstractmethod
    def plan(self, src: Path, options: Mapping[str, Any]) -> Plan:
        """Read SRC's annotations and list the work; raise :class:`SourceError` for a bad SRC."""

    @abstractmethod
    def convert(self, item: Item, images: ImageWriter) -> list[dict[str, Any]]:
        """Write the item's images and return its records; raise :class:`SkipItem` if unusable."""


class ImageWriter:
    """Writes files under ``OUT/images/`` atomically (temporary file, then rename).

    Every path goes through :func:`~phi3v_data.safe_io.join_inside` before a byte is written: a
    name built from data that would leave ``images/`` (``..``, absolute, backslashes, a symlinked
    folder leading out) raises :class:`~phi3v_data.safe_io.UnsafePath`, which skips the item.
    """

    def __init__(self, images_dir: Path, partial_dir: Path):
        self.images_dir = images_dir
        self.partial_dir = partial_dir

    def path(self, relative: str) -> Path:
        """Final path of an image given relative to ``images/``; refuses one that leaves it."""
        return join_inside(self.images_dir, relative, what="image path")

    def exists(self, relative: str) -> bool:
        return self.path(relative).is_file()

    def save(self, relative: str, image: Any, **save_kwargs: Any) -> str:
        """Encode a PIL image (format from the extension; JPEG at :data:`JPEG_QUALITY`)."""
        if relative.lower().endswith((".jpg", ".jpeg")):
            save_kwargs.setdefault("quality", JPEG_QUALITY)
            save_kwargs.setdefault("format", "JPEG")
            if image.mode != "RGB":
                image = image.convert("RGB")
        elif relative.lower().endswith(".png"):
            save_kwargs.setdefault("format", "PNG")
        return self._write(relative, lambda handle: image.save(handle, **save_kwargs))

    def save_bytes(self, relative: str, data: bytes) -> str:
        """Write already-encoded bytes (e.g. an image copied from a parquet column)."""
        return self._write(relative, lambda handle: handle.write(data))

    def copy(self, relative: str, source: Path) -> str:
        """Copy a source file byte for byte (a regular file only: never waits on a FIFO)."""
        with open_regular(source) as reader:
            return self._write(relative, lambda handle: shutil.copyfileobj(reader, handle))

    def _write(self, relative: str, write: Any) -> str:
        path = self.path(relative)  # checked before anything is created
        with atomic_open(path, self.partial_dir) as handle:
            write(handle)
        return relative


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConverterEntry:
    converter: type[Converter]
    origin: str  # "built-in" or the distribution that provides it


def _as_converter_class(obj: Any, where: str) -> type[Converter]:
    if isinstance(obj, Converter):
        obj = type(obj)
    if not (isinstance(obj, type) and issubclass(obj, Converter)):
        raise TypeError(f"{where} is not a phi3v_data.convert.Converter subclass")
    return obj


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def discover_converters() -> dict[str, ConverterEntry]:
    """Built-in converters, then entry points of :data:`ENTRY_POINT_GROUP`; sorted by name.

    A plugin that fails to load, or reuses a taken name, is reported on stderr and left out.
    """
    found: dict[str, ConverterEntry] = {}

    def add(obj: Any, where: str, origin: str) -> None:
        try:
            cls = _as_converter_class(obj, where)
        except TypeError as error:
            _warn(str(error))
            return
        if cls.name in found:
            _warn(f"converter {cls.name!r} from {where} ignored: the name is already taken")
            return
        found[cls.name] = ConverterEntry(cls, origin)

    package = importlib.import_module(BUILTIN_PACKAGE)
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{BUILTIN_PACKAGE}.{module_info.name}")
        except Exception as error:  # one broken module must not take the others down
            _warn(f"built-in converter {module_info.name!r} failed to load: {error}")
            continue
        if hasattr(module, "CONVERTER"):
            add(module.CONVERTER, f"{module.__name__}.CONVERTER", "built-in")
    for entry_point in sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
    ):
        origin = entry_point.dist.name if entry_point.dist else entry_point.value
        try:
            obj = entry_point.load()
        except Exception as error:  # a broken plugin must not break the others
            _warn(f"converter plugin {entry_point.value!r} failed to load: {error}")
            continue
        add(obj, entry_point.value, origin)
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


class OutputError(Exception):
    """OUT cannot be used (non-empty and not ours, without --overwrite)."""


def _json_ready(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, tuple | list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value


def _dump_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


@dataclass
class _Outcome:
    """The result of one item: its records, or why it was skipped."""

    index: int
    key: str
    records: list[dict[str, Any]] | None = None
    reason: str | None = None

    def to_line(self) -> bytes:
        data = {"i": self.index, "key": self.key}
        data.update({"records": self.records} if self.reason is None else {"skip": self.reason})
        return orjson.dumps(data) + b"\n"


# State of a worker process (set once by _init_worker; also used in-process for --workers 1).
_WORKER: dict[str, Any] = {}


def _init_worker(converter_cls: type[Converter], images: ImageWriter, info: DatasetInfo) -> None:
    _WORKER.update(converter=converter_cls(), images=images, info=info)


def _run_item(task: tuple[int, Item]) -> _Outcome:
    index, item = task
    converter: Converter = _WORKER["converter"]
    images: ImageWriter = _WORKER["images"]
    info: DatasetInfo = _WORKER["info"]
    outcome = _Outcome(index, item.key)
    try:
        raw_records = converter.convert(item, images)
        context = record_context(info, item.split)
        records = []
        for raw in raw_records:
            record = Record.model_validate(raw, context=context)
            for relative in record.images:
                if not images.exists(relative):
                    raise SkipItem(f"converter wrote no image {relative}")
            records.append(record.model_dump(mode="json", exclude_none=True))
        outcome.records = records
    except SkipItem as error:
        outcome.reason = str(error)
    except UnsafePath as error:
        outcome.reason = f"unsafe path: {error}"
    except ValidationError as error:
        field, message = plain_errors(error)[0]
        outcome.reason = f"invalid record: {field}: {message}"
    except Exception as error:  # unusable input must never be fatal...
        if is_environment_error(error):
            raise  # ...but a full disk, an I/O error or a refused write is no record's fault
        outcome.reason = f"{type(error).__name__}: {error}"
    return outcome


def _read_journal(path: Path, items: Sequence[Item]) -> dict[int, _Outcome]:
    """Finished items of an interrupted run; a torn last line (killed mid-write) is dropped."""
    done: dict[int, _Outcome] = {}
    if not path.is_file():
        return done
    for line in path.read_bytes().splitlines():
        try:
            data = orjson.loads(line)
            index, key = int(data["i"]), str(data["key"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if 0 <= index < len(items) and items[index].key == key:
            done[index] = _Outcome(index, key, data.get("records"), data.get("skip"))
    return done


def _check_output(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> str:
    """'fresh', 'resume', 'complete' or 'overwrite'; raises OutputError for a foreign OUT.

    An OUT written by the same converter, options and SRC is resumed (also with --overwrite, so
    that rerunning an interrupted command never redoes finished work); any other non-empty OUT
    is to be emptied ('overwrite', done once SRC was read successfully) or refused.
    """
    manifest_path = out_dir / STATE_DIRNAME / MANIFEST_FILENAME
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    contents = _contents(out_dir)
    if not contents:
        return "fresh"
    if contents == [manifest_path.parent] and not manifest_path.exists():
        shutil.rmtree(manifest_path.parent)  # a run killed while writing its first manifest
        return "fresh"
    previous = None
    if manifest_path.is_file():
        try:
            previous = json.loads(read_regular_text(manifest_path))
        except (UnicodeDecodeError, json.JSONDecodeError):
            previous = None
        except OSError as error:
            if is_environment_error(error):
                raise
            previous = None
    if isinstance(previous, dict) and previous.get("identity") == manifest["identity"]:
        return "complete" if previous.get("complete") else "resume"
    if overwrite:
        return "overwrite"
    what = "another converter, options or SRC" if previous else "something else"
    raise OutputError(
        f"{out_dir}: not empty and written by {what}; "
        "choose an empty --out_dir or pass --overwrite to replace its contents"
    )


def _contents(out_dir: Path) -> list[Path]:
    """What OUT holds, the lock file of the running convert aside (sorted; [] when missing)."""
    if not out_dir.exists():
        return []
    return sorted(child for child in out_dir.iterdir() if child.name != LOCK_FILENAME)


def _empty(folder: Path) -> None:
    for child in _contents(folder):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _progress(total: int, initial: int, name: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"convert {name}",
        unit="item",
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def run_conversion(
    converter_cls: type[Converter],
    src: Path,
    out_dir: Path,
    options: Mapping[str, Any],
    *,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert SRC into OUT with the common behaviour; returns the report (also written to OUT).

    Raises :class:`SourceError` (bad SRC), :class:`OutputError` (OUT not usable, or locked by
    another run) or ``OSError`` (the machine's fault: full disk, read-only OUT, I/O error, ...;
    never recorded as an item's fault, so a rerun after the fix converts every item).
    """
    options = _json_ready(dict(options))
    if not src.exists():
        raise SourceError(src, "does not exist")
    if src.resolve().is_relative_to(out_dir.resolve()):
        raise OutputError(f"{out_dir}: holds SRC {src}; choose an --out_dir outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(out_dir / LOCK_FILENAME):
            return _convert_locked(converter_cls, src, out_dir, options, workers, overwrite)
    except LockHeld as error:
        raise OutputError(
            f"{out_dir}: another convert is writing into it ({error.filename} is locked); "
            "wait for it to finish or choose another --out_dir"
        ) from None
    finally:
        with suppress(OSError):  # nothing converted: leave no empty OUT behind
            if created and not _contents(out_dir):
                shutil.rmtree(out_dir, ignore_errors=True)


def _convert_locked(
    converter_cls: type[Converter],
    src: Path,
    out_dir: Path,
    options: dict[str, Any],
    workers: int,
    overwrite: bool,
) -> dict[str, Any]:
    """:func:`run_conversion` once OUT is locked."""
    converter = converter_cls()
    identity = {"converter": converter_cls.name, "options": options, "src": str(src.resolve())}
    manifest = {"identity": identity, "complete": False}
    state = _check_output(out_dir, manifest, overwrite)
    state_dir = out_dir / STATE_DIRNAME
    journal_path = state_dir / JOURNAL_FILENAME
    partial_dir = state_dir / PARTIAL_DIRNAME
    if state == "complete":  # killed after the manifest said so, perhaps before the clean-up
        journal_path.unlink(missing_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
        return json.loads(read_regular_text(out_dir / REPORT_FILENAME))

    plan = converter.plan(src, options)
    keys = [item.key for item in plan.items]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"converter {converter_cls.name!r} planned duplicate item keys")
    info = DatasetInfo.model_validate(
        {
            **plan.info,
            "name": converter_cls.name,
            "converter": {"name": converter_cls.name, "options": options},
        }
    )

    if state == "overwrite":
        _empty(out_dir)
        state = "fresh"
    shutil.rmtree(partial_dir, ignore_errors=True)  # temporaries of a killed run
    if state == "fresh":
        write_atomic(state_dir / MANIFEST_FILENAME, _dump_json(manifest), partial_dir)
    images = ImageWriter(out_dir / IMAGES_DIRNAME, partial_dir)
    done = _read_journal(journal_path, plan.items)
    # rewrite the journal without a torn last line before appending to it
    write_atomic(journal_path, b"".join(done[i].to_line() for i in sorted(done)), partial_dir)

    todo = [(index, item) for index, item in enumerate(plan.items) if index not in done]
    with (
        journal_path.open("ab") as journal,
        _progress(len(plan.items), len(done), converter_cls.name) as bar,
        closing(_execute(converter_cls, images, info, todo, workers)) as outcomes,
    ):
        for outcome in outcomes:
            journal.write(outcome.to_line())
            journal.flush()
            done[outcome.index] = outcome
            bar.update(1)

    report = _assemble(out_dir, converter_cls.name, plan, done, info, partial_dir)
    write_atomic(
        state_dir / MANIFEST_FILENAME, _dump_json({**manifest, "complete": True}), partial_dir
    )
    journal_path.unlink(missing_ok=True)
    shutil.rmtree(partial_dir, ignore_errors=True)
    return report


def _execute(
    converter_cls: type[Converter],
    images: ImageWriter,
    info: DatasetInfo,
    todo: list[tuple[int, Item]],
    workers: int,
) -> Iterator[_Outcome]:
    if workers <= 1 or len(todo) <= 1:
        _init_worker(converter_cls, images, info)
        yield from map(_run_item, todo)
        return
    chunksize = max(1, min(16, len(todo) // (workers * 8)))
    # workers ignore Ctrl-C; any exception here (Ctrl-C, an environment error re-raised from a
    # worker) or closing this generator early terminates and joins them before it propagates
    with worker_pool(workers, _init_worker, (converter_cls, images, info)) as pool:
        yield from pool.imap_unordered(_run_item, todo, chunksize=chunksize)


def _assemble(
    out_dir: Path,
    name: str,
    plan: Plan,
    done: Mapping[int, _Outcome],
    info: DatasetInfo,
    temp_dir: Path,
) -> dict[str, Any]:
    """Write the jsonl files, dataset.json and convert_report.json from the finished items."""
    by_split: dict[str, list[bytes]] = {}
    skipped = [(s.split, s.key, s.reason) for s in plan.skipped]
    seen_ids: set[str] = set()
    for index, item in enumerate(plan.items):
        outcome = done[index]
        lines = by_split.setdefault(item.split, [])
        if outcome.reason is not None:
            skipped.append((item.split, item.key, outcome.reason))
            continue
        for record in outcome.records or []:
            if record["id"] in seen_ids:
                raise RuntimeError(f"converter {name!r} produced the id {record['id']!r} twice")
            seen_ids.add(record["id"])
            lines.append(orjson.dumps(record) + b"\n")
    for split in sorted({s for s, _, _ in skipped}):
        by_split.setdefault(split, [])
    for split, lines in sorted(by_split.items()):
        if lines:
            path = join_inside(out_dir, f"{name}_{split}.jsonl", what="split file")
            write_atomic(path, b"".join(lines), temp_dir)
    write_atomic(
        out_dir / INFO_FILENAME,
        _dump_json(info.model_dump(mode="json", exclude_none=True)),
        temp_dir,
    )
    skipped.sort()
    report = {
        "converter": name,
        "splits": {
            split: {
                "records": len(lines),
                "skipped": sum(1 for s, _, _ in skipped if s == split),
            }
            for split, lines in sorted(by_split.items())
        },
        "skipped_total": len(skipped),
        "skipped": [{"split": s, "input": k, "reason": r} for s, k, r in skipped],
    }
    write_atomic(out_dir / REPORT_FILENAME, _dump_json(report), temp_dir)
    return report


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _converter_command(entry: ConverterEntry) -> click.Command:
    cls = entry.converter
    clashes = {p.name for p in cls.options} & set(RUNNER_PARAMS)
    if clashes:
        raise click.ClickException(f"converter {cls.name!r} redefines runner options {clashes}")

    def callback(src: Path, out_dir: Path, workers: int, overwrite: bool, **options: Any) -> None:
        try:
            report = run_conversion(
                cls, src, out_dir, options, workers=workers, overwrite=overwrite
            )
        except (SourceError, OutputError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except OSError as error:  # unreadable SRC file, full disk, read-only OUT, ...
            where = "" if error.filename is not None else f"{out_dir}: "
            click.echo(
                f"error: {where}{describe_os_error(error)} "
                "(finished items are kept: run the same command again once fixed)",
                err=True,
            )
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            sys.exit(130)
        counts = ", ".join(
            f"{split} {c['records']}" + (f" (+{c['skipped']} skipped)" if c["skipped"] else "")
            for split, c in report["splits"].items()
        )
        click.echo(f"{cls.name}: wrote {out_dir} [{counts}]")
        if report["skipped_total"]:
            click.echo(
                f"{report['skipped_total']} inputs skipped; reasons in {out_dir / REPORT_FILENAME}"
            )

    params: list[click.Parameter] = [
        click.Argument(["src"], type=click.Path(path_type=Path)),
        click.Option(
            ["--out_dir"],
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Output dataset directory (created; resumed if a run of the same command "
            "was interrupted).",
        ),
        click.Option(
            ["--workers"],
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Worker processes; the output does not depend on it.",
        ),
        click.Option(
            ["--overwrite"],
            is_flag=True,
            help="Empty a non-empty OUT written by something else before converting.",
        ),
        *cls.options,
    ]
    return click.Command(
        cls.name,
        callback=callback,
        params=params,
        help=cls.help,
        short_help=_first_line(cls.help),
        context_settings={"help_option_names": ["-h", "--help"]},
    )


class ConverterGroup(click.Group):
    """A click group whose subcommands are the discovered converters."""

    _entries: dict[str, ConverterEntry] | None = None

    def entries(self) -> dict[str, ConverterEntry]:
        if self._entries is None:
            self._entries = discover_converters()
        return self._entries

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.entries())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = self.entries().get(name)
        return _converter_command(entry) if entry else None


@click.group(
    "convert",
    cls=ConverterGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--list", "list_", is_flag=True, help="List the available converters and exit.")
@click.pass_context
def convert_command(ctx: click.Context, list_: bool) -> None:
    """Convert a raw dataset as downloaded into the conversations-jsonl format.

    \b
    phi3v-data convert NAME SRC --out_dir OUT [--workers N] [--overwrite] [options]
    phi3v-data convert NAME --help     (the options of one converter)
    """
    if list_:
        group: ConverterGroup = ctx.command  # type: ignore[assignment]
        entries = group.entries()
        width = max((len(name) for name in entries), default=0)
        for name, entry in entries.items():
            click.echo(f"{name:<{width}}  {_first_line(entry.converter.help)} [{entry.origin}]")
        ctx.exit(0)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
