"""Weight surgery shared by several passes.

- ``head_surgery``: keeping rows, columns and heads of projections, rewriting head-count
  constants and KV-cache shapes (prune-heads, prune-kv-groups, prune-ffn, the CLAP merge).
- ``clap_merge``: CLAP's merge of KV groups from removed layers into a kept one;
  ``clap_plan`` reads the plan's merges in the graph's numbering (both used by drop-layers).
- ``post_norm``: finding and removing post-norms (drop-post-norm, absorb-post-norm).
- ``rotation_basis``: the rotation file (basis and per-norm energies) and the bases derived from
  it (rotate-hidden; read by calib.rotation and the refit too).

Imports: the foundation, ``passes.analysis`` and ``passes.infra``.
"""
