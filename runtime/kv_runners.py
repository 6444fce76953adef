"""The three ways the generation loop runs a decode graph, one object per generation:

* ``BoundRunner`` (the default for a graph whose past and present are separate tensors): IO
  binding into two pre-allocated buffers per cache tensor that swap each step (ping-pong);
* ``SharedRunner`` (a deployment graph whose attention is GroupQueryAttention, ``io_kind``
  ``gqa-shared-buffer``): ONE buffer per cache tensor of fixed capacity C, bound as both the
  past and the present [b, kv, C, d]; the graph (GQA) writes the step's S new positions in place
  at positions total - S .. total - 1, where total = attention_mask.shape[1] (ONNX Runtime's
  past_present_share_buffer: no copy of the cache per step, not even the graph's own Concat);
* ``NumpyRunner``: plain ``session.run`` with numpy feeds, the cache copied out and in each
  step; kept as an independent reference for the bound loops.

Each takes ``run(input_ids [b, s], attention_mask [b, total]) -> logits [b, s, V]``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from pangu_light.core import contract
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.layout import DecodeLayout

__all__ = ["BoundRunner", "NumpyRunner", "SharedRunner"]


class BoundRunner:
    """Runs the decode graph with IO binding into pre-allocated KV buffers.

    Each layer's key and value get two buffers of ``capacity`` positions, allocated once on
    the session's device: step t reads its past from one and the graph writes its present
    into the other, and the next step swaps them (ping-pong). The graph's own Concat still
    writes past + new into the present (that is the graph's contract), but nothing is
    allocated per step, and the cache never crosses into numpy. The decode steps' logits
    [batch, 1, vocab] go into one pre-allocated host buffer; the prefill's [batch, S, vocab]
    are allocated by ONNX Runtime once.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        layout: DecodeLayout,
        device: str,
        device_id: int,
        batch: int,
        capacity: int,
        buffers: int = 2,
    ):
        self.session = session
        self.layout = layout
        self.device = device
        self.device_id = device_id
        self.batch = batch
        self.capacity = capacity
        self.binding = session.io_binding()
        # (past name, present name, element type, [kv, d]) per cache tensor
        self.tensors = []
        for layer in layout.layers:
            for past, present in ((layer.past_key, layer.present_key), (layer.past_value, layer.present_value)):
                self.tensors.append((past, present, layer.dtype, (layer.kv_heads, layer.head_dim)))
        # Two buffers (one when shared) per cache tensor, sized for the longest cache reached.
        self.buffers = [
            tuple(
                ort.OrtValue.ortvalue_from_shape_and_type([batch, kv, capacity, dim], dtype, device, device_id)
                for _ in range(buffers)
            )
            for _, _, dtype, (kv, dim) in self.tensors
        ]
        self.pointers = [tuple(b.data_ptr() for b in pair) for pair in self.buffers]
        self.current = 0  # which of the two buffers holds the cache written by the last run
        self.length = 0  # positions in the cache
        self.step_logits = np.empty((batch, 1, layout.vocab), layout.logits_dtype) if layout.vocab else None
        self._keep: list[np.ndarray] = []

    def _bind_common(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Bind the token ids, the mask and the logits; returns (binding, logits bound to host)."""
        binding = self.binding
        new = input_ids.shape[1]
        # bind_cpu_input wraps the numpy buffer: keep the arrays alive until the run returns.
        self._keep = [np.ascontiguousarray(input_ids), np.ascontiguousarray(attention_mask)]
        binding.bind_cpu_input(contract.INPUT_IDS, self._keep[0])
        binding.bind_cpu_input(contract.ATTENTION_MASK, self._keep[1])
        step_logits = new == 1 and self.step_logits is not None
        if step_logits:
            binding.bind_output(
                contract.LOGITS, "cpu", 0, self.step_logits.dtype.type, list(self.step_logits.shape),
                self.step_logits.ctypes.data,
            )
        else:  # the prefill: ONNX Runtime allocates [batch, S, vocab]; bound first, so output 0
            binding.clear_binding_outputs()
            binding.bind_output(contract.LOGITS, "cpu")
        return binding, step_logits

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch, new = input_ids.shape
        if self.length + new > self.capacity:
            raise RuntimeUserError(
                f"the KV buffers hold {self.capacity} positions but this step needs {self.length + new}: "
                "a bug in the generation loop (the capacity is prompt + max_new_tokens - 1)"
            )
        binding, step_logits = self._bind_common(input_ids, attention_mask)
        read, write = self.current, 1 - self.current
        for (past, present, dtype, (kv, dim)), pointers in zip(self.tensors, self.pointers):
            binding.bind_input(past, self.device, self.device_id, dtype, [batch, kv, self.length, dim], pointers[read])
            binding.bind_output(
                present, self.device, self.device_id, dtype, [batch, kv, self.length + new, dim], pointers[write]
            )
        self.session.run_with_iobinding(binding)
        self.current, self.length = write, self.length + new
        if step_logits:
            return self.step_logits  # overwritten by the next step: selectors must not keep it
        return binding.get_outputs()[0].numpy()


class NumpyRunner:
    """Plain ``session.run`` with numpy feeds: every step copies the whole cache out of ONNX
    Runtime and back in. Kept as an independent reference for the bound loop."""

    def __init__(self, session: ort.InferenceSession, layout: DecodeLayout, batch: int):
        self.session = session
        self.layout = layout
        self.output_names = [contract.LOGITS] + [present for _, present in layout.past_to_present()]
        self.past: dict[str, np.ndarray] = layout.empty_past(batch)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask, **self.past}
        values = self.session.run(self.output_names, feeds)
        self.past = {
            past: value for (past, _), value in zip(self.layout.past_to_present(), values[1:])
        }
        return values[0]



class SharedRunner(BoundRunner):
    """One buffer per cache tensor, bound as both past and present (GQA writes in place).

    The buffers hold ``capacity`` positions; GQA's rotary cache bounds it (``layout.max_length``).
    The logits are bound as in ``BoundRunner``. The cache bindings never change (same buffers,
    same [b, kv, C, d] shapes every step), so they are made once and kept: a step rebinds only
    the token ids, the mask and the logits (binding the 2 x layers cache tensors again costs
    about 1 ms per step from Python on SmolLM2's 30 layers, some 4% of an int4 step). The
    prefill clears the output bindings (its logits are allocated by ONNX Runtime), so the cache
    outputs are bound again after it."""

    def __init__(self, session, layout, device, device_id, batch, capacity):
        if layout.max_length and capacity > layout.max_length:
            raise RuntimeUserError(
                f"prompt + new tokens need {capacity} positions but this deployment graph's rotary cache "
                f"holds {layout.max_length}: generate fewer tokens or re-deploy with --max-length {capacity}"
            )
        super().__init__(session, layout, device, device_id, batch, capacity, buffers=1)
        self._inputs_bound = False
        self._outputs_bound = False

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch, new = input_ids.shape
        if attention_mask.shape[1] > self.capacity:
            raise RuntimeUserError(
                f"the KV buffer holds {self.capacity} positions but this step needs {attention_mask.shape[1]}: "
                "a bug in the generation loop (the capacity is prompt + max_new_tokens - 1)"
            )
        if batch != self.batch:
            raise RuntimeUserError(f"this runner's KV buffers hold a batch of {self.batch}, not {batch}")
        binding, step_logits = self._bind_common(input_ids, attention_mask)
        if not step_logits:  # _bind_common cleared the outputs (logits allocated by ONNX Runtime)
            self._outputs_bound = False
        if not (self._inputs_bound and self._outputs_bound):
            for (past, present, dtype, (kv, dim)), pointers in zip(self.tensors, self.pointers):
                shape = [batch, kv, self.capacity, dim]
                if not self._inputs_bound:
                    binding.bind_input(past, self.device, self.device_id, dtype, shape, pointers[0])
                if not self._outputs_bound:
                    binding.bind_output(present, self.device, self.device_id, dtype, shape, pointers[0])
            self._inputs_bound = self._outputs_bound = True
        self.session.run_with_iobinding(binding)
        self.length = attention_mask.shape[1]
        if step_logits:
            return self.step_logits
        return binding.get_outputs()[0].numpy()
