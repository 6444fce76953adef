"""Output refit: the Gram statistics equal X^T X of the PyTorch activations, the refit equals
numpy's least squares on the same activations, and the projection file for a compiled plan
holds exactly those solutions under the compiled graph's names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pangu_light.calib.gram import GramStats, collect_grams
from pangu_light.calib.refit import bias_compensation, fluctuation, head_fluctuation, refit_projection
from pangu_light.calib.refit_plan import fluctuation_ranking, refit_for_plan
from pangu_light.calib.stats import calibrate
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

from reference import left_padded_batch

U32 = 2.0**-24  # float32 unit roundoff
ACTIVATION_ERROR = 1e-5  # |ORT - torch| on a tiny model's activations (the rewrite tests' logit tolerance)
RELATIVE = 1e-6


def padded_batch(vocab: int, rows: int = 12, width: int = 40, seed: int = 1):
    """Enough real tokens (> the FFN width of 96) for a well-posed least squares; left padding."""
    lengths = [width - (i * 7) % 23 for i in range(rows)]
    return left_padded_batch(vocab, lengths=tuple(lengths), seed=seed)


def torch_projection_inputs(model, ids, mask) -> dict[tuple[str, int], np.ndarray]:
    """(projection, layer) -> its input on the real tokens [T, in], float64, from forward hooks."""
    captured, hooks = {}, []
    for index, layer in enumerate(model.model.layers):
        for proj, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            def keep(_module, args, key=(proj, index)):
                captured[key] = args[0].detach().numpy().astype(np.float64)
            hooks.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for hook in hooks:
        hook.remove()
    real = mask.numpy().astype(bool)
    return {key: value[real] for key, value in captured.items()}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_gram_equals_torch_activations(exported_graph, family):
    assert_gram_equals_torch(*exported_graph(family))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gram_of_a_decode_graph_equals_torch_activations(exported_graph, family):
    assert_gram_equals_torch(*exported_graph(family, kv_cache=True))


def assert_gram_equals_torch(hf_model, path):
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    grams = collect_grams(path, [(ids.numpy(), mask.numpy())] * 2)  # two batches: float64 accumulation
    assert grams.tokens == 2 * int(mask.sum())
    for (proj, index), x in torch_projection_inputs(hf_model, ids, mask).items():
        # float32 accumulation over n terms (|error| <= n u sum|x_i x_j|, Higham's gamma_n) plus the
        # activations' own float32 difference a: |dX^T X + X^T dX| <= a (colsum|X|_i + colsum|X|_j),
        # and for the sum n u colsum|X| + n a; doubled for the two batches. Measured on llama: the
        # bounds are 3e-6 (down) and 3e-5 (o) at the median; one token's own |x_i x_j| is 4e-4
        # (down) and 3e-2 (o), so a padded or missing token breaks them by 10 to 1000 times.
        n, magnitude, colsum = len(x), np.abs(x).T @ np.abs(x), np.abs(x).sum(axis=0)
        bound = 2 * (n * U32 * magnitude + ACTIVATION_ERROR * (colsum[:, None] + colsum[None, :]))
        assert np.all(np.abs(grams.gram[proj][index] - 2 * x.T @ x) <= bound), (proj, index)
        assert np.all(np.abs(grams.sum[proj][index] - 2 * x.sum(0)) <= 2 * (n * U32 * colsum + n * ACTIVATION_ERROR))


@pytest.fixture(scope="module")
def llama_activations(exported_graph):
    hf_model, _ = exported_graph("llama")
    ids, mask = padded_batch(hf_model.config.vocab_size)
    inputs = torch_projection_inputs(hf_model, ids, mask)
    weights = {("o", i): l.self_attn.o_proj.weight.detach().numpy().T.astype(np.float64)
               for i, l in enumerate(hf_model.model.layers)}
    weights.update({("down", i): l.mlp.down_proj.weight.detach().numpy().T.astype(np.float64)
                    for i, l in enumerate(hf_model.model.layers)})
    return inputs, weights


@pytest.mark.parametrize("proj", ["o", "down"])
@pytest.mark.parametrize("intercept", [False, True])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_refit_equals_numpy_least_squares(llama_activations, proj, intercept, ridge):
    inputs, weights = llama_activations
    x, w = inputs[(proj, 1)], weights[(proj, 1)]
    kept = np.sort(np.random.default_rng(0).choice(w.shape[0], w.shape[0] * 2 // 3, replace=False))
    fit = refit_projection(x.T @ x, x.sum(0), len(x), kept, w, ridge=ridge, intercept=intercept)
    # The same problem as one stacked least squares: [X_K, 1; sqrt(lambda) I, 0] [W'; b'] = [X W; 0].
    design = np.hstack([x[:, kept], np.ones((len(x), 1))]) if intercept else x[:, kept]
    penalty = np.sqrt(ridge * np.mean(np.diag(x.T @ x)[kept])) * np.eye(len(kept), design.shape[1])
    solution = np.linalg.lstsq(np.vstack([design, penalty]), np.vstack([x @ w, np.zeros((len(kept), w.shape[1]))]),
                               rcond=None)[0]
    assert relative(fit.weight, solution[: len(kept)]) <= RELATIVE
    if intercept:
        assert relative(fit.bias, solution[-1]) <= RELATIVE
    else:
        assert fit.bias is None


@pytest.mark.parametrize("intercept", [False, True])
def test_nothing_pruned_and_no_ridge_gives_the_original_weights(llama_activations, intercept):
    inputs, weights = llama_activations
    x, w = inputs[("o", 2)], weights[("o", 2)]
    fit = refit_projection(x.T @ x, x.sum(0), len(x), np.arange(w.shape[0]), w, ridge=0.0, intercept=intercept)
    assert relative(fit.weight, w) <= RELATIVE
    if intercept:
        assert np.abs(fit.bias).max() <= RELATIVE * np.abs(x @ w).max()


def test_bias_compensation_and_fluctuation(llama_activations):
    inputs, weights = llama_activations
    x, w = inputs[("o", 0)], weights[("o", 0)]
    kept = np.arange(0, w.shape[0], 2)
    fit = bias_compensation(x.sum(0), len(x), kept, w)
    np.testing.assert_array_equal(fit.weight, w[kept])
    removed = np.arange(1, w.shape[0], 2)
    assert relative(fit.bias, x[:, removed].mean(0) @ w[removed]) <= RELATIVE
    scores = fluctuation(x.T @ x, x.sum(0), len(x), w)
    assert relative(scores, x.var(axis=0) * (w * w).sum(axis=1)) <= RELATIVE
    assert relative(head_fluctuation(scores, 16), scores.reshape(4, 16).sum(1)) <= RELATIVE


def test_fluctuation_ranking_from_the_graph_equals_torch_activations(exported_graph):
    hf_model, path = exported_graph("qwen3")
    ids, mask = padded_batch(hf_model.config.vocab_size)
    batches = [(ids.numpy(), mask.numpy())]
    stats, grams = calibrate(path, batches), collect_grams(path, batches)
    ranked = fluctuation_ranking(stats, grams, ModelMap.from_model(ir.load(path)), heads=True, ffn=True)
    inputs = torch_projection_inputs(hf_model, ids, mask)
    for index, layer in enumerate(hf_model.model.layers):
        for proj, module, got in (("o", layer.self_attn.o_proj, ranked.heads[index]),
                                  ("down", layer.mlp.down_proj, ranked.ffn[index])):
            w = module.weight.detach().numpy().astype(np.float64)
            expected = inputs[(proj, index)].var(axis=0) * (w * w).sum(axis=0)
            if proj == "o":
                expected = expected.reshape(-1, 16).sum(axis=1)
            assert relative(got, expected) <= 1e-4  # float32 sums, then a variance by subtraction
    np.testing.assert_array_equal(ranked.channel, stats.channel)


def test_refit_refuses_bad_requests():
    gram, w = np.eye(4), np.ones((4, 2))
    with pytest.raises(PanguLightError, match=r"Gram matrix \(3, 3\) does not match a weight with 4 inputs"):
        refit_projection(np.eye(3), np.zeros(3), 1, [0], w)
    with pytest.raises(PanguLightError, match="kept inputs must be distinct indices in 0..3"):
        refit_projection(gram, np.zeros(4), 1, [0, 4], w)
    with pytest.raises(PanguLightError, match="normal equations are singular"):
        refit_projection(np.diag([1.0, 0, 1, 1]), np.zeros(4), 1, [0, 1], w, ridge=0.0)


def test_gram_file_round_trip_and_corrupt_file(exported_graph, tmp_path):
    hf_model, path = exported_graph("qwen2")
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    grams = collect_grams(path, [(ids.numpy(), mask.numpy())], meta={"data": "test"})
    grams.save(tmp_path / "g.npz")
    loaded = GramStats.load(tmp_path / "g.npz")
    assert loaded.tokens == grams.tokens and loaded.meta["data"] == "test" and loaded.num_layers == 4
    np.testing.assert_array_equal(loaded.gram["down"][3], grams.gram["down"][3])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(PanguLightError, match="bad.npz is not a Gram file written by pangu-light"):
        GramStats.load(tmp_path / "bad.npz")


def pruned_plan(model_map: ModelMap, drop: list[int], hidden: bool) -> PrunePlan:
    plan = PrunePlan.identity(model_map)
    if hidden:
        plan.hidden = list(range(0, model_map.hidden_size, 4)) + list(range(1, model_map.hidden_size, 4))
    for layer in plan.layers:
        layer.heads = [1, 2]  # one head of each KV group (2 groups of 2)
        layer.ffn = list(range(layer.index, 96, 2))
    plan.drop_layers = drop
    return plan


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_projection_file_for_a_compiled_plan(exported_graph, family):
    hf_model, path = exported_graph(family)
    ids, mask = padded_batch(hf_model.config.vocab_size)
    grams = collect_grams(path, [(ids.numpy(), mask.numpy())])
    original = ir.load(path)
    plan = pruned_plan(ModelMap.from_model(original), drop=[1], hidden=True)
    compiled = ir.load(path)
    plan.attach(compiled)
    run_pipeline(compiled, plan.pipeline())
    refits = refit_for_plan(original, compiled, grams, plan, intercept=True)
    assert len(refits.projections) == 6 and not refits.skipped  # o and down of the 3 kept layers
    hidden = np.asarray(sorted(plan.hidden))
    compiled_layer = ModelMap.from_model(compiled).layers[1]  # original layer 2
    source = ModelMap.from_model(original).layers[2]
    for proj, after, before, kept in (
        ("o", compiled_layer.attention.o, source.attention.o, np.r_[16:48]),
        ("down", compiled_layer.ffn.down, source.ffn.down, np.arange(2, 96, 2)),
    ):
        w = before.weight.const_value.numpy().astype(np.float64).T[:, hidden]
        fit = refit_projection(grams.gram[proj][2], grams.sum[proj][2], grams.tokens, kept, w, intercept=True)
        weight, bias = refits.projections[after.weight.name]
        assert after.weight.name.startswith("model.layers.1.") and weight.shape == tuple(after.weight.shape)
        np.testing.assert_allclose(weight, fit.weight.T, rtol=0, atol=0)
        np.testing.assert_allclose(bias, fit.bias, rtol=0, atol=0)
    bias_only = refit_for_plan(original, compiled, grams, plan, method="bias")
    weight, _ = bias_only.projections[compiled_layer.ffn.down.weight.name]
    np.testing.assert_array_equal(weight, compiled_layer.ffn.down.weight.const_value.numpy())


def test_projections_that_clap_rewrote_are_skipped(exported_graph):
    hf_model, path = exported_graph("llama")
    ids, mask = padded_batch(hf_model.config.vocab_size)
    grams = collect_grams(path, [(ids.numpy(), mask.numpy())])
    original = ir.load(path)
    plan = pruned_plan(ModelMap.from_model(original), drop=[2], hidden=False)
    plan.clap, plan.clap_merges = True, [ClapMerge(removed=2, into=1, groups=[(1, 0), (2, 1)])]
    compiled = ir.load(path)
    plan.attach(compiled)
    run_pipeline(compiled, plan.pipeline())
    refits = refit_for_plan(original, compiled, grams, plan)
    assert refits.skipped == ["model.layers.1.self_attn.o_proj.weight: its values were changed by a pass "
                              "other than pruning (CLAP merge or post-norm absorption)"]
    assert "layer 1: down" in refits.refit and "layer 1: o" not in refits.refit
