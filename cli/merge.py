"""``mora-ret merge``: fold an adapter folder into its backbone and write a plain open_clip checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import make_console


def merge(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder (adapter_config.json + adapter.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help=(
        "A folder (self-describing: open_clip loads it as local-dir:OUT, toolkit architectures included), or a "
        "checkpoint file ending in .safetensors, .pt or .bin.")),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip architecture.  [default: the adapter's]"),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained", help="Base weights the adapter was trained on: open_clip tag or local file.  "
                                   "[default: the weights recorded in the adapter]"),
) -> None:
    """Merge adapters into the backbone: a plain open_clip checkpoint, with no adapter code at inference."""
    from mora_retrieval.adapters.merge import merge_adapter_folder

    summary = merge_adapter_folder(adapter, out, arch=model, pretrained=pretrained)
    console = make_console()
    console.print(f"merged [bold]{summary['method']}[/] adapter into {summary['arch']} "
                  f"(fingerprint {summary['fingerprint']}) -> {summary['checkpoint']}")
    if Path(summary["checkpoint"]).is_dir():
        console.print(f"load it with open_clip.create_model_and_transforms('local-dir:{summary['checkpoint']}'), "
                      f"or --checkpoint {summary['checkpoint']} (no --model needed)")


COMMANDS = {"merge": merge}
