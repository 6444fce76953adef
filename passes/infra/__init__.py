"""The pass infrastructure: pipelines as data, the pass base class, the pass table, running and
verifying a pipeline, and the plan (what to keep) that compiles into a pipeline.

- ``pipeline``: ``PassSpec``/``Pipeline`` with a one-line text form.
- ``base``: ``PanguPass``, an onnx-ir in-place pass with validated options, tags and counts.
- ``registry``: the explicit table of pass names.
- ``manager``: runs a pipeline, records it in the graph's metadata, verifies the result.
- ``verify``: ONNX checker and shape inference on the result.
- ``plan``: the kept indices per axis, validated, translated into a pipeline; ``readable_json``
  writes it as JSON for people.

Imports: the foundation (``pangu_light.core``) and ``passes.analysis``.
"""
