"""The foundation every other package may import; it imports only the standard library.

- ``errors``: ``PanguLightError``, the one exception a user sees as a one-line message.
- ``files``: atomic writes (``atomic_write``, ``atomic_directory``, ``write_json``).
- ``contract``: graph metadata keys and the graph's input/output names.
- ``cache``: the cache directory (``$PANGU_LIGHT_CACHE``, else ``~/.cache/pangu-light``).
- ``paths``: how a file records the path of another file (relative to itself, absolute as a
  fallback) so that outputs keep working from any working directory and after a move.
- ``records``: reading the pass records a compiled graph carries in its metadata.
"""
