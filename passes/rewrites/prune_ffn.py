"""prune-ffn: keep a subset of each layer's FFN neurons (paper section 3.1, eq. 3 ranks them).

A gated FFN is ``y = sum_m act(x W_gate[m]) (x W_up[m]) W_down[:, m]``: neuron m reads row m
of gate_proj and up_proj and writes column m of down_proj, and nothing else. Keeping
neurons K (per layer; layers may end with different widths)::

    x --gate_proj[K]--> act --+
    x --up_proj[K]----------- * --down_proj[:, K]--> y

GLM4 computes gate and up with one Linear whose rows are [gate; up] stacked, split in two
equal halves by ``Split(num_outputs=2)``: it keeps rows K and I + K (I the current width),
so the halves stay equal. Biases of gate/up lose the same entries; down's bias (over the
hidden size) is untouched. No shape constant encodes the FFN width.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import Option, PanguPass
from pangu_light.passes.surgery.head_surgery import (
    check_private,
    clear_intermediate_shapes,
    per_layer,
    resolve_keep_lists,
    take_columns,
    take_rows,
)

__all__ = ["PruneFFNPass"]


class PruneFFNPass(PanguPass):
    name = "prune-ffn"
    options_schema = {
        "keep": Option(list[list[int]], default=None, doc="per layer, the FFN neurons to keep"),
        "keep_first": Option(int, default=None, doc="keep neurons 0..N-1 in every layer"),
        "plan": Option(bool, default=False, doc="keep the neurons of the plan recorded in the graph"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        keep = self._kept_neurons(model, model_map)
        changing = [(layer, kept) for layer, kept in zip(model_map.layers, keep)
                    if len(kept) < layer.ffn.intermediate_size]
        if not changing:
            return ir.passes.PassResult(model, modified=False)
        before = [layer.ffn.intermediate_size for layer in model_map.layers]
        for layer, _ in changing:
            ffn = layer.ffn
            check_private(self.name, ffn.gate, ffn.up, ffn.down)
            if ffn.fused_gate_up and ffn.gate.out_features != 2 * ffn.intermediate_size:
                raise PanguLightError(
                    f"pass prune-ffn: layer {layer.index}: fused {ffn.gate.module} has {ffn.gate.out_features} "
                    f"rows, expected gate and up stacked (2 x {ffn.intermediate_size})"
                )
        for layer, kept in changing:
            ffn = layer.ffn
            width = ffn.intermediate_size
            neurons = np.asarray(kept, dtype=np.int64)
            if ffn.fused_gate_up:
                take_rows(self, ffn.gate, np.concatenate([neurons, width + neurons]))
            else:
                take_rows(self, ffn.gate, neurons)
                take_rows(self, ffn.up, neurons)
            take_columns(self, ffn.down, neurons)
            self.count("neurons_removed", width - len(kept))
        clear_intermediate_shapes(model)
        self.stats["ffn"] = f"{per_layer(before)}->{per_layer([len(k) for k in keep])}"
        return ir.passes.PassResult(model, modified=True)

    def _kept_neurons(self, model: ir.Model, model_map: ModelMap) -> list[list[int]]:
        keep_first = self.options["keep_first"]
        widths = [layer.ffn.intermediate_size for layer in model_map.layers]

        def first_neurons() -> list[list[int]]:
            if not 0 < keep_first <= min(widths):
                raise PanguLightError(
                    f"pass prune-ffn: keep_first={keep_first} must be between 1 and the FFN width "
                    f"of every layer (the narrowest has {min(widths)})"
                )
            return [list(range(keep_first))] * len(widths)

        return resolve_keep_lists(
            self.name, model, model_map, widths, "FFN neuron",
            keep=self.options["keep"], plan=self.options["plan"],
            from_plan=lambda plan: plan.kept_ffn(model_map, self.name),
            choices="keep=[[...], ...] (neurons per layer), keep_first=N or plan=true",
            shortcut=(keep_first, first_neurons),
        )
