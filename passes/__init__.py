"""The graph side: pure rewrites of exported decoder graphs.

- ``infra``: pipelines as data, the ``PanguPass`` base, the pass table, the manager and the plan.
- ``analysis``: the model map and graph statistics (read-only).
- ``surgery``: weight edits shared by several passes (rows, columns, heads, the CLAP merge).
- ``rewrites``: one rewrite pass per file.

Nothing here imports torch, onnxruntime, or another package of ours but the foundation
(``pangu_light.core``): a pass is a pure function of (graph, options).
"""
