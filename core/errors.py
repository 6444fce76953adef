"""The one exception type that reaches a user as a one-line message instead of a traceback."""

from __future__ import annotations

__all__ = ["PanguLightError"]


class PanguLightError(Exception):
    """A problem with the user's input or request: the message names it and says what to do.

    Raised everywhere in the project (runtime/ raises its subclass ``RuntimeUserError``); the
    CLI prints it as ``error: <message>`` and exits with status 2.
    """
