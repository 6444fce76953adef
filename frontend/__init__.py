"""The PyTorch side: resolving and loading Hugging Face models (``loading``), exporting them to
clean ONNX graphs that the passes can rewrite (``export``, with ``export_to_file``, the export
stage), re-importing a compiled graph as a PyTorch model (``reimport``) and recovering it by
distillation from the unpruned model (``distill``, ``kd_loss``, ``teacher_cache``).

Imports: any package of ours but ``tools``.
"""
