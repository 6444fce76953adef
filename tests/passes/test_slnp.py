"""slnp: exactly the gammas that lost channels are rescaled, exactly by eq. 6 on the effective
gamma (1 + w for Gemma), once; the graph then equals the same rescaling done in PyTorch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import format_value

from reference import (
    compile_graph,
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    ort_logits,
    torch_logits,
    torch_slice_hidden,
)
from reference_width import torch_slnp

TOLERANCE = 1e-5
KEEP = sorted(np.random.default_rng(1).choice(64, size=40, replace=False).tolist())
SLICE = f"slice-hidden{{keep={format_value(KEEP)}}}"


def _eq6(gamma: np.ndarray, keep) -> np.ndarray:
    pruned = gamma[keep]
    return pruned * np.linalg.norm(gamma) / np.linalg.norm(pruned)


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}


def test_rescales_exactly_the_sliced_gammas(exported_graph, family):
    _, path = exported_graph(family)
    original = {n.gamma.name: n.effective_gamma() for n in ModelMap.from_model(ir.load(path)).all_norms()}
    model = ir.load(path)
    run_pipeline(model, SLICE)
    before = _initializers(model)
    report = run_pipeline(model, "slnp", verify=True)
    model_map = ModelMap.from_model(model)
    hidden = model_map.hidden_norms()
    expected = 17 if family.startswith(("gemma", "glm")) else 9
    assert report.records[0].stats["gammas_rescaled"] == len(hidden) == expected
    for norm in hidden:
        got = norm.effective_gamma()
        np.testing.assert_allclose(got, _eq6(original[norm.gamma.name], KEEP), rtol=1e-6, atol=1e-7)
        assert np.abs(got - original[norm.gamma.name][KEEP]).max() > 1e-2  # it did rescale
        assert norm.gamma.metadata_props["pangu_light.pass"] == "slice-hidden,slnp"
    after = _initializers(model)
    rescaled = {norm.gamma.name for norm in hidden}
    assert after.keys() == before.keys()
    for name in before.keys() - rescaled:  # q/k norms, weights, embedding: untouched
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("family", ["llama", "gemma3", "glm4"])
def test_no_cache_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    compile_graph(path, f"{SLICE},slnp", tmp_path / "p.onnx")
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    reference = torch_slnp(torch_slice_hidden(hf_model, KEEP), hf_model)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, torch_logits(reference, ids, mask), mask) <= TOLERANCE
    unscaled = torch_logits(torch_slice_hidden(hf_model, KEEP), ids, mask)
    assert max_diff_on_tokens(got, unscaled, mask) > 1e-3


def test_decode_matches_torch(exported_graph, tmp_path):
    hf_model, path = exported_graph("gemma2", kv_cache=True)
    compile_graph(path, f"{SLICE},slnp", tmp_path / "p.onnx")
    reference = torch_slnp(torch_slice_hidden(hf_model, KEEP), hf_model)
    assert decode_diff(tmp_path / "p.onnx", reference, steps=3) <= TOLERANCE


@pytest.mark.parametrize(
    "before", ["", "slice-hidden{keep_first=64},", "prune-heads{per_group=1},prune-ffn{keep_first=50},"]
)
def test_nothing_sliced_changes_nothing(exported_graph, before):
    _, path = exported_graph("gemma3")
    model = ir.load(path)
    if before:
        run_pipeline(model, before.rstrip(","))
    expected = graph_bytes(model)
    report = run_pipeline(model, "slnp")
    assert not report.records[0].modified
    assert graph_bytes(model) == expected


def test_twice_rescales_once_and_a_second_slice_rescales_to_the_original_norm(exported_graph):
    _, path = exported_graph("gemma3")  # 1 + w norms
    original = {n.gamma.name: n.effective_gamma() for n in ModelMap.from_model(ir.load(path)).hidden_norms()}
    model = ir.load(path)
    run_pipeline(model, "slice-hidden{keep_first=48},slnp")
    once = _initializers(model)
    report = run_pipeline(model, "slnp")
    assert not report.records[0].modified and _initializers(model).keys() == once.keys()
    assert all(np.array_equal(once[k], v) for k, v in _initializers(model).items())
    run_pipeline(model, "slice-hidden{keep_first=40},slnp")
    for norm in ModelMap.from_model(model).hidden_norms():
        np.testing.assert_allclose(
            norm.effective_gamma(), _eq6(original[norm.gamma.name], list(range(40))), rtol=1e-6, atol=1e-7
        )


def test_works_from_a_saved_graph_and_keeps_a_tied_lm_head_one_tensor(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    compile_graph(path, SLICE, tmp_path / "sliced.onnx")
    separate, _ = compile_graph(tmp_path / "sliced.onnx", "slnp", tmp_path / "p.onnx")
    together = ir.load(path)
    run_pipeline(together, f"{SLICE},slnp")
    got, expected = _initializers(separate), _initializers(together)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    model_map = ModelMap.from_model(separate)
    assert model_map.tied_embeddings and model_map.lm_head.weight is model_map.embedding
    assert model_map.embedding.shape == ir.Shape([160, 40])
    assert "slnp" not in model_map.embedding.metadata_props["pangu_light.pass"]
