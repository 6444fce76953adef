"""The ``pangu-light`` command line (``cli``) and file I/O helpers; the one place that wires
the stages (frontend, calib, passes, runtime) together."""
