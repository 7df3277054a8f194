"""``mora-ret eval coco``: image-to-image Recall@K on an indexed COCO gallery (``eval cirr`` is in eval_cirr.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import JSON_OPTION, EncoderOptions, make_console, model_options, with_options


@with_options(model_options("Combiner file for mode cir."), "encoder", EncoderOptions)
def eval_coco(
    index: Path = typer.Option(..., "--index", help="Index folder built with `mora-ret index coco`."),
    relevance: str = typer.Option("exact", "--relevance", help="exact | primary | any | jaccard:T"),
    mode: str = typer.Option("image", "--mode", help="image | cir | both (cir re-encodes every image)."),
    as_json: bool = JSON_OPTION,
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch (mode cir)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers (mode cir)."),
    encoder: EncoderOptions = None,
) -> None:
    """Image-to-image Recall@1/5/10 on the indexed COCO gallery (docs/protocols.md §5)."""
    import json
    from rich.table import Table

    from mora_retrieval.errors import MoraError
    from mora_retrieval.progress import ProgressBar
    from mora_retrieval.retrieval.embed import EmbedConfig
    from mora_retrieval.retrieval.evaluate import RelevanceRule, evaluate_coco
    from mora_retrieval.retrieval.index import load_index_folder

    if mode not in ("image", "cir", "both"):
        raise MoraError(f"--mode '{mode}': expected image, cir or both")
    rule = RelevanceRule.parse(relevance)
    folder = load_index_folder(index)
    modes = ["image", "cir"] if mode == "both" else [mode]
    if "cir" not in modes:
        result = evaluate_coco(folder, rule, relevance, modes)
    else:
        model = encoder.load(folder.manifest)
        embed = EmbedConfig(batch_size=batch_size)
        if workers is not None:
            embed.workers = workers
        with ProgressBar(make_console(stderr=True), "re-encoding for cir queries", "img/s") as reporter:
            result = evaluate_coco(folder, rule, relevance, modes, encoder=model, embed=embed, reporter=reporter)
    if as_json:
        typer.echo(json.dumps({"index": str(index), **result.to_json()}, indent=2))
        return
    table = Table("mode", "R@1", "R@5", "R@10", "queries", "left out (no relevant)",
                  title=f"COCO image-to-image, relevance {relevance}")
    for name, r in result.results.items():
        rec = r.recall
        table.add_row(name, *(f"{rec[k]:.2f}" for k in (1, 5, 10)), str(r.evaluated), str(r.no_relevant))
    make_console().print(table)


COMMANDS = {"eval coco": eval_coco}
