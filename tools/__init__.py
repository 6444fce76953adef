"""The ``pangu-light`` command line: ``cli`` (the command table and ``main``), one ``*_cmd``
module per command (its options and one ``run``), and ``arguments``, the options several
commands share. The stages themselves are library functions elsewhere (export in frontend,
calibrate and evaluate in calib, compile in passes, generation in runtime, tables and charts in
reports); a command parses, calls them and prints.

Imports: every package of ours; a command module never imports another command module.
"""
