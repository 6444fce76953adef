"""The rewrite passes, one per file, each registered under its pipeline name in
``passes.infra.registry``: ``drop-layers`` (with the CLAP merge of ``passes.surgery``),
``slice-hidden``, ``rotate-hidden`` (folds the pre-norm gammas, rotates the residual stream by an
orthogonal basis and keeps its leading components), ``prune-heads``, ``prune-kv-groups``,
``prune-ffn``, ``slnp``, ``absorb-post-norm``, ``drop-post-norm``, ``set-projection`` (replaces
projection weights by the refit calib/refit_plan.py computes, read from an .npz). Two passes read
a file, since their values come from calibration: set-projection and rotate-hidden (its basis).
No pass imports another.

Imports: the foundation, ``passes.analysis``, ``passes.surgery`` and ``passes.infra``.
"""
