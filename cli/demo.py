"""``mora-ret demo``: the whole pipeline on the generated shapes world (no data, no downloads)."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import WORKERS_HELP, make_console


def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the world, runs, indexes and report."),
    size: str = typer.Option("small", "--size", help="World size: tiny (a smoke run) | small | medium."),
    model: str = typer.Option("mora-tiny", "--model", help="Architecture to pretrain (mora-tiny, mora-small)."),
    workers: int = typer.Option(1, "--workers", help=WORKERS_HELP),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate data, pretrain, train CLIP4CIR (full, LoRA, MoRA), index, evaluate, classify, search, report."""

    from mora_retrieval.demo import DemoSettings, run_demo

    from .tables import metrics_table

    settings = DemoSettings.smoke(str(out)) if size == "tiny" else DemoSettings(out=str(out), world=size)
    settings.arch, settings.seed = model, seed
    if size != "tiny":
        settings.workers = workers
    console = make_console()
    summary = run_demo(settings, console=console, quiet=False)
    data = summary["json"]
    console.print(metrics_table("CIRR-format val", {**data["cirr_val"], "chance": data["cirr_chance"]}))
    console.print(metrics_table("COCO-format image-to-image (exact relevance)",
                                {**data["coco_i2i"], "chance": data["coco_chance"]}))
    c = data["classification"]
    console.print(f"classification ({c['dataset']}, {c['scenario']['test']}): {c['metric']} "
                  f"{c['test']:.2f} (majority baseline {c['majority_baseline']:.2f})")
    console.print(data["verdict"])
    console.print(summary["chance_note"])
    console.print(f"finished in {data['total_s']:.0f} s; report: [bold]{summary['report']}[/]")
    console.print(f"browse the CLIP4CIR + MoRA index of the COCO-format images: [bold]{summary['serve_command']}[/]")


COMMANDS = {"demo": demo}
