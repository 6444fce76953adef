"""Corrective refit (calib.corrective_refit) against prune's one-shot refit: held-out perplexity,
one run, from one `pangu-light prune` output.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/corrective_refit.py PRUNE_DIR \\
        [--workdir /tmp/corrective] [--rounds 2 | --ridges 1e-3,1e-2] [--calib-samples 64] [--eval-samples 8]
        [--dropped] [--all-projections]

PRUNE_DIR holds original.onnx, pruned.onnx (one-shot refit), plan.json and, for a rotate plan,
rotation.npz. Each round runs both graphs on the wiki calibration split (the same windows prune
drew with seed 0), refits every o_proj/down_proj in refit.npz, and scores the result on the same
LAMBADA and wiki eval-split windows as the original and the one-shot graph.

Measured 2026-12-03 on the output of `pangu-light prune smollm2-135m --params 0.8` (rotate + one-shot refit;
AMD EPYC 2 cores shared, load 4-7; calib 64 x 256 wiki, eval 8 x 256; x the unpruned perplexity,
LAMBADA / wiki; unpruned 56.57 / 27.27)::

    one-shot refit (prune's output)                 2.40 / 2.26
    --rounds 2, ridge 1e-5 toward zero  round 1   370.4 / 407.8     (443 s)
                                        round 2  1308.4 / 354.6     (483 s)
    --ridges (toward the one-shot W')   1e-3       42.6 / 66.2
                                        1e-2        8.57 / 11.76
                                        1e-1        4.24 / 4.84
                                        1           4.41 / 3.55
    --ridges 1e-2,1 --skip-first 1      1e-2        8.14 / 7.02
                                        1           6.33 / 5.86

Every corrective variant is worse than the one-shot refit; prune does not use it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import note

from pangu_light.calib.calibrate import calibration_sequences
from pangu_light.calib.corrective_refit import (
    CORRECTIVE_RIDGE,
    collect_cross_moments,
    corrective_projections,
    hidden_outputs_map,
    layer_targets,
    refit_correctively,
)
from pangu_light.calib.evaluate import evaluate_graphs
from pangu_light.calib.stats import batched
from pangu_light.core.records import layer_origins
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model, save_model_atomic
from pangu_light.passes.infra.plan import load_plan
from pangu_light.passes.rewrites.set_projection import SetProjectionPass, load_projections, save_projections
from pangu_light.passes.surgery.rotation_basis import load_rotation
from pangu_light.reports.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prune_dir", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/corrective"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--ridge", type=float, default=CORRECTIVE_RIDGE)
    parser.add_argument("--ridges", type=lambda text: [float(x) for x in text.split(",")], default=None,
                        help="one moments pass (round 1), then one graph per ridge, e.g. 1e-3,1e-2,1e-1")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-first", type=int, default=0, help="leave the first N positions out of the moments")
    parser.add_argument("--dropped", action="store_true",
                        help="the layer before removed layers also reproduces their residual updates")
    parser.add_argument("--all-projections", action="store_true",
                        help="refit every o_proj/down_proj (CLAP receivers too), not only those in refit.npz")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    original_path, start_path = args.prune_dir / "original.onnx", args.prune_dir / "pruned.onnx"
    plan = load_plan(args.prune_dir / "plan.json")
    rotation = load_rotation(args.prune_dir / "rotation.npz") if plan.hidden_method == "rotate" else None
    names = set(load_projections(args.prune_dir / "refit.npz")) if (args.prune_dir / "refit.npz").is_file() else set()
    if args.all_projections:
        pruned_map = ModelMap.from_model(load_model(start_path))
        names = {lin.weight.name for layer in pruned_map.layers for lin in (layer.attention.o, layer.ffn.down)}
    sequences, _ = calibration_sequences(original_path, "wiki", args.calib_samples, 256, 0, None)
    graphs, seconds = [original_path, start_path], {}
    if args.ridges:  # one pass of moments, one solve per ridge
        began = time.perf_counter()
        compiled = load_model(start_path)
        origins = layer_origins(compiled.metadata_props) or list(range(len(ModelMap.from_model(compiled).layers)))
        clap = plan.clap_merges if plan.clap else ()
        moments = collect_cross_moments(load_model(original_path), load_model(start_path),
                                        layer_targets(origins, clap, dropped=args.dropped),
                                        batched(sequences, args.batch_size), threads=args.threads,
                                        skip_first=args.skip_first)
        hidden_map = hidden_outputs_map(plan, ModelMap.from_model(load_model(original_path)), rotation)
        note(f"moments in {time.perf_counter() - began:.0f} s")
        for ridge in args.ridges:
            projections = corrective_projections(load_model(original_path), compiled, moments, hidden_map, names,
                                                 ridge=ridge)
            file, graph = args.workdir / f"ridge{ridge:g}.npz", load_model(start_path)
            save_projections(file, projections)
            SetProjectionPass({"file": str(file)})(graph)
            kept = args.workdir / f"ridge{ridge:g}.onnx"
            save_model_atomic(graph, kept)
            graphs.append(kept)
    else:
        current = args.workdir / "corrective.onnx"
        save_model_atomic(load_model(start_path), current)
    for round_index in range(1, 0 if args.ridges else args.rounds + 1):
        began = time.perf_counter()
        refit_correctively(original_path, current, plan, names, sequences, rotation=rotation, dropped=args.dropped,
                           ridge=args.ridge, batch_size=args.batch_size, threads=args.threads,
                           save_to=args.workdir / f"corrective{round_index}.npz")
        kept = args.workdir / f"corrective{round_index}.onnx"
        save_model_atomic(load_model(current), kept)
        seconds[str(kept)] = round(time.perf_counter() - began, 1)
        note(f"round {round_index}: {len(names)} projections in {seconds[str(kept)]} s")
        graphs.append(kept)
    rows, results = [], {}
    for data in ("lambada", "wiki"):
        results[data] = evaluate_graphs(graphs, data=data, samples=args.eval_samples, seq_len=256, quiet=True,
                                        threads=args.threads)
    base = {data: results[data][str(original_path)].perplexity for data in results}
    for graph in graphs:
        ppl = {data: results[data][str(graph)].perplexity for data in results}
        rows.append([Path(graph).name, *(f"{ppl[d]:.2f} ({ppl[d] / base[d]:.3f}x)" for d in results),
                     str(seconds.get(str(graph), ""))])
    print(format_table([["graph", "lambada", "wiki", "seconds"], *rows]))
    print(f"load average {os.getloadavg()}")
    (args.workdir / "corrective.json").write_text(json.dumps({"rows": rows, "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
