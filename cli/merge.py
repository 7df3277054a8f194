"""``mora-ret merge``: fold an adapter folder into its backbone and write a plain open_clip checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import make_console


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        adapter: Path = typer.Option(..., "--adapter", help="Adapter folder (adapter_config.json + adapter.safetensors)."),
        out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (.safetensors, .pt or .bin)."),
        model: Optional[str] = typer.Option(None, "--model", help="open_clip architecture (default: from the adapter)."),
        pretrained: Optional[str] = typer.Option(
            None, "--pretrained", help="Base weights the adapter was trained on: open_clip tag or local file."
        ),
    ) -> None:
        """Merge adapters into the backbone: the output loads with open_clip.create_model(arch, pretrained=OUT)."""

        from mora_retrieval.adapters.merge import merge_adapter_folder

        summary = merge_adapter_folder(adapter, out, arch=model, pretrained=pretrained)
        make_console().print(
            f"merged [bold]{summary['method']}[/] adapter into {summary['arch']} "
            f"(fingerprint {summary['fingerprint']}) -> {summary['checkpoint']}"
        )
