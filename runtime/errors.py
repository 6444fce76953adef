"""runtime/'s user-facing error, kept here so that runtime/ imports nothing else of ours."""

from __future__ import annotations

__all__ = ["RuntimeUserError"]


class RuntimeUserError(Exception):
    """A deployment problem the user can fix (bad provider name, graph without KV cache, ...).

    The CLI prints it as ``error: <message>`` and exits with status 2.
    """
