"""Rotation statistics: the graph's moments of the unit-normalised norm inputs equal the same sums
from PyTorch hooks (within float32 accumulation bounds); the basis and energies follow from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pangu_light.calib.rotation import collect_moments, collect_rotation, rotation_from_moments
from pangu_light.core.errors import PanguLightError

from reference import left_padded_batch

U32 = 2.0**-24  # float32 unit roundoff
UNIT_ERROR = 1e-5  # |ORT - torch| of a unit-normalised activation's component on a tiny model


def torch_unit_inputs(model, ids, mask) -> dict[str, np.ndarray]:
    """Each hidden norm's input on the real tokens, divided by its norm: {gamma name: [T, H]} (float64)."""
    captured, hooks = {}, []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm") and not name.endswith(("q_norm", "k_norm")):
            def keep(_module, args, key=f"{name}.weight"):
                captured[key] = args[0].detach().numpy().astype(np.float64)
            hooks.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for hook in hooks:
        hook.remove()
    real = mask.numpy().astype(bool)
    return {key: x[real] / np.linalg.norm(x[real], axis=-1, keepdims=True) for key, x in captured.items()}


@pytest.mark.parametrize("family,kv_cache", [("llama", False), ("qwen2", False), ("mistral", False), ("llama", True)])
def test_moments_equal_torch_hooks(exported_graph, family, kv_cache):
    hf_model, path = exported_graph(family, kv_cache=kv_cache)
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    moments, tokens, _ = collect_moments(path, [(ids.numpy(), mask.numpy())] * 2)  # two batches: float64 sums
    units = torch_unit_inputs(hf_model, ids, mask)
    assert set(moments) == set(units) and len(units) == 2 * 4 + 1 and tokens == 2 * int(mask.sum())
    for name, u in units.items():
        # float32 sums of n terms (Higham's gamma_n: n u sum|u_i u_j|) plus the components' own float32
        # difference a: |dU^T U + U^T dU| <= a (colsum|U|_i + colsum|U|_j); doubled for two batches. One
        # token's own |u_i u_j| is ~1/H = 0.016 on average: a padded or missing token breaks the bound.
        n, magnitude, colsum = len(u), np.abs(u).T @ np.abs(u), np.abs(u).sum(axis=0)
        bound = 2 * (n * U32 * magnitude + UNIT_ERROR * (colsum[:, None] + colsum[None, :]))
        assert np.all(np.abs(moments[name] - 2 * u.T @ u) <= bound), name
        assert float(np.trace(moments[name])) == pytest.approx(2 * n, rel=1e-5)  # unit vectors


def test_collect_rotation_is_the_moments_basis(exported_graph):
    hf_model, path = exported_graph("qwen3")
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    moments, tokens, _ = collect_moments(path, [(ids.numpy(), mask.numpy())])
    rotation = collect_rotation(path, [(ids.numpy(), mask.numpy())], meta={"data": "test"})
    expected = rotation_from_moments(moments, tokens)
    np.testing.assert_allclose(np.abs(rotation.basis.T @ expected.basis)[:4, :4], np.eye(4), atol=1e-6)
    assert rotation.meta["data"] == "test" and rotation.meta["tokens"] == tokens


def test_basis_and_energies_follow_from_the_moments():
    rng = np.random.default_rng(0)
    units = {name: rng.normal(size=(50, 6)) * np.array([3.0, 1, 1, 0.5, 0.2, 0.1]) for name in ("a", "b", "c")}
    units = {k: u / np.linalg.norm(u, axis=1, keepdims=True) for k, u in units.items()}
    rotation = rotation_from_moments({k: u.T @ u for k, u in units.items()}, 50)
    basis = rotation.basis
    np.testing.assert_allclose(basis.T @ basis, np.eye(6), atol=1e-12)
    stacked = np.vstack(list(units.values()))
    variance = np.square(stacked @ basis).sum(axis=0)
    assert np.all(np.diff(variance) <= 1e-12)  # components by decreasing energy
    for name, u in units.items():
        np.testing.assert_allclose(rotation.energy[name], np.square(u @ basis).mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(rotation.energy[name].sum(), 1.0, atol=1e-12)
    with pytest.raises(PanguLightError, match="no calibration tokens"):
        rotation_from_moments({}, 0)
