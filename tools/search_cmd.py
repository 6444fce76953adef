"""Choose the pruned shape by measured speed and a fast quality estimate (the paper's hardware
co-design, section 4.1, measured on this machine instead of simulated):

    pangu-light search smollm2-135m --target-speedup 1.6 -o out/search
    pangu-light search smollm2-135m --target-speedup 1.6 --workload decode --budget-minutes 20 -o out/s

Exports the model (original.onnx, original-kv.onnx in OUTDIR, reused), calibrates it in one pass
(the statistics, the refit's Gram matrices and, with rotation, the residual stream's basis), and
makes candidate shapes: a uniform grid (hidden x
FFN width x query heads per group x KV groups x layers dropped, widths aligned to --align) and
the planner's --params spreads. Their speed is measured on --provider with the real graph
structure through the `bench` machinery (the unpruned graph alongside, paired per round) and
cached in a latency table (keyed by provider, machine, model digest, workload and shape: a
second search measures nothing it knows); a per-layer cost model fitted to the measured shapes
predicts the others (its leave-one-out error is reported). The quality proxy is the KL
divergence to the unpruned model on a few calibration sequences after one-shot pruning with
the best one-shot pipeline `prune` has (the hidden size cut by rotation where the family allows it,
--hidden-method, and the refit). The chosen shape is the lowest KL whose measured speedup reaches
the target.

Writes to OUTDIR: plan.json (the chosen plan: `pangu-light compile original-kv.onnx --plan
OUTDIR/plan.json -o pruned-kv.onnx`), front.md (the Pareto front and every shape with a proxy),
front.png, search.json (every candidate, the cost model, the latency table used), stats.npz and
grams.npz (the calibration the plans and the refit used), rotation.npz (with the rotate method:
the basis the plans keep components of), proxies.json (the proxies, by plan and
sequences: a later search in OUTDIR reuses them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import write_json, write_text
from pangu_light.frontend.loading import DEFAULT_MODEL
from pangu_light.runtime.benchmark import WORKLOADS, workload_requests
from pangu_light.tools.arguments import add_text_arguments
from pangu_light.tools.job_output import export_once, job_notes, output_directory

__all__ = ["HELP", "add_arguments", "run"]

HELP = "choose the pruned shape by measured speed on a provider and a KL quality proxy (-> OUTDIR)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"alias, HF model directory or hub id (default {DEFAULT_MODEL})"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    parser.add_argument("--graph", type=Path, metavar="ORIGINAL.onnx",
                        help="use this exported no-cache graph instead of exporting MODEL (e.g. prune's original.onnx)")
    parser.add_argument("--kv-graph", type=Path, metavar="ORIGINAL-KV.onnx",
                        help="with --graph: the decode graph of the same model (for the paper and decode workloads)")
    parser.add_argument("--target-speedup", type=float, required=True, metavar="X",
                        help="required end-to-end speedup over the unpruned model, e.g. 1.6")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="paper", help="default paper")
    parser.add_argument("--scale", type=int, default=32,
                        help="divide the workload's lengths by this (default 32: paper = 4/32 and 8/64 tokens)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per request (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per latency (default 3)")
    parser.add_argument("--provider", choices=("cpu", "cuda", "cann"), default="cpu",
                        help="execution provider to measure on (default cpu); never falls back")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--budget-minutes", type=float, default=10.0,
                        help="time for measuring and the proxy after the set-up (default 10); the choice is "
                        "always verified by a measurement, which may run past it")
    parser.add_argument("--align", type=int, default=32, help="round hidden/FFN widths to multiples of N (default 32)")
    parser.add_argument("--hidden-method", choices=("auto", "select", "rotate"), default="auto",
                        help="how candidates cut the hidden size, as in prune: rotate keeps the leading components "
                        "of the residual stream's PCA (best one-shot quality), select keeps channels; auto (default) "
                        "rotates where the family allows it (no sandwich norms)")
    parser.add_argument("--design-points", type=int, default=8,
                        help="uniform shapes measured to fit the cost model, besides the --params spreads (default 8)")
    parser.add_argument("--table-dir", type=Path, help="where latency tables live (default: the cache directory)")
    calib = parser.add_argument_group("calibration (statistics, refit)")
    add_text_arguments(calib, role="calib", samples=32, seq_len=256)
    parser.add_argument("--proxy-samples", type=int, default=8, help="sequences for the KL proxy (default 8)")
    parser.add_argument("--proxy-seq-len", type=int, default=64, help="tokens per proxy sequence (default 64)")
    parser.add_argument("--heldout-samples", type=int, default=0, metavar="N",
                        help="also the held-out perplexity (--eval-data's eval split, N sequences of "
                        "--proxy-seq-len * 2 tokens) of every shape with a proxy, to judge the proxy (default 0: off)")
    parser.add_argument("--eval-data", default="lambada", help="text for --heldout-samples (default lambada)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def _check_provider(provider: str) -> None:
    import onnxruntime as ort

    from pangu_light.runtime.session import PROVIDERS, cann_libraries_present

    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available or (provider == "cann" and not cann_libraries_present()):
        missing = "; the CANN runtime library is missing" if PROVIDERS[provider] in available else ""
        raise PanguLightError(
            f"provider {provider} is not available here (onnxruntime lists {', '.join(available)}{missing})"
            ": install its onnxruntime build on the target machine and search there, or use --provider cpu"
        )


def _made_here(meta: dict, original: Path, args: argparse.Namespace) -> bool:
    """Whether a calibration output (its ``meta``) came from ``original`` and this search's text."""
    wanted = {"graph": str(Path(original).resolve()), "data": args.data, "samples": args.samples,
              "seq_len": args.seq_len, "seed": args.seed}
    return all(str(meta.get(k)) == str(v) for k, v in wanted.items() if k != "samples" or v is not None)


def _earlier_calibration(out: Path, original: Path, args: argparse.Namespace):
    """The statistics and Grams an earlier search wrote to OUTDIR, when made from the same graph
    and the same calibration text; else (None, None)."""
    from pangu_light.calib.gram import GramStats
    from pangu_light.calib.stats import CalibrationStats

    if not ((out / "stats.npz").is_file() and (out / "grams.npz").is_file()):
        return None, None
    stats, grams = CalibrationStats.load(out / "stats.npz"), GramStats.load(out / "grams.npz")
    if not (_made_here(stats.meta, original, args) and _made_here(grams.meta, original, args)):
        return None, None
    return stats, grams


def _earlier_rotation(out: Path, original: Path, args: argparse.Namespace):
    """OUTDIR's rotation.npz when an earlier search made it from the same graph and text, else None."""
    from pangu_light.passes.surgery.rotation_basis import load_rotation

    if not (out / "rotation.npz").is_file():
        return None
    earlier = load_rotation(out / "rotation.npz")
    return earlier if _made_here(earlier.meta, original, args) else None


def run(args: argparse.Namespace) -> int:
    from pangu_light.calib.calibrate import collect_graph_all
    from pangu_light.calib.planner import Targets
    from pangu_light.calib.rotation import resolve_hidden_method
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.infra.graph_io import load_model, load_model_metadata
    from pangu_light.passes.infra.plan import PrunePlan
    from pangu_light.passes.surgery.rotation_basis import save_rotation
    from pangu_light.reports.search_report import markdown_table, plot_front
    from pangu_light.search.candidates import generate_candidates
    from pangu_light.search.driver import SearchConfig, json_ready, pareto_front, run_search
    from pangu_light.search.latency import LatencyTable, file_digest, table_key

    if not args.target_speedup > 1.0:
        raise PanguLightError(f"--target-speedup {args.target_speedup}: give a speedup above 1, e.g. 1.6")
    for name in ("scale", "batch", "repeats", "threads", "align", "proxy_samples", "design_points"):
        if getattr(args, name) < 1:
            raise PanguLightError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if not args.budget_minutes >= 0:
        raise PanguLightError(f"--budget-minutes {args.budget_minutes}: give 0 or more minutes")
    _check_provider(args.provider)
    out: Path = output_directory(args.output)
    start = time.perf_counter()
    note = job_notes(args.quiet)

    def exported(name: str, kv_cache: bool) -> Path:
        return export_once(args.model, out / name, kv_cache=kv_cache, note=note)

    requests = workload_requests(args.workload, args.scale)
    decodes = any(r.output_tokens > 1 for r in requests)
    if args.graph is not None:
        if decodes and args.kv_graph is None:
            raise PanguLightError(
                f"--graph: the {args.workload} workload decodes; give its decode graph with --kv-graph "
                "(`pangu-light export MODEL --kv-cache`), or use --workload prefill"
            )
        for path in (args.graph, args.kv_graph):
            if path is not None and not path.is_file():
                raise PanguLightError(f"{path}: no such file; pass an exported .onnx graph")
        original = args.graph
        timing_graph = args.kv_graph if decodes else original
    else:
        original = exported("original.onnx", kv_cache=False)
        timing_graph = exported("original-kv.onnx", kv_cache=True) if decodes else original
    model_map = ModelMap.from_model(load_model(original))
    hidden_method = resolve_hidden_method(args.hidden_method, model_map, Targets(params=0.5))
    rotates = hidden_method == "rotate"
    stats, grams = _earlier_calibration(out, original, args)
    rotation = _earlier_rotation(out, original, args) if rotates else None
    if stats is None or grams is None or (rotates and rotation is None):
        note(f"calibrating: statistics, the refit's Gram matrices{', the rotation' if rotates else ''} (one pass)")
        collected = collect_graph_all(
            original, data=args.data, samples=args.samples, seq_len=args.seq_len, seed=args.seed, batch_size=4,
            grams=True, rotation=rotates, threads=args.threads, tokenizer=args.tokenizer, quiet=args.quiet,
        )
        stats, grams, rotation = collected.stats, collected.grams, collected.rotation
        stats.save(out / "stats.npz")
        grams.save(out / "grams.npz")
        if rotates:
            save_rotation(out / "rotation.npz", rotation)
    else:
        note(f"reusing the calibration in {out} (stats.npz, grams.npz{', rotation.npz' if rotates else ''}: "
             "same graph and text)")
    encode, bos = graph_tokenizer(original, load_model_metadata(original), args.tokenizer)
    proxy_sequences = sequences_for(args.data, encode, bos, samples=args.proxy_samples, seq_len=args.proxy_seq_len,
                                    seed=args.seed + 1, split="calib")

    eval_sequences = None
    if args.heldout_samples:
        eval_sequences = sequences_for(args.eval_data, encode, bos, samples=args.heldout_samples,
                                       seq_len=2 * args.proxy_seq_len, seed=args.seed, split="eval")
    candidates = generate_candidates(model_map, stats, align=args.align, hidden_method=hidden_method,
                                     rotation=rotation, rotation_file=str((out / "rotation.npz").resolve()))
    note(f"{len(candidates)} candidate shapes")
    table = LatencyTable(table_key(provider=args.provider, model_digest=file_digest(timing_graph),
                                   workload=args.workload, scale=args.scale, batch=args.batch, threads=args.threads),
                         args.table_dir)
    proxy_cache: dict = {}
    if (out / "proxies.json").is_file():  # an earlier search in OUTDIR: its proxies, for the same graph
        saved = json.loads((out / "proxies.json").read_text())
        proxy_cache = saved["proxies"] if saved.get("graph") == file_digest(original) else {}
    config = SearchConfig(
        target=args.target_speedup, requests=requests, batch=args.batch, repeats=args.repeats,
        session_options=dict(provider=args.provider, threads=args.threads, strict=True),
        budget_seconds=args.budget_minutes * 60, design_points=args.design_points, threads=args.threads,
        quiet=args.quiet,
    )
    result = run_search(
        original=original, timing_graph=timing_graph, candidates=candidates, identity=PrunePlan.identity(model_map),
        head_dim=model_map.layers[0].attention.head_dim, grams=grams, proxy_sequences=proxy_sequences,
        table=table, config=config, eval_sequences=eval_sequences, proxy_cache=proxy_cache, rotation=rotation,
    )
    write_json(out / "proxies.json", {"graph": file_digest(original), "proxies": proxy_cache})
    plan = result.chosen.plan
    plan.targets["search"] = {"target_speedup": args.target_speedup, "workload": args.workload,
                              "scale": args.scale, "provider": args.provider, "label": result.chosen.label}
    plan.targets["refit"] = "refit"
    plan.save(out / "plan.json")
    front = pareto_front(result.rows)
    with_proxy = sorted((r for r in result.rows if r.get("kl") is not None), key=lambda r: r["speedup"])
    report = json_ready(result)
    report.update({"front": front, "target_speedup": args.target_speedup, "latency_table": str(table.path),
                   "workload": {"name": args.workload, "scale": args.scale, "batch": args.batch,
                                "repeats": args.repeats}, "provider": args.provider, "threads": args.threads,
                   "graphs": {"original": str(Path(original).resolve()), "decode": str(Path(timing_graph).resolve())},
                   "tokenizer": str(args.tokenizer.resolve()) if args.tokenizer else None})
    write_json(out / "search.json", report)
    chosen = result.chosen.label
    write_text(out / "front.md", f"# Pareto front (target {args.target_speedup:g}x, {args.workload}/{args.scale}, "
               f"{args.provider})\n\n{markdown_table(front, chosen)}\n\n# Every shape with a proxy\n\n"
               f"{markdown_table(with_proxy, chosen)}\n")
    plot_front(result.rows, front, args.target_speedup, out / "front.png", chosen)
    print(markdown_table(front, chosen))
    errors = result.cost_model["median_abs_relative_error"]
    print(f"chosen: {chosen}: measured speedup {result.chosen_row['speedup']:.2f}x, KL {result.chosen_row['kl']:.4f}, "
          f"{result.chosen_row['parameter_ratio']:.3f} of the parameters")
    print(f"measured {result.measured_now} new shapes ({result.cost_model['measured_shapes']} known); cost model "
          f"leave-one-out median |error| {'-' if errors is None else f'{100 * errors:.1f}%'}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"wrote plan.json, front.md, front.png, search.json in {out}")
    return 0
