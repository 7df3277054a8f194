"""The ``mora-ret`` app: every command is listed, help imports nothing heavy, errors are one line."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from mora_retrieval_cli.app import app

COMMANDS = ("demo", "data", "pretrain", "train", "merge", "index", "search", "serve", "eval", "classify", "predict",
            "analyze", "models")


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.output, name
    for group, subcommands in {"train": ["cirr"], "eval": ["coco", "cirr"], "index": ["coco", "images", "merge", "rebuild"],
                               "data": ["shapes"]}.items():
        out = CliRunner().invoke(app, [group, "--help"]).output
        for sub in subcommands:
            assert f" {sub} " in out, (group, sub)


def test_help_does_not_import_torch_open_clip_or_faiss():
    code = ("import sys; from mora_retrieval_cli.app import app; "
            "print(sorted(m for m in ('torch', 'open_clip', 'faiss', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_models_with_no_match_says_so():
    result = CliRunner().invoke(app, ["models", "nonexistent*"])
    assert result.exit_code == 1 and "no architecture matches 'nonexistent*'" in str(result.exception)
    listed = CliRunner().invoke(app, ["models", "mora-t*"], terminal_width=200)
    assert listed.exit_code == 0 and "mora-tiny" in listed.output


def test_user_errors_are_one_line_with_status_1(tmp_path):
    code = "from mora_retrieval_cli.app import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "merge", "--adapter", str(tmp_path / "nope"), "-o",
                           str(tmp_path / "m.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "adapter folder not found" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_adapter_help_names_the_registered_methods():
    from mora_retrieval.adapters import list_methods
    from mora_retrieval_cli.options import METHOD_HELP

    assert tuple(name.strip(" .") for name in METHOD_HELP.split(":", 1)[1].split("|")) == list_methods()
