"""Deployment graphs: a decode graph of ours made ready for ONNX Runtime (weights folded for
MatMul, weight-only int8/int4 through ONNX Runtime's own quantizer), written with a record of
what was done (``deploy.json``).

Why a package of its own: the rewrites are pure passes (``passes.deploy``), but the quantizer is
part of onnxruntime, which passes may not import; and it is a build step, not something a
running deployment needs, so it does not belong in ``runtime`` either. Like ``calib`` it may
import core, passes and runtime, never tools or frontend (tests/deploy/test_deploy_imports.py).
"""
