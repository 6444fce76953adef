"""rotate-hidden on the real SmolLM2-135M (hidden 576, tied embeddings, 30 layers): a random
rotation without a cut keeps the logits; a cut to 448 with RMS corrections equals the plain
PyTorch edit (k x k matrix before the lm_head), which the pass replaces by a diagonal gamma.

Bound: ``float32_bound`` (tests/reference.py): 2e-4 + 3e-5 x max |logit|, or 4x the unrotated
export's own |ORT - torch| on the same batch, measured here, where larger.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from reference_rotation import torch_rotate_hidden

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.rewrites.rotate_hidden import Rotation, random_rotation, save_rotation

from reference import float32_bound, left_padded_batch, max_diff_on_tokens, ort_logits, torch_logits

pytestmark = pytest.mark.real_model
HIDDEN, KEPT = 576, 448


def _rotated(path, pipeline: str, out):
    model = ir.load(path)
    run_pipeline(model, pipeline)
    ir.save(model, out, external_data=out.name + ".data")
    return model


def test_rotation_on_smollm2(smollm2_graph, smollm2_model, tmp_path):
    ids, mask = left_padded_batch(smollm2_model.config.vocab_size, lengths=(24, 17, 9))
    expected = torch_logits(smollm2_model, ids, mask)
    own = max_diff_on_tokens(ort_logits(smollm2_graph(False), ids, mask), expected, mask)

    _rotated(smollm2_graph(False), "rotate-hidden{random_seed=0}", tmp_path / "r.onnx")
    got = ort_logits(tmp_path / "r.onnx", ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= float32_bound(expected, own, mask)

    names = [n.gamma.name for n in ModelMap.from_model(ir.load(smollm2_graph(False))).hidden_norms()]
    rng = np.random.default_rng(1)
    rotation = Rotation(random_rotation(HIDDEN, 1), {name: rng.dirichlet(np.ones(HIDDEN)) for name in names})
    save_rotation(tmp_path / "rotation.npz", rotation)
    model = _rotated(smollm2_graph(False), f'rotate-hidden{{file="{tmp_path / "rotation.npz"}",keep_first={KEPT}}}',
                     tmp_path / "cut.onnx")
    model_map = ModelMap.from_model(model)
    assert model_map.hidden_size == KEPT and model_map.tied_embeddings
    correction = {name: float(np.sqrt(HIDDEN / KEPT * e[:KEPT].sum())) for name, e in rotation.energy.items()}
    reference = torch_logits(torch_rotate_hidden(smollm2_model, rotation.basis, KEPT, correction), ids, mask)
    got = ort_logits(tmp_path / "cut.onnx", ids, mask)
    assert max_diff_on_tokens(got, reference, mask) <= float32_bound(reference, own, mask)
