"""Corrective refit: each o_proj/down_proj refit again, this time from the inputs the PRUNED graph
feeds it, toward the unpruned layer's output.

The one-shot refit (``calib.refit_plan``) fits ``x_K W' ~ x W`` with both sides taken from the
unpruned model. In the pruned model the projection never sees ``x_K``: every layer before it was
pruned too, so it reads ``x'``. This stage runs the original graph and the pruned graph on the
same calibration tokens and refits every projection the one-shot refit set, to what it really
reads::

    original graph   x_t  [in]   (projection input, layer l = the compiled layer's origin)
    pruned graph     x'_t [in']  (the same projection's input, compiled layer c)

    min_{W''} sum_t || x'_t W'' - x_t W P ||^2 + lambda ||W''||^2
    (G' + lambda I) W'' = X'^T X W P         G' = X'^T X'   lambda = ridge * mean(diag G')

W [in, out] is the original weight (MatMul layout); P maps the original hidden outputs to the
compiled ones: the kept channels, or the leading components Q_k of a rotation (as the one-shot
refit). A bias of the original projection stays as the compiled graph has it (b0 P): it is on
both sides. Cross moments X'^T X come from the two sessions' projection inputs, read out per
batch (real tokens only), multiplied in float32 (one product for both) and added in float64.

All projections are refit at once from one pass (their inputs came from the one-shot refit
graph); ``rounds`` > 1 repeats the pass on the result, a fixed-point iteration toward the
sequential fit. Projections the one-shot refit skipped (CLAP receivers, absorbed post-norms) are
left as they are::

    original  x_l ----------------> o_proj_l (W)  ---> target  x W P
    pruned    x'_c (drifted) -----> o_proj_c (W'') --> fitted  x' W''
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from pangu_light.calib.refit import DEFAULT_RIDGE
from pangu_light.calib.taps import tapped_session
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["CrossMoments", "collect_cross_moments", "corrective_projections", "layer_targets", "tap_projection_inputs"]

PROJECTIONS = ("o", "down")


def tap_projection_inputs(model: ir.Model, model_map: ModelMap) -> dict[tuple[str, int], str]:
    """Make every layer's o_proj and down_proj input a graph output (in place: use a copy);
    returns (projection, layer) -> output name."""
    graph = model.graph
    graph.outputs.clear()
    names = {}
    for layer in model_map.layers:
        for proj, linear in (("o", layer.attention.o), ("down", layer.ffn.down)):
            node = ir.node("Identity", [linear.input])
            graph.append(node)
            node.outputs[0].name = f"pangu_light.input.{proj}.{layer.index}"
            node.outputs[0].dtype = linear.input.dtype
            graph.outputs.append(node.outputs[0])
            names[(proj, layer.index)] = node.outputs[0].name
    return names


Targets = dict[tuple[str, int], list[int]]  # (projection, compiled layer) -> original layers it stands for


def layer_targets(origins: Sequence[int], clap: Sequence = ()) -> Targets:
    """What each compiled projection reproduces: its own original layer's output; a CLAP receiver's
    o_proj also the attention outputs of the layers merged into it (``plan.clap``)."""
    targets: Targets = {}
    for position, origin in enumerate(origins):
        merged = [merge.removed for merge in clap if merge.into == origin]
        targets[("o", position)] = [origin, *merged]
        targets[("down", position)] = [origin]
    return targets


@dataclasses.dataclass
class CrossMoments:
    """float64 sums over real tokens, per (projection, compiled layer) c: ``gram`` X'^T X' and,
    per original layer l it stands for, ``cross[(projection, c, l)]`` = X'^T X_l."""

    gram: dict[tuple[str, int], np.ndarray]
    cross: dict[tuple[str, int, int], np.ndarray]
    tokens: int


def collect_cross_moments(
    original: ir.Model,
    compiled: ir.Model,
    targets: Targets,
    batches,
    *,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> CrossMoments:
    """Run both graphs (copies are tapped; the arguments are consumed) over the same
    (input_ids, attention_mask) batches and add up the moments ``CrossMoments`` holds."""
    source_map, target_map = ModelMap.from_model(original), ModelMap.from_model(compiled)
    if {c for _, c in targets} != set(range(len(target_map.layers))):
        raise PanguLightError(f"the targets name layers {sorted({c for _, c in targets})}, the compiled graph "
                              f"has {len(target_map.layers)}")
    source_names = tap_projection_inputs(original, source_map)
    target_names = tap_projection_inputs(compiled, target_map)
    del source_map, target_map
    gram: dict[tuple[str, int], np.ndarray] = {}
    cross: dict[tuple[str, int, int], np.ndarray] = {}
    tokens = 0
    with tapped_session(original, threads=threads) as source, tapped_session(compiled, threads=threads) as target:
        for input_ids, mask in batches:
            real = mask.reshape(-1).astype(bool)
            before = source.run(list(source_names.values()), input_ids, mask)
            after = target.run(list(target_names.values()), input_ids, mask)
            for (proj, layer), name in target_names.items():
                x_new = after[name].reshape(real.size, -1)[real]
                originals = targets[(proj, layer)]
                x_old = [before[source_names[(proj, l)]].reshape(real.size, -1)[real] for l in originals]
                # One product for all (one rounding path: with nothing pruned, cross == gram exactly).
                both = (x_new.T @ np.concatenate([x_new, *x_old], axis=1)).astype(np.float64)
                parts = np.split(both, np.cumsum([x.shape[1] for x in [x_new, *x_old]])[:-1], axis=1)
                gram[(proj, layer)] = gram.get((proj, layer), 0.0) + parts[0]
                for origin, part in zip(originals, parts[1:]):
                    cross[(proj, layer, origin)] = cross.get((proj, layer, origin), 0.0) + part
            tokens += int(real.sum())
            if on_batch is not None:
                on_batch(int(real.sum()))
    if not tokens:
        raise PanguLightError("no calibration tokens were seen")
    return CrossMoments(gram, cross, tokens)


def corrective_projections(
    original: ir.Model,
    compiled: ir.Model,
    moments: CrossMoments,
    hidden_map: np.ndarray,
    names: set[str],
    *,
    ridge: float = DEFAULT_RIDGE,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """New weights [out, in] (biases unchanged) for the compiled projections named in ``names``:
    the solution above, its target summed over the original layers the moments name. ``hidden_map``
    is P [H, k] (a 0/1 selection or the rotation's Q_k)."""
    source, target = ModelMap.from_model(original), ModelMap.from_model(compiled)
    hidden_map = np.asarray(hidden_map, dtype=np.float64)

    def original_weight(proj: str, layer: int) -> np.ndarray:
        linear = source.layers[layer].attention.o if proj == "o" else source.layers[layer].ffn.down
        return linear.weight.const_value.numpy().astype(np.float64).T @ hidden_map

    result = {}
    for position, layer in enumerate(target.layers):
        for proj, after in (("o", layer.attention.o), ("down", layer.ffn.down)):
            if after.weight.name not in names:
                continue
            gram = moments.gram[(proj, position)]
            rhs = sum(cross @ original_weight(proj, origin)
                      for (p, c, origin), cross in moments.cross.items() if (p, c) == (proj, position))
            lhs = gram.copy()
            lhs[np.diag_indices_from(lhs)] += ridge * float(np.mean(np.diag(gram)))
            bias = None if after.bias is None else after.bias.const_value.numpy()
            result[after.weight.name] = (_solve(lhs, rhs).T, bias)
    return result


def _solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:  # an input that never varies: least squares instead
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]
