"""``mora-ret analyze``: the embedding analysis of a finished run (paper §4.4–4.5, appendix E)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import WORKERS_HELP, device_option, make_console


def analyze(
    run: Path = typer.Option(..., "--run", help="A finished `mora-ret classify` or `mora-ret train cirr` run folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to embed (default: test; CIR runs: CIRR val)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/analysis)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples",
                                              help="Use at most N samples, evenly spread over the split (>= 5)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default: the run's)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Encoding batch size."),
    workers: int = typer.Option(0, "--workers", help=WORKERS_HELP),
    seed: int = typer.Option(0, "--seed", help="t-SNE seed."),
    device: str = device_option(),
    as_json: bool = typer.Option(False, "--json", help="Print analysis.json instead of the tables."),
) -> None:
    """Inter-modal distance (Table 2), drift (Table 3), modality gap, Gram spectra (Figure 4), t-SNE (Figure 10).

    Compares the run's adapted (merged) model with its original backbone on complete samples of
    the split; writes analysis.json, analysis.html, spectra.png and tsne.png into --out.
    """
    import json

    from rich.table import Table

    from mora_retrieval.analysis import AnalyzeConfig, analyze_run
    from mora_retrieval.analysis.section import DRIFT_HEADER, drift_rows, intermodal_table

    console = make_console(stderr=as_json)
    config = AnalyzeConfig(split=split, max_samples=max_samples, batch_size=batch_size, num_workers=workers,
                           device=device, data_root=None if data_root is None else str(data_root), tsne_seed=seed)
    result = analyze_run(run, out, config, console=console)
    data = result.data
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    first = "Inter-modal distance" if data["inter_modal"] is not None else "Modality gap"
    for title, (header, rows) in (
        (f"{first} ({data['dataset']} {data['split']}, {data['samples']['pairs']} samples)", intermodal_table(data)),
        ("Modality-specific drift from the original embeddings", (DRIFT_HEADER, drift_rows(data))),
    ):
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)
    for note in data["notes"]:
        console.print(f"[yellow]{note}[/]")
    console.print("written: " + ", ".join(str(path) for path in result.files.values()))


COMMANDS = {"analyze": analyze}
