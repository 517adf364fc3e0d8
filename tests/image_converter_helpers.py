"""Helpers of the docvqa / nlvr2 / hateful_memes converter tests: raw trees, CLI runs, checks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from PIL import Image

from phi3v_data.convert import convert_command
from phi3v_data.validate import validate_dataset

#: The console script installed next to the interpreter (``.venv/bin/phi3v-data``).
PHI3V_DATA = str(Path(sys.executable).with_name("phi3v-data"))


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (24, 16), seed: int = 0) -> bytes:
    """A small real image, different for every seed (so byte comparisons mean something)."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    image.putpixel((0, 0), (255 - (seed % 256), 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Write an image of format ``fmt`` at ``path`` (whatever its extension) and return its bytes."""
    data = image_bytes(fmt, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``phi3v-data ARGS`` in a real subprocess."""
    return subprocess.run(
        [PHI3V_DATA, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def convert(name: str, src: Path, out: Path, *options: str) -> Result:
    """``phi3v-data convert NAME SRC --out_dir OUT OPTIONS`` in-process (fast; same code path)."""
    return CliRunner().invoke(
        convert_command, [name, str(src), "--out_dir", str(out), *options], catch_exceptions=False
    )


def assert_converted(result: Result | subprocess.CompletedProcess[str]) -> None:
    output = getattr(result, "output", None) or f"{result.stdout}\n{result.stderr}"
    code = getattr(result, "exit_code", None)
    code = result.returncode if code is None else code
    assert code == 0, output


def assert_valid(out: Path) -> None:
    """``phi3v-data validate`` (library call, header checks) accepts the dataset."""
    report = validate_dataset(out)
    assert report.ok, report.format_text()


def report_reasons(out: Path) -> list[str]:
    """The reasons listed in ``convert_report.json``, in report order."""
    return [entry["reason"] for entry in read_json(out / "convert_report.json")["skipped"]]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative POSIX path -> bytes)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def images_under(out: Path) -> list[str]:
    """Relative paths of the files under ``OUT/images``."""
    root = out / "images"
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
