"""The one-shot refit of a CLAP receiver's o_proj, over the heads merged into it.

CLAP (``passes/surgery/clap_merge.py``) gives receiver r the KV groups of r and of the removed
layers j that merge into it, each with its own layer's q/k/v rows and o_proj columns. The merged
heads of j now read r's input, so ``ctx_j(x_r) W_o_j`` is not what j added to the residual stream,
and the one-shot refit (``calib.refit_plan``) cannot refit the receiver: the original model never
computes ``ctx_j(x_r)``. This module makes it compute them, without changing anything else:

    probe graph = the original, each receiver's attention widened to ALL its own groups and the
                  foreign groups the plan merges into it (all their heads), the foreign o_proj
                  columns set to ZERO:

    x_r --norm_r--> q/k/v [own groups | foreign groups] --attn--> Z_r = [U_r | F_r] --o_proj [W_o_r | 0]--> +x_r

so every residual stream is the original's (both sides of the fit come from the unpruned model, as
for every other refit) and the tap Z_r holds r's own heads U_r (exactly the original's) and the
foreign heads F_r computed on the original x_r. The compiled receiver reads Z_r's columns K (the
plan's kept heads of each merged group). With P the plan's hidden outputs (kept channels or the
rotation's Q_k), the refit is a ridge least squares with the targets' cross moments::

    target "own":   T = U_r W_o_r P                     (the receiver's own attention output)
    target "next":  T = U_r W_o_r P + U_n W_o_n P       (and that of the removed layer next to r, if one merges)
    target "span":  T = U_r W_o_r P + sum_j U_j W_o_j P  (and that of every layer merged into it)

    (G_KK + lambda I) W' = sum_l C_{K,l} W_o_l P,    G = Z_r^T Z_r,  C_l = Z_r^T U_l,
    lambda = ridge * mean(diag G_KK)

U_j is layer j's own o_proj input in the probe (its residual stream is the original's).

Rotate plans fold each layer's pre-norm gamma into that layer's q/k/v before CLAP copies rows, so
the compiled merged heads read x_r's normalised input times gamma_j, not gamma_r; the probe does
the same (foreign q/k/v input columns scaled by gamma_j / gamma_r). Moments are float32 products
per batch (real tokens only), summed in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from pangu_light.calib.refit import DEFAULT_RIDGE, stacked_products
from pangu_light.calib.taps import run_tapped, tap_values
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import replace_initializer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.clap_merge import GroupSource, merge_attention
from pangu_light.passes.surgery.head_surgery import head_rows

__all__ = ["TARGETS", "ReceiverMoments", "collect_receiver_moments", "probe_graph", "receiver_columns",
           "receiver_groups", "receivers_to_refit", "refit_receiver"]

TARGETS = ("own", "next", "span")


@dataclasses.dataclass
class ReceiverMoments:
    """Per receiver r (original numbering): ``gram[r]`` = Z_r^T Z_r and ``cross[r][l]`` = Z_r^T U_l
    for each removed layer l merging into r, whether or not a group of l was chosen (float64 sums
    over ``tokens`` real tokens); ``foreign[r]``: the (layer, group) blocks after r's own heads in
    Z_r, in order."""

    gram: dict[int, np.ndarray]
    cross: dict[int, dict[int, np.ndarray]]
    foreign: dict[int, list[tuple[int, int]]]
    tokens: int


def receiver_groups(plan: PrunePlan) -> dict[int, list[tuple[int, int]]]:
    """{receiver: the plan's merged (layer, group) list} for receivers that take a foreign group."""
    result = {}
    for merge in plan.clap_merges:
        groups = [tuple(g) for g in merge.groups]
        if any(layer != merge.into for layer, _ in groups):
            result[merge.into] = groups
    return result


def receivers_to_refit(plan: PrunePlan) -> bool:
    """Whether the refit takes any CLAP receiver of ``plan``: CLAP on, a foreign group merged, and the
    post-norms not absorbed (absorption rewrote the receivers' o_proj; the refit leaves them)."""
    return bool(plan.clap and not plan.absorb_post_norms and receiver_groups(plan))


class _ProbePass:
    """What ``merge_attention`` needs of a pass: a name, tags and counters (the probe is scratch)."""

    name = "clap-refit-probe"

    def tag(self, value) -> None:
        pass

    def count(self, key: str, amount: int = 1) -> None:
        pass


def probe_graph(
    original: ir.Model, plan: PrunePlan, model_map: ModelMap | None = None
) -> tuple[ir.Model, dict[int, list[tuple[int, int]]]]:
    """The probe above, built in place on ``original`` (pass a copy; ``model_map``: its map, if
    already made); returns it and, per receiver, the foreign (layer, group) blocks of Z_r in order."""
    model_map = model_map or ModelMap.from_model(original)
    rotated = plan.hidden_method == "rotate" and len(plan.hidden) < plan.hidden_size
    foreign_blocks = {}
    for receiver_index, groups in receiver_groups(plan).items():
        receiver = model_map.layers[receiver_index]
        foreign = sorted({g for g in groups if g[0] != receiver_index})
        own = [GroupSource(receiver, g, (receiver_index, g)) for g in range(receiver.attention.num_kv_heads)]
        sources = own + [GroupSource(model_map.layers[layer], group, (layer, group)) for layer, group in foreign]
        saved = _scale_foreign_inputs(receiver, {layer for layer, _ in foreign}, model_map) if rotated else {}
        merge_attention(_ProbePass(), original, receiver, sources)
        for value, weight in saved.items():  # the merge copied the scaled rows; the layers keep theirs
            replace_initializer(value, weight)
        attention = receiver.attention
        own_width = len(own) * (attention.num_heads // attention.num_kv_heads) * attention.head_dim
        weight = attention.o.weight.const_value.numpy().copy()
        weight[:, own_width:] = 0.0
        replace_initializer(attention.o.weight, weight)
        foreign_blocks[receiver_index] = foreign
    return original, foreign_blocks


def _scale_foreign_inputs(receiver, layers: set[int], model_map: ModelMap) -> dict[ir.Value, np.ndarray]:
    """Foreign q/k/v input columns times gamma_j / gamma_r (in place): in a rotate plan the merged
    heads of j read the receiver's normalised input times j's gamma (folded into j's rows before
    the merge). Returns the weights as they were, to put back once the merge has copied them."""
    receiver_gamma = _pre_attention_gamma(receiver)
    saved = {}
    for index in sorted(layers):
        layer = model_map.layers[index]
        ratio = np.divide(_pre_attention_gamma(layer), receiver_gamma, out=np.zeros_like(receiver_gamma),
                          where=np.abs(receiver_gamma) > 1e-12)
        for linear in (layer.attention.q, layer.attention.k, layer.attention.v):
            weight = linear.weight.const_value.numpy()
            saved[linear.weight] = weight
            replace_initializer(linear.weight, (weight * ratio[None, :]).astype(weight.dtype))
    return saved


def _pre_attention_gamma(layer) -> np.ndarray:
    norm = layer.norms["pre_attn"]
    gamma = norm.gamma.const_value.numpy().astype(np.float64)
    return 1.0 + gamma if norm.one_plus_w else gamma


def collect_receiver_moments(
    original: ir.Model,
    plan: PrunePlan,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ReceiverMoments:
    """Build the probe of ``original`` (consumed: pass a copy), run it over (input_ids,
    attention_mask) ``batches`` and add up the moments ``ReceiverMoments`` holds."""
    model_map = ModelMap.from_model(original)
    probe, foreign = probe_graph(original, plan, model_map)
    if not foreign:
        raise PanguLightError("the plan merges no foreign KV group into any layer: there is no CLAP receiver to refit")
    merged = {r: sorted({m.removed for m in plan.clap_merges if m.into == r}) for r in foreign}
    wanted = sorted(set(foreign) | {layer for layers in merged.values() for layer in layers})
    names = tap_values(probe, {f"pangu_light.clap_refit.context.{i}": model_map.layers[i].attention.o.input
                               for i in wanted})
    del model_map
    gram: dict[int, np.ndarray] = {}
    cross: dict[int, dict[int, np.ndarray]] = {r: {} for r in foreign}
    tokens = 0

    def accumulate(outputs: dict[str, np.ndarray], mask: np.ndarray) -> None:
        nonlocal tokens
        real = mask.reshape(-1).astype(bool)
        rows = {i: outputs[name].reshape(real.size, -1)[real] for i, name in zip(wanted, names)}
        for receiver, sources in merged.items():
            parts = stacked_products(rows[receiver], [rows[j] for j in sources])
            gram[receiver] = gram.get(receiver, 0.0) + parts[0]
            for layer, part in zip(sources, parts[1:]):
                cross[receiver][layer] = cross[receiver].get(layer, 0.0) + part
        tokens += int(real.sum())

    run_tapped(probe, batches, names, accumulate, threads=threads, on_batch=on_batch)
    if not tokens:
        raise PanguLightError("no calibration tokens were seen")
    return ReceiverMoments(gram, cross, foreign, tokens)


def receiver_columns(plan: PrunePlan, receiver: int, foreign: list[tuple[int, int]], head_dim: int) -> np.ndarray:
    """The columns of Z_r the compiled receiver's o_proj reads, in its order: for each merged
    (layer, group) of the plan, that layer's kept heads of the group."""
    shape = plan.shapes[receiver]
    per_group = shape.num_heads // shape.num_kv_heads
    own_heads = shape.num_heads
    columns = []
    for layer, group in receiver_groups(plan)[receiver]:
        kept = [h for h in sorted(plan.layers[layer].heads) if h // per_group == group]
        if layer == receiver:
            blocks = kept
        else:
            start = own_heads + foreign.index((layer, group)) * per_group
            blocks = [start + h - group * per_group for h in kept]
        columns.append(head_rows(blocks, head_dim))
    return np.concatenate(columns)


def refit_receiver(
    moments: ReceiverMoments, plan: PrunePlan, receiver: int, weights: dict[int, np.ndarray], head_dim: int,
    *, target: str = "next", ridge: float = DEFAULT_RIDGE,
) -> np.ndarray:
    """W' [|K|, out] (MatMul layout) for ``receiver``'s compiled o_proj; ``weights[l]`` = W_o_l P
    [heads * head_dim, out] of the receiver and of every layer merged into it."""
    if target not in TARGETS:
        raise PanguLightError(f"unknown CLAP refit target {target!r}; use one of {', '.join(TARGETS)}")
    foreign = moments.foreign[receiver]
    kept = receiver_columns(plan, receiver, foreign, head_dim)
    gram = moments.gram[receiver]
    own = weights[receiver].shape[0]
    rhs = gram[kept, :own] @ weights[receiver]
    for layer, cross in moments.cross[receiver].items():
        if target == "span" or (target == "next" and abs(layer - receiver) == 1):
            rhs = rhs + cross[kept] @ weights[layer]
    lhs = gram[np.ix_(kept, kept)].copy()
    lhs[np.diag_indices_from(lhs)] += ridge * float(np.mean(np.diag(lhs)))
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        raise PanguLightError(
            f"the CLAP refit of layer {receiver} is singular (a merged head is zero on every calibration token); "
            "use a ridge above 0"
        ) from None
