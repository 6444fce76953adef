"""Deployment graphs side by side: decode tokens/s, prefill ms, node counts, greedy agreement and
held-out perplexity of a decode graph and its fp32 / int8 / int4 deployments, and of ONNX Runtime
GenAI's own graphs of the same model (its model builder; ``pip install -e .[genai]``).

    python benchmarks/deploy_speed.py out/prune/original-kv.onnx [out/prune/pruned-kv.onnx]
        -o out/deploy-bench [--weights fp32,int8,int4] [--threads 1,2] [--rounds 3] [--prompt 32]
        [--new-tokens 128] [--ppl-samples 16] [--tokenizer DIR] [--json PATH]
        [--genai DIR ...] [--baseline LABEL]

``--genai DIR``: a directory the GenAI builder wrote (``python -m onnxruntime_genai.models.builder
-i HF_DIR -o DIR -p fp32|int4 -e cpu``), run through onnxruntime_genai's own generator (its
shared KV buffer, greedy, the same prompt tokens, intra-op threads set by a config overlay);
labelled ``genai DIRNAME``. Its prefill is the ``append_tokens`` call, its decode the
``generate_next_token`` loop (the first call uses the prefill's logits, so both loops run the
graph new_tokens - 1 times; ``min_length`` keeps GenAI from stopping at the end-of-text token,
so both generate exactly new_tokens). ``--baseline LABEL`` adds each graph's decode ratio to that row
(median of per-round ratios), e.g. ``--baseline "genai fp32"``.

For each source graph, `pangu-light deploy` builds each of --weights (block 32, symmetric,
accuracy level 4; the lm_head at deploy's default width, int8 under int4, or at the width after
a colon: ``int4:int4`` quantizes the lm_head to int4 too, as GenAI's int4 builder does; a
``+nobias`` suffix deploys with ``--no-padding-bias``, as GenAI's graphs are: batch 1 has no padding;
a ``+gptq`` suffix with ``--quant-method gptq``, its default calibration: 32 x 256 tokens of wiki).
Then, per thread count, one session per graph; rounds alternate between the graphs, in reversed
order every other round (one warm-up round thrown away), each round a greedy generation of
--new-tokens after the same random --prompt-token prompt (or the tokens of --prompt-text; batch 1).
Reported: medians of decode tokens/s and prefill ms, the decode ratio to the source graph (median
of per-round ratios), the node count in the file and after ONNX Runtime's optimiser, how many
greedy tokens equal the source's, and perplexity on the held-out LAMBADA split (same sequences for every graph, GenAI's
graphs included: evaluated by our runtime with an empty past, as ours are). Machine
load (1-minute average) before and after is printed: timings on a shared machine move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pangu_light.calib.evaluate import evaluate_graphs
from pangu_light.deploy.build import DeployOptions, build_deployment
from pangu_light.runtime.generate import generate
from pangu_light.runtime.session import create_session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32, help="random prompt tokens (ids 100-9999, seed 0)")
    parser.add_argument("--prompt-text", help="a text prompt instead (the first source's tokenizer, as calibration "
                        "encodes: its BOS first where the tokenizer adds one): greedy agreement then means "
                        "something, where a random prompt's flat next-token distribution flips on rounding")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ppl-samples", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="HF model directory (default: the graph's metadata)")
    parser.add_argument("--weights", default="fp32,int8,int4", help="deployments built of each source")
    parser.add_argument("--genai", type=Path, action="append", default=[], help="a GenAI builder output directory")
    parser.add_argument("--baseline", help="label of the row every decode ratio is also taken against")
    parser.add_argument("--no-time-sources", action="store_true", help="time only the deployments (and GenAI)")
    args = parser.parse_args()
    if args.no_time_sources and not args.baseline:
        parser.error("--no-time-sources needs --baseline: the ratios are then taken to it alone")

    graphs: list[tuple[str, Path, str]] = []  # (label, path, its source label)
    stems = [source.stem for source in args.sources]
    for source in args.sources:
        name = f"{source.parent.name}/{source.stem}" if stems.count(source.stem) > 1 else source.stem
        graphs.append((name, source, name))
        for spec in args.weights.split(","):
            spec, *flags = spec.split("+")
            unknown = set(flags) - {"nobias", "gptq"}
            if unknown:
                parser.error(f"--weights {spec}+{'+'.join(flags)}: the suffixes are +nobias and +gptq")
            weights, _, head = spec.partition(":")
            suffix = f"{weights}{'-head-' + head if head else ''}" + "".join(f"-{flag}" for flag in flags)
            out = args.output / f"{name.replace('/', '-')}-{suffix}"
            options = DeployOptions(weights=weights, lm_head_weights=head, padding_bias="nobias" not in flags,
                                    quant_method="gptq" if "gptq" in flags else "rtn")
            record = build_deployment(source, out, options, tokenizer=args.tokenizer)
            label = f"{name} {weights} head {record.get('lm_head_weights') or 'fp32'} {' '.join(flags)}".rstrip()
            graphs.append((label, out / "model.onnx", name))
    for directory in args.genai:
        graphs.append((f"genai {directory.name}", directory / "model.onnx", graphs[0][0]))
    timed = [g for g in graphs if not (args.no_time_sources and g[0] == g[2])]
    load_start = os.getloadavg()
    rows = {label: {"path": str(path), "nodes_file": len(onnx.load(str(path), load_external_data=False).graph.node),
                    "nodes_ort": _ort_nodes(path)} for label, path, _ in graphs}
    prompt = [_prompt_tokens(args)]
    for threads in [int(t) for t in args.threads.split(",")]:
        sessions = {
            label: _genai_model(path.parent, threads) if label.startswith("genai ")
            else create_session(path, provider="cpu", threads=threads)
            for label, path, _ in timed
        }
        decode = {label: [] for label, _, _ in timed}
        prefill = {label: [] for label, _, _ in timed}
        tokens = {}
        for round_index in range(args.rounds + 1):  # the order reversed every other round
            for label, _, _ in (timed if round_index % 2 == 0 else timed[::-1]):
                if label.startswith("genai "):
                    new, prefill_s, decode_tps = _genai_generate(sessions[label], prompt[0], args.new_tokens)
                else:
                    result = generate(sessions[label], prompt, args.new_tokens)
                    new, prefill_s = result.tokens[0], result.prefill_seconds
                    decode_tps = result.decode_tokens_per_second
                tokens[label] = new
                if round_index:
                    decode[label].append(decode_tps)
                    prefill[label].append(prefill_s * 1000)
        for label, _, base in timed:
            if base not in decode:  # --no-time-sources: compare with the baseline alone
                base = args.baseline
            ratios = [a / b for a, b in zip(decode[label], decode[base])]
            rows[label][f"t{threads}"] = {
                "decode_tokens_per_second": statistics.median(decode[label]),
                "prefill_ms": statistics.median(prefill[label]),
                "decode_ratio": statistics.median(ratios),
                "same_greedy_tokens": _same_prefix(tokens[label], tokens[base]),
                "decode_rounds": decode[label],
                "prefill_rounds_ms": prefill[label],
            }
            if args.baseline:
                vs = [a / b for a, b in zip(decode[label], decode[args.baseline])]
                rows[label][f"t{threads}"].update(vs_baseline=statistics.median(vs),
                                                  vs_baseline_spread=[min(vs), max(vs)])
    load_end = os.getloadavg()
    _print(rows, args, len(prompt[0]), load_start, load_end)  # timings first: the perplexity pass takes a while
    if args.ppl_samples:
        ours = [(label, path) for label, path, _ in graphs if not label.startswith("genai ")]
        ours += [(label, _fixed_head_dim(path)) for label, path, _ in graphs if label.startswith("genai ")]
        ppl = evaluate_graphs([str(p) for _, p in ours], data="lambada", samples=args.ppl_samples, seq_len=256,
                              tokenizer=args.tokenizer, quiet=True, threads=1)
        for label, path in ours:
            rows[label]["perplexity"] = ppl[str(path)].perplexity
            print(f"{label:34s} perplexity {rows[label]['perplexity']:.3f} (LAMBADA eval, {args.ppl_samples} x 256)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load": [load_start, load_end]}, indent=2) + "\n")
    return 0


def _prompt_tokens(args: argparse.Namespace) -> list[int]:
    if args.prompt_text is None:
        return np.random.default_rng(0).integers(100, 10000, args.prompt).tolist()
    from pangu_light.calib.text import graph_tokenizer
    from pangu_light.passes.infra.graph_io import load_model_metadata

    source = args.sources[0]
    encode, bos_id = graph_tokenizer(source, load_model_metadata(source), args.tokenizer)
    return ([] if bos_id is None else [bos_id]) + encode(args.prompt_text)


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens agree before the first difference."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _genai_model(directory: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(directory))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def _genai_generate(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(new tokens, prefill seconds, decode tokens/s) through onnxruntime_genai's generator."""
    import time

    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # min_length: GenAI's generator stops at the end-of-text token (ours runs on): without it,
    # GenAI int4 stopped after 26 of 128 tokens on the default prompt, a shorter, cheaper run.
    length = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens([prompt])
    prefill = time.perf_counter() - start
    tokens: list[int] = []
    start = time.perf_counter()
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    decode = time.perf_counter() - start
    return tokens, prefill, (len(tokens) - 1) / decode if decode > 0 else float("nan")


def _fixed_head_dim(path: Path) -> Path:
    """A copy of a GenAI graph (beside it, so its external data resolves) whose cache inputs
    name the head size as a number, not ``kv_cache_dim``: our runtime's DecodeLayout needs it to
    feed the empty past of a perplexity window."""
    head = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "kv_cache_dim":
                dim.dim_value = head
    fixed = path.with_name("model.fixed-head-dim.onnx")
    onnx.save(model, str(fixed))
    return fixed


def _ort_nodes(path: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def _print(rows, args, prompt_tokens: int, load_start, load_end) -> None:
    threads = [int(t) for t in args.threads.split(",")]
    head = f"{'graph':34s} {'nodes':>11s}"
    for t in threads:
        head += f" | t={t}: {'tok/s':>6s} {'ratio':>5s} {'vs base [min-max]':>17s} {'prefill':>8s} {'same':>5s}"
    print(head)
    for label, row in rows.items():
        line = f"{label:34s} {row['nodes_file']:5d}/{row['nodes_ort']:5d}"
        for t in threads:
            if f"t{t}" not in row:
                line += " | (not timed)"
                continue
            r = row[f"t{t}"]
            low, high = r.get("vs_baseline_spread", [float("nan")] * 2)
            line += (f" | {'':5s}{r['decode_tokens_per_second']:6.1f} {r['decode_ratio']:5.2f} "
                     f"{r.get('vs_baseline', float('nan')):5.2f} [{low:4.2f}-{high:4.2f}] "
                     f"{r['prefill_ms']:6.1f}ms {r['same_greedy_tokens']:3d}/{args.new_tokens}")
        print(line)
    print(f"ratio: decode tokens/s against the row's source graph (GenAI rows: the first source; untimed "
          f"sources: the baseline); vs base: against {args.baseline or '-'}, median [smallest-largest] of the "
          f"per-round ratios; same: greedy tokens equal to the source's before the first difference")
    kind = "text" if args.prompt_text else "random"
    print(f"nodes: in the file / after ONNX Runtime's optimiser; prompt {prompt_tokens} {kind} tokens, "
          f"{args.new_tokens} new, batch 1, greedy; medians of {args.rounds} alternating rounds; "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    raise SystemExit(main())
