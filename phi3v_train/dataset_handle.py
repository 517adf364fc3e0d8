"""One dataset handle per run: opened once, validated once (on rank 0), read once.

:meth:`DatasetHandle.open` validates the dataset directory on rank 0 only (``validate_dataset``);
the verdict (ok, or the report's text) and the facts the other ranks need are broadcast as JSON,
so no other rank validates or scans anything again. ``dataset.json`` is parsed once; the records
of a split are read on first use and cached. Training and evaluation take the handle (or its
``records(split)`` and ``images_root``) instead of a folder they would parse again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3v_data.dataset import IMAGES_DIRNAME, SplitRecords, iter_records, load_info, scan_splits
from phi3v_data.schema import DatasetInfo


class DatasetInvalid(Exception):
    """The dataset cannot be used: ``str()`` is one line; ``report`` the validate text, if any."""

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class DatasetHandle:
    """A validated dataset directory: its info, split files, images root and cached records."""

    root: Path
    info: DatasetInfo
    splits: dict[str, Path]
    _records: dict[str, SplitRecords] = field(default_factory=dict, repr=False)

    @property
    def images_root(self) -> Path:
        return self.root / IMAGES_DIRNAME

    def split_path(self, split: str) -> Path:
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise DatasetInvalid(f"{self.root}: no split {split!r} (found: {known})")
        return self.splits[split]

    def records(self, split: str) -> SplitRecords:
        """Every record of ``split`` (schema-checked, with file lines), read once per run."""
        if split not in self._records:
            path = self.split_path(split)
            numbered = list(iter_records(path, info=self.info, split=split))
            self._records[split] = SplitRecords(path, numbered)
        return self._records[split]

    @classmethod
    def open(cls, data_dir: Path, *, validate: bool = True, share: Any = None) -> DatasetHandle:
        """Validate (when asked) and open ``data_dir`` on this rank, or take rank 0's facts.

        ``share(facts) -> facts`` broadcasts rank 0's JSON-able facts to every rank (identity in
        one process; see :func:`phi3v_train.distributed.share_from_main`). Raises
        :class:`DatasetInvalid` on every rank when rank 0 found a problem.
        """
        from phi3v_train.distributed import share_from_main

        share = share or share_from_main
        facts = share(lambda: _facts(Path(data_dir), validate))
        if facts["error"]:
            raise DatasetInvalid(facts["error"], facts["report"])
        info = DatasetInfo.model_validate(facts["info"])
        splits = {name: Path(path) for name, path in facts["splits"].items()}
        return cls(root=Path(data_dir), info=info, splits=splits)


def _facts(data_dir: Path, validate: bool) -> dict[str, Any]:
    """What rank 0 finds: the verdict, dataset.json and the split files (JSON-able)."""
    from phi3v_data.dataset import DatasetError
    from phi3v_data.validate import validate_dataset

    facts: dict[str, Any] = {"error": "", "report": "", "info": None, "splits": {}}
    if not data_dir.is_dir():
        facts["error"] = f"{data_dir}: --data_dir: no such directory"
        return facts
    if validate:
        report = validate_dataset(data_dir)
        if not report.ok:
            facts["report"] = report.format_text()
            facts["error"] = f"{data_dir}: dataset is invalid (report above); nothing was trained"
            return facts
    try:
        info = load_info(data_dir)
        found = scan_splits(data_dir, info)
    except DatasetError as error:
        facts["error"] = str(error)
        return facts
    facts["info"] = info.model_dump(mode="json")
    facts["splits"] = {name: str(path) for name, path in found.splits.items()}
    return facts
