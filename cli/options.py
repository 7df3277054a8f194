"""Options shared by several commands, declared once so their defaults and help agree."""

from __future__ import annotations

import typer

DEVICE_HELP = "auto (cuda:LOCAL_RANK when CUDA is present, else cpu) | cpu | cuda | cuda:N."
PRECISION_HELP = "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."


def device_option(**kw) -> typer.models.OptionInfo:
    """``--device`` with the toolkit's one rule (mora_retrieval.device) as default."""
    return typer.Option("auto", "--device", help=DEVICE_HELP, **kw)
