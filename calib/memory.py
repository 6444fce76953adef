"""The calibration batch size that fits a memory budget (``calibrate --max-memory 4G``).

Calibration holds the graph's weights once (ONNX Runtime's session), a fixed runtime overhead,
and per sequence of the batch the activations ONNX Runtime keeps while the batch runs::

    peak(B) ~ weights + overhead + B * per_sequence

    per_sequence = 4 bytes * L * ( 2 * sum over layers of (5 * max(H, n*d) + F)      tapped values
                                 + max over layers of (3 * n_heads * L          scores, mask, softmax
                                                       + 6 * F + 12 * max(H, n*d)) )   one layer's work

for L tokens per sequence (float32 activations, the eager attention's [n_heads, L, L] scores).
The first term is there because ONNX Runtime keeps the values the taps read (each layer's norm
outputs, attention context, FFN activation, input and output) of every layer until the taps'
reductions run, whatever the stored node order, and its arena holds about two such sets once
more than one batch has run. Measured on SmolLM2-135M at L = 256 (peak RSS, 8 or 16 sequences):
0.88 GB + 0.26 GB per sequence of the batch over several batches (one batch of 8: 0.13 GB per
sequence); this estimate says 0.50 GB of weights + 0.63 GB + 0.28 GB per sequence. The
statistics are accumulated per batch in float64; the batch size changes the result only by
rounding: ONNX Runtime's float32 kernels round per-sample sums differently for another batch
shape (SmolLM2-135M, batch 3 against 4: 7e-8 relative at most; the tiny test models: float64
rounding only). The estimate is printed before the run starts, so a user can see what it
assumed; it is a model of one runtime's allocator, checked on one model, not a guarantee.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["MemoryEstimate", "RUNTIME_OVERHEAD_BYTES", "estimate_calibration_memory", "format_size", "parse_size"]

# Python, NumPy, ONNX Runtime's libraries and arena, the tokenizer and corpus: what a calibrate
# process holds besides weights and activations (SmolLM2-135M, 16 x 256: ~0.4 GB; rounded up).
RUNTIME_OVERHEAD_BYTES = 640 * 2**20
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Bytes of ``4G``, ``512M``, ``1.5GiB``, ``2GB`` (binary units) or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if match is None:
        raise PanguLightError(f"cannot read the size {text!r}; write it like 4G, 512M or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    overhead: int
    per_sequence: int
    seq_len: int

    def peak(self, batch_size: int) -> int:
        return self.weights + self.overhead + batch_size * self.per_sequence

    def batch_size(self, budget: int, samples: int) -> int:
        """The largest batch (at most ``samples``) whose estimated peak fits ``budget``; one
        clear line when not even one sequence fits."""
        if budget <= self.weights + self.overhead:
            raise PanguLightError(
                f"--max-memory {format_size(budget)} is below the graph's weights ({format_size(self.weights)}) "
                f"plus the runtime ({format_size(self.overhead)}); calibration holds the weights once: give "
                f"at least {format_size(self.peak(1))}"
            )
        fits = (budget - self.weights - self.overhead) // self.per_sequence
        if fits < 1:
            raise PanguLightError(
                f"--max-memory {format_size(budget)} leaves {format_size(budget - self.weights - self.overhead)} "
                f"beside the weights, less than one sequence of {self.seq_len} tokens needs "
                f"({format_size(self.per_sequence)}); give at least {format_size(self.peak(1))} or a shorter --seq-len"
            )
        return int(max(1, min(fits, samples)))

    def describe(self, budget: int, batch_size: int) -> str:
        return (
            f"memory estimate: weights {format_size(self.weights)} + runtime {format_size(self.overhead)} + "
            f"{format_size(self.per_sequence)} per sequence of {self.seq_len} tokens -> batch size {batch_size} "
            f"(about {format_size(self.peak(batch_size))} within --max-memory {format_size(budget)})"
        )


def estimate_calibration_memory(model_map: ModelMap, weight_bytes: int, seq_len: int) -> MemoryEstimate:
    """The estimate above for a graph whose initializers hold ``weight_bytes``."""
    widest, tapped = 0, 0
    for layer in model_map.layers:
        attention = layer.attention
        width = max(model_map.hidden_size, attention.num_heads * attention.head_dim)
        tapped += 5 * width + layer.ffn.intermediate_size
        widest = max(widest, 3 * attention.num_heads * seq_len + 6 * layer.ffn.intermediate_size + 12 * width)
    return MemoryEstimate(weight_bytes, RUNTIME_OVERHEAD_BYTES, 4 * seq_len * (2 * tapped + widest), seq_len)
