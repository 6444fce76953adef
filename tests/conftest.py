"""Session-wide fixtures: tiny models of every family and their exported graphs, built once.

``exported_graph(family, kv_cache)`` returns ``(hf_model, path_to_onnx)``; exporting takes
seconds per graph, so each (family, kind) is exported at most once per test session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from families import FAMILIES, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def exported_graph(tmp_path_factory):
    import onnx_ir as ir

    from pangu_light.frontend.export import ExportOptions, export_model

    cache: dict[tuple[str, bool], tuple[object, Path]] = {}
    root = tmp_path_factory.mktemp("exported")

    def get(family: str, kv_cache: bool = False):
        key = (family, kv_cache)
        if key not in cache:
            model = tiny_model(family)
            path = root / f"{family}{'-kv' if kv_cache else ''}.onnx"
            ir.save(export_model(model, ExportOptions(kv_cache=kv_cache)), path)
            cache[key] = (model, path)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model as a local HF directory (converted once into the cache)."""
    from pangu_light.frontend.loading import resolve_model

    return resolve_model("smollm2-135m")


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "family" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("family", FAMILIES)
