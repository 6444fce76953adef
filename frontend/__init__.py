"""The PyTorch side: resolving and loading Hugging Face models (``loading``), exporting them to
clean ONNX graphs that the passes can rewrite (``export``, with ``export_to_file``, the export
stage), re-importing a compiled graph as a PyTorch model (``reimport``: the graph's shapes and weights;
``student``: building, saving and loading that model) and recovering it by distillation from the
unpruned model (the ``distill`` package, ``kd_loss``, ``teacher_cache``).

Imports: any package of ours but ``tools``.
"""
