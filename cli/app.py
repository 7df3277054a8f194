"""``mora-ret``: the Typer application.

Each command group lives in its own small module exposing ``register(app)``. Modules import
only typer/rich at import time (torch, open_clip and faiss are imported inside the commands),
so ``mora-ret --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

from .options import command_group

app = command_group("MoRA for open_clip: composed image retrieval and missing-modality recognition.")
app.info.name = "mora-ret"



@app.callback()
def _root() -> None:
    """MoRA for open_clip: composed image retrieval and missing-modality recognition."""


# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "demo", "data", "pretrain", "train", "merge", "index", "search", "serve", "eval", "eval_cirr", "classify", "analyze",
    "models",
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"mora_retrieval_cli.{_name}").register(app)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 1;
    warnings print as one ``warning: …`` line (no source location)."""
    import warnings

    from mora_retrieval.errors import MoraError

    warnings.formatwarning = _one_line_warning
    try:
        app()
    except MoraError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
