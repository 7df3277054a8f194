"""cli/options.py: options declared once reach each command as one packed argument."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from mora_retrieval_cli.options import (ADAPTER_SETTINGS, TRAINING_SETTINGS, EncoderOptions, model_options,
                                        with_options, with_settings)


def _invoke(command, *args: str) -> list:
    """Run ``command`` as a one-command Typer app; return what it received."""
    received = []
    app = typer.Typer(add_completion=False)
    app.command()(command(received))
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return received


def test_with_settings_nests_the_given_options_under_the_section():
    def command(received):
        @with_settings(ADAPTER_SETTINGS + TRAINING_SETTINGS, {}, section="stage1")
        def train(name: str = typer.Option("x", "--name"), overrides: dict = None) -> None:
            received.append((name, overrides))
        return train

    [(name, overrides)] = _invoke(command, "--name", "y", "--rank", "8", "--targets", "q, v,", "--lr", "0.5",
                                  "--device", "cpu")
    assert name == "y"
    assert overrides == {"adapter": {"r": 8, "r_shared": 8, "targets": ["q", "v"]},
                         "stage1": {"lr": 0.5, "device": "cpu"}}
    [(_, overrides)] = _invoke(command, "--rank", "8", "--rank-shared", "2")
    assert overrides == {"adapter": {"r": 8, "r_shared": 2}}
    assert _invoke(command) == [("x", {})]


def test_model_options_arrive_as_encoder_options_beside_the_commands_own():
    def command(received):
        @with_options(model_options("Combiner file."), "encoder", EncoderOptions)
        def search(k: int = typer.Option(3, "-k"), encoder: EncoderOptions = None) -> None:
            received.append((k, encoder))
        return search

    [(k, encoder)] = _invoke(command, "-k", "5", "--model", "mora-tiny", "--run", "runs/a", "--combiner", "c.pt")
    assert k == 5
    assert encoder == EncoderOptions(model="mora-tiny", run=Path("runs/a"), combiner=Path("c.pt"), device="auto")
    [(_, encoder)] = _invoke(command, "--device", "cpu")
    assert encoder == EncoderOptions(device="cpu")


def test_encoder_options_load_the_manifests_model_unless_a_model_option_is_given(monkeypatch):
    import mora_retrieval.retrieval.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "load_encoder_from_source", lambda source, device: ("manifest", source, device))
    monkeypatch.setattr(encoder_module, "load_encoder", lambda model, pretrained, **kw: ("options", model, kw["run"]))
    manifest = {"source": {"arch": "mora-tiny"}}
    assert EncoderOptions(device="cpu").load(manifest) == ("manifest", {"arch": "mora-tiny"}, "cpu")
    assert EncoderOptions(run=Path("r")).load(manifest) == ("options", None, Path("r"))
    assert EncoderOptions(combiner=Path("c")).load(manifest)[0] == "options"
    assert EncoderOptions(model="mora-tiny").load() == ("options", "mora-tiny", None)
