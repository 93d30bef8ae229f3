"""The data error type (its own module so that metrics and containers can both raise it)."""

from __future__ import annotations

from ..config import ColoraError


class DataError(ColoraError, ValueError):
    """A problem with user-supplied data or data settings.

    The message is one line meant for the user: it names the file (and line) or key and what is
    wrong, so the CLI can print it without a traceback. It never quotes a data file's content:
    data.path may point at files that are not ours to print.
    """
