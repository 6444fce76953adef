"""Weight surgery shared by the width passes (prune-heads, prune-kv-groups, prune-ffn).

Query head h of an attention with head_dim d owns rows ``h*d .. h*d+d-1`` of q_proj (and
of its bias) and the same columns of o_proj; KV group g owns the same rows of k_proj and
v_proj. Removing a head or neuron is taking the kept rows of the producing Linear and the
kept columns of the consuming one::

    x --q_proj[rows(kept)]--> ... attention ... --o_proj[:, rows(kept)]--> y
    x --gate/up[kept]--> act(gate) * up --down[:, kept]--> y

Head counts live in the GQA shape constants (ModelMap ``head_count_constants``) and, for
GLM4's interleaved rotary embedding (``stack(-x2, x1).flatten(-2)``), in the Reshape that
flattens each rotated half back to ``[b, heads, s, d_rot]`` (see ``all_head_count_constants``);
in decode graphs the KV group count is also dim 1 of ``past_key_values.{i}.*`` and
``present.{i}.*``.

After any width change, intermediate shapes recorded by the exporter are stale and are
cleared (ORT rejects a graph whose recorded shapes contradict its weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis import patterns
from pangu_light.passes.analysis.graph_utils import exclusive, in_scope, replace_initializer
from pangu_light.passes.analysis.model_map import Attention, HeadCountConstant, Linear, ModelMap
from pangu_light.passes.infra.base import PanguPass, check_indices
from pangu_light.passes.infra.plan import PrunePlan

__all__ = [
    "all_head_count_constants",
    "check_keep_lists",
    "check_private",
    "clear_intermediate_shapes",
    "head_rows",
    "per_layer",
    "set_head_count",
    "set_kv_heads_in_io",
    "take_columns",
    "take_rows",
]


def all_head_count_constants(attention: Attention) -> list[HeadCountConstant]:
    """The map's GQA constants plus head counts the map does not record: a heads-first view
    (``patterns.HEADS_FIRST_VIEW``) on the q (k) path inside the layer, whose Concat holds the
    query (KV) head count as a constant at position 1 (GLM4's interleaved rotary flatten,
    ``[b, heads, s, d_rot]``). The q/k views before that are ``[b, s, -1, d]``: position 1
    is the sequence length there, never a constant."""
    known = {(c.concat, c.index) for c in attention.head_count_constants}
    found = list(attention.head_count_constants)
    for start, what, count in ((attention.q.output, "heads", attention.num_heads),
                               (attention.k.output, "kv_heads", attention.num_kv_heads)):
        for node in _path_to_scores(start, attention.module):
            view = patterns.match(patterns.HEADS_FIRST_VIEW, node.outputs[0]) if node.op_type == "Reshape" else None
            if view is None or (view["shape"], 1) in known or int(patterns.scalar(view["heads"])) != count:
                continue
            found.append(HeadCountConstant(view["shape"], 1, what))
            known.add((view["shape"], 1))
    return found


def _path_to_scores(value: ir.Value, layer_scope: str) -> list[ir.Node]:
    """Nodes of the layer reachable forward from a q/k projection output up to (not past) the
    attention MatMul; shape reads (Shape) are not followed: they lead to masks, not head axes."""
    seen: dict[ir.Node, None] = {}  # insertion-ordered set
    frontier = [value]
    while frontier:
        next_frontier = []
        for v in frontier:
            for node in v.consumers():
                if node in seen or not in_scope(node, layer_scope):
                    continue
                seen[node] = None
                if node.op_type not in ("MatMul", "Shape"):
                    next_frontier.extend(node.outputs)
        frontier = next_frontier
    return list(seen)


def check_keep_lists(
    pass_name: str, keep: Sequence[Sequence[int]], model_map: ModelMap, sizes: Sequence[int], what: str
) -> list[list[int]]:
    """Validate one keep list per layer against ``sizes`` (the current count per layer) and
    return them sorted; ``what`` names one item ("query head"). Every problem is a
    PanguLightError naming the layer and the fix."""
    layers = len(model_map.layers)
    if len(keep) != layers:
        raise PanguLightError(
            f"pass {pass_name}: keep has {len(keep)} entries but the model has {layers} layers; "
            f"give one list of kept {what}s per layer (list all of them to keep a layer whole)"
        )
    result = []
    for index, (kept, size) in enumerate(zip(keep, sizes)):
        if not kept:
            raise PanguLightError(
                f"pass {pass_name}: layer {index} keeps no {what}s; keep at least one "
                "(remove whole layers with drop-layers)"
            )
        check_indices(
            kept, size,
            out_of_range=lambda i: f"pass {pass_name}: layer {index}: {what} {i} does not exist; "
            f"the layer has {size} (0..{size - 1})",
            repeated=lambda i: f"pass {pass_name}: layer {index} names {what} {i} twice",
        )
        result.append(sorted(kept))
    return result


def resolve_keep_lists(
    pass_name: str,
    model: ir.Model,
    model_map: ModelMap,
    sizes: Sequence[int],
    what: str,
    *,
    keep: Sequence[Sequence[int]] | None,
    plan: bool,
    from_plan: Callable[[PrunePlan], list[list[int]]],
    choices: str,
    shortcut: tuple[int | None, Callable[[], list[list[int]]]] | None = None,
) -> list[list[int]]:
    """The per-layer keep lists of a width pass given exactly one of its options: ``keep``
    (the lists), ``plan`` (``from_plan`` reads them from the graph's plan) or, where the pass
    has one, a shortcut option (its value and the function building the lists from it).
    ``choices`` lists the options for the error; the lists are checked by check_keep_lists."""
    given = [keep is not None, plan] + ([shortcut[0] is not None] if shortcut is not None else [])
    if sum(given) != 1:
        raise PanguLightError(f"pass {pass_name}: give exactly one of {choices}")
    if shortcut is not None and shortcut[0] is not None:
        keep = shortcut[1]()
    elif plan:
        keep = from_plan(PrunePlan.from_model(model, pass_name))
    return check_keep_lists(pass_name, keep, model_map, sizes, what)


def per_layer(values: Sequence[int]) -> str:
    """Per-layer counts for a report: ``4`` when all layers agree, else ``4/2/4/2``."""
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def head_rows(heads: Sequence[int], head_dim: int) -> np.ndarray:
    """The rows (of q/k/v, or columns of o_proj) that belong to ``heads``, in order."""
    return (np.asarray(heads, dtype=np.int64)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def check_private(pass_name: str, *linears: Linear) -> None:
    """Refuse (before any edit) to resize a weight that something besides its Linear reads."""
    for linear in linears:
        _check_private(pass_name, linear)


def _check_private(pass_name: str, linear: Linear) -> None:
    if not exclusive(linear.weight, [linear.transpose]):
        raise PanguLightError(
            f"pass {pass_name}: {linear.weight.name} is also read outside {linear.module or 'its projection'}; "
            "removing its rows would change those readers too (untie the weight before pruning)"
        )


def take_rows(pass_: PanguPass, linear: Linear, rows: np.ndarray) -> None:
    """Keep output features ``rows`` of ``linear``: weight rows and bias entries."""
    _check_private(pass_.name, linear)
    replace_initializer(linear.weight, np.take(linear.weight.const_value.numpy(), rows, axis=0))
    pass_.tag(linear.weight)
    pass_.count("initializers_sliced")
    if linear.bias is not None:
        replace_initializer(linear.bias, np.take(linear.bias.const_value.numpy(), rows, axis=0))
        pass_.tag(linear.bias)
        pass_.count("initializers_sliced")


def take_columns(pass_: PanguPass, linear: Linear, columns: np.ndarray) -> None:
    """Keep input features ``columns`` of ``linear`` (its bias is over outputs: untouched)."""
    _check_private(pass_.name, linear)
    replace_initializer(linear.weight, np.take(linear.weight.const_value.numpy(), columns, axis=1))
    pass_.tag(linear.weight)
    pass_.count("initializers_sliced")


def set_head_count(pass_: PanguPass, model: ir.Model, constant: HeadCountConstant, count: int) -> None:
    """Write ``count`` into one GQA shape constant. A constant that something else also reads
    (or that is not an initializer) is left alone: the Concat gets a new initializer."""
    value = constant.value
    array = np.full_like(value.const_value.numpy(), count)
    graph = model.graph
    private = value.name in graph.initializers and len(value.uses()) == 1
    if private:
        replace_initializer(value, array)
    else:
        name = f"{constant.concat.name or 'concat'}_{constant.what}"
        while name in graph.initializers:
            name += "_"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
        graph.register_initializer(value)
        constant.concat.replace_input_with(constant.index, value)
        pass_.tag(constant.concat)
    pass_.tag(value)
    pass_.count("head_count_constants")


def set_kv_heads_in_io(pass_: PanguPass, attention: Attention, count: int) -> None:
    """Decode graphs: dim 1 of this layer's past/present key and value is the KV head count."""
    for value in (attention.past_key, attention.past_value, attention.present_key, attention.present_value):
        if value is None or value.shape is None:
            continue
        dims = list(value.shape.dims)
        dims[1] = count
        value.shape = ir.Shape(dims)
        pass_.tag(value)
        pass_.count("kv_io_retyped")


def clear_intermediate_shapes(model: ir.Model) -> None:
    """Forget the shapes of every value that is not a graph input, output or initializer."""
    graph = model.graph
    boundary = set(graph.inputs) | set(graph.outputs) | set(graph.initializers.values())
    for node in graph:
        for value in node.outputs:
            if value not in boundary:
                value.shape = None
