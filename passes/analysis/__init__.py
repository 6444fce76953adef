"""Reading an exported decoder graph without changing it.

- ``patterns``: graph regions as declarative patterns (RMSNorm, Linear, GQA) and their matcher.
- ``model_map``: ``ModelMap``, what every part of the graph is (layers, norms and their roles,
  projections, head-count constants, KV-cache I/O), derived from the graph itself; its parts
  are in ``map_types``, the derivation in ``map_builder`` and ``map_attention``.
- ``attention_context``: what an attention shares with other layers (rotary, mask, score
  constants), which tells layer types apart.
- ``parameters``: the one parameter count (GraphStats and the planner both use it).
- ``graph_stats``: parameters, FLOPs and bytes per token from the model map.
- ``graph_utils``: small queries on values and nodes (module scopes, readers, ``exclusive``).

Imports: the foundation (``pangu_light.core``) only.
"""
