"""One candidate's graph: the original graph compiled with the candidate's plan (the same passes
``compile --plan`` runs), optionally with the refit projections (``set-projection``), saved to a
file ONNX Runtime can load. Latency needs only the structure; the quality proxy also the refit."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from pangu_light.calib.gram import GramStats
from pangu_light.calib.refit_plan import refit_and_set
from pangu_light.passes.infra.graph_io import load_model, save_model_atomic
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.rotation_basis import Rotation

__all__ = ["compile_candidate"]


def compile_candidate(
    source: str | os.PathLike, plan: PrunePlan, output: str | os.PathLike, *,
    original: ir.Model | None = None, grams: GramStats | None = None, rotation: Rotation | None = None,
) -> Path:
    """Compile ``source`` with ``plan`` into ``output``; with ``original`` (the unpruned no-cache
    graph, loaded) and ``grams``, refit the pruned o_proj/down_proj as ``prune`` does (in the
    rotated basis when the plan rotates the hidden size: ``rotation`` is then needed)."""
    output = Path(output)
    model = load_model(source)
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    if grams is not None and original is not None:
        refit_and_set(original, model, grams, plan, rotation=rotation)
    save_model_atomic(model, output)
    return output
