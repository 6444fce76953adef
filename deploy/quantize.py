"""Weight-only quantisation of MatMul weights through ONNX Runtime's own quantizer.

``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig`` (round to nearest, per block):
for a weight B [K, N] (the layout MatMul reads: run ``fold-weight-transpose`` first), each
column n is cut along K into blocks of ``block_size``; block j of column n gets one scale
s[n, j] (and a zero point z[n, j] when asymmetric) and its elements are stored as integers::

    q = clamp(round(B / s) + z, 0, 2**bits - 1)        B_deq = (q - z) * s
    symmetric: z = 2**(bits - 1) (8 for int4, 128 for int8), s = (signed max-|.| element) / -z

so |B - B_deq| <= |s| / 2 per element, except (symmetric) an element of the other sign than the
block's largest beyond (z - 1/2)|s|, clamped to z - 1 above z: its error is |B| - (z - 1)|s|,
at most |s|. K that is not a multiple of ``block_size`` (a pruned hidden size of 500) is padded
with zeros inside the last block; the ``K`` attribute keeps the real size.
Each quantized ``MatMul(x, B)`` becomes ``com.microsoft.MatMulNBits(x, q, s[, z])`` with
``accuracy_level`` choosing the compute type on CPU (0: float32 on the dequantized weights;
4: activations quantized per block to int8 as well, the fast path).

``dequantize_matmul_nbits`` decodes what the quantizer wrote back to float32 [K, N], so tests and
reports can build "the fp32 graph with dequantized weights" and compare against it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx

from pangu_light.core.errors import PanguLightError

__all__ = [
    "BITS", "eligible_matmuls", "quantize_weights", "dequantize_matmul_nbits", "lm_head_matmul", "name_unnamed_nodes",
]

BITS = {"int8": 8, "int4": 4}


def eligible_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls the quantizer can take: the second input a 2-D float initializer."""
    weights = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            weight = weights.get(node.input[1])
            if weight is not None and len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT:
                found.append(node)
    return found


def lm_head_matmul(model: onnx.ModelProto, logits: str) -> onnx.NodeProto | None:
    """The last MatMul the ``logits`` output depends on (the lm_head; Gemma2's soft-capping or a
    final scale may sit between), found by walking producers back from the output."""
    producers = {out: node for node in model.graph.node for out in node.output}
    frontier, seen = [logits], set()
    while frontier:
        name = frontier.pop(0)
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul":
            return node
        frontier.extend(node.input)
    return None


def quantize_weights(
    model: onnx.ModelProto,
    *,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    accuracy_level: int = 4,
    exclude: Iterable[str] = (),
) -> onnx.ModelProto:
    """``model`` with every eligible MatMul not named in ``exclude`` replaced by MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if bits not in BITS.values():
        raise PanguLightError(f"weight-only quantisation takes 4 or 8 bits, not {bits}: use --weights int4 or int8")
    if block_size < 16 or block_size & (block_size - 1):
        raise PanguLightError(
            f"--block-size {block_size} is not supported: MatMulNBits takes a power of two >= 16 (32 is usual)"
        )
    name_unnamed_nodes(model)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=list(exclude))
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs one INFO line per node it looks at
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


def dequantize_matmul_nbits(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight [K, N] a MatMulNBits node computes with: (q - z) * s per block."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    packed = initializers[node.input[1]].reshape(n, -1)  # [N, k_blocks * blob]
    blocks = -(-k // block)
    scales = initializers[node.input[2]].reshape(n, blocks).astype(np.float64)
    if bits == 8:
        q = packed.astype(np.int64)
    elif bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.int64)
    else:
        raise PanguLightError(f"MatMulNBits with bits={bits} is not handled here (only 4 and 8)")
    q = q[:, : blocks * block].reshape(n, blocks, block)
    if len(node.input) > 3 and node.input[3]:
        zp = initializers[node.input[3]].reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zero = zp[:, :blocks].astype(np.int64)
    else:
        zero = np.full((n, blocks), 2 ** (bits - 1), dtype=np.int64)
    weight = (q - zero[:, :, None]) * scales[:, :, None]  # [N, blocks, block]
    return weight.reshape(n, blocks * block)[:, :k].T.astype(np.float32)


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """``nodes_to_exclude`` matches node names: give every unnamed node a unique one."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
