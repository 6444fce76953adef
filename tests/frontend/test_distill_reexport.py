"""The distilled student's re-export reuses a structure traced before for the same student shape:
a second student of that shape (other weights) is not traced again, and its graph computes what
its module computes under ONNX Runtime (within float32 rounding of the logits); a student of
another shape is traced anew. The structure cache lives in a temporary directory here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distill import setup  # noqa: F401  (setup is the module fixture)

from pangu_light.core.cache import CACHE_ENV
from pangu_light.frontend.distill import reexport
from pangu_light.frontend.distill.outputs import export_checked
from pangu_light.frontend.reimport import reimport

from reference import float32_bound, left_padded_batch, max_diff_on_tokens, ort_logits, torch_logits


@pytest.fixture
def traces(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    count = [0]
    original = reexport.export_model

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(reexport, "export_model", counted)
    return count


@pytest.mark.slow
def test_a_second_student_of_one_shape_reuses_the_structure(setup, tmp_path, traces):  # noqa: F811
    ids, mask = left_padded_batch(160)
    windows = np.random.default_rng(0).integers(3, 100, size=(2, 64))
    outputs = {}
    # (graph, kind, seed): per_layer without a cache twice, uniform with a KV cache twice.
    for graph, kv_cache, seed in (("per_layer.onnx", False, 0), ("per_layer.onnx", False, 1),
                                  ("uniform.onnx", True, 2), ("uniform.onnx", True, 3)):
        student = reimport(setup / graph, attn_implementation="sdpa")
        with torch.no_grad():  # other weights of the same shape: the graph must carry these
            generator = torch.Generator().manual_seed(seed)
            for parameter in student.model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        path = tmp_path / f"{seed}.onnx"
        # ORT against the module (max |diff| within float32 rounding, else it raises), decode graphs included.
        assert export_checked(student.model, student, path, windows, kv_cache=kv_cache, tokenizer=None,
                              say=lambda m: None) <= 1e-4
        expected = torch_logits(student.model, ids, mask)
        if not kv_cache:
            assert max_diff_on_tokens(ort_logits(path, ids, mask), expected, mask) <= float32_bound(expected, mask=mask)
        outputs[seed] = expected
    # Each shape and kind traced once, reused once.
    assert traces[0] == 2
    for a, b in ((0, 1), (2, 3)):  # the reused graph got the new weights
        assert max_diff_on_tokens(outputs[a], outputs[b], mask) > 1e-2


def test_export_check_refuses_a_wrong_graph_even_after_measuring_float32_error(setup, tmp_path, monkeypatch):  # noqa: F811
    """Beyond the fixed bound the check measures PyTorch's own float32 error on the weights (float64
    forward) and allows 8x that; a graph with one wrong weight is still refused."""
    import onnx_ir as ir

    from pangu_light.core.errors import PanguLightError
    from pangu_light.frontend.distill import outputs

    student = reimport(setup / "uniform.onnx", attn_implementation="sdpa")
    windows = np.random.default_rng(0).integers(3, 100, size=(2, 64))
    ids = np.ascontiguousarray(windows[:2, :64], dtype=np.int64)
    with torch.no_grad():
        logits = student.model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)))
    own = outputs._float32_error(student.model, ids, np.ones_like(ids), logits.logits.numpy())
    assert 0 < own <= float32_bound(logits.logits.numpy())  # float32 rounding, nothing more

    original = reexport.export_student

    def corrupted(*args, **kwargs):
        graph = original(*args, **kwargs)
        weight = next(v for name, v in graph.graph.initializers.items() if "down_proj" in name)
        weight.const_value = ir.Tensor(weight.const_value.numpy() * 1.5, name=weight.name)
        return graph

    monkeypatch.setattr(reexport, "export_student", corrupted)
    with pytest.raises(PanguLightError, match="disagrees with PyTorch"):
        export_checked(student.model, student, tmp_path / "wrong.onnx", windows, kv_cache=False, tokenizer=None,
                       say=lambda m: None)
    assert not (tmp_path / "wrong.onnx").exists()
