"""The projection file for a compiled graph: every pruned o_proj / down_proj refit from the
ORIGINAL graph's Gram statistics (``calib.gram``) and weights, by the plan's kept indices.

For compiled layer c (original layer l: recorded by drop-layers in ``LAYER_ORIGINS``, else the
plan's c-th kept layer) and each projection whose inputs the plan pruned (o_proj: the kept query
heads' rows, d per head; down_proj: the kept neurons), with H the plan's kept hidden channels::

    W = original weight^T [in, out]       target   x W[:, H]  (+ b0[H] when it had a bias b0)
    method "refit":  W', b' = calib.refit.refit_projection(G_l, s_l, N, K, W[:, H], ridge, intercept)
    method "bias":   W', b' = calib.refit.bias_compensation(s_l, N, K, W[:, H])
    file entry   weight = W'^T [|H|, |K|]  (the compiled initializer's layout, its name),
                 bias   = b0[H] + b'  (None when neither exists)

The compiled graph is read only for names and shapes, and to check that its projection still
holds exactly W[K][:, H]^T, i.e. that only prune/slice passes touched it. A projection that
another pass rewrote is left as it is and reported in ``skipped``: CLAP receivers (their o_proj
reads merged heads of several layers, whose one-shot targets the original Gram cannot give; given
``receivers``, the moments of ``calib.clap_refit``'s probe graph, they are refit from those) and
post-norm absorption (sandwich families; it scales o_proj/down_proj rows by gamma * s_inv, so a
refit would have to be done before it: refit the graph without absorption, or absorb after).
Sandwich families without absorption (Gemma2/3, GLM4) refit as the others: the post-norm reads
the projection's output, which the refit reproduces.

With a rotate plan (``rotate-hidden``: outputs are the leading k components of a basis Q, not
channels), pass ``rotation`` = the [H, k] columns the pass used (``rotate_hidden.effective_basis``):
the targets are then x W Q_k (and b0 Q_k), compiled weights are checked against Q_k^T W_K to float32
rounding. The least squares is linear in its targets, so this equals refitting first and rotating
after: W'_rot = W' Q_k.

``fluctuation_ranking`` feeds the planner FLAP's metric instead of S_head / S_ffn (per axis).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pangu_light.calib.clap_refit import ReceiverMoments, refit_receiver
from pangu_light.calib.gram import GramStats
from pangu_light.calib.refit import (
    DEFAULT_RIDGE,
    Refit,
    bias_compensation,
    fluctuation,
    head_fluctuation,
    refit_projection,
)
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.core.records import layer_origins
from pangu_light.passes.analysis.model_map import Linear, ModelMap
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.rewrites.set_projection import Projection, SetProjectionPass, save_projections

__all__ = ["METHODS", "ProjectionRefits", "fluctuation_ranking", "refit_and_set", "refit_for_plan"]

METHODS = ("refit", "bias")


@dataclasses.dataclass
class ProjectionRefits:
    projections: dict[str, Projection]  # compiled weight initializer name -> (weight [out, in], bias)
    refit: list[str]  # "layer <compiled>: o" entries written
    skipped: list[str]  # "<weight name>: why" for pruned projections left as they are

    def meta(self) -> dict:
        return {"refit": self.refit, "skipped": self.skipped}


def refit_for_plan(
    original: ir.Model,
    compiled: ir.Model,
    grams: GramStats,
    plan: PrunePlan,
    *,
    method: str = "refit",
    ridge: float = DEFAULT_RIDGE,
    intercept: bool = False,
    rotation: np.ndarray | None = None,
    receivers: ReceiverMoments | None = None,
    receiver_target: str = "next",
) -> ProjectionRefits:
    """New o_proj/down_proj weights (and biases) for ``compiled`` = ``original`` pruned by ``plan``.

    ``receivers`` (``calib.clap_refit``): the CLAP receivers' o_proj are refit too, over their
    merged heads, toward ``receiver_target`` ("own", "next" or "span"; sandwich families always
    "own"); without them, or after post-norm absorption, they are skipped.

    No intercept by default: on SmolLM2-135M at the 0.62 shape it measured slightly better
    (benchmarks/refit_quality.py: LAMBADA 848 vs 888, wiki 417 vs 423)."""
    if method not in METHODS:
        raise PanguLightError(f"unknown refit method {method!r}; use one of {', '.join(METHODS)}")
    source, target = ModelMap.from_model(original), ModelMap.from_model(compiled)
    if grams.num_layers != len(source.layers) or len(plan.shapes) != len(source.layers):
        raise PanguLightError(
            f"the Gram file has {grams.num_layers} layers, the plan {len(plan.shapes)}, the original graph "
            f"{len(source.layers)}: they must describe the same model"
        )
    origins = _origins(compiled, plan, len(source.layers), len(target.layers))
    if len(origins) != len(target.layers):
        raise PanguLightError(f"the compiled graph has {len(target.layers)} layers but records {len(origins)} origins")
    hidden = _Outputs(plan, rotation, source.hidden_size)
    result = ProjectionRefits({}, [], [])
    for position, (layer, index) in enumerate(zip(target.layers, origins)):
        head_dim = source.layers[index].attention.head_dim
        heads = np.asarray(sorted(plan.layers[index].heads), dtype=np.int64)
        kept = {
            "o": (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1),
            "down": np.asarray(sorted(plan.layers[index].ffn), dtype=np.int64),
        }
        pairs = {
            "o": (source.layers[index].attention.o, layer.attention.o),
            "down": (source.layers[index].ffn.down, layer.ffn.down),
        }
        if receivers is not None and index in receivers.foreign and not plan.absorb_post_norms:
            # A post-norm reads each layer's o_proj output before the residual Add: another layer's
            # raw o_proj output is not what it added, so sandwich families fit the receiver's own.
            target = "own" if "post_attn" in source.layers[index].norms else receiver_target
            weights = {layer: hidden.take(source.layers[layer].attention.o.matmul_weight())
                       for layer in [index, *receivers.cross[index]]}
            fit = refit_receiver(receivers, plan, index, weights, head_dim, target=target, ridge=ridge)
            before = pairs.pop("o")[0]
            result.projections[layer.attention.o.weight.name] = (fit.T, _bias(before, Refit(fit, None), hidden))
            result.refit.append(f"layer {position}: o (CLAP receiver, target {target})")
        for proj, (before, after) in pairs.items():
            if len(kept[proj]) == before.in_features:
                continue  # no input removed: nothing to refit
            why = _rewritten(before, after, kept[proj], hidden)
            if why:
                result.skipped.append(f"{after.weight.name}: {why}")
                continue
            weight = hidden.take(before.matmul_weight())
            if method == "refit":
                fit = refit_projection(grams.gram[proj][index], grams.sum[proj][index], grams.tokens, kept[proj],
                                       weight, ridge=ridge, intercept=intercept)
            else:
                fit = bias_compensation(grams.sum[proj][index], grams.tokens, kept[proj], weight)
            result.projections[after.weight.name] = (fit.weight.T, _bias(before, fit, hidden))
            result.refit.append(f"layer {position}: {proj}")
    return result


def refit_and_set(
    original: ir.Model, compiled: ir.Model, grams: GramStats, plan: PrunePlan, *, rotation=None,
    save_to: str | os.PathLike | None = None, **options,
) -> ProjectionRefits:
    """``refit_for_plan`` (``options``: its keywords) in the basis the plan cut the hidden size in,
    and the new projections set on ``compiled`` in place by the ``set-projection`` pass, as
    ``prune`` does. A plan that rotates the hidden size needs the ``rotation`` it was planned with.
    ``save_to``: keep the projection file there (``prune``'s refit.npz; else a temporary one)."""
    import tempfile

    from pangu_light.passes.rewrites.rotate_hidden import effective_basis

    basis = None
    if plan.hidden_method == "rotate" and len(plan.hidden) < plan.hidden_size:
        if rotation is None:
            raise PanguLightError(
                "the refit of a plan that rotates the hidden size needs the rotation it was planned with"
            )
        basis = effective_basis(rotation.basis, ModelMap.from_model(original), len(plan.hidden))
    refits = refit_for_plan(original, compiled, grams, plan, rotation=basis, **options)
    if not refits.projections:
        return refits
    if save_to is not None:
        save_projections(save_to, refits.projections, refits.meta())
        SetProjectionPass({"file": str(Path(save_to).resolve())})(compiled)
        return refits
    with tempfile.TemporaryDirectory(prefix="pangu-refit-") as scratch:
        path = Path(scratch) / "refit.npz"
        save_projections(path, refits.projections, refits.meta())
        SetProjectionPass({"file": str(path)})(compiled)
    return refits


def fluctuation_ranking(
    stats: CalibrationStats, grams: GramStats, model_map: ModelMap, *, heads: bool = True, ffn: bool = False
) -> CalibrationStats:
    """``stats`` with S_head (``heads``) and/or S_ffn (``ffn``) replaced by FLAP's fluctuation
    metric of the original graph ``model_map`` (the planner ranks by whatever the fields hold)."""
    if grams.num_layers != len(model_map.layers):
        raise PanguLightError(f"the Gram file has {grams.num_layers} layers, the graph {len(model_map.layers)}")
    replaced = {}
    if heads:
        replaced["heads"] = [
            head_fluctuation(_fluctuation(grams, "o", index, layer.attention.o), layer.attention.head_dim)
            for index, layer in enumerate(model_map.layers)
        ]
    if ffn:
        replaced["ffn"] = [
            _fluctuation(grams, "down", index, layer.ffn.down) for index, layer in enumerate(model_map.layers)
        ]
    return dataclasses.replace(stats, **replaced)


def _fluctuation(grams: GramStats, proj: str, index: int, linear: Linear) -> np.ndarray:
    weight = linear.matmul_weight()
    return fluctuation(grams.gram[proj][index], grams.sum[proj][index], grams.tokens, weight)


def _origins(compiled: ir.Model, plan: PrunePlan, before: int, after: int) -> list[int]:
    """The original index of each compiled layer: recorded by drop-layers, else by the plan."""
    recorded = layer_origins(compiled.metadata_props)
    if recorded is not None:
        return recorded
    if after == before:
        return list(range(after))
    return [i for i in range(before) if i not in set(plan.drop_layers)]


class _Outputs:
    """The plan's hidden outputs: kept channels (select) or the leading components of a rotation."""

    def __init__(self, plan: PrunePlan, rotation: np.ndarray | None, hidden_size: int):
        self.rotation = None if rotation is None else np.asarray(rotation, dtype=np.float64)
        self.channels = np.asarray(sorted(plan.hidden), dtype=np.int64)
        if (plan.hidden_method == "rotate") != (rotation is not None):
            raise PanguLightError(
                f"the plan keeps hidden channels by {plan.hidden_method!r}: give the rotation (its [H, k] basis) "
                "exactly when the plan rotates"
            )
        if self.rotation is not None and self.rotation.shape != (hidden_size, len(plan.hidden)):
            raise PanguLightError(
                f"the rotation is {list(self.rotation.shape)}, the plan keeps {len(plan.hidden)} of {hidden_size}"
            )

    def take(self, array: np.ndarray) -> np.ndarray:
        """``array``'s last (hidden) axis mapped to the plan's outputs."""
        return array[..., self.channels] if self.rotation is None else array @ self.rotation

    def same(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        if self.rotation is None:
            return np.array_equal(actual, expected)
        scale = float(np.abs(expected).max(initial=0.0))
        return bool(np.allclose(actual, expected, rtol=0.0, atol=1e-5 * scale + 1e-30))


def _rewritten(before: Linear, after: Linear, kept: np.ndarray, hidden: _Outputs) -> str:
    """Why ``after`` is not ``before`` with inputs ``kept`` and outputs ``hidden`` taken ('' if it is)."""
    expected = hidden.take(before.weight.const_value.numpy().astype(np.float64)[:, kept].T).T
    actual = after.weight.const_value.numpy()
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} is not the plan's {list(expected.shape)} (a CLAP merge?)"
    if not hidden.same(actual, expected):
        return "its values were changed by a pass other than pruning (CLAP merge or post-norm absorption)"
    if (before.bias is None) != (after.bias is None):
        return "its bias was added or removed by another pass"
    return ""


def _bias(before: Linear, fit: Refit, hidden: _Outputs) -> np.ndarray | None:
    original = hidden.take(before.bias.const_value.numpy().astype(np.float64)) if before.bias is not None else None
    if fit.bias is None:
        return original
    return fit.bias if original is None else original + fit.bias
