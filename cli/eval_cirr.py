"""``mora-ret eval cirr``: CIRR metrics of a finished CIR run, or the test1 submission files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import device_option, make_console


def eval_cirr(
    run: Path = typer.Option(..., "--run", help="Run folder written by `mora-ret train cirr`."),
    split: str = typer.Option("val", "--split", help="val (metrics) | test1 (submission files)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="CIRR root (default: the run's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the test1 files (default: the run)."),
    no_combiner: bool = typer.Option(False, "--no-combiner", help="Score the summed features, not the Combiner."),
    device: str = device_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """CIRR Recall@1/5/10/50 and Recall_subset@1/2/3 of the merged model (reference removed)."""
    import json

    from mora_retrieval.tasks.cir import evaluate_cirr_run

    from .tables import metrics_table

    result = evaluate_cirr_run(run, None if data_root is None else str(data_root), split, out, device,
                               use_combiner=not no_combiner)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif "files" in result:
        make_console().print(f"{result['queries']} queries ranked; submission files:\n  " + "\n  ".join(result["files"]))
    else:
        label = "Combiner" if result["combiner"] else "summed features"
        make_console().print(metrics_table(f"CIRR {split} — {run}", {label: result}))


COMMANDS = {"eval cirr": eval_cirr}
