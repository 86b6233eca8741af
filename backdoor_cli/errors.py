"""Errors that carry their own exit code, so the CLI can map them without guessing.

Exit codes (the CLI contract): 0 ok, 1 a gate failed, 2 bad usage or bad input,
3 unsafe input refused, 130 interrupted.
"""

from __future__ import annotations


class BdcleanError(Exception):
    """A problem the user can fix. `message` names the problem, `hint` the remedy."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one or two lines, never a traceback
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(BdcleanError):
    """A bad input: missing or malformed file, key/shape mismatch, invalid data."""


class ConfigError(BdcleanError):
    """A bad option, YAML config or trigger spec."""


class UnsafeInputError(BdcleanError):
    """A file that would run code if loaded (e.g. a pickle needing arbitrary globals)."""

    exit_code = 3


class OutputError(BdcleanError):
    """Outputs cannot be written (exists without --force, would overwrite the input, unwritable)."""
