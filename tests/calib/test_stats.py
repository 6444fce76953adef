"""Statistics computed through the graph (taps + ORT) against PyTorch forward hooks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pangu_light.calib.stats import CalibrationStats, calibrate, gamma_statistics
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap

from reference import left_padded_batch

REL = 1e-4


def torch_statistics(model, model_map: ModelMap, batches, aggregation: str):
    """The same statistics from forward hooks on the HF modules named by the model map."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def keep(name, which):
        def hook(module, args, output):
            captured[name] = (
                (args[0] if which == "in" else output if not isinstance(output, tuple) else output[0]).detach().double()
            )

        return hook

    handles = []
    hidden_norms = model_map.hidden_norms()
    for norm in hidden_norms:
        handles.append(modules[norm.module].register_forward_hook(keep(f"norm:{norm.module}", "out")))
    post_norms = [
        n for layer in model_map.layers for role, n in layer.norms.items() if role in ("post_attn", "post_ffn")
    ]
    for norm in post_norms:
        handles.append(modules[norm.module].register_forward_hook(keep(f"post:{norm.module}", "in")))
    for layer in model_map.layers:
        handles.append(modules[layer.attention.o.module].register_forward_hook(keep(f"ctx:{layer.index}", "in")))
        handles.append(modules[layer.ffn.down.module].register_forward_hook(keep(f"ffn:{layer.index}", "in")))
        handles.append(modules[layer.module].register_forward_hook(keep(f"in:{layer.index}", "in")))
        handles.append(modules[layer.module].register_forward_hook(keep(f"out:{layer.index}", "out")))

    per_sample: dict[str, list[np.ndarray]] = {}
    counts = []
    cos_sum = np.zeros(len(model_map.layers))
    s_inv_sum = {n.gamma.name: 0.0 for n in post_norms}
    log_inverses: dict[str, list[torch.Tensor]] = {n.gamma.name: [] for n in post_norms}

    def add(key, tensor_bsc, m):  # per-sample masked sums over the sequence
        kept = torch.where(m[..., None] > 0, tensor_bsc, torch.zeros_like(tensor_bsc))  # pads may be NaN
        per_sample.setdefault(key, []).append(kept.sum(1).numpy())

    with torch.no_grad():
        for ids, mask in batches:
            ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
            m = mask.double()
            counts.append(m.sum(1).numpy())
            for norm in hidden_norms:
                add(f"channel:{norm.gamma.name}", captured[f"norm:{norm.module}"].abs(), m)
            for layer in model_map.layers:
                attention = layer.attention
                ctx = captured[f"ctx:{layer.index}"]
                heads = ctx.reshape(*ctx.shape[:2], attention.num_heads, attention.head_dim).norm(dim=-1)
                add(f"head:{layer.index}", heads, m)
                add(f"ffn:{layer.index}", captured[f"ffn:{layer.index}"].abs(), m)
                x, y = captured[f"in:{layer.index}"], captured[f"out:{layer.index}"]
                cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=0.0)
                cos_sum[layer.index] += float(cos[m > 0].sum())
            for norm in post_norms:
                x = captured[f"post:{norm.module}"]
                inverse = torch.rsqrt(x.pow(2).mean(-1) + norm.eps)
                s_inv_sum[norm.gamma.name] += float(inverse[m > 0].sum())
                log_inverses[norm.gamma.name].append(torch.log(inverse[m > 0]))
    for h in handles:
        h.remove()
    counts = np.concatenate(counts)
    tokens = counts.sum()

    def aggregate(key):
        values = np.concatenate(per_sample[key])
        if aggregation == "paper":
            return values.sum(0)
        return np.sqrt(((values / counts[:, None]) ** 2).sum(0))

    return {
        "channel": sum(aggregate(f"channel:{n.gamma.name}") for n in hidden_norms),
        "heads": [aggregate(f"head:{l.index}") for l in model_map.layers],
        "ffn": [aggregate(f"ffn:{l.index}") for l in model_map.layers],
        "block_influence": 1 - cos_sum / tokens,
        "s_inv": {k: v / tokens for k, v in s_inv_sum.items()},
        "log_s_inv": {k: torch.cat(v).numpy() for k, v in log_inverses.items()},
        "tokens": tokens,
    }


def _batches(vocab):
    first = left_padded_batch(vocab, lengths=(9, 6, 4), seed=1)
    second = left_padded_batch(vocab, lengths=(7, 7), seed=2)
    return [(ids.numpy(), mask.numpy()) for ids, mask in (first, second)]


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("aggregation", ["paper", "minitron"])
@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])
def test_graph_statistics_match_torch_hooks(exported_graph, family, kv_cache, aggregation):
    model, path = exported_graph(family, kv_cache)
    model_map = ModelMap.from_model(ir.load(path))
    batches = _batches(model.config.vocab_size)
    stats = calibrate(path, batches, aggregation=aggregation)
    expected = torch_statistics(model, model_map, batches, aggregation)

    assert stats.tokens == expected["tokens"] == 9 + 6 + 4 + 7 + 7
    assert _relative(stats.channel, expected["channel"]) <= REL
    for got, want in zip(stats.heads, expected["heads"], strict=True):
        assert _relative(got, want) <= REL
    for got, want in zip(stats.ffn, expected["ffn"], strict=True):
        assert _relative(got, want) <= REL
    # BI is 1 - cos with cos near 1 for some layers: compare the cosines' complement absolutely.
    np.testing.assert_allclose(stats.block_influence, expected["block_influence"], rtol=REL, atol=1e-6)
    assert set(stats.s_inv) == set(expected["s_inv"])
    for name, value in expected["s_inv"].items():
        assert abs(stats.s_inv[name] - value) <= REL * abs(value)
    has_post_norms = any("post_attn" in layer.norms for layer in model_map.layers)
    assert bool(stats.s_inv) == has_post_norms
    assert set(stats.s_inv_spread) == set(expected["log_s_inv"])
    for name, logs in expected["log_s_inv"].items():
        # The graph sums log(1/rms) and its square in float32 over one batch's tokens (at most
        # 9 x 3 terms): each sum is off by at most terms x eps32 x (sum of |terms|), and the
        # variance E[l^2] - E[l]^2 inherits both errors.
        eps, terms = float(np.finfo(np.float32).eps), 27
        variance_bound = 4 * terms * eps * float(np.mean(logs**2)) + 1e-12
        assert abs(stats.s_inv_spread[name] ** 2 - logs.var()) <= variance_bound
        assert logs.std() > 1e-3  # the spread is not trivially zero on these tokens


def test_padding_never_counts(exported_graph):
    """Changing the token ids under padding leaves every statistic unchanged."""
    model, path = exported_graph("llama")
    ids, mask = _batches(model.config.vocab_size)[0]
    scrambled = ids.copy()
    scrambled[mask == 0] = 7
    a = calibrate(path, [(ids, mask)])
    b = calibrate(path, [(scrambled, mask)])
    np.testing.assert_array_equal(a.channel, b.channel)
    for x, y in zip(a.heads + a.ffn, b.heads + b.ffn):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.block_influence, b.block_influence)


def test_batches_accumulate_like_one_batch(exported_graph):
    model, path = exported_graph("qwen3")
    batches = _batches(model.config.vocab_size)
    whole = calibrate(path, batches)
    parts = [calibrate(path, [batch]) for batch in batches]
    np.testing.assert_allclose(whole.channel, parts[0].channel + parts[1].channel, rtol=1e-12)
    np.testing.assert_allclose(whole.ffn[2], parts[0].ffn[2] + parts[1].ffn[2], rtol=1e-12)


def test_stats_round_trip(tmp_path, exported_graph):
    model, path = exported_graph("gemma3")
    stats = calibrate(path, _batches(model.config.vocab_size), meta={"data": "test"})
    stats.save(tmp_path / "stats.npz")
    loaded = CalibrationStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.channel, stats.channel)
    assert [h.tolist() for h in loaded.heads] == [h.tolist() for h in stats.heads]
    assert loaded.s_inv == stats.s_inv and loaded.tokens == stats.tokens
    assert loaded.s_inv_spread == stats.s_inv_spread and len(stats.s_inv_spread) == 8
    assert loaded.meta["data"] == "test" and loaded.meta["aggregation"] == "paper"
    assert set(loaded.gamma) == set(stats.gamma)


def test_gamma_statistics_use_the_effective_gamma(exported_graph):
    _, path = exported_graph("gemma2")
    model_map = ModelMap.from_model(ir.load(path))
    norm = model_map.layers[1].norms["post_ffn"]
    w = norm.gamma.const_value.numpy().astype(np.float64)
    mean, std, low, high, mean_abs, l2 = gamma_statistics(model_map)[norm.gamma.name]
    assert mean == pytest.approx((1 + w).mean()) and high == pytest.approx((1 + w).max())
    assert l2 == pytest.approx(np.linalg.norm(1 + w))


def test_not_a_stats_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "stats.npz"
    bad.write_bytes(b"not numpy")
    with pytest.raises(PanguLightError, match="not a statistics file"):
        CalibrationStats.load(bad)
