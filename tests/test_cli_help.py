"""`--help` of every command: each default is visible and flags render as flags."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from mora_retrieval_cli.app import app


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):  # a group (typer ships its own copy of click's classes)
            yield from _commands(command, path)
        else:
            yield path, command


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_command_is_listed():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train cirr", "classify", "index coco", "search", "eval coco", "eval cirr", "merge", "demo"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_every_default_and_plain_flags(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # undo click's wrapping
    assert "<bool>" not in text
    for param in command.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        record = " ".join(param.get_help_record(command.context_class(command))[1].split())
        assert record in text, (param.name, record)
        if param.is_flag:
            assert f"{param.opts[0]} <" not in text, param.opts[0]  # a flag takes no value
        elif param.default is not None and not param.required:
            assert "[default: " in record, f"{' '.join(path)} {param.opts[0]}: no default shown"


@pytest.mark.parametrize("command", [("train", "cirr"), ("classify",)])
def test_training_commands_say_they_default_to_downloaded_vit_b_16(command):
    text = " ".join(CliRunner().invoke(app, [*command, "--help"], terminal_width=200).output.split())
    assert "[default: ViT-B-16]" in text and "[default: openai]" in text
