"""Calibration and evaluation on real text, through ONNX Runtime.

- ``corpora`` (with ``wiki``, the Wikipedia prose parser): named text sources, split so that
  calibration and evaluation never share a document, cut into token sequences.
- ``text``: a graph's own tokenizer and the token sequences it is fed.
- ``taps`` and ``stats``: the importance statistics of the paper (section 3), gathered by
  tapping the graph; ``calibrate``: the calibrate stage (graph + text -> statistics).
- ``planner``: statistics and targets -> a prune plan.
- ``evaluate``: perplexity of graphs on held-out text (the evaluate stage).

Imports: ``pangu_light.core``, ``passes`` (model map, graph I/O) and ``runtime`` (sessions);
never ``tools`` or ``frontend``.
"""
