"""The errors robust-surgery raises on bad input: each message names the problem and the fix.

Every one derives from :class:`UserError`: the input (a file, a setting, a data set, a path)
is wrong, not the code. The CLI prints a ``UserError`` as one ``error:`` line and exits 1; any
other exception is a bug and shows its traceback. Each class also derives from the built-in
that fits (:class:`ValueError`, :class:`TypeError`, :class:`FileNotFoundError`), so code written
against the built-ins keeps working.
"""
from __future__ import annotations

__all__ = [
    "UserError",
    "InvalidInputError",
    "InvalidTypeError",
    "MissingFileError",
    "MissingDependencyError",
    "ModelLoadError",
    "UntrustedCodeError",
    "OutputPathError",
    "OutputFolderMissingError",
    "StateMismatchError",
    "NonFiniteError",
]


class UserError(Exception):
    """Base of every error caused by the user's input; its message says what to change."""


class InvalidInputError(UserError, ValueError):
    """A value given (a setting, a spec, the contents of a file) is not valid here."""


class InvalidTypeError(UserError, TypeError):
    """An argument of the wrong kind was given (a path where a model was expected, ...)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks a part it must hold)."""


class MissingDependencyError(UserError, ImportError):
    """A package this feature needs is not installed; the message gives the install command."""


class ModelLoadError(InvalidInputError):
    """A model could not be loaded; the message says what was wrong and how to fix it."""


class UntrustedCodeError(ModelLoadError):
    """A file asks to import and call code outside robust-surgery's registries, without consent.

    Pass ``trust_code=True`` (CLI: ``--trust-code``) only for files from a source you trust.
    """


class OutputPathError(InvalidInputError):
    """An output path cannot be written (missing folder, a folder or device in the way, disk full...)."""


class OutputFolderMissingError(OutputPathError, FileNotFoundError):
    """The folder an output should go to does not exist (also a :class:`FileNotFoundError`)."""


class StateMismatchError(InvalidInputError):
    """A resume file (evaluation state, fine-tuning checkpoint) belongs to a run with other settings."""


class NonFiniteError(InvalidInputError):
    """A number that must be finite (a budget, a pixel, a model output) is NaN or infinite."""
