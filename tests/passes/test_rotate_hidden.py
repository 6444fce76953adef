"""rotate-hidden: without a cut the graph computes what it did; with a cut it equals the same
fold + rotation + cut done on the PyTorch module (tests/reference_rotation.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from reference_rotation import torch_rotate_hidden

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.rewrites.rotate_hidden import (
    ROTATION_KEY,
    Rotation,
    diagonalising_basis,
    random_rotation,
    save_rotation,
)

from reference import (
    assert_refused,
    compile_graph,
    decode_diff,
    float32_bound,
    left_padded_batch,
    max_diff_on_tokens,
    no_cache_diff,
    torch_logits,
)

PRE_NORM = ["llama", "qwen2", "qwen3", "mistral"]  # llama, qwen3 tied; qwen2, mistral untied
SANDWICH = ["gemma2", "gemma3", "glm4"]
HIDDEN, KEPT = 64, 40


def _bound(hf_model) -> float:
    """float32 error of the unedited export plus room: see reference.float32_bound."""
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    return float32_bound(torch_logits(hf_model, ids, mask), mask=mask)


def _rotation_file(tmp_path, hf_model, seed: int = 3) -> tuple:
    """A random orthogonal basis with random per-norm energies (positive, summing to 1)."""
    rng = np.random.default_rng(seed)
    names = [f"{n}.weight" for n, m in hf_model.named_modules() if type(m).__name__.endswith("RMSNorm")
             and not n.endswith(("q_norm", "k_norm"))]
    energy = {name: rng.dirichlet(np.ones(HIDDEN)) for name in names}
    rotation = Rotation(random_rotation(HIDDEN, seed), energy)
    path = tmp_path / "rotation.npz"
    save_rotation(path, rotation)
    correction = {name: float(np.sqrt(HIDDEN / KEPT * e[:KEPT].sum())) for name, e in energy.items()}
    return path, rotation, correction


@pytest.mark.parametrize("family", PRE_NORM)
@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])
def test_without_cut_keeps_the_function(exported_graph, family, kv_cache, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=kv_cache)
    rotated, report = compile_graph(path, "rotate-hidden{random_seed=0}", tmp_path / "r.onnx")
    model_map = ModelMap.from_model(rotated)
    before = ModelMap.from_model(ir.load(path))
    assert model_map.hidden_size == HIDDEN and len(list(rotated.graph)) == len(list(ir.load(path).graph))
    moved = np.abs(model_map.layers[0].attention.o.weight.const_value.numpy()
                   - before.layers[0].attention.o.weight.const_value.numpy()).max()
    assert moved > 0.01  # the weights really were rotated
    assert all(np.allclose(n.gamma.const_value.numpy(), 1.0) for n in model_map.hidden_norms()
               if n.role != "final" or not model_map.tied_embeddings)
    diff = decode_diff(tmp_path / "r.onnx", hf_model) if kv_cache else no_cache_diff(tmp_path / "r.onnx", hf_model)
    assert diff <= _bound(hf_model)


@pytest.mark.parametrize("family", PRE_NORM)
@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])
def test_cut_matches_torch(exported_graph, family, kv_cache, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=kv_cache)
    file, rotation, correction = _rotation_file(tmp_path, hf_model)
    rotated, report = compile_graph(path, f'rotate-hidden{{file="{file}",keep_first={KEPT}}}', tmp_path / "r.onnx")
    model_map = ModelMap.from_model(rotated)
    assert model_map.hidden_size == KEPT
    recorded = json.loads(rotated.metadata_props[ROTATION_KEY])
    assert recorded["rms_correction"] == pytest.approx(correction, rel=1e-6)
    reference = torch_rotate_hidden(hf_model, rotation.basis, KEPT, correction)
    diff = decode_diff(tmp_path / "r.onnx", reference) if kv_cache else no_cache_diff(tmp_path / "r.onnx", reference)
    assert diff <= _bound(reference)
    ids, mask = left_padded_batch(hf_model.config.vocab_size)  # the cut changes the function: a real check
    assert max_diff_on_tokens(torch_logits(reference, ids, mask), torch_logits(hf_model, ids, mask), mask) > 1e-2


def test_correction_off_is_the_plain_cut(exported_graph, tmp_path):
    """A random basis carries no energies: every gamma is 1 (folded), the cut is plain."""
    hf_model, path = exported_graph("qwen2")
    compile_graph(path, f"rotate-hidden{{random_seed=5,keep_first={KEPT}}}", tmp_path / "r.onnx")
    reference = torch_rotate_hidden(hf_model, random_rotation(HIDDEN, 5), KEPT)
    assert no_cache_diff(tmp_path / "r.onnx", reference) <= _bound(reference)


def test_tied_embedding_stays_one_tensor_without_new_nodes(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    original = ir.load(path)
    rotated, report = compile_graph(path, f"rotate-hidden{{random_seed=1,keep_first={KEPT}}}", tmp_path / "r.onnx")
    model_map = ModelMap.from_model(rotated)
    assert model_map.tied_embeddings and model_map.embedding.shape == ir.Shape([160, KEPT])
    assert len(list(rotated.graph)) == len(list(original.graph))
    assert len(rotated.graph.initializers) == len(original.graph.initializers)
    assert model_map.final_norm.gamma.shape == ir.Shape([KEPT])


def test_diagonalising_basis_keeps_the_span():
    basis, gamma = random_rotation(12, 2), np.random.default_rng(0).normal(size=12)
    turned = diagonalising_basis(basis, gamma, 5)
    for block in (slice(0, 5), slice(5, 12)):
        a, b = basis[:, block], turned[:, block]
        np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-12)  # the same projector
        m = b.T @ (gamma[:, None] * b)
        np.testing.assert_allclose(m, np.diag(np.diag(m)), atol=1e-12)


@pytest.mark.parametrize("family", SANDWICH)
def test_sandwich_families_refused(exported_graph, family):
    _, path = exported_graph(family)
    assert_refused(path, "rotate-hidden{random_seed=0}", "has sandwich norms")


def test_bad_rotation_files_refused(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    bad = tmp_path / "bad.npz"
    save_rotation(bad, Rotation(random_rotation(HIDDEN, 0) * 1.01))
    assert_refused(path, f'rotate-hidden{{file="{bad}"}}', "the rotation is not orthogonal")
    save_rotation(bad, Rotation(random_rotation(32, 0)))
    assert_refused(path, f'rotate-hidden{{file="{bad}"}}', "the graph's hidden size is 64 (expected")
    assert_refused(path, "rotate-hidden{random_seed=0,keep_first=65}", "keep_first=65 must be between 1")
    assert_refused(path, "rotate-hidden{keep_first=3}", "give exactly one of file=rotation.npz, random_seed=N")
    assert_refused(path, f'rotate-hidden{{file="{tmp_path / "none.npz"}"}}', "no such file")
    save_rotation(bad, Rotation(random_rotation(HIDDEN, 0), {"model.norm.weight": np.ones(HIDDEN) / HIDDEN}))
    assert_refused(path, f'rotate-hidden{{file="{bad}",keep_first=8}}', "has no energies for model.layers.0")
