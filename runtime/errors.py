"""runtime/'s user-facing error: the foundation's error type, named for deployment problems."""

from __future__ import annotations

from pangu_light.core.errors import PanguLightError

__all__ = ["RuntimeUserError"]


class RuntimeUserError(PanguLightError):
    """A deployment problem the user can fix (bad provider name, graph without KV cache, ...).

    The CLI prints it as ``error: <message>`` and exits with status 2.
    """
