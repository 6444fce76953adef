"""GPTQ: block-wise int4/int8 weights that keep each MatMul's output on calibration text.

Round to nearest (``deploy.quantize``) minimises each weight's own error. What the model feels
is the output error of a MatMul ``y = x W`` (W [K, N], the layout MatMul reads) over the inputs
x it sees; with H = sum_x x^T x [K, K] (the input's Gram over calibration tokens)::

    || X (W - Q) ||_F^2  =  sum_n (w_n - q_n)^T H (w_n - q_n)      (w_n: column n of W)

GPTQ (Frantar et al. 2022) quantizes the K input rows of W one at a time and after each spreads
its rounding error over the rows not yet quantized, which is the least-squares correction under
H. With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), in the order the rows are taken::

    q_k   = quant(w_k, s_block(k))             (row k of the current W)
    e_k   = (w_k - q_k) / U[k, k]
    w_j  <- w_j - U[k, j] e_k        for the rows j after k

done lazily in chunks of ``chunk`` rows (the rows after a chunk get the chunk's errors in one
matrix product; the same arithmetic). Two choices make it work on these models:

* act order: rows are taken by decreasing H[k, k], so the inputs that carry the most energy
  (the massive-activation channels of the attention-sink tokens, 100-1000x the rest) are rounded
  first, while nothing has been pushed onto them yet, and the others absorb their errors. In
  input order, GPTQ made SmolLM2-135M's int4 graph worse than round to nearest (LAMBADA 73.0
  against 66.7, float32 compute); in act order it is better (62.4);
* static blocks: the scale of each block of ``block_size`` consecutive input rows is fixed
  before any row moves, from the original weights, exactly as round to nearest sets it (the
  layout MatMulNBits stores: symmetric, s = (signed max-|.| element) / -z,
  q = clamp(round(w / s) + z, 0, 2z - 1), z = 2^(bits - 1)); act order visits the rows of a
  block out of order, so the scale cannot wait for the block's first row. A block narrower than
  ``block_size`` (a width that is not a multiple) is the last one, padded with z (0) when packed.

H gets ``damp`` x mean(diag H) on its diagonal (inputs that never vary would make it singular);
a row whose input is always 0 is quantized to 0.

Graph region: none is added. The quantizer (``deploy.quantize``, round to nearest) writes the
MatMulNBits nodes and their layouts; ``overwrite_packed`` replaces each node's packed weights
and scales by GPTQ's::

    x --MatMulNBits(B_packed[N, blocks, block * bits / 8], scales[N * blocks], K, N, bits, block_size)--> y

The Grams are collected through the float32 graph about to be quantized (``collect_input_grams``:
``calib.gram``'s masked Gram reduction after each quantized MatMul's input, so only [K, K] leaves
ONNX Runtime; float32 within a batch, float64 across batches)::

    x [B,S,K] --Where(mask)--Reshape[B*S, K]--> X --MatMul(X^T, X)--> gram.gptq.<i>  [K, K]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError

__all__ = ["QuantizedWeight", "collect_input_grams", "gptq_quantize", "overwrite_packed", "round_to_nearest"]

DEFAULT_DAMP = 0.01


@dataclasses.dataclass
class QuantizedWeight:
    """q [N, blocks * block_size] integers in [0, 2^bits) and scales [N, blocks] (float64)."""

    q: np.ndarray
    scales: np.ndarray
    k: int
    bits: int
    block_size: int

    def dequantized(self) -> np.ndarray:
        """[K, N] float64: (q - z) * s."""
        n, blocks = self.scales.shape
        z = 2 ** (self.bits - 1)
        values = (self.q.reshape(n, blocks, self.block_size) - z) * self.scales[:, :, None]
        return values.reshape(n, -1)[:, : self.k].T


def _block_scales(rows: np.ndarray, bits: int) -> np.ndarray:
    """Scales [N] of one block given its rows [N, width] (as columns of W^T): signed max / -z."""
    z = 2 ** (bits - 1)
    largest = rows[np.arange(rows.shape[0]), np.abs(rows).argmax(axis=1)]
    scales = largest / -z
    return np.where(scales == 0, 1.0, scales)  # an all-zero block: any scale gives q = z


def _quantize_row(values: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    z = 2 ** (bits - 1)
    return np.clip(np.round(values / scales) + z, 0, 2 * z - 1)


def _empty(n: int, k: int, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = -(-k // block_size)
    q = np.full((n, blocks * block_size), 2 ** (bits - 1), dtype=np.int64)
    return q, np.ones((n, blocks))


def round_to_nearest(weight: np.ndarray, *, bits: int = 4, block_size: int = 32) -> QuantizedWeight:
    """Per-block round to nearest (what ONNX Runtime's quantizer does), for comparison and tests."""
    k, n = weight.shape
    rows = weight.T.astype(np.float64)
    q, scales = _empty(n, k, bits, block_size)
    for block, start in enumerate(range(0, k, block_size)):
        part = rows[:, start : start + block_size]
        scales[:, block] = _block_scales(part, bits)
        q[:, start : start + part.shape[1]] = _quantize_row(part, scales[:, block, None], bits)
    return QuantizedWeight(q, scales, k, bits, block_size)


def gptq_quantize(
    weight: np.ndarray, gram: np.ndarray, *, bits: int = 4, block_size: int = 32, damp: float = DEFAULT_DAMP,
    chunk: int = 128,
) -> QuantizedWeight:
    """GPTQ of ``weight`` [K, N] for inputs whose Gram is ``gram`` [K, K], act order and static
    blocks (see the module docstring)."""
    k, n = weight.shape
    if gram.shape != (k, k):
        raise PanguLightError(f"GPTQ: the input Gram is {list(gram.shape)}, the weight has K = {k} inputs")
    static = round_to_nearest(weight, bits=bits, block_size=block_size)  # its scales are the static blocks'
    scales = static.scales
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    order = np.argsort(-np.diag(h), kind="stable")  # act order; dead rows (H = 1 + damp) go last
    rows = weight.T.astype(np.float64)[:, order]  # [N, K]: column c is input row order[c] of W
    rows[:, dead[order]] = 0.0
    h = h[order][:, order]
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    except np.linalg.LinAlgError as error:
        raise PanguLightError(f"GPTQ: the input Gram is not positive definite after damping ({error}); "
                              "raise the damping or use more calibration text") from error
    z = 2 ** (bits - 1)
    taken = np.empty((n, k), dtype=np.int64)  # q in the order taken
    block_of = order // block_size
    for first in range(0, k, chunk):
        last = min(first + chunk, k)
        current = rows[:, first:last].copy()
        errors = np.zeros_like(current)
        u = upper[first:last, first:last]
        for i in range(last - first):
            s = scales[:, block_of[first + i]]
            taken[:, first + i] = _quantize_row(current[:, i], s, bits)
            error = (current[:, i] - (taken[:, first + i] - z) * s) / u[i, i]
            current[:, i:] -= np.outer(error, u[i, i:])
            errors[:, i] = error
        rows[:, last:] -= errors @ upper[first:last, last:]
    q = static.q.copy()  # the padding of a narrow last block stays z
    q[:, order] = taken
    return QuantizedWeight(q, scales, k, bits, block_size)


def _pack(weight: QuantizedWeight) -> np.ndarray:
    """MatMulNBits' B: [N, blocks, block_size * bits / 8] uint8 (4 bits: low nibble first)."""
    n, blocks = weight.scales.shape
    q = weight.q.astype(np.uint8).reshape(n, blocks, weight.block_size)
    if weight.bits == 8:
        return q
    return (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)


def overwrite_packed(model: onnx.ModelProto, quantized: dict[str, QuantizedWeight],
                     sources: dict[str, str]) -> int:
    """Replace the packed weights and scales of the MatMulNBits nodes whose output is a key of
    ``sources`` (node output -> the float weight name it was quantized from) by ``quantized``'s
    (keyed by that weight name); returns how many. Symmetric nodes only (no zero-point input)."""
    initializers = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.output[0] not in sources:
            continue
        weight = quantized.get(sources[node.output[0]])
        if weight is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise PanguLightError(f"GPTQ: {node.name} has zero points; GPTQ here writes symmetric blocks only")
        if (attrs["K"], attrs["bits"], attrs["block_size"]) != (weight.k, weight.bits, weight.block_size):
            raise PanguLightError(f"GPTQ: {node.name} is K={attrs['K']} bits={attrs['bits']} block="
                                  f"{attrs['block_size']}, the GPTQ weight K={weight.k} bits={weight.bits} "
                                  f"block={weight.block_size}")
        packed, scales = initializers[node.input[1]], initializers[node.input[2]]
        new_packed = _pack(weight).reshape(tuple(packed.dims))
        new_scales = weight.scales.astype(onnx.helper.tensor_dtype_to_np_dtype(scales.data_type)).reshape(
            tuple(scales.dims))
        packed.CopyFrom(onnx.numpy_helper.from_array(new_packed, packed.name))
        scales.CopyFrom(onnx.numpy_helper.from_array(new_scales, scales.name))
        done += 1
    return done


def collect_input_grams(
    model: ir.Model, weights: Iterable[str], batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
    threads: int | None = None, on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """{weight name: Gram [K, K] of the input of the MatMul that reads it} over ``batches``
    (padding masked out), from one run of ``model`` (consumed: use a copy) whose outputs become the
    Grams (``calib.gram.add_masked_grams``: only [K, K] leaves the session, never the activations).
    MatMuls that share an input (gate and up) share one Gram."""
    from pangu_light.calib.gram import add_masked_grams
    from pangu_light.calib.taps import run_tapped

    wanted = set(weights)
    sources: dict[str, tuple[ir.Value, int]] = {}  # MatMul input name -> (value, K)
    input_of_weight: dict[str, str] = {}
    for node in model.graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if weight is None or weight.name not in wanted:
            continue
        if weight.const_value is None or len(weight.const_value.shape) != 2:
            raise PanguLightError(f"GPTQ: {weight.name} is not a 2-D initializer")
        value = node.inputs[0]
        sources.setdefault(value.name, (value, weight.const_value.shape[0]))
        input_of_weight[weight.name] = value.name
    missing = sorted(wanted - set(input_of_weight))
    if missing:
        raise PanguLightError(f"GPTQ: no MatMul reads {missing[0]} ({len(missing)} weights in all)")
    model.graph.outputs.clear()
    keys = {name: f"gptq.{index}" for index, name in enumerate(sources)}  # value names may hold any character
    outputs = add_masked_grams(model, {keys[name]: source for name, source in sources.items()}, sums=False)
    grams: dict[str, np.ndarray] = {}

    def consume(results: dict[str, np.ndarray], mask: np.ndarray) -> None:
        for name, result in results.items():
            grams[name] = grams.get(name, 0.0) + result.astype(np.float64)

    run_tapped(model, batches, list(outputs.values()), consume, threads=threads, on_batch=on_batch)
    return {weight: grams[outputs[("gram", keys[value])]] for weight, value in input_of_weight.items()}
