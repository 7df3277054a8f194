"""Shared by the CLI tests: an app holding some of the toolkit's commands, and a call that must succeed."""

from __future__ import annotations

import typer
from typer.testing import CliRunner


def cli_app(*commands: str) -> typer.Typer:
    """A Typer app with just ``commands`` registered, as the real app registers them."""
    from mora_retrieval_cli.app import build_app

    application = typer.Typer()
    application.callback()(lambda: None)
    return build_app(application, commands)


def invoke_ok(app: typer.Typer, *args):
    """Run ``app`` with ``args``; re-raise what it raised, and require exit status 0."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result
