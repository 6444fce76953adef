"""The graph side: pure rewrites of exported decoder graphs.

- ``infra``: pipelines as data, the ``PanguPass`` base, the pass table, the manager and the plan.
- ``analysis``: read-only: graph regions as patterns, the model map, the parameter count and
  graph statistics.
- ``surgery``: weight edits shared by several passes (rows, columns, heads, the CLAP merge,
  removing post-norms).
- ``rewrites``: one rewrite pass per file.

Nothing here imports torch, onnxruntime, or another package of ours but the foundation
(``pangu_light.core``): a pass is a pure function of (graph, options).
"""
