"""The rewrite passes, one per file, each registered under its pipeline name in
``passes.infra.registry``: ``drop-layers`` (with the CLAP merge of ``passes.surgery``),
``slice-hidden``, ``prune-heads``, ``prune-kv-groups``, ``prune-ffn``, ``slnp``,
``absorb-post-norm``, ``drop-post-norm``, ``set-projection`` (replaces projection weights by the
refit calib/refit_plan.py computes, read from an .npz: the one pass that reads a file, since its
values come from calibration). No pass imports another.

Imports: the foundation, ``passes.analysis``, ``passes.surgery`` and ``passes.infra``.
"""
