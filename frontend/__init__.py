"""The PyTorch side: resolving and loading Hugging Face models (``loading``) and exporting
them to clean ONNX graphs that the passes can rewrite (``export``)."""
