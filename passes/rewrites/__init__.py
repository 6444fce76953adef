"""The rewrite passes, one per file, each registered under its pipeline name in
``passes.infra.registry``: ``drop-layers`` (with the CLAP merge of ``passes.surgery``),
``slice-hidden``, ``prune-heads``, ``prune-kv-groups``, ``prune-ffn``, ``slnp``,
``absorb-post-norm``, ``drop-post-norm``. No pass imports another.

Imports: the foundation, ``passes.analysis``, ``passes.surgery`` and ``passes.infra``.
"""
