"""A self-contained HTML page of a query and its results.

Thumbnails (at most 256 px on the long side) are embedded as base64 JPEG ``data:`` URIs, so
the page can be mailed or moved without the image files; the full paths are shown as text.
Images that cannot be read are shown as a grey placeholder with the reason.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from ..data.images import load_image
from ..errors import MoraError
from ..fileio import atomic_write
from .search import Hit

THUMBNAIL = 256

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;padding:8px;background:#fff;border:1px solid #ddd;border-radius:6px;width:264px}
figure img{max-width:256px;max-height:256px;display:block;margin:auto}
figcaption{font-size:12px;word-break:break-all;margin-top:4px}
.query{border-color:#36c;border-width:2px}
.missing{width:256px;height:128px;background:#ddd;display:flex;align-items:center;justify-content:center;font-size:12px}
"""


def thumbnail_jpeg(path: str | Path, size: int = THUMBNAIL) -> bytes:
    """A JPEG thumbnail of ``path``, at most ``size`` px a side (raises DataError if unreadable)."""
    image = load_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _figure(path: str, caption: str, css: str = "") -> str:
    try:
        data = base64.b64encode(thumbnail_jpeg(path)).decode("ascii")
        img = f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(Path(path).name)}">'
    except MoraError as exc:
        img = f'<div class="missing">{html.escape(str(exc)[:120])}</div>'
    return f'<figure class="{css}">{img}<figcaption>{caption}</figcaption></figure>'


def render_gallery(hits: Sequence[Hit], *, image: str | Path | None = None, text: str | None = None, title: str = "") -> str:
    """The HTML page: the query (image and/or text) followed by the ranked results."""
    query_parts = []
    if image is not None:
        query_parts.append(_figure(str(image), "query image<br>" + html.escape(str(image)), "query"))
    if text is not None:
        query_parts.append(f'<figure class="query"><figcaption>query text:<br><b>{html.escape(text)}</b></figcaption></figure>')
    results = []
    for hit in hits:
        meta = f"#{hit.rank} · score {hit.score:.4f}"
        if hit.item.image_id is not None:
            meta += f" · id {hit.item.image_id}"
        results.append(_figure(hit.item.path, f"{meta}<br>{html.escape(hit.item.path)}"))
    heading = html.escape(title or "mora-ret search")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{heading}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{heading}</h1><h2>Query</h2><div class='grid'>{''.join(query_parts)}</div>"
        f"<h2>Top {len(hits)}</h2><div class='grid'>{''.join(results)}</div></body></html>\n"
    )


def write_gallery(path: str | Path, hits: Sequence[Hit], **kwargs: object) -> None:
    """Write :func:`render_gallery`'s page to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(render_gallery(hits, **kwargs))  # type: ignore[arg-type]
