"""A self-contained HTML report: headed sections of tables, images (embedded) and raw HTML."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .fileio import atomic_write

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;background:#fcfcfc}
table{border-collapse:collapse;margin:0.6em 0 1.2em}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#eee}
.note{color:#555;font-size:14px}
img.plot{max-width:520px;margin:4px;border:1px solid #ddd}
iframe{width:100%;height:520px;border:1px solid #ccc}
"""


@dataclass
class Section:
    """One part of the report: a heading, notes, tables, images and raw HTML, in that order."""

    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)
    embedded_pages: list[str] = field(default_factory=list)

    def table(self, caption: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Floats are shown with two decimals."""
        cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
        self.tables.append((caption, list(header), cells))

    def metrics(self, caption: str, columns: Sequence[str], results: Mapping[str, Mapping[str, float]]) -> None:
        """A table of named results: one row per model, one column per metric, ``-`` where one is absent."""
        rows = [[name, *(metrics.get(c, "-") for c in columns)] for name, metrics in results.items()]
        self.table(caption, ["model", *columns], rows)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure style="display:inline-block"><img class="plot" src="data:image/png;base64,{data}">' \
           f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>"


def write_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write the report atomically and return its path."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(f"<p class='note'>{html.escape(n)}</p>" for n in section.notes)
        for caption, header, rows in section.tables:
            parts.append(f"<table><caption>{html.escape(caption)}</caption><tr>")
            parts.extend(f"<th>{html.escape(h)}</th>" for h in header)
            parts.append("</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
        parts.extend(_image(image, caption) for caption, image in section.images if Path(image).is_file())
        parts.extend(f"<iframe srcdoc=\"{html.escape(page, quote=True)}\"></iframe>" for page in section.embedded_pages)
    parts.append("</body></html>\n")
    with atomic_write(path, "w") as handle:
        handle.write("".join(parts))
    return Path(path)
