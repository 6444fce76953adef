"""Weight surgery shared by several passes: keeping rows, columns and heads of projections,
rewriting head-count constants, and the CLAP merge of key/value groups.

Imports: the foundation, ``passes.analysis`` and ``passes.infra``.
"""
