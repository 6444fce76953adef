"""Runners and the bound for float16/bfloat16 graphs against torch in the same dtype (the bound
is derived in tests/frontend/test_export_half.py's docstring)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

IR_DTYPE = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
BOUND_UNITS = 16


def unit_roundoff(dtype: str) -> float:
    return float(torch.finfo(getattr(torch, dtype)).eps) / 2


def half_bound(dtype: str, reference: np.ndarray) -> float:
    """The largest |graph - torch| allowed on logits ``reference``: 16 u x max |logit| (derived in
    tests/frontend/test_export_half.py)."""
    u = unit_roundoff(dtype)
    return BOUND_UNITS * u * float(np.abs(reference).max())


def left_padded(vocab: int, lengths, seed: int):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        ids[row, : width - n] = 0
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask_t = torch.from_numpy(mask)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=mask_t,
                    position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    return out.logits.float().numpy()


class Runner:
    """Runs a half graph: ONNX Runtime (CPU) for float16, onnx's reference evaluator for bfloat16."""

    def __init__(self, path, dtype: str):
        self.dtype = dtype
        if dtype == "bfloat16":
            from onnx.reference import ReferenceEvaluator

            self.evaluator = ReferenceEvaluator(onnx.load(str(path)))
            self.outputs = list(self.evaluator.output_names)
        else:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict) -> dict:
        if self.dtype == "bfloat16":
            results = self.evaluator.run(None, feeds)
        else:
            results = self.session.run(None, feeds)
        return dict(zip(self.outputs, results))
