"""The rotation basis for ``rotate-hidden``: PCA of the unit-normalised residual stream, through the graph.

The residual stream is read only through the hidden-size RMSNorms (per layer the pre-attention
and pre-FFN norm, and the final norm), which see it up to scale. For each such norm n, over the
real (unpadded) calibration tokens t, with x_t the norm's input and u_t = x_t / ||x_t||::

    C_n = sum_t u_t^T u_t       [H, H]       (float32 inside a batch, float64 across batches)

    C = sum_n C_n = Q diag(lambda) Q^T,  lambda decreasing           (numpy eigh, float64)
    e_n[j] = (Q^T C_n Q)_jj / N          the energy of n's unit inputs along component j
                                          (sum_j e_n[j] = 1; the kept fraction is sum_{j<k} e_n[j])

Normalising each token first keeps the few positions with residual norms 20-1000x the rest
(the first token, delimiters: "massive activations") from choosing the basis alone. The taps,
as in ``calib.taps`` and ``calib.gram``, return only the [H, H] products::

    x [B,S,H] --Div(ReduceL2(x))--Where(mask)--Reshape[B*S,H]--> U --MatMul(U^T, U)--> rot.<gamma> [H,H]

``save_rotation`` (of the pass) writes Q and every e_n; the pass reads them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pangu_light.calib.taps import run_tapped
from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.rewrites.rotate_hidden import Rotation, rms_corrections

__all__ = [
    "add_rotation_taps", "collect_moments", "collect_rotation", "collect_graph_rotation", "plan_rotation",
    "rotation_from_moments", "resolve_hidden_method",
]


def add_rotation_taps(model: ir.Model, model_map: ModelMap | None = None) -> dict[str, str]:
    """Replace the graph's outputs by each hidden norm's C_n (in place: use a copy).
    Returns {gamma name: graph output}."""
    model_map = model_map or ModelMap.from_model(model)
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == contract.ATTENTION_MASK), None)
    if mask is None:
        raise PanguLightError("rotation statistics need a graph with an attention_mask input (exported by pangu-light)")
    graph.outputs.clear()
    counter = iter(range(1 << 30))

    def op(op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes)
        graph.append(node)
        node.outputs[0].name = f"pangu_light.rot.{next(counter)}.{op_type}"
        return node.outputs[0]

    def const(array: np.ndarray) -> ir.Value:
        return op("Constant", value=ir.tensor(array))

    token_mask = op("Unsqueeze", op("Cast", mask, to=ir.DataType.BOOL), const(np.array([-1], np.int64)))
    zero, last = const(np.array(0.0, np.float32)), const(np.array([-1], np.int64))
    rows_shape = const(np.array([-1, model_map.hidden_size], np.int64))
    outputs: dict[str, str] = {}
    for norm in model_map.hidden_norms():
        if norm.gamma.name in outputs:
            continue
        x = norm.input
        unit = op("Div", x, op("ReduceL2", x, last, keepdims=1))
        rows = op("Reshape", op("Where", token_mask, unit, zero), rows_shape)
        out = op("Identity", op("MatMul", op("Transpose", rows, perm=[1, 0]), rows))
        out.name, out.dtype = f"rot.{norm.gamma.name}", ir.DataType.FLOAT
        graph.outputs.append(out)
        outputs[norm.gamma.name] = out.name
    return outputs


def rotation_from_moments(moments: dict[str, np.ndarray], tokens: int, meta: dict | None = None) -> Rotation:
    """Q from the summed moments, components by decreasing eigenvalue, and each norm's energies."""
    if not tokens:
        raise PanguLightError("no calibration tokens were seen")
    total = sum(np.asarray(m, dtype=np.float64) for m in moments.values())
    total = (total + total.T) / 2
    eigenvalues, basis = np.linalg.eigh(total)
    order = np.argsort(eigenvalues)[::-1]
    basis = basis[:, order]
    energy = {name: np.einsum("hj,hi,ij->j", basis, np.asarray(m, dtype=np.float64), basis) / tokens
              for name, m in moments.items()}
    spectrum = eigenvalues[order] / (tokens * len(moments))
    info = {"tokens": tokens, "norms": len(moments), "top_energy": [round(float(v), 6) for v in spectrum[:8]]}
    return Rotation(basis, energy, {**info, **(meta or {})})


def collect_moments(
    graph_path: str | Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Run a rotation-tapped copy of the graph at ``graph_path`` (the file is not modified) over
    (input_ids, attention_mask) batches: ({gamma name: C_n}, real tokens, providers used)."""
    model = ir.load(graph_path)
    outputs = add_rotation_taps(model)
    moments: dict[str, np.ndarray] = {}
    tokens = 0

    def accumulate(results: dict[str, np.ndarray], mask: np.ndarray) -> None:
        nonlocal tokens
        for gamma, name in outputs.items():
            moments[gamma] = moments.get(gamma, 0.0) + results[name].astype(np.float64)
        tokens += int(mask.sum())

    providers = run_tapped(model, batches, list(outputs.values()), accumulate, provider=provider, threads=threads,
                           on_batch=on_batch)
    return moments, tokens, providers


def collect_rotation(graph_path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     meta: dict | None = None, **options) -> Rotation:
    """The rotation of the graph at ``graph_path`` over the batches (options: ``collect_moments``'s)."""
    moments, tokens, providers = collect_moments(graph_path, batches, **options)
    where = {"graph": str(Path(graph_path).resolve()), "providers": providers}
    return rotation_from_moments(moments, tokens, {**where, **(meta or {})})


def collect_graph_rotation(
    model_path: Path, *, data: str, samples: int | None, seq_len: int, seed: int, batch_size: int,
    provider: str = "cpu", threads: int | None = None, tokenizer: Path | None = None, quiet: bool = False,
) -> Rotation:
    """The rotation of ``model_path`` over the calibration split of ``data`` (the same sequences
    ``calib.calibrate`` uses for the same arguments)."""
    from tqdm import tqdm

    from pangu_light.calib.stats import batched
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.passes.infra.graph_io import load_model_metadata

    encode, bos_id = graph_tokenizer(model_path, load_model_metadata(model_path), tokenizer)
    sequences = sequences_for(data, encode, bos_id, samples=samples, seq_len=seq_len, seed=seed, split="calib")
    meta = {"data": data, "split": "calib", "samples": int(len(sequences)), "seq_len": seq_len, "seed": seed}
    with tqdm(total=int(sequences.size), unit="tok", desc="rotation", disable=quiet, file=sys.stderr) as bar:
        return collect_rotation(model_path, batched(sequences, batch_size), provider=provider, threads=threads,
                                meta=meta, on_batch=bar.update)


def plan_rotation(plan: PrunePlan, model_map: ModelMap, kept: int, rotation: Rotation | None,
                  rotation_file: str | None) -> None:
    """Make ``plan`` keep the leading ``kept`` components of ``rotation`` (saved at ``rotation_file``),
    recording the file and each norm's RMS correction (the planner's ``hidden_method`` rotate)."""
    if rotation is None or not rotation_file:
        raise PanguLightError("--hidden-method rotate needs a rotation (calib.rotation) and the file it is saved in")
    if any(role.startswith("post") for layer in model_map.layers for role in layer.norms):
        raise PanguLightError(
            "--hidden-method rotate: this model has sandwich norms, whose post-norm gammas do not commute with "
            "a rotation of the residual stream; use --hidden-method select"
        )
    if kept == model_map.hidden_size:
        return  # nothing is cut: the plan keeps every channel, and no rotation is needed
    plan.hidden, plan.hidden_method = list(range(kept)), "rotate"
    corrections = rms_corrections(rotation, model_map, kept)
    plan.rotation = {"file": str(rotation_file), "rms_correction": {k: round(v, 6) for k, v in corrections.items()}}


def resolve_hidden_method(requested: str, model_map: ModelMap, targets) -> str:
    """``auto``: rotate for pre-norm families when the targets may cut the hidden size, else select
    (sandwich-norm families: rotation is not exact there); ``select`` and ``rotate`` as given."""
    if requested != "auto":
        return requested
    sandwich = any(role.startswith("post") for layer in model_map.layers for role in layer.norms)
    cuts = targets.hidden is not None and targets.hidden < model_map.hidden_size
    cuts = cuts or (targets.params is not None and targets.hidden is None)
    return "rotate" if cuts and not sandwich else "select"
