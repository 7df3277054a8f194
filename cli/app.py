"""``mora-ret``: the Typer application.

Every command is a plain function in a small module; each module lists its commands in
``COMMANDS`` (``{"name": function}``, or ``{"group name": function}`` for ``mora-ret GROUP
NAME``), and :func:`build_app` registers them all the same way. Modules import only typer/rich
at import time (torch, open_clip and faiss are imported inside the commands), so
``mora-ret --help`` stays fast.
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
#: The command groups and their help.
GROUPS = {
    "data": "Dataset utilities: generate the synthetic shapes world.",
    "train": "Train models (CIR on CIRR).",
    "index": "Embed a collection of images and build a FAISS index folder.",
    "eval": "Evaluate retrieval: COCO image-to-image recall, CIRR.",
}


def build_app(root: typer.Typer, modules: tuple[str, ...] = COMMAND_MODULES) -> typer.Typer:
    """Register every module's ``COMMANDS`` on ``root`` (groups created on first use)."""
    groups: dict[str, typer.Typer] = {}
    for module in modules:
        for path, command in importlib.import_module(f"mora_retrieval_cli.{module}").COMMANDS.items():
            *group, name = path.split()
            target = root
            if group:
                if group[0] not in groups:
                    groups[group[0]] = command_group(GROUPS[group[0]])
                    root.add_typer(groups[group[0]], name=group[0])
                target = groups[group[0]]
            target.command(name)(command)
    return root


build_app(app)


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
