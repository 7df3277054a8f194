"""Options shared by several commands, declared once so their defaults and help agree."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import typer

# mora_retrieval.adapters.list_methods(), written out so that --help imports no torch
# (tests/test_cli_app.py checks that the two agree).
METHOD_HELP = ("Adapter method: mora | no_gram | learned_gram | no_shared | no_specific | subtract_base | lora | dora "
               "| bitfit | full | dcp | mmp.")

DEVICE_HELP = "auto (cuda:LOCAL_RANK when CUDA is present, else cpu) | cpu | cuda | cuda:N."
PRECISION_HELP = "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."


WORKERS_HELP = "DataLoader worker processes."
#: Absent --workers means the engine's rule (mora_retrieval.device.default_num_workers).
WORKERS_DEFAULT = "auto: on CUDA the free cores (at most 8), on CPU 0"


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


# ---------------------------------------------------------------- settings options of the training commands


@dataclass(frozen=True)
class Setting:
    """An option that sets one key of a recipe's settings; ``None`` (not given) leaves the key to
    the lower layers (the recipe's defaults, then ``--config FILE``)."""

    name: str  # the command's parameter
    flag: str
    type: Any
    help: str
    key: str  # dotted settings path; "train." is the recipe's training section


MODEL_SETTINGS = (
    Setting("model", "--model", str, "open_clip architecture.", "arch"),
    Setting("pretrained", "--pretrained", str, "open_clip tag (downloaded by open_clip) or local checkpoint file; "
            "`none` for random weights.", "pretrained"),
)
ADAPTER_SETTINGS = (
    Setting("method", "--adapter", str, METHOD_HELP, "adapter.method"),
    Setting("rank", "--rank", int, "r of the adapter (and r_s, unless --rank-shared).", "adapter.r"),
    Setting("rank_shared", "--rank-shared", int, "r_s of MoRA's shared part.", "adapter.r_shared"),
    Setting("alpha", "--alpha", float, "Low-rank strength α.", "adapter.alpha"),
    Setting("targets", "--targets", str, "Projections, e.g. q,v or q,k,v,out.", "adapter.targets"),
    Setting("layers", "--layers", int, "Adapt the last N blocks of each tower.", "adapter.layers"),
)
#: The prompt baselines' own settings (classification only: they cannot be merged, CIR needs a merged encoder).
PROMPT_SETTINGS = (
    Setting("prompt_length", "--prompt-length", int, "dcp / mmp: prompt tokens per block.", "adapter.prompt_length"),
    Setting("prompt_depth", "--prompt-depth", int, "dcp / mmp: prompts in the first N blocks of each tower.",
            "adapter.prompt_depth"),
)
PROMPT_DEFAULTS = {"prompt_length": "dcp 36, mmp 16", "prompt_depth": "6"}
TRAINING_SETTINGS = (
    Setting("epochs", "--epochs", int, "Training epochs.", "train.epochs"),
    Setting("lr", "--lr", float, "Learning rate (peak, after the warm-up).", "train.lr"),
    Setting("batch_size", "--batch-size", int, "Batch per process.", "train.batch_size"),
    Setting("weight_decay", "--weight-decay", float, "AdamW weight decay.", "train.weight_decay"),
    Setting("grad_accum", "--grad-accum", int, "Micro-batches per optimiser step.", "train.grad_accum"),
    Setting("warmup_ratio", "--warmup-ratio", float, "Share of the steps in linear warm-up.", "train.warmup_ratio"),
    Setting("max_grad_norm", "--max-grad-norm", float, "Clip the gradient norm to this.", "train.max_grad_norm"),
    Setting("patience", "--patience", int, "Early stopping after N epochs without gain.", "train.patience"),
    Setting("max_steps", "--max-steps", int, "Stop after N optimiser steps.", "train.max_steps"),
    Setting("workers", "--workers", int, WORKERS_HELP, "train.num_workers"),
    Setting("device", "--device", str, DEVICE_HELP, "train.device"),
    Setting("precision", "--precision", str, PRECISION_HELP, "train.precision"),
    Setting("seed", "--seed", int, "Training seed (also draws random backbone weights).", "train.seed"),
)
#: Where the training images come from (recipes with a prepared-image cache: train cirr).
INPUT_SETTINGS = (
    Setting("prepared", "--prepared/--no-prepared", bool, "Decode and preprocess the images once into a "
            "memory-mapped uint8 cache (rebuilt when the images or the preprocessing change) and train from it; "
            "--no-prepared decodes the image files every epoch.", "prepared"),
    Setting("prepared_dir", "--prepared-dir", str, "Folder of the prepared-image cache.", "prepared_dir"),
)
INPUT_DEFAULTS = {"prepared": "--prepared", "prepared_dir": "DATA_ROOT/prepared, else ~/.cache/mora-retrieval/prepared/..."}

#: What the training options default to in every recipe (the recipes' own defaults are in their help).
TRAINING_DEFAULTS = {"grad_accum": "1", "warmup_ratio": "0.1", "max_grad_norm": "off", "patience": "off",
                     "max_steps": "off", "workers": WORKERS_DEFAULT, "device": "auto", "precision": "auto", "seed": "0"}

CONFIG_OPTION = typer.Option(None, "--config", help="JSON/TOML file of settings: any subset of the run's config.json "
                             "keys (command-line options win).")


def with_settings(options: Sequence[Setting], defaults: dict[str, str], section: str = "train") -> Callable:
    """Add ``options`` to a command, declared here once for every training command.

    Each is ``None`` unless given; ``defaults`` is what its help shows. The command receives the
    given ones as ``overrides``: a nested dict of settings (``train.`` keys under ``section``),
    ready for the recipe's ``build_settings``. ``--rank`` sets r_s too unless ``--rank-shared``
    is given; ``--targets`` is split at commas.
    """
    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "overrides"]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            overrides: dict[str, Any] = {}
            for option in options:
                value = kwargs.pop(option.name)
                if value is None:
                    continue
                if option.name == "targets":
                    value = comma_list(value)
                *parents, leaf = option.key.replace("train.", f"{section}.", 1).split(".")
                node = overrides
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = value
            adapter = overrides.get("adapter", {})
            if "r" in adapter:
                adapter.setdefault("r_shared", adapter["r"])
            return command(**kwargs, overrides=overrides)

        added = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[o.type],
                                   default=typer.Option(None, o.flag, help=_with_default(o.help, defaults.get(o.name))))
                 for o in options]
        run.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added)
        run.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "overrides"},
                               **{o.name: Optional[o.type] for o in options}}
        return run

    return decorate


def comma_list(value: str | None) -> list[str] | None:
    """``"a, b,"`` → ``["a", "b"]``; ``None`` stays ``None``."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _with_default(help: str, default: str | None) -> str:
    return help if default is None else f"{help}  [default: {default}]"
