"""The foundation every other package may import: standard library only, nothing of ours.

- ``paths``: how a file records the path of another file (relative to itself, absolute as a
  fallback) so that outputs keep working from any working directory and after a move.
"""
