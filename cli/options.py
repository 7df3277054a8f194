"""Options shared by several commands, declared once so their defaults and help agree."""

from __future__ import annotations

import typer

# mora_retrieval.adapters.list_methods(), written out so that --help imports no torch
# (tests/test_cli_app.py checks that the two agree).
METHOD_HELP = ("Adapter method: mora | no_gram | learned_gram | no_shared | no_specific | subtract_base | lora | dora "
               "| bitfit | full | dcp | mmp.")

DEVICE_HELP = "auto (cuda:LOCAL_RANK when CUDA is present, else cpu) | cpu | cuda | cuda:N."
PRECISION_HELP = "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."


WORKERS_HELP = "DataLoader worker processes.  [default: auto: on CUDA the free cores (at most 8), on CPU 0]"


def workers_option(**kw) -> typer.models.OptionInfo:
    """``--workers`` whose absence means the engine's rule (mora_retrieval.device.default_num_workers)."""
    return typer.Option(None, "--workers", help=WORKERS_HELP, **kw)


def device_option(**kw) -> typer.models.OptionInfo:
    """``--device`` with the toolkit's one rule (mora_retrieval.device) as default."""
    return typer.Option("auto", "--device", help=DEVICE_HELP, **kw)


#: Width of output that goes to a log file or pipe instead of a terminal: wide enough that
#: tables keep whole paths and numbers, while plain lines are never wrapped (soft wrap).
LOG_WIDTH = 240


def make_console(stderr: bool = False, quiet: bool = False):
    """A rich Console; when not writing to a terminal, no hard wrap at 80 columns."""
    from rich.console import Console

    console = Console(stderr=stderr, quiet=quiet)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, quiet=quiet, width=LOG_WIDTH, soft_wrap=True)


def command_group(help: str) -> typer.Typer:
    """A Typer (sub)app with the toolkit's settings: plain click help, so every default and flag
    renders as it is (rich help markup swallowed ``[default: …]`` and showed flags as ``<bool>``)."""
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                       pretty_exceptions_enable=False)
