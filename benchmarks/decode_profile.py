"""Where a decode step's time goes, per graph: ONNX Runtime's profiler over greedy decoding.

    python benchmarks/decode_profile.py original-kv.onnx pruned-kv.onnx [--prompt 32]
        [--new-tokens 128] [--threads 2] [--no-spinning] [--rounds 3] [--json]

For each graph (rounds alternate between graphs, the first round is a warm-up), the decode
steps of ``runtime.generate`` (pre-allocated KV buffers, IO binding; a deployment graph of
``pangu-light deploy`` gets its shared buffer, and no ideal ratios: it has no model map) are
split into:

    loop      wall time per step outside ``session.run`` (token choice, binding, Python)
    session   ONNX Runtime's model_run minus the kernels inside it (scheduling, allocation)
    kernels   the sum of kernel times, by op type, with the lm_head MatMul (the node whose
              output's last dimension is the vocabulary) and the KV-cache Concats (output
              rank 4 with the cache's length) apart

and each part of a pruned graph is shown relative to the first graph, next to the ideal
ratios from GraphStats (weights bytes per token, FLOPs). It answers why a measured decode
speedup falls short of the ideal: a part that does not shrink with the pruning (per-node
overhead, the lm_head over a vocabulary that is not pruned) caps it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.infra.graph_io import load_model
from pangu_light.reports.machine import format_machine
from pangu_light.reports.table import format_table
from pangu_light.runtime.generate import generate
from pangu_light.runtime.machine import describe_machine, load_average


def profile_once(
    path: str, threads: int, prompt: list[int], new_tokens: int, vocab: int, spinning: bool = True
) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"decode_profile_{os.getpid()}")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    result = generate(session, [prompt], new_tokens)
    trace = session.end_profiling()
    with open(trace) as handle:
        events = json.load(handle)
    os.remove(trace)
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # the decode steps
    start = runs[0]["ts"]
    steps = len(runs)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    by_op: collections.Counter = collections.Counter()
    lm_head = kv_concat = 0.0
    for event in kernels:
        args = event.get("args", {})
        op, duration = args.get("op_name"), event["dur"]
        shapes = [list(item.values())[0] for item in args.get("output_type_shape", [])]
        if op in ("MatMul", "FusedMatMul", "Gemm") and shapes and shapes[0] and shapes[0][-1] == vocab:
            lm_head += duration
        elif op == "Concat" and shapes and len(shapes[0]) == 4:
            kv_concat += duration
        else:
            by_op[op] += duration
    kernel_total = sum(e["dur"] for e in kernels)
    run_total = sum(e["dur"] for e in runs)
    wall = result.decode_seconds * 1e6
    ms = lambda us: us / steps / 1e3  # noqa: E731
    return {
        "steps": steps,
        "wall_ms": ms(wall),
        "loop_ms": ms(wall - run_total),
        "session_overhead_ms": ms(run_total - kernel_total),
        "kernels_ms": ms(kernel_total),
        "lm_head_ms": ms(lm_head),
        "kv_concat_ms": ms(kv_concat),
        "kernel_nodes_per_step": len(kernels) / steps,
        "by_op_ms": {op: ms(d) for op, d in by_op.most_common()},
    }


def _ideal(path: str, context: int) -> dict:
    """Weight bytes and FLOPs per decode token from GraphStats; for a deployment graph (fused
    ops, no model map) only the vocabulary, read off the logits output."""
    try:
        stats = GraphStats.from_model(load_model(path), context=context)
    except PanguLightError:
        logits = next(o for o in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_outputs()
                      if o.name == contract.LOGITS)
        return {"bytes": None, "flops": None, "vocab": int(logits.shape[-1]), "lm_head_flops": None}
    return {
        "bytes": stats.bytes_per_token_decode().total_bytes,
        "flops": stats.flops_per_token,
        "vocab": stats.vocab_size,
        "lm_head_flops": stats.lm_head_flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-spinning", action="store_true", help="idle ORT threads wait instead of spinning")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up (medians)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ideals = [_ideal(path, args.prompt + args.new_tokens // 2) for path in args.graphs]
    prompt = np.random.default_rng(0).integers(0, min(i["vocab"] for i in ideals), args.prompt).tolist()
    samples: list[list[dict]] = [[] for _ in args.graphs]
    load_start = load_average()
    for round_index in range(args.rounds + 1):
        order = range(len(args.graphs)) if round_index % 2 == 0 else reversed(range(len(args.graphs)))
        for g in order:
            result = profile_once(
                args.graphs[g], args.threads, prompt, args.new_tokens, ideals[g]["vocab"], not args.no_spinning
            )
            if round_index:
                samples[g].append(result)
    load_end = load_average()

    keys = ["wall_ms", "loop_ms", "session_overhead_ms", "kernels_ms", "lm_head_ms", "kv_concat_ms"]
    rows = []
    for path, runs, ideal in zip(args.graphs, samples, ideals):
        row = {"graph": path, **{k: float(np.median([r[k] for r in runs])) for k in keys}}
        row["kernel_nodes_per_step"] = runs[0]["kernel_nodes_per_step"]
        ops = collections.defaultdict(list)
        for r in runs:
            for op, value in r["by_op_ms"].items():
                ops[op].append(value)
        row["by_op_ms"] = {op: float(np.median(v)) for op, v in sorted(ops.items(), key=lambda kv: -np.median(kv[1]))}
        row["ideal"] = ideal
        rows.append(row)
    report = {
        "machine": describe_machine(),
        "load_average": {"start": load_start, "end": load_end},
        "threads": args.threads,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    spin = " (no spinning)" if args.no_spinning else ""
    print(
        f"machine: {format_machine(report['machine'])}; threads {args.threads}{spin}; load {load_start} -> {load_end}"
    )
    print(
        f"decode of {args.new_tokens} tokens after {args.prompt}, batch 1; ms per step, medians of {args.rounds} rounds"
    )
    base = rows[0]
    names = {
        "wall_ms": "wall",
        "loop_ms": "loop",
        "session_overhead_ms": "session",
        "kernels_ms": "kernels",
        "lm_head_ms": "lm_head",
        "kv_concat_ms": "kv_concat",
    }
    table = [("graph", *(names[k] for k in keys), "nodes")]
    for row in rows:
        cells = [f"{row[k]:.2f}" + (f" ({row[k] / base[k]:.2f})" if base[k] else "") for k in keys]
        table.append((os.path.basename(row["graph"]), *cells, f"{row['kernel_nodes_per_step']:.0f}"))
    print(format_table(table))
    for row in rows[1:]:
        ideal, first = row["ideal"], base["ideal"]
        if ideal["bytes"] is None or first["bytes"] is None:
            continue  # a deployment graph: no model map, no ideal ratios
        print(
            f"{os.path.basename(row['graph'])}: ideal step-time ratio from bytes "
            f"{ideal['bytes'] / first['bytes']:.3f}, from FLOPs {ideal['flops'] / first['flops']:.3f}, "
            f"lm_head FLOPs {ideal['lm_head_flops'] / first['lm_head_flops']:.3f}; "
            f"measured wall {row['wall_ms'] / base['wall_ms']:.3f}, "
            f"kernels {row['kernels_ms'] / base['kernels_ms']:.3f}"
        )
    for row in rows:
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(row["by_op_ms"].items())[:8])
        print(f"{os.path.basename(row['graph'])} other kernels (ms/step): {top}")


if __name__ == "__main__":
    main()
