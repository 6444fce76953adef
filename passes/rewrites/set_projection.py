"""set-projection: give projections new weights (and biases) from a projection file.

An output refit (``calib.refit_plan``) computes, for some Linears of a compiled graph, a new
weight W' [out, in] (the initializer's own layout) and optionally a bias b' [out]. This pass
writes them in: the weight initializer's values are replaced (same name, shape checked); a bias
replaces the values of the projection's existing bias, or, where it has none, is added after the
MatMul as a new initializer named after the weight (``...o_proj.weight`` -> ``...o_proj.bias``)::

    x --MatMul(Transpose(W))--> y           becomes     x --MatMul(Transpose(W'))--Add(b')--> y

The file is an .npz with ``weight.<initializer name>`` [out, in], optionally
``bias.<initializer name>`` [out], and ``meta`` (JSON, ``"format": "pangu-light-projections/1"``);
``save_projections`` writes it. Every entry is checked before anything changes: a name that is
no initializer, an initializer that is no projection weight, a weight that something besides its
projection reads (a tied weight), or a shape that differs from the graph's is a PanguLightError
naming the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write
from pangu_light.passes.analysis.graph_utils import replace_initializer
from pangu_light.passes.analysis.model_map import Linear, ModelMap
from pangu_light.passes.infra.base import Option, PanguPass

__all__ = ["PROJECTIONS_FORMAT", "Projection", "SetProjectionPass", "load_projections", "save_projections"]

PROJECTIONS_FORMAT = "pangu-light-projections/1"

Projection = tuple[np.ndarray, "np.ndarray | None"]  # (weight [out, in], bias [out] or None)


def save_projections(path: str | os.PathLike, projections: dict[str, Projection], meta: dict | None = None) -> None:
    """Write ``{weight initializer name: (weight, bias or None)}`` as a projection file (atomically)."""
    arrays = {"meta": np.array(json.dumps({"format": PROJECTIONS_FORMAT, **(meta or {})}))}
    for name, (weight, bias) in projections.items():
        arrays[f"weight.{name}"] = np.asarray(weight, dtype=np.float32)
        if bias is not None:
            arrays[f"bias.{name}"] = np.asarray(bias, dtype=np.float32)
    with atomic_write(path, suffix=".npz") as temporary:
        np.savez(temporary, **arrays)


def load_projections(path: str | os.PathLike, pass_name: str = "set-projection") -> dict[str, Projection]:
    path = Path(path)
    if not path.is_file():
        raise PanguLightError(f"pass {pass_name}: cannot read the projection file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != PROJECTIONS_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {PROJECTIONS_FORMAT!r}")
            names = [key[len("weight."):] for key in data.files if key.startswith("weight.")]
            stray = [key for key in data.files if key.startswith("bias.") and key[len("bias."):] not in names]
            if stray:
                raise ValueError(f"{stray[0]} has no weight.{stray[0][len('bias.'):]}")
            return {n: (data[f"weight.{n}"], data[f"bias.{n}"] if f"bias.{n}" in data.files else None) for n in names}
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise PanguLightError(
            f"pass {pass_name}: {path} is not a projection file written by pangu-light ({error})"
        ) from None


class SetProjectionPass(PanguPass):
    name = "set-projection"
    options_schema = {
        "file": Option(str, doc="projection file (.npz): new weights and biases by weight initializer name"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        projections = load_projections(self.options["file"], self.name)
        if not projections:
            return ir.passes.PassResult(model, modified=False)
        linears = _projections_by_weight(ModelMap.from_model(model))
        checked = [(self._check(model, linears, name, w, b), w, b) for name, (w, b) in projections.items()]
        for linear, weight, bias in checked:
            replace_initializer(linear.weight, weight)
            self.tag(linear.weight)
            self.count("weights_set")
            if bias is None:
                continue
            if linear.bias is not None:
                replace_initializer(linear.bias, bias)
                self.tag(linear.bias)
            else:
                self._add_bias(model, linear, bias)
            self.count("biases_set")
        return ir.passes.PassResult(model, modified=True)

    def _check(self, model: ir.Model, linears: dict[str, Linear], name: str, weight, bias) -> Linear:
        where = f"pass {self.name}: {name}"
        if name not in model.graph.initializers:
            raise PanguLightError(f"{where}: the graph has no initializer of that name; write the file for this graph")
        linear = linears.get(name)
        if linear is None:
            raise PanguLightError(f"{where} is not the weight of a projection (Linear) of a decoder layer or lm_head")
        readers = [use.node for use in linear.weight.uses()]
        if readers != [linear.transpose]:
            raise PanguLightError(
                f"{where} is also read outside {linear.module or 'its projection'} (a tied weight); "
                "setting it would change those readers too"
            )
        expected = tuple(linear.weight.shape)
        if tuple(weight.shape) != expected:
            raise PanguLightError(f"{where}: the file gives shape {list(weight.shape)}, the graph has {list(expected)}")
        if bias is not None:
            if tuple(bias.shape) != (expected[0],):
                raise PanguLightError(
                    f"{where}: the file's bias has shape {list(bias.shape)}, the projection has {expected[0]} outputs"
                )
            if linear.bias is not None and [u.node for u in linear.bias.uses()] != [linear.bias_add]:
                raise PanguLightError(f"{where}: its bias {linear.bias.name} is also read elsewhere; untie it first")
            if linear.bias is None and linear.matmul.outputs[0] in model.graph.outputs:
                raise PanguLightError(f"{where}: its product is a graph output; a bias cannot be added after it")
        for array, what in ((weight, "weight"), (bias, "bias")):
            if array is not None and not np.isfinite(array).all():
                raise PanguLightError(f"{where}: the file's {what} holds NaN or infinity")
        return linear

    def _add_bias(self, model: ir.Model, linear: Linear, bias: np.ndarray) -> None:
        graph = model.graph
        stem = linear.weight.name[: -len(".weight")] if linear.weight.name.endswith(".weight") else linear.weight.name
        name = f"{stem}.bias"
        while name in graph.initializers:
            name += "_"
        array = bias.astype(linear.weight.const_value.dtype.numpy())
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(array.shape), linear.weight.dtype
        graph.register_initializer(value)
        product = linear.matmul.outputs[0]
        readers = list(product.uses())
        add = ir.node("Add", [product, value], name=f"{linear.matmul.name or stem}_bias")
        scopes = linear.matmul.metadata_props.get(contract.TORCH_NAME_SCOPES)
        if scopes is not None:
            add.metadata_props[contract.TORCH_NAME_SCOPES] = scopes
        result = add.outputs[0]
        result.name, result.dtype, result.shape = f"{product.name}_biased", product.dtype, product.shape
        for use in readers:
            use.node.replace_input_with(use.idx, result)
        graph.insert_after(linear.matmul, add)
        for item in (value, add):
            self.tag(item)


def _projections_by_weight(model_map: ModelMap) -> dict[str, Linear]:
    linears = [model_map.lm_head]
    for layer in model_map.layers:
        attention, ffn = layer.attention, layer.ffn
        linears += [attention.q, attention.k, attention.v, attention.o, ffn.gate, ffn.up, ffn.down]
    return {linear.weight.name: linear for linear in linears}
