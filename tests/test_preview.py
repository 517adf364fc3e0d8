"""``phi3v-data preview``: the page's content, its escaping, and how it renders in headless Chromium.

The Chromium test (skipped when Debian's ``chromium`` is absent; ``.ci/run`` installs it) loads the
page from a file URL, checks the rendered DOM and keeps a screenshot as an artifact: under the
test's tmp_path and as ``tests/artifacts/preview.png`` (git-ignored); the test prints both paths.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from dataset_files import write_dataset
from PIL import Image

from phi3v_data.cli import main

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EVIL = '<script>alert("x")</script> & <img src=http://example.com/x.png>'


def _picture(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    """A gradient with a coloured square, so that thumbnails are easy to tell apart."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    square = Image.new("RGB", (width // 2, height // 2), colour)
    image.paste(square, (width // 4, height // 4))
    stream = io.BytesIO()
    image.save(stream, "JPEG" if width % 2 else "PNG")
    return stream.getvalue()


def _turn(user: str, images: list[str], answer: str, inline: bool = False) -> dict:
    turn = {"images": images, "user": user, "assistant": answer}
    return {**turn, "inline_images": True} if inline else turn


ROWS = [
    {
        "id": "first",
        "source": "demo",
        "conversations": [_turn("What colour is the square?", ["red.png"], "red")],
    },
    {
        "id": "inline",
        "source": "demo",
        "system": "You compare pictures. Answer in one word.",
        "conversations": [
            _turn(
                "Compare <image> with <image>: same colour?", ["red.png", "blue.jpg"], "no", True
            ),
            _turn("What are they doing?<image>", ["wide.png"], "nothing", True),
        ],
    },
    {"id": "text", "source": "demo", "conversations": [_turn(EVIL, [], EVIL)]},
    {
        "id": "mismatch",
        "source": "demo",
        "conversations": [_turn("Only <image> here", ["red.png", "blue.jpg"], "two", True)],
    },
    {"id": "missing", "source": "demo", "conversations": [_turn("Where?", ["gone.png"], "away")]},
    "{broken json",
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    images = {
        "red.png": _picture((240, 180), (220, 30, 30)),
        "blue.jpg": _picture((301, 400), (30, 60, 220)),
        "wide.png": _picture((640, 160), (30, 180, 60)),
    }
    val = [{"id": "v1", "source": "demo", "conversations": [_turn("Hi", ["red.png"], "hello")]}]
    return write_dataset(tmp_path / "demo", {"train": ROWS, "val": val}, images=images)


def _preview(dataset: Path, out: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["preview", str(dataset), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8")


def test_page_holds_every_record_escaped_and_self_contained(dataset: Path, tmp_path: Path) -> None:
    page = _preview(dataset, tmp_path / "p.html", "--num_crops", "4")
    assert page.count('<section class="record') == 6
    assert page.count("data:image/jpeg;base64,") == 4  # red twice, blue, wide
    # Escaped: the hostile text is shown, never parsed; nothing is loaded from elsewhere.
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page
    assert not re.search(r"""<[^>]*\b(src|href)=["']?(https?:|//)""", page)
    assert "default-src 'none'" in page
    # Placement, system prompt, validate problems on their records, split statistics.
    assert "images inline" in page and "images first" in page and "text only" in page
    assert "You compare pictures. Answer in one word." in page
    sections = page.split('<section class="record')
    mismatch = sections[4]  # invalid: shown by its line with its problem
    assert 'data-line="4"' in mismatch and "not a valid record" in mismatch
    assert "conversations.0.user" in mismatch and "1 &lt;image&gt; placeholder(s)" in mismatch
    assert "does not exist in images/" in page.split('data-id="missing"')[1].split("</section>")[0]
    assert "not a valid record" in page and "num_crops=4" in page
    assert "<td>train</td><td>3</td><td>3</td>" in page and "<td>val</td><td>1</td>" in page
    # --split and --limit.
    page = _preview(dataset, tmp_path / "v.html", "--split", "val")
    assert page.count('<section class="record') == 1 and 'data-id="v1"' in page
    page = _preview(dataset, tmp_path / "l.html", "--limit", "2")
    assert page.count('<section class="record') == 2
    result = CliRunner().invoke(main, ["preview", str(dataset), "--split", "nope", "--out", "x"])
    assert result.exit_code != 0 and "no split 'nope'" in result.output


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def test_page_renders_in_headless_chromium(dataset: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    page = tmp_path / "preview.html"
    _preview(dataset, page, "--num_crops", "4")
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180
    ).stdout
    assert dom.count('<section class="record') == 6, dom[:2000]
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', dom)) == 4  # red twice
    assert "<script" not in dom and "&lt;script&gt;" in dom
    assert 'data-id="inline"' in dom and "You compare pictures." in dom
    shot = tmp_path / "preview.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        capture_output=True,
        timeout=180,
        check=True,
    )
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        colours = image.convert("RGB").resize((60, 80)).getcolors(60 * 80)
    assert colours is not None and len(colours) > 20  # not a blank page
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / "preview.png"
    shutil.copyfile(shot, kept)
    print(f"preview screenshot: {shot} (copy: {kept})")
