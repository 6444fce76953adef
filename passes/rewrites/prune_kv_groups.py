"""prune-kv-groups: remove whole KV groups (a K/V head and the query heads that share it).

With n_rep query heads per group, group g is K/V head g and query heads g*n_rep ..
g*n_rep+n_rep-1. No other head reads K/V head g, so removing the group is removing
k_proj and v_proj rows g*d..g*d+d-1 (and bias entries), the q_proj rows and o_proj columns
of its query heads (see prune-heads), and lowering the head counts::

    x -> k_proj/v_proj[kept rows] -> view(-1, d) -> [k_norm(d)] -> rope -> (Concat past) -+
           Unsqueeze -> Expand[b, n_kv', n_rep, t, d] -> Reshape[b, n_kv'*n_rep, t, d] <---+
    x -> q_proj[kept heads' rows] ------------------------------------> attn -> o_proj[:, kept]

The shape constants "kv_heads" and "heads" change; in decode graphs so does dim 1 of the
layer's ``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs.
This is also the attention half of CLAP (paper 3.2.1), whose choice of groups is the plan's.
"""

from __future__ import annotations

import onnx_ir as ir

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
    set_kv_heads_in_io,
    take_columns,
    take_rows,
)

__all__ = ["PruneKVGroupsPass"]


class PruneKVGroupsPass(PanguPass):
    name = "prune-kv-groups"
    options_schema = {
        "keep": Option(list[list[int]], default=None, doc="per layer, the KV groups to keep"),
        "plan": Option(bool, default=False, doc="keep the KV groups of the plan recorded in the graph"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        keep = self._kept_groups(model, model_map)
        changing = [(layer.attention, kept) for layer, kept in zip(model_map.layers, keep)
                    if len(kept) < layer.attention.num_kv_heads]
        if not changing:
            return ir.passes.PassResult(model, modified=False)
        before = [layer.attention.num_kv_heads for layer in model_map.layers]
        for attention, _ in changing:
            check_private(self.name, attention.q, attention.k, attention.v, attention.o)
        for attention, kept in changing:
            rep = attention.num_heads // attention.num_kv_heads
            kv_rows = head_rows(kept, attention.head_dim)
            query_rows = head_rows([g * rep + r for g in kept for r in range(rep)], attention.head_dim)
            take_rows(self, attention.k, kv_rows)
            take_rows(self, attention.v, kv_rows)
            take_rows(self, attention.q, query_rows)
            take_columns(self, attention.o, query_rows)
            for constant in all_head_count_constants(attention):
                if constant.what == "kv_heads":
                    set_head_count(self, model, constant, len(kept))
                elif constant.what == "heads":
                    set_head_count(self, model, constant, len(kept) * rep)
            set_kv_heads_in_io(self, attention, len(kept))
            self.count("kv_groups_removed", attention.num_kv_heads - len(kept))
            self.count("heads_removed", (attention.num_kv_heads - len(kept)) * rep)
        clear_intermediate_shapes(model)
        after = [len(k) for k in keep]
        self.stats["kv_groups"] = f"{per_layer(before)}->{per_layer(after)}"
        return ir.passes.PassResult(model, modified=True)

    def _kept_groups(self, model: ir.Model, model_map: ModelMap) -> list[list[int]]:
        return resolve_keep_lists(
            self.name, model, model_map, [layer.attention.num_kv_heads for layer in model_map.layers], "KV group",
            keep=self.options["keep"], plan=self.options["plan"],
            from_plan=lambda plan: plan.kept_kv_groups(model_map, self.name),
            choices="keep=[[...], ...] (KV groups per layer) or plan=true",
        )
