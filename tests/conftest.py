"""Shared fixtures: the read-only reference folder (skipped when absent) and GPU gating."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path | None:
    candidates = [os.environ.get("PHI3V_SHARED"), REPO_ROOT.parent / "shared", REPO_ROOT / "shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "reference" / "phi35v").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder (docs, raw fixtures, golden vectors); tests skip cleanly without it."""
    found = _find_shared()
    if found is None:
        pytest.skip("../shared is absent (a fresh clone has none): reference tests skipped")
    return found


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    """../shared/reference/phi35v: golden vectors of the official implementation."""
    return shared_dir / "reference" / "phi35v"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
