"""prune-heads: remove query heads inside their KV groups (paper section 3.1, eq. 2 ranks them).

Attention output is a sum over heads of each head's context times its block of o_proj
columns, ``y = sum_h ctx_h W_o[:, h]``, and head h reads only its own rows of q_proj. So
removing head h is removing q_proj rows (and q bias entries) h*d..h*d+d-1 and the same
o_proj columns; K and V are untouched. Heads are removed inside their KV group, the same
number kept in every group of a layer (layers may differ), so GQA stays regular: the
group's shared K/V are expanded n_rep' = kept per group times::

    x -> q_proj[kept rows] -> view(-1, d) -> [q_norm(d)] -> rope -+
    kv -> Unsqueeze -> Expand[b, n_kv, n_rep', t, d] -> Reshape[b, n_kv*n_rep', t, d] -+-> attn
                                                 -> o_proj[:, kept columns] -> y

The q/k/v views use -1 for the head count, so only the Expand/Reshape constants change
("heads_per_group" and "heads" in the model map). q/k norms act on head_dim: untouched.
"""

from __future__ import annotations

import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import Option, PanguPass
from pangu_light.passes.surgery.head_surgery import (
    all_head_count_constants,
    check_private,
    clear_intermediate_shapes,
    head_rows,
    per_layer,
    resolve_keep_lists,
    set_head_count,
    take_columns,
    take_rows,
)

__all__ = ["PruneHeadsPass"]


class PruneHeadsPass(PanguPass):
    name = "prune-heads"
    options_schema = {
        "keep": Option(list[list[int]], default=None, doc="per layer, the query heads to keep"),
        "per_group": Option(int, default=None, doc="keep the first N query heads of every KV group"),
        "plan": Option(bool, default=False, doc="keep the heads of the plan recorded in the graph"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        keep = self._kept_heads(model, model_map)
        changing = [(layer.attention, kept) for layer, kept in zip(model_map.layers, keep)
                    if len(kept) < layer.attention.num_heads]
        if not changing:
            return ir.passes.PassResult(model, modified=False)
        before = [layer.attention.num_heads for layer in model_map.layers]
        for attention, _ in changing:
            check_private(self.name, attention.q, attention.o)
        for attention, kept in changing:
            rows = head_rows(kept, attention.head_dim)
            take_rows(self, attention.q, rows)
            take_columns(self, attention.o, rows)
            per_group = len(kept) // attention.num_kv_heads
            for constant in all_head_count_constants(attention):
                if constant.what == "heads_per_group":
                    set_head_count(self, model, constant, per_group)
                elif constant.what == "heads":
                    set_head_count(self, model, constant, len(kept))
            self.count("heads_removed", attention.num_heads - len(kept))
        clear_intermediate_shapes(model)
        self.stats["heads"] = f"{per_layer(before)}->{per_layer([len(k) for k in keep])}"
        return ir.passes.PassResult(model, modified=True)

    def _kept_heads(self, model: ir.Model, model_map: ModelMap) -> list[list[int]]:
        per_group = self.options["per_group"]
        attentions = [layer.attention for layer in model_map.layers]

        def first_heads_per_group() -> list[list[int]]:
            keep = []
            for layer, attention in zip(model_map.layers, attentions):
                rep = attention.num_heads // attention.num_kv_heads
                if not 0 < per_group <= rep:
                    raise PanguLightError(
                        f"pass prune-heads: per_group={per_group} must be between 1 and the query heads "
                        f"per KV group; layer {layer.index} has {rep}"
                    )
                keep.append([g * rep + r for g in range(attention.num_kv_heads) for r in range(per_group)])
            return keep

        keep = resolve_keep_lists(
            self.name, model, model_map, [a.num_heads for a in attentions], "query head",
            keep=self.options["keep"], plan=self.options["plan"],
            from_plan=lambda plan: plan.kept_heads(model_map, self.name),
            choices="keep=[[...], ...] (query heads per layer), per_group=N or plan=true",
            shortcut=(per_group, first_heads_per_group),
        )
        for layer, attention, kept in zip(model_map.layers, attentions, keep):
            rep = attention.num_heads // attention.num_kv_heads
            per_group = [0] * attention.num_kv_heads
            for head in kept:
                per_group[head // rep] += 1
            if 0 in per_group:
                raise PanguLightError(
                    f"pass prune-heads: layer {layer.index} keeps no query head of KV group "
                    f"{per_group.index(0)} (heads {per_group.index(0) * rep}..{per_group.index(0) * rep + rep - 1}); "
                    "a group keeps at least one head: remove whole groups with prune-kv-groups"
                )
            if len(set(per_group)) != 1:
                raise PanguLightError(
                    f"pass prune-heads: layer {layer.index} keeps {per_group} query heads in its KV groups; "
                    "every group of a layer must keep the same number, so GQA stays regular"
                )
        return keep

