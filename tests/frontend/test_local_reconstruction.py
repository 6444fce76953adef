"""Local reconstruction: the hidden map is read off the embeddings (a selection, or any linear map
such as a rotation), the spans give dropped layers to the kept layer before them, an unpruned
student reproduces every boundary of the teacher exactly (the capture, the map and the layer calls
are right), and on pruned tiny students (sliced hidden + heads + FFN + SLNP; KV groups + FFN + a
dropped layer) every layer's held-out error falls below half its start and the whole student's
held-out KL to the teacher falls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from test_distill import setup  # noqa: F401  (the module fixture: teacher, graphs, corpus)

from pangu_light.calib.text import graph_tokenizer, sequences_for
from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.distill.hidden_map import hidden_map, layer_spans
from pangu_light.frontend.distill.local import LocalConfig, heldout_metrics, reconstruct
from pangu_light.frontend.reimport import reimport
from pangu_light.passes.infra.graph_io import load_model_metadata


def test_hidden_map_of_a_selection_and_of_a_rotation():
    generator = torch.Generator().manual_seed(0)
    e_t = torch.randn(200, 24, generator=generator)
    keep = [5, 0, 17, 3, 22, 9]
    p = hidden_map(e_t[:, keep], e_t)
    assert torch.equal(p, torch.eye(24)[:, keep])
    q, _ = torch.linalg.qr(torch.randn(24, 10, generator=generator, dtype=torch.float64))
    p = hidden_map((e_t.double() @ q).float(), e_t)
    assert float((p.double() - q).abs().max()) < 1e-5  # float32 inputs: ~1e-7 relative
    with pytest.raises(PanguLightError, match="not a linear map"):
        hidden_map(torch.randn(200, 10, generator=generator), e_t)


def test_spans_give_dropped_layers_to_the_kept_layer_before():
    assert layer_spans([0, 1, 2, 3], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layer_spans([0, 1, 3], 4) == [(0, 1), (1, 3), (3, 4)]
    assert layer_spans([1, 2], 4) == [(0, 2), (2, 4)]  # layer 0 to the first kept, layer 3 to the last
    with pytest.raises(PanguLightError):
        layer_spans([2, 1], 4)


def _data(setup, graph, train):  # noqa: F811
    encode, eos = graph_tokenizer(setup / graph, load_model_metadata(setup / graph), None)
    text = str(setup / "text.txt")
    windows = sequences_for(text, encode, eos, samples=None, seq_len=32, seed=0, split="calib")[:train]
    held = sequences_for(text, encode, eos, samples=16, seq_len=32, seed=0, split="eval")
    return windows, held


def test_an_unpruned_student_reproduces_every_boundary(setup, tmp_path):  # noqa: F811
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(setup / "teacher")).eval()
    student = reimport(setup / "orig.onnx")
    train, held = _data(setup, "orig.onnx", 8)
    result = reconstruct(student.model, teacher, LocalConfig(
        train, held, tmp_path, student.spec.origin, steps_per_layer=1, lr=1e-12, bf16=False, quiet=True))
    # float32, the same modules on the same inputs: only the re-import's rounding (exact here).
    assert all(layer["error_start"] <= 1e-10 for layer in result.layers), result.layers
    assert not list(tmp_path.glob("*.npy"))  # the boundaries are deleted


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["uniform.onnx", "per_layer.onnx"])
def test_each_layer_halves_its_error_and_the_kl_falls(setup, tmp_path, graph):  # noqa: F811
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(setup / "teacher")).eval()
    student = reimport(setup / graph)
    train, held = _data(setup, graph, 256)
    before = heldout_metrics(student.model, teacher, held, batch=4, bf16=False)
    result = reconstruct(student.model, teacher, LocalConfig(
        train, held, tmp_path, student.spec.origin, steps_per_layer=100, micro_batch=8, lr=3e-3, bf16=False,
        quiet=True))
    after = heldout_metrics(student.model, teacher, held, batch=4, bf16=False)
    spans = [tuple(layer["span"]) for layer in result.layers]
    assert spans == ([(0, 1), (1, 2), (2, 3), (3, 4)] if graph == "uniform.onnx" else [(0, 1), (1, 3), (3, 4)])
    for layer in result.layers:
        # every start is a real error (the 0.04 of per_layer's layer 0 is its pruned KV group)
        assert layer["error_start"] > 0.02 and layer["error_end"] < 0.5 * layer["error_start"], layer
    assert after["eval_kl"] < 0.5 * before["eval_kl"], (before, after)
    assert np.isfinite(after["eval_perplexity"])
