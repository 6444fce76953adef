"""Deployment rewrites: pure onnx-ir passes that prepare a decode graph for ONNX Runtime's own
tools (its weight-only quantizer, its fusions). The quantizer itself runs in ``pangu_light.deploy``,
since passes never import onnxruntime."""
