"""``phi3v-data preview``: one self-contained HTML page to look at a dataset before training on it.

The page holds, at the top, the dataset's split statistics (records, tokens per record at
``--num_crops`` from :mod:`phi3v_data.token_stats`) and the problems ``validate`` finds outside any
listed record; then the first ``--limit`` lines of one split: each record's system prompt, every
turn with its images as small JPEG thumbnails where the model sees them (first, or inline at the
``<image>`` placeholders), the answer, the record's token count, and every validate problem of
its line. Every piece of data is HTML-escaped; images are ``data:`` URIs and a Content Security
Policy forbids any other resource, so the page opens offline and fetches nothing. The file is
written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import defaultdict
from pathlib import Path

import click

from phi3v_data.atomic import write_atomic
from phi3v_data.dataset import images_root, record_context
from phi3v_data.images import ImageError, load_image
from phi3v_data.schema import DEFAULT_NUM_CROPS, IMAGE_PLACEHOLDER, Record, Turn
from phi3v_data.token_stats import (
    SplitTokens,
    TokenCounter,
    TokenReport,
    count_records,
    iter_split_records,
    split_files,
)
from phi3v_data.validate import Problem, validate_dataset

#: Longest side of a thumbnail, in pixels.
THUMBNAIL_SIZE = 160
#: JPEG quality of the embedded thumbnails (small pages; not the converters' quality).
THUMBNAIL_JPEG_QUALITY = 70

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:16px 24px}
header h1{margin:0 0 6px;font-size:20px}
main{padding:16px 24px;max-width:1100px}
table{border-collapse:collapse;background:#fff;margin:8px 0 16px}
td,th{border:1px solid #d5d9e0;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
.record{background:#fff;border:1px solid #d5d9e0;border-radius:8px;margin:0 0 16px;padding:12px 16px}
.record.bad{border-color:#c62828;box-shadow:0 0 0 2px #ffcdd2}
.record h2{font-size:15px;margin:0 0 8px;display:flex;gap:12px;flex-wrap:wrap}
.muted{color:#667085;font-weight:normal}
.system{background:#eef2ff;border-left:4px solid #4f46e5;padding:6px 10px;margin:6px 0}
.turn{border-top:1px dashed #d5d9e0;padding:8px 0}
.role{font-weight:600;margin-right:6px}
.user,.assistant{white-space:pre-wrap;overflow-wrap:anywhere}
.assistant{background:#ecfdf3;border-left:4px solid #16a34a;padding:6px 10px;margin-top:6px}
figure{display:inline-block;margin:4px 6px 4px 0;vertical-align:middle;text-align:center}
figure img{display:block;max-width:160px;max-height:160px;border:1px solid #d5d9e0}
figcaption{font-size:11px;color:#667085}
.broken{width:120px;height:80px;background:#fee2e2;color:#991b1b;font-size:11px;padding:4px;
display:flex;align-items:center;justify-content:center;overflow:hidden}
.badge{font-size:11px;padding:1px 6px;border-radius:8px;background:#e5e7eb;color:#374151}
.problems{color:#991b1b;background:#fef2f2;margin:8px 0 12px;padding:6px 10px 6px 26px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


class _Thumbnails:
    """Base64 JPEG thumbnails of the images below ``root``, once per path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.cache: dict[str, str] = {}

    def figure(self, relative: str, number: int) -> str:
        if relative not in self.cache:
            try:
                image = load_image(self.root, relative)
                image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                stream = io.BytesIO()
                image.save(stream, "JPEG", quality=THUMBNAIL_JPEG_QUALITY)
                data = base64.b64encode(stream.getvalue()).decode("ascii")
                self.cache[relative] = (
                    f'<img src="data:image/jpeg;base64,{data}" alt="{_e(relative)}">'
                )
            except ImageError as error:
                self.cache[relative] = f'<div class="broken">{_e(error.problem)}</div>'
        caption = f"&lt;|image_{number}|&gt; {_e(relative)}"
        return (
            f'<figure title="{_e(relative)}">{self.cache[relative]}'
            f"<figcaption>{caption}</figcaption></figure>"
        )


def _user_html(turn: Turn, thumbnails: _Thumbnails) -> str:
    """The user text with its images where the model sees them."""
    figures = [thumbnails.figure(path, k) for k, path in enumerate(turn.images, 1)]
    if turn.inline_images:
        pieces = turn.user.split(IMAGE_PLACEHOLDER)
        if len(pieces) == len(figures) + 1:
            body = "".join(
                _e(piece) + fig for piece, fig in zip(pieces, [*figures, ""], strict=True)
            )
            return f'<span class="badge">images inline</span><div class="user">{body}</div>'
    place = "images first" if figures else "text only"
    return (
        f'<span class="badge">{place}</span><div>{"".join(figures)}</div>'
        f'<div class="user">{_e(turn.user)}</div>'
    )


def _problems_html(problems: list[Problem]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{_e(p.field)}: {_e(p.message)}</li>" for p in problems)
    return f'<ul class="problems">{items}</ul>'


def _record_html(
    line: int,
    record: Record | None,
    problems: list[Problem],
    counter: TokenCounter,
    thumbnails: _Thumbnails,
) -> str:
    bad = " bad" if problems or record is None else ""
    if record is None:
        return (
            f'<section class="record{bad}" data-line="{line}"><h2>line {line} '
            f'<span class="muted">not a valid record</span></h2>{_problems_html(problems)}</section>'
        )
    try:
        tokens = counter.count(record)
        count = f"{tokens.total:,} tokens ({tokens.image:,} image + ~{tokens.text:,} text)"
    except ImageError as error:
        count = f"tokens unknown ({error})"
    parts = [
        f'<section class="record{bad}" data-line="{line}" data-id="{_e(record.id)}">',
        f'<h2>{_e(record.id)} <span class="muted">line {line} · {_e(record.source)} · '
        f"{_e(count)}</span></h2>",
    ]
    if record.system is not None:
        parts.append(
            f'<div class="system"><span class="role">system</span>{_e(record.system)}</div>'
        )
    for index, turn in enumerate(record.conversations, 1):
        parts.append(
            f'<div class="turn"><span class="role">user {index}</span>'
            f"{_user_html(turn, thumbnails)}"
            f'<div class="assistant"><span class="role">assistant</span>{_e(turn.assistant)}</div>'
            "</div>"
        )
    extra = []
    if record.answers is not None:
        extra.append(f"answers: {_e(' | '.join(record.answers))}")
    if record.label is not None:
        extra.append(f"label: {record.label}")
    if record.group is not None:
        extra.append(f"group: {_e(record.group)}")
    if extra:
        parts.append(f'<div class="muted">{" · ".join(extra)}</div>')
    parts.append(_problems_html(problems) + "</section>")
    return "".join(parts)


def _stats_html(report: TokenReport) -> str:
    how = "tokenizer" if report.exact else "text estimated at 4 characters per token"
    rows = []
    for split in report.splits:
        data = split.to_json()
        cells = [data.get(key, "–") for key in ("records", "skipped", "min", "mean", "p95", "max")]
        share = f"{data['image_share']:.0%}" if "image_share" in data else "–"
        rows.append(
            f"<tr><td>{_e(split.split)}</td>"
            + "".join(f"<td>{_e(cell)}</td>" for cell in cells)
            + f"<td>{share}</td></tr>"
        )
    head = "".join(
        f"<th>{name}</th>"
        for name in ("split", "records", "skipped", "min", "mean", "p95", "max", "image tokens")
    )
    return (
        f"<h3>Tokens per record at num_crops={report.num_crops} ({_e(how)})</h3>"
        f'<table class="stats"><tr>{head}</tr>{"".join(rows)}</table>'
    )


def build_preview(
    data_dir: Path, split: str | None = None, limit: int = 20, num_crops: int = DEFAULT_NUM_CROPS
) -> str:
    """The HTML page of a dataset folder: statistics of every split, ``limit`` lines of one."""
    data_dir = Path(data_dir)
    files, info = split_files(data_dir)
    if not files:
        raise click.ClickException(f"{data_dir}: no <name>_<split>.jsonl file to preview")
    names = [name for name, _ in files]
    chosen = split or ("train" if "train" in names else names[0])
    if chosen not in names:
        raise click.ClickException(f"no split {chosen!r} in {data_dir}; found: {', '.join(names)}")
    validation = validate_dataset(data_dir, jobs=1)
    by_line: dict[tuple[str, int], list[Problem]] = defaultdict(list)
    for problem in validation.problems:
        by_line[(os.path.realpath(problem.path), problem.line)].append(problem)

    root = images_root(data_dir.parent if data_dir.is_file() else data_dir)
    counter = TokenCounter(root, num_crops)
    thumbnails = _Thumbnails(root)
    stats: list[SplitTokens] = []
    sections: list[str] = []
    shown: set[tuple[str, int]] = set()
    for name, path in files:
        context = record_context(info, name)
        records = []
        for line, record in iter_split_records(path, context):
            records.append(record)
            if name == chosen and len(sections) < limit:
                key = (os.path.realpath(path), line)
                shown.add(key)
                sections.append(_record_html(line, record, by_line[key], counter, thumbnails))
        stats.append(count_records(counter, name, records))
    others = [p for key, group in by_line.items() if key not in shown for p in group]
    total = sum(len(split.totals) + split.skipped for split in stats if split.split == chosen)
    verdict = "valid" if validation.ok else f"{len(validation.problems)} problem(s)"
    title = f"{info.name or data_dir.name} · {chosen}"
    other_html = ""
    if others:
        items = "".join(f"<li>{_e(problem)}</li>" for problem in others[:200])
        more = f"<li>… and {len(others) - 200} more</li>" if len(others) > 200 else ""
        other_html = f'<h3>Other problems</h3><ul class="problems">{items}{more}</ul>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><div>{_e(data_dir)} · validate: {_e(verdict)} · "
        f"showing {len(sections)} of {total} lines of split {_e(chosen)}</div></header><main>"
        f"{_stats_html(TokenReport(num_crops, False, stats))}{other_html}"
        f'<div id="records">{"".join(sections)}</div></main></body></html>\n'
    )


@click.command("preview")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--split", default=None, help="Split to show (default: train, else the first).")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Lines shown."
)
@click.option(
    "--num_crops",
    "--num-crops",
    type=click.IntRange(1, 16),
    default=None,
    help=f"num_crops of the token counts (default: dataset.json's num_crops, else {DEFAULT_NUM_CROPS}).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The HTML file to write.",
)
def preview_command(
    path: Path, split: str | None, limit: int, num_crops: int | None, out: Path
) -> None:
    """Write one self-contained HTML page showing a dataset (folder or one .jsonl file)."""
    if num_crops is None:
        _, info = split_files(path)
        num_crops = info.num_crops or DEFAULT_NUM_CROPS
    page = build_preview(path, split=split, limit=limit, num_crops=num_crops)
    write_atomic(out, page.encode("utf-8"))
    click.echo(f"wrote {out} ({len(page.encode('utf-8')):,} bytes)")
