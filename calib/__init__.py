"""Calibration: corpora, importance statistics gathered under ONNX Runtime, the prune planner.

Empty so far; see the [calib] issue.
"""
