"""One candidate's graph: the original graph compiled with the candidate's plan (the same passes
``compile --plan`` runs), optionally with the refit projections (``set-projection``), saved to a
file ONNX Runtime can load. Latency needs only the structure; the quality proxy also the refit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx_ir as ir

from pangu_light.calib.gram import GramStats
from pangu_light.calib.refit_plan import refit_for_plan
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model, save_model_atomic
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.rewrites.rotate_hidden import effective_basis
from pangu_light.passes.rewrites.set_projection import save_projections
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
        basis = None
        if plan.hidden_method == "rotate" and len(plan.hidden) < plan.hidden_size:
            if rotation is None:
                raise PanguLightError("compile_candidate: a rotate plan's refit needs the rotation it was planned with")
            basis = effective_basis(rotation.basis, ModelMap.from_model(original), len(plan.hidden))
        refits = refit_for_plan(original, model, grams, plan, method="refit", rotation=basis)
        if refits.projections:
            projections = output.with_suffix(".refit.npz")
            save_projections(projections, refits.projections, refits.meta())
            run_pipeline(model, f"set-projection{{file={json.dumps(str(projections.resolve()))}}}")
            projections.unlink()
    save_model_atomic(model, output)
    return output
