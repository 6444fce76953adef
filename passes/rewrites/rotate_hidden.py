"""rotate-hidden: fold the pre-norm gammas, rotate the residual stream by an orthogonal Q, keep k components.

For pre-norm models (Llama, Qwen2/3, Mistral) the residual stream h in R^H is read only through
RMSNorms and written only through o_proj/down_proj and the embedding. With n(h) = h / rms(h) and
a norm's gamma g, a reader computes n(h) diag(g) W^T (ONNX layout W [out, H]). Three exact steps,
then one cut (row vectors, Q [H, H] orthogonal, Q_k its first k columns)::

    fold     W_in  <- W_in diag(g),  g <- 1        q/k/v, gate/up (the norm's readers); untied lm_head
    rotate   E     <- E Q                          embedding (a tied lm_head: the same tensor)
             W_in  <- W_in Q                       every reader: n(h Q) = n(h) Q since rms(h Q) = rms(h)
             W_out <- Q^T W_out,  b <- b Q         o_proj, down_proj (and their biases)
    keep k   the same with Q_k instead of Q; every norm's gamma becomes the RMS correction
             c = sqrt(H / k * f),  f = the norm input's mean kept energy fraction (calibration),
             since rms over the k kept components of a token is rms(h) sqrt(H f / k).

Graph region (every hidden-size weight; no node is added or removed)::

    ids -Gather(E Q_k)-> h --RMSNorm(c)--> x --MatMul(Transpose(W diag(g) Q_k))--> q/k/v, gate/up
    ... --MatMul(Transpose(Q_k^T W_out))--Add(b Q_k)--> +h --> ... --RMSNorm(final)--> lm_head

Tied embeddings: the final norm's gamma g_f cannot be folded into the lm_head (it is the
embedding). Its readers see n(h) diag(g_f) E^T = n(hQ) (Q^T diag(g_f) Q) (EQ)^T, a k x k matrix
M = Q_k^T diag(g_f) Q_k before the lm_head. Instead of adding that MatMul, Q is turned inside the
kept span: M = R diag(sigma) R^T (eigh, k x k orthogonal R) and Q_k <- Q_k R (likewise the dropped
block), which keeps the span (so the same function as the MatMul, and the same kept energy) but
makes M diagonal: the final norm keeps a vector gamma sigma * c and the embedding stays one tensor
at its true parameter count. (Without slicing, Q R is a signed permutation: nothing is lost.)

Sandwich families (Gemma2/3, GLM4) are refused: their post-norm's gamma acts on the branch output
before the residual Add, and diag(g) does not commute with Q. Absorb the post-norms first
(absorb-post-norm), or keep hidden channels by selection (slice-hidden).

Q comes from a rotation file (``calib.rotation`` writes it: PCA of the unit-normalised residual
stream, components by decreasing energy) with the per-norm energies, or from ``random_seed`` (a
random orthogonal Q, no correction: tests and ablations). Arithmetic is float64, cast back once.
The corrections are recorded in the model's metadata (``ROTATION_KEY``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import exclusive, outside_readers, replace_initializer
from pangu_light.passes.analysis.model_map import Linear, ModelMap, Norm
from pangu_light.passes.infra.base import Option, PanguPass
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.head_surgery import clear_intermediate_shapes
from pangu_light.passes.surgery.rotation_basis import (
    ROTATION_FORMAT,
    Rotation,
    diagonalising_basis,
    load_rotation,
    random_rotation,
    save_rotation,
)

__all__ = [
    "ROTATION_FORMAT", "ROTATION_KEY", "Rotation", "RotateHiddenPass", "diagonalising_basis", "effective_basis",
    "load_rotation", "random_rotation", "rms_corrections", "save_rotation",
]

ROTATION_KEY = "pangu_light.rotation"  # model metadata: JSON {hidden, kept, rms_correction: {gamma: c}}
ORTHOGONALITY_TOLERANCE = 1e-6


class RotateHiddenPass(PanguPass):
    name = "rotate-hidden"
    options_schema = {
        "file": Option(str, default=None, doc="rotation file (.npz from calib.rotation): basis and energies"),
        "random_seed": Option(int, default=None, doc="a random orthogonal basis instead (no RMS correction)"),
        "keep_first": Option(int, default=None, doc="keep the leading N components (default: all)"),
        "plan": Option(bool, default=False, doc="the rotation file and kept width of the plan in the graph"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        hidden = model_map.hidden_size
        rotation, kept = self._rotation_and_width(model, model_map)
        self._check(model_map, rotation.basis, kept)
        correction = rms_corrections(rotation, model_map, kept)
        final = model_map.final_norm
        g_final = final.effective_gamma()
        q = effective_basis(rotation.basis, model_map, kept)

        def put(value: ir.Value, array: np.ndarray) -> None:
            replace_initializer(value, array)
            self.tag(value)
            self.count("initializers_rotated")

        put(model_map.embedding, model_map.embedding.const_value.numpy().astype(np.float64) @ q)
        if model_map.tied_embeddings:
            sigma = np.einsum("hk,h,hk->k", q, g_final, q)  # diag(Q_k^T diag(g) Q_k), diagonal by construction
            self._set_gamma(final, sigma * correction[final.gamma.name])
        else:
            self._fold_and_rotate(model_map.lm_head, g_final, q, put)
            self._set_gamma(final, np.full(kept, correction[final.gamma.name]))
        for layer in model_map.layers:
            for role, readers in _readers(layer).items():
                norm = layer.norms[role]
                for linear in readers:
                    self._fold_and_rotate(linear, norm.effective_gamma(), q, put)
                self._set_gamma(norm, np.full(kept, correction[norm.gamma.name]))
            for linear in (layer.attention.o, layer.ffn.down):
                put(linear.weight, q.T @ linear.weight.const_value.numpy().astype(np.float64))
                if linear.bias is not None:
                    put(linear.bias, linear.bias.const_value.numpy().astype(np.float64) @ q)
        clear_intermediate_shapes(model)
        record = {"hidden": hidden, "kept": kept, "tied_final_diagonalised": model_map.tied_embeddings,
                  "rms_correction": {name: round(c, 8) for name, c in correction.items()}}
        model.metadata_props[ROTATION_KEY] = json.dumps(record, separators=(",", ":"))
        self.stats["hidden"] = f"{hidden}->{kept}"
        self.stats["rms_correction_min"] = round(min(correction.values()), 6)
        self.stats["rms_correction_max"] = round(max(correction.values()), 6)
        return ir.passes.PassResult(model, modified=True)

    # -- pieces ------------------------------------------------------------------------------

    def _rotation_and_width(self, model: ir.Model, model_map: ModelMap) -> tuple[Rotation, int]:
        file, seed, keep_first, plan = (self.options[k] for k in ("file", "random_seed", "keep_first", "plan"))
        hidden = model_map.hidden_size
        if sum((file is not None, seed is not None, plan)) != 1:
            raise PanguLightError(
                "pass rotate-hidden: give exactly one of file=rotation.npz, random_seed=N or plan=true"
            )
        if plan:
            if keep_first is not None:
                raise PanguLightError("pass rotate-hidden: plan=true takes the width from the plan; drop keep_first")
            recorded = PrunePlan.from_model(model, self.name)
            file, keep_first = rotation_of_plan(recorded, model_map, self.name)
        rotation = load_rotation(file, self.name) if file is not None else Rotation(random_rotation(hidden, seed))
        kept = hidden if keep_first is None else keep_first
        if not 0 < kept <= hidden:
            raise PanguLightError(f"pass rotate-hidden: keep_first={kept} must be between 1 and the hidden size "
                                  f"{hidden}")
        return rotation, kept

    def _check(self, model_map: ModelMap, basis: np.ndarray, kept: int) -> None:
        hidden = model_map.hidden_size
        sandwich = [n.module for layer in model_map.layers for r, n in layer.norms.items() if r.startswith("post")]
        if sandwich:
            raise PanguLightError(
                f"pass rotate-hidden: {model_map.family or 'this model'} has sandwich norms ({sandwich[0]}, ...): a "
                "post-norm's gamma scales the branch output before the residual Add and does not commute with a "
                "rotation; absorb the post-norms first (absorb-post-norm) or keep channels with slice-hidden"
            )
        if basis.shape != (hidden, hidden):
            raise PanguLightError(
                f"pass rotate-hidden: the rotation is {list(basis.shape)}, the graph's hidden size is {hidden} "
                f"(expected [{hidden}, {hidden}]); compute it on this model"
            )
        error = float(np.abs(basis.T @ basis - np.eye(hidden)).max()) if np.isfinite(basis).all() else np.inf
        if error > ORTHOGONALITY_TOLERANCE:
            raise PanguLightError(
                f"pass rotate-hidden: the rotation is not orthogonal (max |Q^T Q - I| = {error:.3g} > "
                f"{ORTHOGONALITY_TOLERANCE}); give an orthogonal basis (e.g. eigenvectors from calib.rotation)"
            )
        region = _region(model_map)
        for value in _weights(model_map):
            if not exclusive(value, region):
                readers = sorted({node.op_type for node in outside_readers(value, region)})
                raise PanguLightError(
                    f"pass rotate-hidden: {value.name} is also read by {readers or 'the graph'}; "
                    "rotating it would change those readers too"
                )

    def _fold_and_rotate(self, linear: Linear, gamma: np.ndarray, q: np.ndarray, put) -> None:
        put(linear.weight, (linear.weight.const_value.numpy().astype(np.float64) * gamma[None, :]) @ q)

    def _set_gamma(self, norm: Norm, gamma: np.ndarray) -> None:
        replace_initializer(norm.gamma, gamma - 1.0 if norm.one_plus_w else gamma)
        self.tag(norm.gamma)
        self.count("gammas_set")


def effective_basis(basis: np.ndarray, model_map: ModelMap, kept: int) -> np.ndarray:
    """The [H, kept] columns the pass rotates by: ``basis``'s first ``kept``, turned inside their span
    for a tied lm_head (``diagonalising_basis``). A refit of the written projections uses the same."""
    if model_map.tied_embeddings:
        basis = diagonalising_basis(np.asarray(basis, dtype=np.float64), model_map.final_norm.effective_gamma(), kept)
    return np.asarray(basis, dtype=np.float64)[:, :kept]


def rms_corrections(rotation: Rotation, model_map: ModelMap, kept: int) -> dict[str, float]:
    """Per hidden norm (gamma name), c = sqrt(H / kept * kept energy fraction); 1 without a cut or energies."""
    hidden = model_map.hidden_size
    result = {}
    for norm in model_map.hidden_norms():
        name = norm.gamma.name
        if kept == hidden or not rotation.energy:
            result[name] = 1.0
            continue
        if name not in rotation.energy:
            raise PanguLightError(
                f"pass rotate-hidden: the rotation file has no energies for {name} ({norm.module}); "
                "compute it on this model (calib.rotation)"
            )
        fraction = rotation.kept_fraction(name, kept)
        if not fraction > 0:
            raise PanguLightError(f"pass rotate-hidden: {name} keeps no energy in {kept} components")
        result[name] = float(np.sqrt(hidden / kept * fraction))
    return result


def rotation_of_plan(plan: PrunePlan, model_map: ModelMap, pass_name: str) -> tuple[str, int]:
    """The rotation file and kept width a plan with ``hidden_method`` rotate names."""
    if plan.hidden_method != "rotate" or not plan.rotation.get("file"):
        raise PanguLightError(
            f"pass {pass_name}: plan=true but the plan keeps hidden channels by {plan.hidden_method!r} with no "
            "rotation file; make the plan with --hidden-method rotate"
        )
    kept = len(plan.hidden)
    if plan.hidden != list(range(kept)):
        raise PanguLightError(f"pass {pass_name}: a rotate plan keeps the leading components 0..{kept - 1}")
    if model_map.hidden_size != plan.hidden_size:
        raise PanguLightError(
            f"pass {pass_name}: the graph's hidden size is {model_map.hidden_size}, the plan's original "
            f"{plan.hidden_size}; rotate the unsliced graph"
        )
    return plan.rotation["file"], kept


def _readers(layer) -> dict[str, list[Linear]]:
    """Each pre-norm's readers: the projections whose input is its output (all five, once each)."""
    attention, ffn = layer.attention, layer.ffn
    linears = list(dict.fromkeys([attention.q, attention.k, attention.v, ffn.gate, ffn.up]))
    result = {role: [l for l in linears if l.input is layer.norms[role].output] for role in ("pre_attn", "pre_ffn")}
    if sum(len(v) for v in result.values()) != len(linears):
        raise PanguLightError(
            f"pass rotate-hidden: in layer {layer.index} a projection does not read its pre-norm's output "
            "directly; this layout is not supported"
        )
    return result


def _weights(model_map: ModelMap) -> list[ir.Value]:
    values = [model_map.embedding, model_map.lm_head.weight] + [n.gamma for n in model_map.hidden_norms()]
    for layer in model_map.layers:
        a, f = layer.attention, layer.ffn
        values += [l.weight for l in (a.q, a.k, a.v, a.o, f.gate, f.up, f.down)]
        values += [l.bias for l in (a.o, f.down) if l.bias is not None]
    return list(dict.fromkeys(values))


def _region(model_map: ModelMap) -> set[ir.Node]:
    linears = [model_map.lm_head]
    for layer in model_map.layers:
        a, f = layer.attention, layer.ffn
        linears += [a.q, a.k, a.v, a.o, f.gate, f.up, f.down]
    region = {model_map.embedding_gather}
    region.update(node for linear in linears for node in (linear.transpose, linear.bias_add) if node is not None)
    region.update(node for norm in model_map.hidden_norms() for node in norm.nodes)
    return region
