"""Options shared by several commands, declared once so their defaults and help agree."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, get_type_hints

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


JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")
INDEX_OPTION = typer.Option(..., "--index", help="Index folder (indexes/<name>).")
RESUME_OPTION = typer.Option(False, "--resume", help="Continue an interrupted run in --run-dir exactly.")
SKIP_BAD_IMAGES_OPTION = typer.Option(False, "--skip-bad-images", help="Skip (and count) unreadable images.")


# ---------------------------------------------------------------- model options of the retrieval commands

MODEL_PANEL = "Model options"
QUERY_COMBINER_HELP = "Combiner file for composed queries."


def _model_option(help: str) -> Any:
    return field(default=None, metadata={"help": help})


@dataclass(frozen=True)
class EncoderOptions:
    """The model options of the retrieval commands, each field the option ``--<name>`` (``None``: not given)."""

    model: Optional[str] = _model_option("open_clip architecture, e.g. ViT-B-16 or mora-tiny.")
    pretrained: Optional[str] = _model_option("open_clip tag or checkpoint file.")
    adapter: Optional[Path] = _model_option("Adapter folder, merged onto --pretrained.")
    checkpoint: Optional[Path] = _model_option("Merged open_clip checkpoint: a file (with --model), or a folder "
                                               "from `mora-ret merge -o DIR`.")
    run: Optional[Path] = _model_option("Training run folder (config.json, merged/adapter, combiner).")
    combiner: Optional[Path] = None  # its help depends on the command: model_options(combiner_help)
    device: str = "auto"

    def load(self, manifest: Optional[dict] = None) -> Any:
        """The encoder the options name, else (when none is given) the index manifest's model."""
        from mora_retrieval.retrieval.encoder import load_encoder, load_encoder_from_source

        if manifest is not None and all(getattr(self, f.name) is None for f in fields(self) if f.name != "device"):
            return load_encoder_from_source(manifest["source"], device=self.device)
        return load_encoder(self.model, self.pretrained, adapter=self.adapter, checkpoint=self.checkpoint,
                            run=self.run, combiner=self.combiner, device=self.device)


def model_options(combiner_help: Optional[str] = None) -> list[inspect.Parameter]:
    """The options of :class:`EncoderOptions` (--combiner when it has a help text): a command with them
    (``with_options(model_options(), "encoder", EncoderOptions)``) receives ``encoder``, an
    :class:`EncoderOptions`."""
    types = get_type_hints(EncoderOptions)
    helps = {f.name: f.metadata["help"] for f in fields(EncoderOptions) if "help" in f.metadata}
    if combiner_help is not None:
        helps["combiner"] = combiner_help
    return [option(name, types[name], typer.Option(None, f"--{name}", help=help, rich_help_panel=MODEL_PANEL))
            for name, help in helps.items()] + [option("device", str, device_option(rich_help_panel=MODEL_PANEL))]


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
INPUT_DEFAULTS = {"prepared": "--prepared",
                  "prepared_dir": "DATA_ROOT/prepared, else ~/.cache/mora-retrieval/prepared/..."}

#: What the training options default to in every recipe (the recipes' own defaults are in their help).
TRAINING_DEFAULTS = {"grad_accum": "1", "warmup_ratio": "0.1", "max_grad_norm": "off", "patience": "off",
                     "max_steps": "off", "workers": WORKERS_DEFAULT, "device": "auto", "precision": "auto", "seed": "0"}

CONFIG_OPTION = typer.Option(None, "--config", help="JSON/TOML file of settings: any subset of the run's config.json "
                             "keys (command-line options win).")


def option(name: str, annotation: Any, info: typer.models.OptionInfo) -> inspect.Parameter:
    """A keyword parameter ``name`` declared as the typer option ``info`` (for :func:`with_options`)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=info)


def with_options(options: Sequence[inspect.Parameter], into: str, pack: Callable[..., Any] = dict) -> Callable:
    """Append ``options`` to a command's parameters, declared once for every command that takes them.

    The command receives their values as one argument ``into``: ``pack(**values)`` (a dict by default).
    """
    names = [parameter.name for parameter in options]

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != into]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, **{into: pack(**values)})

        run.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
                                              + list(options))
        run.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != into},
                               **{p.name: p.annotation for p in options}}
        return run

    return decorate


def with_settings(options: Sequence[Setting], defaults: dict[str, str], section: str = "train") -> Callable:
    """Add ``options`` to a command, declared here once for every training command.

    Each is ``None`` unless given; ``defaults`` is what its help shows. The command receives the
    given ones as ``overrides``: a nested dict of settings (``train.`` keys under ``section``),
    ready for the recipe's ``build_settings``. ``--rank`` sets r_s too unless ``--rank-shared``
    is given; ``--targets`` is split at commas.
    """
    def overrides(**values: Any) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for setting in options:
            value = values[setting.name]
            if value is None:
                continue
            if setting.name == "targets":
                value = comma_list(value)
            *parents, leaf = setting.key.replace("train.", f"{section}.", 1).split(".")
            node = nested
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
        adapter = nested.get("adapter", {})
        if "r" in adapter:
            adapter.setdefault("r_shared", adapter["r"])
        return nested

    parameters = [option(o.name, Optional[o.type],
                         typer.Option(None, o.flag, help=_with_default(o.help, defaults.get(o.name))))
                  for o in options]
    return with_options(parameters, "overrides", overrides)


def comma_list(value: str | None) -> list[str] | None:
    """``"a, b,"`` → ``["a", "b"]``; ``None`` stays ``None``."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _with_default(help: str, default: str | None) -> str:
    return help if default is None else f"{help}  [default: {default}]"
