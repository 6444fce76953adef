"""Reading an exported decoder graph without changing it.

- ``model_map``: what every part of the graph is (layers, norms and their roles, projections,
  head-count constants, KV-cache I/O), derived from the graph itself.
- ``graph_stats``: parameters, FLOPs and bytes per token from the model map (the one
  parameter count the planner also uses).
- ``graph_utils``: small queries on values and nodes (module scopes, consumers, constants).

Imports: the foundation (``pangu_light.core``) only.
"""
