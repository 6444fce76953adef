"""slice-hidden: the rewritten graph equals the same channels kept in the PyTorch module."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.core.contract import GAMMA_L2_BEFORE_SLICE as GAMMA_L2_KEY
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import format_value
from pangu_light.passes.infra.plan import PrunePlan

from reference import (
    assert_unchanged,
    compile_graph,
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    ort_decode_logits,
    ort_logits,
    torch_drop_layers,
    torch_logits,
    torch_slice_hidden,
)

TOLERANCE = 1e-5
KEEP = sorted(np.random.default_rng(0).choice(64, size=40, replace=False).tolist())


def test_no_cache_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    pruned, report = compile_graph(path, f"slice-hidden{{keep={format_value(KEEP)}}}", tmp_path / "p.onnx")
    model_map = ModelMap.from_model(pruned)
    assert model_map.hidden_size == 40
    assert all(n.gamma.shape == ir.Shape([40]) for n in model_map.hidden_norms())
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    expected = torch_logits(torch_slice_hidden(hf_model, KEEP), ids, mask)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


def test_decode_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    compile_graph(path, "slice-hidden{keep_first=48}", tmp_path / "p.onnx")
    assert decode_diff(tmp_path / "p.onnx", torch_slice_hidden(hf_model, list(range(48)))) <= TOLERANCE


@pytest.mark.parametrize("family", ["llama", "gemma3", "glm4"])
@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])
def test_chained_with_drop_layers(exported_graph, family, kv_cache, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=kv_cache)
    pipeline = f"drop-layers{{layers=[1,2]}},slice-hidden{{keep={format_value(KEEP)}}}"
    pruned, report = compile_graph(path, pipeline, tmp_path / "p.onnx")
    assert pruned.metadata_props["pangu_light.pipeline"] == pipeline
    reference = torch_slice_hidden(torch_drop_layers(hf_model, [1, 2]), KEEP)
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    if kv_cache:
        got, ids, mask = ort_decode_logits(tmp_path / "p.onnx", ids, mask, steps=4)
    else:
        got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, torch_logits(reference, ids, mask), mask) <= TOLERANCE


def test_tied_embedding_stays_one_tensor(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    pruned, report = compile_graph(path, "slice-hidden{keep_first=32}", tmp_path / "p.onnx")
    model_map = ModelMap.from_model(pruned)
    assert model_map.tied_embeddings
    assert model_map.embedding.shape == ir.Shape([160, 32])
    # embedding (= lm_head) + 9 norms + 4 layers x 7 projections
    assert report.records[0].stats["initializers_sliced"] == 1 + 9 + 4 * 7
    assert model_map.embedding.metadata_props["pangu_light.pass"] == "slice-hidden"


def test_untied_lm_head_sliced_separately(exported_graph, tmp_path):
    _, path = exported_graph("qwen2")
    pruned, _ = compile_graph(path, "slice-hidden{keep_first=32}", tmp_path / "p.onnx")
    model_map = ModelMap.from_model(pruned)
    assert not model_map.tied_embeddings
    assert model_map.lm_head.weight.shape == ir.Shape([160, 32])
    assert model_map.embedding.shape == ir.Shape([160, 32])


def test_q_k_norms_untouched(exported_graph, tmp_path):
    _, path = exported_graph("qwen3")
    original = ModelMap.from_model(ir.load(path))
    pruned, _ = compile_graph(path, "slice-hidden{keep_first=32}", tmp_path / "p.onnx")
    for before, after in zip(original.layers, ModelMap.from_model(pruned).layers):
        np.testing.assert_array_equal(
            before.attention.q_norm.gamma.const_value.numpy(), after.attention.q_norm.gamma.const_value.numpy()
        )
        assert after.attention.q_norm.gamma.shape == ir.Shape([16])


def test_keeping_everything_changes_nothing(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    assert_unchanged(path, "slice-hidden{keep_first=64}", tmp_path / "p.onnx")


@pytest.mark.parametrize(
    "options, message",
    [
        ("keep_first=0", "keep_first=0 must be between 1 and the hidden size 64"),
        ("keep_first=65", "keep_first=65 must be between 1 and the hidden size 64"),
        ("keep=[]", "keeping 0 channels leaves no model"),
        ("keep=[3,64]", "channel 64 does not exist; the hidden size is 64"),
        ("keep=[3,3]", "names a channel twice"),
        ("keep=[1],keep_first=2", "give exactly one of keep"),
    ],
)
def test_bad_requests_are_clear_errors(exported_graph, options, message):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match=message.replace("[", r"\[")):
        run_pipeline(ir.load(path), f"slice-hidden{{{options}}}")


# ---------------------------------------------------------------- what slnp needs, plan=true


def test_records_each_gammas_norm_before_slicing(exported_graph, family):
    _, path = exported_graph(family)
    original = ModelMap.from_model(ir.load(path))
    model = ir.load(path)
    run_pipeline(model, "slice-hidden{keep_first=48}")
    run_pipeline(model, "slice-hidden{keep_first=40}")  # a second slice keeps the first record
    model_map = ModelMap.from_model(model)
    for before, after in zip(original.hidden_norms(), model_map.hidden_norms()):
        recorded = float(after.gamma.metadata_props[GAMMA_L2_KEY])
        # the EFFECTIVE gamma: 1 + w for Gemma's norms
        assert recorded == pytest.approx(np.linalg.norm(before.effective_gamma()), rel=1e-12)
    recorded = [v.name for v in model.graph.initializers.values() if GAMMA_L2_KEY in v.metadata_props]
    assert sorted(recorded) == sorted(n.gamma.name for n in model_map.hidden_norms())


def test_plan_keeps_the_plans_channels(exported_graph):
    _, path = exported_graph("qwen2")
    by_plan, by_list = ir.load(path), ir.load(path)
    plan = PrunePlan.identity(ModelMap.from_model(by_plan))
    plan.hidden = KEEP[::-1]
    for model in (by_plan, by_list):
        plan.attach(model)
    report = run_pipeline(by_plan, "slice-hidden{plan=true}")
    run_pipeline(by_list, f"slice-hidden{{keep={format_value(KEEP)}}}")
    assert report.records[0].stats["hidden"] == "64->40"
    assert graph_bytes(by_plan) == graph_bytes(by_list)
    # Applying the plan again finds the graph already at the plan's width.
    assert not run_pipeline(by_plan, "slice-hidden{plan=true}").records[0].modified


@pytest.mark.parametrize(
    "options, message",
    [
        ("plan=true,keep_first=4", "give exactly one of keep=[...] (channel indices), keep_first=N or plan=true"),
        ("plan=true", "plan=true but the graph carries no plan"),
    ],
)
def test_bad_plan_requests_are_clear_errors(exported_graph, options, message):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run_pipeline(ir.load(path), f"slice-hidden{{{options}}}")
