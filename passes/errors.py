"""The one exception type that reaches a user as a one-line message instead of a traceback."""

from __future__ import annotations

__all__ = ["PanguLightError"]


class PanguLightError(Exception):
    """A problem with the user's input or request: the message names it and says what to do.

    Raised by passes/, frontend/, calib/ and tools/; the CLI prints it as
    ``error: <message>`` and exits with status 2. runtime/ has its own twin
    (``pangu_light.runtime.errors.RuntimeUserError``) so that it can ship alone.
    """
