"""The whole job in one command: export, calibrate, plan, compile, refit, evaluate.

    pangu-light prune smollm2-135m --params 0.7 -o out/prune
    pangu-light prune ./my-hf-dir --hidden 448 --heads-per-group 2 --ffn 1152 --drop-layers 4 -o out/p

Writes every intermediate into OUTDIR, so each stage can be inspected or re-run alone:

    original.onnx      the exported graph (no KV cache); reused when it exists for the same MODEL
    stats.npz          calibration statistics (`pangu-light calibrate`)
    plan.json          the prune plan (`pangu-light plan`)
    pruned.onnx        the rewritten graph (`pangu-light compile --plan`, then `set-projection`)
    refit.npz          the refit o_proj/down_proj weights set-projection applied (unless --refit none)
    rotation.npz       with --hidden-method rotate: the residual stream's PCA basis and energies
    layer_probe.json   with the sensitivity spread (a --params budget's default): each layer's probed
                       loss rise per unit of refit error, which moves heads and FFN neurons between layers
    original-kv.onnx, pruned-kv.onnx   the decode graphs (KV cache), unless --no-kv-cache
    summary.json       the table printed at the end

and prints parameters, FLOPs per token and held-out perplexity before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from pangu_light.calib.sensitivity_probe import PROBE_SAMPLES, PROBE_SEQ_LEN
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import write_json
from pangu_light.frontend.loading import DEFAULT_MODEL
from pangu_light.reports.prune import describe_plan, summary_table
from pangu_light.tools.arguments import add_target_arguments, add_text_arguments, targets_from_args
from pangu_light.tools.job_output import export_kinds, job_notes, output_directory

__all__ = ["HELP", "add_arguments", "run"]

HELP = "export, calibrate, plan, compile, refit and evaluate in one go (-> OUTDIR)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"alias, HF model directory or hub id (default {DEFAULT_MODEL})"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="output directory for every intermediate")
    add_target_arguments(parser, prune=True)
    calib = parser.add_argument_group("calibration")
    add_text_arguments(calib, role="calib", samples=64, seq_len=256)
    calib.add_argument(
        "--aggregation", choices=("paper", "minitron"), default="paper", help="statistic aggregation (default paper)"
    )
    evaluation = parser.add_argument_group("evaluation")
    add_text_arguments(evaluation, role="eval", samples=32, seq_len=256)
    evaluation.add_argument("--no-eval", action="store_true", help="skip the perplexity before/after")
    parser.add_argument(
        "--refit", choices=("refit", "bias", "none"), default="refit",
        help="after pruning, refit each o_proj/down_proj that lost inputs to reproduce the unpruned "
        "layer's output on the calibration tokens (ridge least squares, default), add the removed "
        "inputs' mean contribution as a bias (bias: FLAP's compensation), or leave the weights (none)",
    )
    parser.add_argument(
        "--clap-refit", choices=("next", "own", "span", "none"), default="next",
        help="with --clap and --refit refit: refit each CLAP receiver's o_proj over its merged heads (the "
        "merged heads computed on the unpruned model's input: one more forward pass over the calibration "
        "text) to reproduce the receiver's own attention output plus that of the removed layer next to it "
        "(next, default), its own only (own), or that of every layer merged into it too (span); none leaves "
        "the copied weights",
    )
    parser.add_argument(
        "--hidden-method", choices=("auto", "select", "rotate"), default="auto",
        help="how the hidden size shrinks: keep the channels with the highest S_channel (select), or "
        "rotate the residual stream into the PCA basis of its unit-normalised tokens (calibration) and keep "
        "the leading components, each norm's gamma folded into its readers and set to an RMS correction "
        "(rotate; pre-norm families only: Llama, Qwen2/3, Mistral). auto (default): rotate for pre-norm "
        "families when the hidden size is cut, select otherwise. Recorded in plan.json",
    )
    parser.add_argument("--no-kv-cache", action="store_true", help="do not export and prune the decode graph")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per ONNX Runtime call (default 4)")
    parser.add_argument(
        "--probe-samples", type=int, default=PROBE_SAMPLES, metavar="N",
        help=f"with --spread sensitivity: calibration sequences each layer probe is scored on (default "
        f"{PROBE_SAMPLES}; the probe runs each layer's part of the model 1 + 2 x layers times). More tokens "
        "rank the layers better: on SmolLM2-135M at --params 0.8, LAMBADA perplexity 1.53x the unpruned "
        "model's with 2 x 128 probe tokens, 1.50x with 4 x 128 or 2 x 256, 1.44x with 4 x 256, 1.40x with "
        "8 x 256, the probe's time growing with the tokens",
    )
    parser.add_argument(
        "--probe-seq-len", type=int, default=PROBE_SEQ_LEN, metavar="T",
        help=f"with --spread sensitivity: their first T tokens (default {PROBE_SEQ_LEN})",
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def run(args: argparse.Namespace) -> int:
    from pangu_light.calib.budget import resolve_spread
    from pangu_light.calib.calibrate import collect_graph_all
    from pangu_light.calib.evaluate import evaluate_graphs
    from pangu_light.calib.planner import make_plan, reachable_spread
    from pangu_light.calib.refit_plan import refit_and_set
    from pangu_light.calib.rotation import resolve_hidden_method
    from pangu_light.calib.sensitivity import FLOORS
    from pangu_light.core.paths import record_path
    from pangu_light.passes.analysis.graph_stats import GraphStats
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.infra.graph_io import load_model, save_model_atomic
    from pangu_light.passes.infra.manager import run_pipeline
    from pangu_light.passes.rewrites.rotate_hidden import save_rotation

    targets = targets_from_args(args)
    targets = dataclasses.replace(targets, hidden_method=args.hidden_method,
                                  spread=resolve_spread(args.spread, targets, refit=args.refit == "refit"))
    untargeted = dataclasses.replace(targets, hidden_method="select", clap_margin=type(targets)().clap_margin)
    if untargeted in (type(targets)(), type(targets)(align=args.align)):
        raise PanguLightError(
            "prune needs a target: --params 0.7, or widths such as --hidden 448 --heads-per-group 2 "
            "--ffn 1152, or --drop-layers 6 (see `pangu-light prune --help`)"
        )
    targets.check()  # before the export and calibration it would otherwise wait for
    if targets.selection != "scores" and args.refit != "refit":
        raise PanguLightError(
            f"--selection {targets.selection} chooses for the refit: it needs --refit refit (the default)")
    out: Path = output_directory(args.output)
    start = time.perf_counter()
    note = job_notes(args.quiet)

    # Both graph kinds in one export run (the model resolved and checked once).
    graphs = {False: out / "original.onnx", **({} if args.no_kv_cache else {True: out / "original-kv.onnx"})}
    export_kinds(args.model, graphs, note=note)
    original = graphs[False]

    model = load_model(original)
    model_map = ModelMap.from_model(model)
    targets.hidden_method = resolve_hidden_method(args.hidden_method, model_map, targets)
    refit = args.refit != "none"
    wanted = ["statistics", *(["the refit's Gram matrices"] if refit else []),
              *(["the residual stream's rotation"] if targets.hidden_method == "rotate" else [])]
    note(f"calibrating: {', '.join(wanted)} (one pass)")
    collected = collect_graph_all(
        original, data=args.data, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        batch_size=args.batch_size, grams=refit, rotation=targets.hidden_method == "rotate",
        aggregation=args.aggregation, threads=args.threads, tokenizer=args.tokenizer, quiet=args.quiet,
    )
    stats, rotation = collected.stats, collected.rotation
    stats.save(out / "stats.npz")
    if rotation is not None:
        save_rotation(out / "rotation.npz", rotation)
    spread = reachable_spread(model_map, stats, targets, args.spread)
    if spread != targets.spread:
        note(f"--spread auto: the sensitivity spread cannot reach --params {targets.params} (it cuts {FLOORS}); "
             "spreading by hidden-light instead, no layer probe")
        targets.spread = spread
    layer_scales = None
    if targets.spread == "sensitivity" and collected.grams is not None:
        layer_scales = _probe_layers(original, stats, collected.grams, collected.sequences, args,
                                     len(model_map.layers))
        write_json(out / "layer_probe.json", layer_scales.to_json())
    plan = make_plan(model_map, stats, targets, rotation=rotation,
                     rotation_file=str((out / "rotation.npz").resolve()), grams=collected.grams,
                     layer_scales=layer_scales)
    plan.targets["refit"] = args.refit
    if plan.clap:
        plan.targets["clap_refit"] = args.clap_refit
    plan.source["graph"] = record_path(original, out / "plan.json")
    plan.save(out / "plan.json")
    if not args.quiet:
        print(describe_plan(plan), file=sys.stderr)

    refit_file = out / "refit.npz"

    def compile_with_plan(graph, source: Path, target: Path):
        plan.attach(graph)
        pipeline = plan.pipeline()
        note(f"compiling {source.name} -> {target.name}: {pipeline}")
        run_pipeline(graph, pipeline)
        return graph

    original_stats = GraphStats.from_model(model)  # before the passes rewrite it in place
    pruned_model = compile_with_plan(model, original, out / "pruned.onnx")
    if refit:
        grams, collected.grams = collected.grams, None
        receivers = _receiver_moments(original, plan, collected.sequences, args) if args.refit == "refit" else None
        refits = refit_and_set(load_model(original), pruned_model, grams, plan, rotation=rotation,
                               method=args.refit, save_to=refit_file, receivers=receivers,
                               receiver_target=args.clap_refit)
        del grams
        if refits.skipped:
            note(f"left as they are (not refit): {'; '.join(refits.skipped)}")
        refit = bool(refits.projections)
    save_model_atomic(pruned_model, out / "pruned.onnx")
    rows = {"original": original_stats, "pruned": GraphStats.from_model(pruned_model)}
    del model, pruned_model
    if not args.no_kv_cache:
        original_kv = graphs[True]
        pruned_kv = compile_with_plan(load_model(original_kv), original_kv, out / "pruned-kv.onnx")
        if refit:  # the same projections (the decode graph holds the same weights)
            run_pipeline(pruned_kv, f"set-projection{{file={json.dumps(str(refit_file.resolve()))}}}")
        save_model_atomic(pruned_kv, out / "pruned-kv.onnx")

    perplexities = {}
    if not args.no_eval:
        note(f"perplexity on {args.eval_data!r} (eval split)")
        results = evaluate_graphs(
            [original, out / "pruned.onnx"],
            data=args.eval_data,
            samples=args.eval_samples,
            seq_len=args.eval_seq_len,
            seed=args.seed,
            tokenizer=args.tokenizer,
            batch_size=args.batch_size,
            threads=args.threads,
            quiet=args.quiet,
        )
        perplexities = dict(zip(("original", "pruned"), results.values()))

    summary = {
        "model": str(args.model),
        "plan": describe_plan(plan).splitlines(),
        "calibration": {"data": args.data, "tokens": stats.tokens, "samples": args.samples, "seq_len": args.seq_len},
        "refit": args.refit,
        "hidden_method": plan.hidden_method,
        "evaluation": None
        if args.no_eval
        else {"data": args.eval_data, "samples": args.eval_samples, "seq_len": args.eval_seq_len},
        "graphs": {
            name: {
                "parameters": s.total_parameters,
                "flops_per_token": s.flops_per_token,
                "layers": s.num_layers,
                "hidden_size": s.hidden_size,
                **({"perplexity": perplexities[name].perplexity} if name in perplexities else {}),
            }
            for name, s in rows.items()
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / "summary.json", summary)
    print(summary_table(summary))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} in {out}")
    return 0


def _receiver_moments(original: Path, plan, sequences, args: argparse.Namespace):
    """``calib.clap_refit`` moments of the plan's CLAP receivers (None: no receiver, or --clap-refit none)."""
    from tqdm import tqdm

    from pangu_light.calib.clap_refit import collect_receiver_moments, receivers_to_refit
    from pangu_light.calib.stats import batched
    from pangu_light.passes.infra.graph_io import load_model

    if args.clap_refit == "none" or not receivers_to_refit(plan):
        return None
    with tqdm(total=int(sequences.size), unit="tok", desc="CLAP receivers", disable=args.quiet,
              file=sys.stderr) as bar:
        return collect_receiver_moments(load_model(original), plan, batched(sequences, args.batch_size),
                                        threads=args.threads, on_batch=bar.update)


def _probe_layers(original: Path, stats, grams, sequences, args: argparse.Namespace, layers: int):
    """``calib.sensitivity_probe`` on the first ``--probe-seq-len`` tokens of the first ``--probe-samples``
    calibration sequences (the windows calibration ran on)."""
    from tqdm import tqdm

    from pangu_light.calib.sensitivity_probe import probe_layers

    with tqdm(total=1 + 2 * layers, unit="probe", desc="layer probe", disable=args.quiet, file=sys.stderr) as bar:
        if args.probe_samples < 1 or args.probe_seq_len < 2:
            raise PanguLightError("--probe-samples must be at least 1 and --probe-seq-len at least 2")
        probe = sequences[: args.probe_samples, : args.probe_seq_len]
        return probe_layers(original, stats, grams, probe, batch_size=args.batch_size,
                            threads=args.threads, on_probe=lambda: bar.update(1))
