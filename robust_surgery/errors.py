"""The errors robust-surgery raises on bad input: each message names the problem and the fix.

Every class derives from :class:`ValueError` (or :class:`TypeError`), so code written against
the plain built-ins keeps working; the CLI prints any of them as one ``error:`` line.
"""
from __future__ import annotations

__all__ = [
    "ModelLoadError",
    "UntrustedCodeError",
    "OutputPathError",
    "OutputFolderMissingError",
    "StateMismatchError",
    "NonFiniteError",
]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what was wrong and how to fix it."""


class UntrustedCodeError(ModelLoadError):
    """A file asks to import and call code outside robust-surgery's registries, without consent.

    Pass ``trust_code=True`` (CLI: ``--trust-code``) only for files from a source you trust.
    """


class OutputPathError(ValueError):
    """An output path cannot be written (missing folder, a folder or device in the way, disk full...)."""


class OutputFolderMissingError(OutputPathError, FileNotFoundError):
    """The folder an output should go to does not exist (also a :class:`FileNotFoundError`)."""


class StateMismatchError(ValueError):
    """A resume file (evaluation state, fine-tuning checkpoint) belongs to a run with other settings."""


class NonFiniteError(ValueError):
    """A number that must be finite (a budget, a pixel, a model output) is NaN or infinite."""
