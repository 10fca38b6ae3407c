"""The errors vqcli raises on purpose. Anything else escaping is a bug."""

from __future__ import annotations

import os


class VqcliError(Exception):
    """A known failure with a message meant for people."""


class UsageError(VqcliError):
    """The options do not make sense (exit code 2 in the CLI)."""


class FileError(VqcliError):
    """One input file cannot be used. The message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(VqcliError):
    """A model configuration that cannot be built."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line for a person: its first line, cut at ``limit`` characters,
    or the exception's type name when it has no message."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
