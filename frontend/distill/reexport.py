"""The distilled student's graph from a structure traced before for the same student shape.

Tracing (torch.onnx's dynamo export) is nearly all of an export's time, a minute or more for a
30-layer model on two cores, and the graph it gives depends on the student's shape (its config
and its per-layer ``StudentSpec``), the graph kind and the code that builds and exports it, never
on the weight values (``frontend.structure_cache``). Every run that distils the same pruned
shape (the runs of a benchmark, a second recipe, a longer budget) exports the same structure, so
the first one stores it without its weights and the later ones load it and attach the trained
parameters (the same ``weights.attach_weights`` the export stage uses, here from the module in
memory). The key adds, to what ``structure_key`` hashes (config, graph kind, opset, exporter
sources, library versions), the student's spec and the sources that build the student's modules.

The graph is checked under ONNX Runtime against the module by the caller (``export_checked``),
whichever way it was made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch

from pangu_light.core import contract
from pangu_light.frontend.export import OPSET, ExportOptions, export_model
from pangu_light.frontend.structure_cache import load_structure, store_structure, structure_key
from pangu_light.frontend.student import StudentSpec
from pangu_light.frontend.weights import attach_weights

__all__ = ["export_student", "student_structure_key"]

# The code that shapes a student's modules, beyond the exporter's own (hashed by structure_key).
_STUDENT_SOURCES = ("student.py", "reimport.py")


def student_structure_key(model: torch.nn.Module, spec: StudentSpec, kv_cache: bool) -> str:
    """The structure cache key of ``model`` (a student built from ``spec``) for one graph kind."""
    frontend = Path(__file__).resolve().parent.parent
    description = {
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "student_spec": spec.to_json(),
        "student_sources": [(frontend / name).read_text() for name in _STUDENT_SOURCES],
    }
    return structure_key(json.dumps(description, sort_keys=True), kv_cache, OPSET)


def export_student(model: torch.nn.Module, spec: StudentSpec, *, kv_cache: bool,
                   say: Callable[[str], None] = print) -> ir.Model:
    """``export_model(model)`` (float32, eager attention, eval mode), its structure reused when a
    student of this shape was exported before, and stored for the next one otherwise."""
    model.eval()
    model.config._attn_implementation = "eager"  # what export_model sets: the key and the check match
    model.config.use_cache = kv_cache
    key = student_structure_key(model, spec, kv_cache)
    aliases = _parameter_aliases(model)
    cached = load_structure(key, kv_cache)
    if cached is not None and attach_weights(cached, _module_source(model), aliases):
        cached.metadata_props[contract.SOURCE_CONFIG] = model.config.to_json_string(use_diff=False)
        say("... reusing the structure traced before for this student shape")
        return cached
    exported = export_model(model, ExportOptions(kv_cache=kv_cache))
    store_structure(exported, key, kv_cache, aliases)
    return exported


def _parameter_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> all names of that tensor (a tied embedding has two)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _module_source(model: torch.nn.Module):
    """The module's current parameters as graph tensors (float32 copies), by any of their names."""
    parameters = dict(model.named_parameters(remove_duplicate=False))

    def tensor(names: list[str], shape: tuple[int, ...], dtype: ir.DataType):
        parameter = next((parameters[n] for n in names if n in parameters), None)
        if parameter is None or tuple(parameter.shape) != shape or dtype != ir.DataType.FLOAT:
            return None
        return ir.tensor(parameter.detach().cpu().float().numpy().copy(), name=names[0])

    return tensor
