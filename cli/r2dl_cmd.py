"""CLI command ``surgery reprogram r2dl``."""
from __future__ import annotations

import typer


def register(reprogram_app: typer.Typer) -> None:
    """Add the ``r2dl`` subcommand to ``surgery reprogram``."""
