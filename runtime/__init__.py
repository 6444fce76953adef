"""What a deployment needs to run a (pruned) decode graph: ONNX Runtime sessions and generation.

- ``session.create_session(path, provider="auto"|"cann"|"cuda"|"cpu", ...)`` -> ``SessionInfo``:
  picks the execution provider (CANN only when its libraries are really present), checks CANN
  options, and reports a fall-back to the CPU (``fell_back``, a warning) instead of hiding it.
- ``generate.greedy_generate(session, prompts, max_new_tokens, stop_tokens=..., pad_token_id=...)``
  and ``generate.generate(..., select=argmax_selector | Sampling(temperature, top_k, top_p, seed))``:
  left-padded batches, prefill with an empty past, then one token per step with the KV cache in
  buffers allocated once on the device and bound by IO binding.
- ``layout.DecodeLayout``: per-layer KV names and shapes read from the graph (so pruned graphs
  with fewer layers, heads or KV heads just work), and the empty past a prefill is fed.
- ``sampling``: the next-token choice (``argmax_selector``, ``Sampling``).
- ``benchmark``: workloads (the paper's mix, prefill, decode), graphs measured alternately,
  stats over rounds, peak memory in a fresh process; ``machine``: the machine description a
  report carries. ``pangu-light bench`` adds the ideal speedups (``reports.bench_cost``).
- ``tokenizer``: finds the tokenizer from ``--tokenizer`` or the graph's tokenizer metadata
  (``core.contract.TOKENIZER``) and loads it lazily (transformers or tokenizers).
- ``errors.RuntimeUserError``: problems the user can fix, printed by the CLI as ``error: ...``.

Imports: of ours only ``pangu_light.core`` (names and the error type, standard library only);
otherwise onnxruntime, numpy, a tokenizer library (lazily) and the standard library, so it can
ship without the compiler.
"""
