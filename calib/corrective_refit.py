"""Corrective refit: each o_proj/down_proj refit again, this time from the inputs the PRUNED graph
feeds it, toward the unpruned layer's output.

The one-shot refit (``calib.refit_plan``) fits ``x_K W' ~ x W`` with both sides taken from the
unpruned model. In the pruned model the projection never sees ``x_K``: every layer before it was
pruned too, so it reads ``x'``. This stage runs the original graph and the pruned graph on the
same calibration tokens and refits every projection the one-shot refit set, to what it really
reads::

    original graph   x_t  [in]   (projection input, layer l = the compiled layer's origin)
    pruned graph     x'_t [in']  (the same projection's input, compiled layer c)

    min_{W''} sum_t || x'_t W'' - x_t W P ||^2 + lambda ||W'' - W'||^2
    (G' + lambda I) W'' = X'^T X W P + lambda W'     G' = X'^T X'   lambda = ridge * mean(diag G')

W' is the projection the pruned graph holds (the one-shot refit); the penalty pulls toward it.

MEASURED HARMFUL, so prune does not use it (issue 14 item 1 asked why sequential refit diverges):
on SmolLM2-135M at `prune --params 0.8` (rotate + one-shot refit: 2.40x / 2.26x the unpruned
LAMBADA / wiki perplexity) every variant was worse, and the more freedom the correction had, the
worse: ridge 1e-5 toward zero 370x / 408x (two rounds: 1308x / 355x); toward W' with ridge 1e-3,
1e-2, 1e-1, 1: 42.6x, 8.6x, 4.2x, 4.4x (LAMBADA); leaving the first position (the massive-activation
token) out of the moments did not change that (1e-2: 8.1x, 1: 6.3x). The math is right (tests:
the solution of the least squares on PyTorch activations, exact with nothing pruned), so the
evidence says: reproducing the unpruned projection output from drifted inputs moves weights in
directions that generalise badly; the one-shot targets (both sides from the unpruned model) are
the ones to use. Kept for benchmarks/corrective_refit.py, which reproduces these numbers.

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

from pangu_light.calib.refit import stacked_products
from pangu_light.calib.taps import tap_values, tapped_session
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = [
    "CrossMoments",
    "collect_cross_moments",
    "corrective_projections",
    "hidden_outputs_map",
    "layer_targets",
    "refit_correctively",
    "tap_projection_inputs",
]

PROJECTIONS = ("o", "down")
CORRECTIVE_RIDGE = 1e-1  # relative to mean(diag G'): the least harmful measured


def tap_projection_inputs(model: ir.Model, model_map: ModelMap) -> dict[tuple[str, int], str]:
    """Make every layer's o_proj and down_proj input a graph output (in place: use a copy);
    returns (projection, layer) -> output name."""
    values = {(proj, layer.index): linear.input for layer in model_map.layers
              for proj, linear in (("o", layer.attention.o), ("down", layer.ffn.down))}
    names = {key: f"pangu_light.input.{key[0]}.{key[1]}" for key in values}
    tap_values(model, {names[key]: value for key, value in values.items()})
    return names


Source = tuple[str, int]  # (projection, original layer)
Targets = dict[tuple[str, int], list[Source]]  # (projection, compiled layer) -> original outputs it stands for


def layer_targets(origins: Sequence[int], clap: Sequence = (), *, dropped: bool = False) -> Targets:
    """What each compiled projection reproduces: its own original layer's output; a CLAP receiver's
    o_proj also the attention outputs of the layers merged into it (``plan.clap_merges``). ``dropped``:
    the last kept layer before a run of removed layers also takes their whole residual updates
    (attention and FFN outputs) into its down_proj's target (CLAP-merged attention excepted)."""
    targets: Targets = {}
    merged = {merge.removed for merge in clap}
    for position, origin in enumerate(origins):
        targets[("o", position)] = [("o", origin), *(("o", m.removed) for m in clap if m.into == origin)]
        targets[("down", position)] = [("down", origin)]
        if dropped:
            following = origins[position + 1] if position + 1 < len(origins) else None
            gone = range(origin + 1, following if following is not None else origin + 1)
            for removed in gone:
                if removed not in merged:
                    targets[("down", position)].append(("o", removed))
                targets[("down", position)].append(("down", removed))
    return targets


@dataclasses.dataclass
class CrossMoments:
    """float64 sums over real tokens, per (projection, compiled layer) c: ``gram`` X'^T X' and,
    per original output it stands for (projection q of layer l), ``cross[(projection, c, (q, l))]`` = X'^T X_ql."""

    gram: dict[tuple[str, int], np.ndarray]
    cross: dict[tuple[str, int, Source], np.ndarray]
    tokens: int


def collect_cross_moments(
    original: ir.Model,
    compiled: ir.Model,
    targets: Targets,
    batches,
    *,
    threads: int | None = None,
    skip_first: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> CrossMoments:
    """Run both graphs (copies are tapped; the arguments are consumed) over the same
    (input_ids, attention_mask) batches and add up the moments ``CrossMoments`` holds; the first
    ``skip_first`` positions of each row are left out (massive-activation tokens)."""
    source_map, target_map = ModelMap.from_model(original), ModelMap.from_model(compiled)
    if {c for _, c in targets} != set(range(len(target_map.layers))):
        raise PanguLightError(f"the targets name layers {sorted({c for _, c in targets})}, the compiled graph "
                              f"has {len(target_map.layers)}")
    source_names = tap_projection_inputs(original, source_map)
    target_names = tap_projection_inputs(compiled, target_map)
    del source_map, target_map
    gram: dict[tuple[str, int], np.ndarray] = {}
    cross: dict[tuple[str, int, Source], np.ndarray] = {}
    tokens = 0
    with tapped_session(original, threads=threads) as source, tapped_session(compiled, threads=threads) as target:
        for input_ids, mask in batches:
            counted = mask.copy()
            counted[:, :skip_first] = 0
            real = counted.reshape(-1).astype(bool)
            before = source.run(list(source_names.values()), input_ids, mask)
            after = target.run(list(target_names.values()), input_ids, mask)
            for (proj, layer), name in target_names.items():
                x_new = after[name].reshape(real.size, -1)[real]
                originals = targets[(proj, layer)]
                x_old = [before[source_names[source]].reshape(real.size, -1)[real] for source in originals]
                parts = stacked_products(x_new, x_old)  # with nothing pruned, cross == gram exactly
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
    ridge: float = CORRECTIVE_RIDGE,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """New weights [out, in] (biases unchanged) for the compiled projections named in ``names``:
    the solution above, its target summed over the original layers the moments name. ``hidden_map``
    is P [H, k] (a 0/1 selection or the rotation's Q_k)."""
    source_map, target_map = ModelMap.from_model(original), ModelMap.from_model(compiled)
    hidden_map = np.asarray(hidden_map, dtype=np.float64)

    def original_weight(source: Source) -> np.ndarray:
        proj, layer = source
        layers = source_map.layers
        linear = layers[layer].attention.o if proj == "o" else layers[layer].ffn.down
        return linear.matmul_weight() @ hidden_map

    result = {}
    for position, layer in enumerate(target_map.layers):
        for proj, after in (("o", layer.attention.o), ("down", layer.ffn.down)):
            if after.weight.name not in names:
                continue
            gram = moments.gram[(proj, position)]
            rhs = sum(cross @ original_weight(source)
                      for (p, c, source), cross in moments.cross.items() if (p, c) == (proj, position))
            lhs, damping = gram.copy(), ridge * float(np.mean(np.diag(gram)))
            lhs[np.diag_indices_from(lhs)] += damping
            current = after.matmul_weight()  # W' [in', k]
            bias = None if after.bias is None else after.bias.const_value.numpy()
            result[after.weight.name] = (_solve(lhs, rhs + damping * current).T, bias)
    return result


def _solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:  # an input that never varies: least squares instead
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def hidden_outputs_map(plan, original_map: ModelMap, rotation=None) -> np.ndarray:
    """P [H, k]: the plan's kept hidden channels as a 0/1 selection, or the rotation's Q_k."""
    from pangu_light.passes.rewrites.rotate_hidden import effective_basis

    if plan.hidden_method == "rotate" and len(plan.hidden) < plan.hidden_size:
        if rotation is None:
            raise PanguLightError("the corrective refit of a plan that rotates the hidden size needs its rotation")
        return effective_basis(rotation.basis, original_map, len(plan.hidden))
    select = np.zeros((plan.hidden_size, len(plan.hidden)))
    select[sorted(plan.hidden), np.arange(len(plan.hidden))] = 1.0
    return select


def refit_correctively(
    original_path, pruned_path, plan, names: set[str], sequences: np.ndarray, *, rotation=None,
    rounds: int = 1, dropped: bool = False, ridge: float = CORRECTIVE_RIDGE, batch_size: int = 4,
    threads: int | None = None, save_to, on_round: Callable[[int, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``rounds`` corrective passes over the calibration ``sequences`` [N, T]: each refits the
    projections named in ``names`` of the graph at ``pruned_path`` and rewrites that file
    atomically. The last projections are saved to ``save_to`` (set-projection's file) and returned."""
    from pangu_light.calib.stats import batched
    from pangu_light.core.records import layer_origins
    from pangu_light.passes.infra.graph_io import load_model, save_model_atomic
    from pangu_light.passes.rewrites.set_projection import SetProjectionPass, save_projections

    if rounds < 1:
        raise PanguLightError(f"corrective refit rounds must be at least 1 (got {rounds})")
    original = load_model(original_path)
    hidden_map = hidden_outputs_map(plan, ModelMap.from_model(original), rotation)
    projections = {}
    for round_index in range(rounds):
        if on_round is not None:
            on_round(round_index + 1, rounds)
        compiled = load_model(pruned_path)
        origins = layer_origins(compiled.metadata_props) or list(range(len(ModelMap.from_model(compiled).layers)))
        targets = layer_targets(origins, plan.clap_merges if plan.clap else (), dropped=dropped)
        moments = collect_cross_moments(load_model(original_path), load_model(pruned_path), targets,
                                        batched(sequences, batch_size), threads=threads, on_batch=on_batch)
        projections = corrective_projections(original, compiled, moments, hidden_map, names, ridge=ridge)
        save_projections(save_to, projections, {"corrective_rounds": round_index + 1, "dropped": dropped})
        SetProjectionPass({"file": str(save_to)})(compiled)
        save_model_atomic(compiled, pruned_path)
    return projections
