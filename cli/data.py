"""``mora-ret data``: dataset utilities (``data shapes`` writes the generated shapes world)."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import make_console


def shapes(
    out: Path = typer.Option(..., "--out", help="Folder to write the world into (one subfolder per dataset)."),
    size: str = typer.Option("small", "--size", help="tiny (tests) | small | medium (the demo)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same bytes."),
    image_size: int = typer.Option(64, "--image-size", help="Image side in pixels (MM-IMDb posters are 1.5x taller)."),
) -> None:
    """Write CIRR, COCO, Food-101, MM-IMDb and Hateful-Memes-format datasets of drawn shapes."""
    from rich.table import Table

    from mora_retrieval.data.images import require_choice
    from mora_retrieval.data.shapes import WORLD_SIZES, generate_shapes_world, read_world_manifest
    from mora_retrieval.progress import ProgressBar

    require_choice(size, WORLD_SIZES, "--size")  # before the progress bar starts
    console = make_console()
    with ProgressBar(console, "shapes world", "img/s") as bar:
        bar.start(WORLD_SIZES[size].total_images())
        roots = generate_shapes_world(out, size=size, seed=seed, image_size=image_size,
                                      progress=lambda part, n: bar.advance(n, description=f"{part:<13}"))
    manifest = read_world_manifest(out)
    table = Table("dataset", "split", "counts", "root", title=f"shapes world ({size}, seed {seed})")
    for part, root in roots.items():
        for split, counts in manifest["parts"][part]["splits"].items():
            table.add_row(part, split, ", ".join(f"{v} {k}" for k, v in counts.items()), str(root))
    console.print(table)


COMMANDS = {"data shapes": shapes}
