"""Are two `prune` output folders the same job's result? (e.g. before and after a speed-up)

    python benchmarks/compare_prune_outputs.py out/before out/after

Compares, file by file: every array of stats.npz, rotation.npz and refit.npz (exactly), plan.json
(the kept indices and targets; the source paths may differ), the initializers of pruned.onnx and
pruned-kv.onnx byte for byte and their node lists, and the parameters, FLOPs and perplexities in
summary.json. Prints one line per file and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _npz(a: Path, b: Path) -> str | None:
    x, y = _arrays(a), _arrays(b)
    if x.keys() != y.keys():
        return f"keys differ: {sorted(x.keys() ^ y.keys())[:5]}"
    skip = {"meta"}  # the settings, with the graph's path
    bad = [k for k in x if k not in skip and not np.array_equal(x[k], y[k])]
    return f"arrays differ: {bad[:5]}" if bad else None


def _plan(a: Path, b: Path) -> str | None:
    x, y = (json.loads(p.read_text()) for p in (a, b))
    for plan in (x, y):  # where the files were differs between the folders, nothing else may
        plan.pop("source", None)
        (plan.get("hidden") or {}).get("rotation", {}).pop("file", None)
    return None if x == y else f"differ in {sorted(k for k in x if x.get(k) != y.get(k))}"


def _graph(a: Path, b: Path) -> str | None:
    from pangu_light.passes.infra.graph_io import load_model

    x, y = load_model(a), load_model(b)
    if [(n.op_type, [v.name if v else "" for v in n.inputs]) for n in x.graph] != \
       [(n.op_type, [v.name if v else "" for v in n.inputs]) for n in y.graph]:
        return "node lists differ"
    if x.graph.initializers.keys() != y.graph.initializers.keys():
        return "initializer names differ"
    bad = [n for n, v in x.graph.initializers.items()
           if v.const_value.tobytes() != y.graph.initializers[n].const_value.tobytes()]
    return f"initializers differ: {bad[:5]}" if bad else None


def _summary(a: Path, b: Path) -> str | None:
    x, y = (json.loads(p.read_text())["graphs"] for p in (a, b))
    return None if x == y else f"{x} != {y}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    checks = {"stats.npz": _npz, "rotation.npz": _npz, "refit.npz": _npz, "plan.json": _plan,
              "pruned.onnx": _graph, "pruned-kv.onnx": _graph, "summary.json": _summary}
    failed = False
    for name, check in checks.items():
        a, b = args.before / name, args.after / name
        if not a.exists() and not b.exists():
            continue
        problem = "missing on one side" if not (a.exists() and b.exists()) else check(a, b)
        failed |= problem is not None
        print(f"{name:16s} {'same' if problem is None else 'DIFFERENT: ' + problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
