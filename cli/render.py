"""Output helpers for the CLI: results on stdout, progress and errors on stderr."""
from __future__ import annotations

import functools
import json
import os
import sys

import typer
from rich.console import Console

# results (tables) on stdout; redirected to a file or pipe, rich would cut tables to 80 columns
# (numbers become "4.01…"): give them room unless the user set COLUMNS
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
err = Console(stderr=True)  # progress, warnings and errors on stderr


def print_json(data) -> None:
    """Write ``data`` as JSON to stdout (plain, so scripts can parse it)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def write_json(data, path) -> None:
    """Write ``data`` as JSON to ``path`` (temporary name, then rename)."""
    from robust_surgery.fileutil import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1):
    """Print ``message`` as an error on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from robust_surgery import ModelLoadError, NoLayerMatchedError

    errors: list[type[BaseException]] = [ModelLoadError, NoLayerMatchedError, ValueError, FileNotFoundError,
                                         PermissionError, TypeError, KeyError]
    return tuple(errors)


def guard(fn):
    """Turn the library's clear errors into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _user_errors() as e:
            text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            fail(str(text))

    return wrapper
