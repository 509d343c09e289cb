"""User-facing errors: one clear line, no traceback (docs/api.md)."""

from __future__ import annotations


class PeregrineError(Exception):
    """An error whose message is meant for the user, shown as one line."""

    exit_code = 1


class UsageError(PeregrineError):
    """Bad command-line usage (exit 2)."""

    exit_code = 2
