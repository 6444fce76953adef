"""drop-layers: remove whole decoder layers by re-wiring the residual stream around them.

A pre-norm (or sandwich-norm) decoder layer is ``y = x + f(x)``; removing it is ``y = x``::

    h_{l-1} --[layer l]--> h_l --[layer l+1]-->      becomes      h_{l-1} --[layer l+1]-->

Every consumer of the removed layer's output reads its input instead; the layer's nodes and
weights then have no consumers and are deleted. In decode graphs the layer's
``past_key_values.{l}.*`` inputs and ``present.{l}.*`` outputs go too. The layers after a
removed one are renumbered (weights ``model.layers.{i}.*``, name scopes, KV-cache I/O
names), so the result looks like a model exported with fewer layers; the original index of
each kept layer is recorded in the metadata (``contract.LAYER_ORIGINS``, composed over
repeated runs; absent means layer i is the original layer i).

Which layers: ``layers=[...]``, or ``plan=true`` for the plan's ``drop_layers`` (the lowest
Block Influence, eq. 4, ``1 - mean cos(x_l, x_{l+1})``). With a plan made with CLAP (paper
3.2.1, ``passes.surgery.clap_merge``), each removed layer's best KV groups first move into the
kept layer it merges into (the plan's ``clap_merges``, ranked by eq. 5)::

    layer l: groups {(l, 0), (l, 1)}    layer l+1 (removed): {(l+1, 0), (l+1, 1)}
        -> layer l: top-K of the four, e.g. {(l, 1), (l+1, 0)}; layer l+1 re-wired away

``clap=false`` removes the layers plainly (ShortGPT/Minitron style, the ablation), whatever
the plan says; ``clap=true`` merges even if the plan was not made for it (it needs merges).
"""

from __future__ import annotations

import ast
import json
import re

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.records import layer_origins
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import Option, PanguPass, check_indices
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.clap_merge import merge_attention
from pangu_light.passes.surgery.clap_plan import resolve_merges

__all__ = ["DropLayersPass"]



class DropLayersPass(PanguPass):
    name = "drop-layers"
    options_schema = {
        "layers": Option(list[int], default=None, doc="indices of the layers to remove"),
        "plan": Option(bool, default=False, doc="remove the plan's drop_layers (plan recorded in the graph)"),
        "clap": Option(bool, default=None, doc="merge KV groups into the kept neighbour (default: as the plan says)"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        drop, plan = self._validated(model, model_map)
        if not drop:
            return ir.passes.PassResult(model, modified=False)
        if plan is not None:  # CLAP: move the chosen KV groups first, while every layer is there
            merges = resolve_merges(plan, model_map, drop, self.name)
            for into, sources in merges.items():
                merge_attention(self, model, model_map.layer(into), sources)
            if merges:
                # "1<-1.0,3.1": layer 1 now holds group 0 of layer 1 and group 1 of layer 3 (original numbering)
                self.stats["merged"] = " ".join(
                    f"{into}<-" + ",".join(f"{s.original[0]}.{s.original[1]}" for s in sources)
                    for into, sources in merges.items()
                )
        graph = model.graph
        for index in sorted(drop, reverse=True):
            layer = model_map.layer(index)
            attention = layer.attention
            kv_outputs = [v for v in (attention.present_key, attention.present_value) if v is not None]
            for value in kv_outputs:
                graph.outputs.remove(value)
            for consumer in {use.node for use in layer.output.uses()}:
                self.tag(consumer)
            layer.output.replace_all_uses_with(layer.input)
            self.count("layers_removed")
        # Dead nodes first, so that the removed layers' KV inputs have no consumers left.
        common_passes.RemoveUnusedNodesPass()(model)
        kept = next(layer.attention for layer in model_map.layers if layer.index not in drop)
        for index in drop:
            attention = model_map.layer(index).attention
            for value, stand_in in ((attention.past_key, kept.past_key), (attention.past_value, kept.past_value)):
                if value is None:
                    continue
                self._repoint_shape_reads(value, stand_in)
                if value.uses():
                    raise PanguLightError(
                        f"pass drop-layers: {value.name} is still read after removing layer {index}"
                    )
                graph.inputs.remove(value)
        self._renumber(model, model_map, drop)
        _record_origins(model, len(model_map.layers), drop)
        self.stats["removed"] = sorted(drop)
        return ir.passes.PassResult(model, modified=True)

    def _repoint_shape_reads(self, past: ir.Value, stand_in: ir.Value) -> None:
        """The exporter reads the batch and past length off an arbitrary layer's past input;
        point such reads at a kept layer's input, which has the same batch and past length."""
        for use in list(past.uses()):
            node = use.node
            start = node.attributes.get_int("start", 0) if node.op_type == "Shape" else None
            end = node.attributes.get_int("end", None) if node.op_type == "Shape" else None
            reads_only_batch_or_length = start is not None and (
                (end is not None and end <= 1) or start >= 2
            )
            if not reads_only_batch_or_length:
                continue
            node.replace_input_with(use.idx, stand_in)
            self.tag(node)

    def _requested(self, model: ir.Model, model_map: ModelMap) -> tuple[list[int], PrunePlan | None]:
        """The layers to remove, and the plan whose CLAP merges to carry out (None: plain)."""
        layers, from_plan = self.options["layers"], self.options["plan"]
        if (layers is None) == (not from_plan):
            raise PanguLightError("pass drop-layers: give exactly one of layers=[...] or plan=true")
        if not from_plan:
            if self.options["clap"]:
                raise PanguLightError("pass drop-layers: clap=true needs plan=true (the merges come from the plan)")
            return layers, None
        plan = PrunePlan.from_model(model, self.name)
        if len(model_map.layers) != len(plan.shapes):
            raise PanguLightError(
                f"pass drop-layers: the plan is for {len(plan.shapes)} layers but the graph has "
                f"{len(model_map.layers)}; was drop-layers already applied?"
            )
        clap = plan.clap if self.options["clap"] is None else self.options["clap"]
        if clap and not plan.clap and not plan.clap_merges:
            raise PanguLightError(
                "pass drop-layers: clap=true, but the plan records no CLAP merges (it was made without CLAP); "
                "re-plan with `pangu-light plan --clap`, or drop clap=true"
            )
        return list(plan.drop_layers), (plan if clap else None)

    def _validated(self, model: ir.Model, model_map: ModelMap) -> tuple[set[int], PrunePlan | None]:
        requested, plan = self._requested(model, model_map)
        count = len(model_map.layers)
        check_indices(
            requested, count,
            out_of_range=lambda i: f"pass drop-layers: layer index {i} is out of range; "
            f"this model has layers 0..{count - 1}",
            repeated=lambda i: f"pass drop-layers: layers={requested} names a layer twice",
        )
        if len(set(requested)) == count:
            raise PanguLightError(
                f"pass drop-layers: removing all {count} layers leaves no model; keep at least one"
            )
        return set(requested), plan

    def _renumber(self, model: ir.Model, model_map: ModelMap, drop: set[int]) -> None:
        """Give the kept layers consecutive indices: weights, name scopes and KV I/O names."""
        new_index = {}
        for layer in model_map.layers:
            if layer.index not in drop:
                new_index[layer.index] = len(new_index)
        renames = {
            model_map.layer(old).module: _with_index(model_map.layer(old).module, new)
            for old, new in new_index.items()
            if old != new
        }
        if not renames:
            return
        graph = model.graph
        # Rename in increasing order: a slot is always vacated before it is reused.
        for old_module, new_module in renames.items():
            for value in list(graph.initializers.values()):
                if value.name.startswith(old_module + "."):
                    graph.initializers.pop(value.name)
                    value.name = new_module + value.name[len(old_module):]
                    graph.register_initializer(value)
                    self.tag(value)
                    self.count("initializers_renamed")
        pattern = re.compile(r"^(" + "|".join(re.escape(m) for m in renames) + r")(?=\.|$)")
        for node in graph:
            raw = node.metadata_props.get(contract.TORCH_NAME_SCOPES)
            if not raw:
                continue
            scopes = ast.literal_eval(raw)
            if any(pattern.match(s) for s in scopes):
                renamed = [pattern.sub(lambda m: renames[m.group(1)], s) for s in scopes]
                node.metadata_props[contract.TORCH_NAME_SCOPES] = repr(renamed)
        for old, new in new_index.items():
            attention = model_map.layer(old).attention
            names = (contract.past_key, contract.past_value, contract.present_key, contract.present_value)
            values = (attention.past_key, attention.past_value, attention.present_key, attention.present_value)
            for name, value in zip(names, values):
                if value is not None and old != new:
                    value.name = name(new)
                    self.tag(value)


def _record_origins(model: ir.Model, count: int, drop: set[int]) -> None:
    """Record the original index of each kept layer, composed with an earlier record."""
    origins = layer_origins(model.metadata_props) or list(range(count))
    kept = [origin for index, origin in enumerate(origins) if index not in drop]
    model.metadata_props[contract.LAYER_ORIGINS] = json.dumps(kept)


def _with_index(module: str, index: int) -> str:
    stack, _, _ = module.rpartition(".")
    return f"{stack}.{index}"
