"""``mora-ret search``: query an index folder with an image, a text, or both (composed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import INDEX_OPTION, JSON_OPTION, QUERY_COMBINER_HELP, EncoderOptions, make_console, model_options, \
    with_options


@with_options(model_options(QUERY_COMBINER_HELP), "encoder", EncoderOptions)
def search_cmd(
    index: Path = INDEX_OPTION,
    image: Optional[Path] = typer.Option(None, "--image", help="Query image."),
    text: Optional[str] = typer.Option(None, "--text", help="Query text (with --image: a composed query)."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results (at least 1)."),
    as_json: bool = JSON_OPTION,
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML gallery page."),
    encoder: EncoderOptions = None,
) -> None:
    """Top-k images for a query; the model is reloaded from the index manifest unless model options are given."""
    import json
    from rich.table import Table

    from mora_retrieval.errors import MoraError
    from mora_retrieval.retrieval.index import load_index_folder
    from mora_retrieval.retrieval.search import query_mode, search, search_payload

    if image is None and text is None:
        raise MoraError("give a query: --image FILE, --text TEXT, or both")
    folder = load_index_folder(index)
    model = encoder.load(folder.manifest)
    hits = search(folder, model, image=image, text=text, k=k)
    if html_out is not None:
        from mora_retrieval.retrieval.gallery import write_gallery

        write_gallery(html_out, hits, image=image, text=text, title=f"{index.name}: top {k}")
    mode = query_mode(image is not None, text is not None)
    if as_json:
        payload = search_payload(str(index), model, hits, image=str(image) if image else None, text=text)
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table("rank", "score", "item", "image id", "categories", title=f"{mode} query, top {len(hits)}")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", h.item.path,
                      "" if h.item.image_id is None else str(h.item.image_id),
                      ",".join(map(str, h.item.categories)))
    make_console().print(table)
    if html_out is not None:
        make_console(stderr=True).print(f"gallery written to {html_out}")


COMMANDS = {"search": search_cmd}
