"""slice-hidden: keep a subset K of the hidden (residual-stream) channels everywhere.

The residual stream h in R^H is read and written only through weights, so restricting it to
channels K is a pure weight edit (paper eq. 1 ranks the channels; this pass takes K)::

    E[V, H]           -> E[:, K]             embedding (and a tied lm_head: the same tensor)
    gamma[H]          -> gamma[K]            every hidden-size RMSNorm (pre, post, final)
    W_in[out, H]      -> W_in[:, K]          q/k/v, gate/up (or fused gate_up), lm_head
    W_out[H, in]      -> W_out[K, :]         o_proj, down_proj (and their biases, if any)

Each RMSNorm then averages over |K| channels instead of H. q/k norms act on head_dim and
are untouched; so are Gemma's embedding scale sqrt(H) (a constant the model was trained
with) and every shape constant (none encodes H). Stale intermediate shapes are cleared,
as ORT rejects graphs whose recorded shapes contradict the new weights.

For SLNP (paper eq. 6, the ``slnp`` pass), every gamma it slices records ||gamma_eff||_2 of
the effective gamma before slicing (``1 + w`` for Gemma's norms), in float64, in the
value's ``metadata_props[contract.GAMMA_L2_BEFORE_SLICE]``: once, so a second slice
keeps the original norm; slicing again also clears slnp's "applied" mark, so slnp then
rescales to the original norm again.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import exclusive, outside_readers, replace_initializer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import Option, PanguPass, check_indices
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.head_surgery import clear_intermediate_shapes

__all__ = ["SliceHiddenPass"]


class SliceHiddenPass(PanguPass):
    name = "slice-hidden"
    options_schema = {
        "keep": Option(list[int], default=None, doc="hidden channel indices to keep"),
        "keep_first": Option(int, default=None, doc="keep channels 0..N-1"),
        "plan": Option(bool, default=False, doc="keep the channels of the plan recorded in the graph"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        keep = self._kept_channels(model, model_map)
        if len(keep) == model_map.hidden_size:
            return ir.passes.PassResult(model, modified=False)
        sliced: set[ir.Value] = set()
        region = _hidden_readers(model_map)

        def take(value: ir.Value | None, axis: int) -> None:
            if value is None or value in sliced:  # a tied lm_head is the embedding: slice once
                return
            array = value.const_value.numpy()
            if array.shape[axis] != model_map.hidden_size:
                raise PanguLightError(
                    f"pass slice-hidden: {value.name} has {array.shape[axis]} channels on axis "
                    f"{axis}, expected the hidden size {model_map.hidden_size}"
                )
            self._check_private(value, region)
            replace_initializer(value, np.take(array, keep, axis=axis))
            sliced.add(value)
            self.tag(value)
            self.count("initializers_sliced")

        take(model_map.embedding, axis=1)
        take(model_map.lm_head.weight, axis=1)
        for norm in model_map.hidden_norms():
            if norm.gamma not in sliced:
                props = norm.gamma.metadata_props
                if contract.GAMMA_L2_BEFORE_SLICE not in props:
                    props[contract.GAMMA_L2_BEFORE_SLICE] = repr(float(np.linalg.norm(norm.effective_gamma())))
                props.pop(contract.SLNP_APPLIED, None)
            take(norm.gamma, axis=0)
        for layer in model_map.layers:
            attention, ffn = layer.attention, layer.ffn
            for linear in (attention.q, attention.k, attention.v, ffn.gate, ffn.up):
                take(linear.weight, axis=1)
            for linear in (attention.o, ffn.down):
                take(linear.weight, axis=0)
                take(linear.bias, axis=0)
        clear_intermediate_shapes(model)
        self.stats["hidden"] = f"{model_map.hidden_size}->{len(keep)}"
        return ir.passes.PassResult(model, modified=True)

    def _kept_channels(self, model: ir.Model, model_map: ModelMap) -> np.ndarray:
        hidden = model_map.hidden_size
        keep, keep_first, plan = self.options["keep"], self.options["keep_first"], self.options["plan"]
        if sum((keep is not None, keep_first is not None, plan)) != 1:
            raise PanguLightError(
                "pass slice-hidden: give exactly one of keep=[...] (channel indices), keep_first=N or plan=true"
            )
        if plan:
            keep = PrunePlan.from_model(model, self.name).kept_hidden(model_map, self.name)
        if keep_first is not None:
            if not 0 < keep_first <= hidden:
                raise PanguLightError(
                    f"pass slice-hidden: keep_first={keep_first} must be between 1 and the hidden size {hidden}"
                )
            keep = list(range(keep_first))
        if not keep:
            raise PanguLightError("pass slice-hidden: keeping 0 channels leaves no model; keep at least one")
        check_indices(
            keep, hidden,
            out_of_range=lambda k: f"pass slice-hidden: channel {k} does not exist; "
            f"the hidden size is {hidden} (channels 0..{hidden - 1})",
            repeated=lambda k: "pass slice-hidden: keep=[...] names a channel twice",
        )
        return np.array(sorted(keep), dtype=np.int64)

    @staticmethod
    def _check_private(value: ir.Value, region: set[ir.Node]) -> None:
        """Refuse to slice a weight that something outside the hidden-size roles also reads."""
        if not exclusive(value, region):
            readers = {node.op_type for node in outside_readers(value, region)}
            raise PanguLightError(
                f"pass slice-hidden: {value.name} is also read by {sorted(readers) or 'the graph'}; "
                "slicing it would change those readers too"
            )


def _hidden_readers(model_map: ModelMap) -> set[ir.Node]:
    """The nodes that read the weights this pass slices: the embedding lookup, every
    projection's Transpose and bias Add, every hidden-size norm's nodes."""
    linears = [model_map.lm_head]
    for layer in model_map.layers:
        attention, ffn = layer.attention, layer.ffn
        linears += [attention.q, attention.k, attention.v, attention.o, ffn.gate, ffn.up, ffn.down]
    region = {model_map.embedding_gather}
    region.update(node for linear in linears for node in (linear.transpose, linear.bias_add) if node is not None)
    region.update(node for norm in model_map.hidden_norms() for node in norm.nodes)
    return region
