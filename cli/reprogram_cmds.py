"""CLI commands for reprogramming: ``surgery reprogram ar|bar|r2dl``."""
from __future__ import annotations

import typer

reprogram_app = typer.Typer(help="Reprogram a frozen source model for a new task (AR, BAR, R2DL).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``surgery reprogram`` and its subcommands to the ``surgery`` app."""
    from . import r2dl_cmd

    r2dl_cmd.register(reprogram_app)
    app.add_typer(reprogram_app, name="reprogram")
