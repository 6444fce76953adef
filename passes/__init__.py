"""The graph side: the model map, the pass infrastructure and one rewrite pass per file.

- ``model_map.ModelMap.from_model(model)``: what every part of an exported decoder graph is
  (layers, norms and their roles, projections, head-count constants, KV-cache I/O), derived
  from the graph itself.
- ``pipeline``, ``base``, ``registry``, ``manager``, ``verify``: pipelines as data with a
  one-line text form, the ``PanguPass`` base (onnx-ir in-place pass with validated options,
  tags and counts), the explicit pass table, running and verifying a pipeline.
- Passes: ``drop_layers.DropLayersPass`` (``drop-layers``), ``slice_hidden.SliceHiddenPass``
  (``slice-hidden``).
- ``graph_stats``: parameters, FLOPs and bytes per token from the model map.

Nothing here imports torch or onnxruntime or reads data: a pass is a pure function of
(graph, options).
"""
