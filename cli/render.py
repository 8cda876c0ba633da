"""Output helpers for the CLI: results on stdout, progress and errors on stderr."""
from __future__ import annotations

import functools
import warnings
import os
import sys

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape

# results (tables) on stdout; redirected to a file or pipe, rich would cut tables to 80 columns
# (numbers become "4.01…"): give them room unless the user set COLUMNS
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
err = Console(stderr=True)  # progress, warnings and errors on stderr




def print_json(data) -> None:
    """Write ``data`` as strict JSON to stdout (no NaN/Infinity tokens; plain, so scripts can parse it)."""
    from robust_surgery._json import strict_dumps

    sys.stdout.write(strict_dumps(data, indent=2) + "\n")


def write_json(data, path) -> None:
    """Write ``data`` as strict JSON to ``path`` (temporary name, then rename)."""
    from robust_surgery._json import strict_dumps
    from robust_surgery._files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(strict_dumps(data, indent=2) + "\n")


def check_out(path, suffix: str | None = None, what: str = "output"):
    """Check an output path before any work starts (folder exists and is writable, nothing odd in the way)."""
    if path is None or str(path) == "-":
        return path
    from robust_surgery._files import check_output_path

    return check_output_path(path, suffix=suffix, what=what)


def fail(message: str, code: int = 1):
    """Print ``message`` as one error line on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/bold red] {escape(' '.join(str(message).split()))}", highlight=False, markup=True,
              soft_wrap=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI prints as one line: the library's :class:`~robust_surgery.errors.UserError`,
    and the OS errors of opening a path the user named (missing, a folder, no permission)."""
    from robust_surgery.errors import UserError

    return (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one yellow ``warning:`` line on stderr (no file name, no source line)."""
    err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


# The parameters of the commands that name files: what they are called in an error line. Every command
# goes through `guard`, which refuses an output that is the same file as an input or another output.
_INPUT_PARAMS = {"model": "the model (MODEL)", "source": "the source model (SOURCE)", "data": "the data (--data)",
                 "compare": "the compared model (--compare)", "downstream": "the downstream data (--downstream)",
                 "models": "the model", "target": "the target data (--target)"}
_OUTPUT_PARAMS = {"out": "the output (-o)", "json_out": "the report (--json)", "plot": "the plot (--plot)",
                  "filters": "the filter image (--filters)", "log": "the log (--log)", "state": "the state file (--state)"}


def _file_params(kwargs: dict) -> tuple[list, list]:
    """(inputs, outputs) of a command's arguments, as (what, path) pairs."""
    inputs, outputs = [], []
    for name, what in _INPUT_PARAMS.items():
        value = kwargs.get(name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None:
                continue
            text = str(v)
            if "=" in text and not os.path.exists(text):  # inherit's name=spec pairs
                text = text.split("=", 1)[1]
            inputs.append((what, text))
    for name, what in _OUTPUT_PARAMS.items():
        value = kwargs.get(name)
        if value is not None and str(value) != "-":
            outputs.append((what, str(value)))
    return inputs, outputs


def guard(fn):
    """Print a user error as one red ``error:`` line on stderr, exit code 1 (no traceback).

    The library's errors (``UserError``) say what is wrong and how to fix it. Any other
    exception is a bug and propagates with its traceback. ``ROBUST_SURGERY_DEBUG=1`` shows the
    traceback of user errors too. Ctrl-C exits 130 with a line saying so.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from robust_surgery._files import check_distinct_paths

            check_distinct_paths(*_file_params(kwargs))
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C); no output file was left half-written (a --state or --checkpoint-dir "
                 "run resumes where it stopped)", code=130)
        except _user_errors() as e:
            if os.environ.get("ROBUST_SURGERY_DEBUG"):
                raise
            fail(str(e))
        except EOFError as e:
            if os.environ.get("ROBUST_SURGERY_DEBUG"):
                raise
            fail(f"a file ended early ({e or 'end of file'}): it is empty or truncated")

    return wrapper


def _click_exceptions():
    """The click exception classes Typer raises (recent Typer bundles its own copy of click)."""
    import typer.core

    return typer.core._click.exceptions


class SurgeryGroup(TyperGroup):
    """The top-level group: usage errors (unknown option, bad value, missing argument) become one
    ``error:`` line with exit code 2, like every other error, instead of a framed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        exc = _click_exceptions()
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except exc.UsageError as e:
            if not e.format_message().strip() or type(e).__name__ == "NoArgsIsHelpError":  # help was printed
                if standalone_mode:
                    sys.exit(e.exit_code)
                raise typer.Exit(e.exit_code) from None
            where = f"surgery {e.ctx.command_path.split(' ', 1)[1]} --help" if e.ctx and " " in e.ctx.command_path \
                else "surgery --help"
            self._exit(f"{e.format_message()} (see '{where}')", 2, standalone_mode)
        except exc.ClickException as e:
            self._exit(e.format_message(), e.exit_code, standalone_mode)
        except typer.Abort:
            self._exit("aborted", 1, standalone_mode)
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return rv

    @staticmethod
    def _exit(message: str, code: int, standalone_mode: bool):
        try:
            fail(message, code)
        except typer.Exit:
            if standalone_mode:
                sys.exit(code)
            raise
