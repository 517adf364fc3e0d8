"""The README's map of the code names every module of the product packages, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("phi3v_data", "phi3v_train")


def _map_block() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Map of the code", 1)[1]
    return section.split("```text", 1)[1].split("```", 1)[0].splitlines()


def _mapped_modules() -> set[str]:
    """Paths of the ``.py`` entries, rebuilt from the indentation of the tree."""
    stack: list[tuple[int, str]] = []
    found = set()
    for line in _map_block():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match[1]) // 2, match[2]
        stack = [(d, n) for d, n in stack if d < depth]
        path = "/".join([n.rstrip("/") for _, n in stack] + [name.rstrip("/")])
        if name.endswith("/"):
            stack.append((depth, name))
        elif name.endswith(".py") and path.startswith(PACKAGES):
            found.add(path)
    return found


def test_readme_map_matches_the_tree() -> None:
    on_disk = {
        path.relative_to(REPO_ROOT).as_posix()
        for package in PACKAGES
        for path in (REPO_ROOT / package).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    mapped = _mapped_modules()
    assert sorted(on_disk - mapped) == [], "modules missing from the README map"
    assert sorted(mapped - on_disk) == [], "README map names modules that do not exist"
