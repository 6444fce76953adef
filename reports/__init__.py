"""What the commands print and draw: text tables, the benchmark's cost model and report, charts.

- ``table``: ``format_table``, the one width-padded text table every command and benchmark uses.
- ``prune``: the plan and the before/after summary that ``plan`` and ``prune`` print.
- ``bench_cost``: the ideal cost of a generation workload (FLOPs, bytes) and the speedups it predicts.
- ``bench_table``: the readable form of a ``bench`` report; ``bench_chart``: its PNG chart.
- ``machine``: the machine a measurement ran on, as one line.
- ``loss_plot``: a distillation run's loss and held-out perplexity against tokens (PNG).

Imports: ``pangu_light.core`` and third-party libraries only (matplotlib lazily); the objects it
reports on (graph statistics, plans, workloads) are passed in, never imported.
"""
