"""A deployment graph from a decode graph: fused attention and norms, weights laid out for
MatMul, int8/int4 weight-only.

    pangu-light deploy out/prune/pruned-kv.onnx -o out/deploy-int4
    pangu-light deploy out/prune/original-kv.onnx -o out/deploy-fp32 --weights fp32
    pangu-light run out/deploy-int4/model.onnx --prompt "The capital of France is"

Writes OUTDIR/model.onnx (with model.onnx.data beside it when the weights pass 1.8 GB) and
OUTDIR/deploy.json, the record of what was done (options, counts, node totals, versions; the
same record is in the graph's pangu_light.deploy metadata).

Steps: (1) fuse-gqa: each layer's attention becomes one com.microsoft GroupQueryAttention
(rotary inside, from cos/sin caches of --max-length positions; KV heads and head counts per
layer as the graph has them; sliding windows and soft-capping read off the graph), whose
past and present may be one pre-allocated buffer (`run` and `bench` bind them so). A layer
whose attention is not of the export's form is left as it is (GLM4's partial interleaved
rotary). (2) fold-weight-transpose: every weight our exporter reads as Transpose(W) is stored
as W^T, the layout MatMul reads. (3) fuse-norms: RMSNorm -> SimplifiedLayerNormalization, a
residual Add + RMSNorm -> SkipSimplifiedLayerNormalization (onnxscript's rules); fp32 stops
here, and --no-fuse skips (1) and (3). (4) --weights
int8/int4: ONNX Runtime's own MatMulNBitsQuantizer (round to nearest, one scale per block of
--block-size weights along the input dimension, symmetric unless --asymmetric) turns every
MatMul with a constant weight into com.microsoft.MatMulNBits: all projections of every layer
and the lm_head (at --lm-head when given, e.g. int8; --lm-head fp32 keeps it float32); the embedding
stays float32. Input
widths that are not a multiple of the block size (pruned hidden sizes) are padded inside the
last block. --accuracy-level 4 (default) lets the CPU kernel quantize activations to int8 too
(fastest); 0 computes in float32 on the dequantized weights. --quant-method gptq keeps those
nodes and blocks but chooses the integers by GPTQ: the input Gram of every quantized MatMul is
collected through the float32 graph on --calib-samples windows of --calib-data (the graph's
tokenizer), and each weight's rounding errors are spread over its not yet quantized input rows
so that the MatMul's output on that text moves least. That is the default (--quant-method auto)
whenever the tokenizer and the text are found; otherwise deploy rounds to nearest and says why.

The result runs with `pangu-light run` and `bench` (one KV buffer per cache tensor, bound as
past and present; bench costs it from the source graph's FLOPs and its own weight bytes) and in
ONNX Runtime directly (com.microsoft ops are in every onnxruntime build). --genai-package also
writes genai_config.json and the tokenizer files, so onnxruntime_genai.Model(OUTDIR) loads it
(GenAI takes one shape for all layers: uniform graphs only). `inspect` and `diff` read graphs
through the model map, which does not know the fused ops: use them on the source graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.deploy.build import QUANT_METHODS, WEIGHTS, DeployOptions, build_deployment

__all__ = ["HELP", "add_arguments", "run"]

HELP = "deployment graph: weights folded for MatMul, int8/int4 weight-only quantisation (ORT)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="decode graph (.onnx, from export --kv-cache or prune)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output directory (model.onnx, deploy.json)")
    parser.add_argument(
        "--weights", choices=WEIGHTS, default="int4", help="weight type of the projections (default int4)"
    )
    parser.add_argument(
        "--block-size", type=int, default=32, help="weights per quantisation block along the input width (default 32)"
    )
    parser.add_argument(
        "--lm-head",
        choices=WEIGHTS,
        help="weight type of the lm_head alone (default: as --weights, but int8 under int4: on SmolLM2 an "
        "int4 lm_head costs 5.5 LAMBADA perplexity points, an int8 one 0.1, for ~4%% of decode speed)",
    )
    parser.add_argument(
        "--no-quantize-lm-head", action="store_true", help="keep the lm_head in float32 (= --lm-head fp32)"
    )
    parser.add_argument("--asymmetric", action="store_true", help="a zero point per block (default symmetric)")
    parser.add_argument(
        "--quant-method", choices=QUANT_METHODS, default="auto",
        help="rtn: round to nearest per block (ONNX Runtime's quantizer, no data, seconds); gptq: the "
        "same blocks, weights chosen by GPTQ to keep each MatMul's output on calibration text (needs the "
        "graph's tokenizer; about 80 s and 4.2 GB peak on SmolLM2-135M against rtn's 9 s and 2.2 GB; "
        "symmetric only). On SmolLM2 pruned to 0.8, int4 LAMBADA perplexity 166 (rtn) -> 111 (gptq), "
        "fp32 92. auto (the default): gptq where the tokenizer and text are found and the blocks are "
        "symmetric, else rtn, saying why",
    )
    parser.add_argument("--calib-data", default="wiki",
                        help="GPTQ's calibration text: a corpus name as calibrate's --data (default wiki)")
    parser.add_argument("--calib-samples", type=int, default=32,
                        help="GPTQ's calibration windows of --calib-seq-len tokens (default 32)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per GPTQ calibration window")
    parser.add_argument("--gptq-damp", type=float, default=0.01,
                        help="GPTQ's damping: this x mean(diag H) on the input Gram's diagonal (default 0.01)")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        choices=range(5),
        metavar="{0..4}",
        help="MatMulNBits compute type: 4 int8 activations (default, fastest on CPU), 0 float32",
    )
    parser.add_argument("--provider", choices=("cpu",), default="cpu", help="target provider (cpu so far)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=0,
        help="longest sequence (prompt + new tokens) the fused graph serves: the rotary cache's "
        "positions (default: the model's max_position_embeddings, else 4096)",
    )
    parser.add_argument(
        "--genai-package",
        action="store_true",
        help="also write an ONNX Runtime GenAI package (genai_config.json + tokenizer files) for "
        "onnxruntime_genai.Model(OUTDIR); uniform layer shapes only",
    )
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer directory for --genai-package and GPTQ's text (default: the graph's)")
    parser.add_argument(
        "--no-padding-bias",
        action="store_true",
        help="GroupQueryAttention without the padding bias: a little faster per step (~2%% on SmolLM2 "
        "int4), exact for batches without padding only; the runtime refuses prompts of different lengths",
    )
    parser.add_argument(
        "--no-fuse", action="store_true", help="keep the export's attention and norms (no GQA, no fused norms)"
    )


def run(args: argparse.Namespace) -> int:
    options = DeployOptions(
        weights=args.weights,
        block_size=args.block_size,
        quantize_lm_head=not args.no_quantize_lm_head,
        lm_head_weights=args.lm_head or "",
        symmetric=not args.asymmetric,
        accuracy_level=args.accuracy_level,
        provider=args.provider,
        fuse=not args.no_fuse,
        max_length=args.max_length,
        padding_bias=not args.no_padding_bias,
        quant_method=args.quant_method,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        gptq_damp=args.gptq_damp,
    )
    if args.weights == "fp32" and (args.no_quantize_lm_head or args.asymmetric):
        raise PanguLightError("--no-quantize-lm-head and --asymmetric apply to --weights int8/int4 only")
    if args.no_quantize_lm_head and args.lm_head not in (None, "fp32"):
        raise PanguLightError(f"--no-quantize-lm-head contradicts --lm-head {args.lm_head}: give one of them")
    options.check()
    if args.tokenizer and not (args.genai_package or args.quant_method in ("gptq", "auto")):
        raise PanguLightError("--tokenizer is read by --genai-package and --quant-method gptq/auto only")
    record = build_deployment(
        args.model, args.output, options, genai_tokenizer=args.tokenizer if args.genai_package else False,
        tokenizer=args.tokenizer,
    )
    fold = record["fold_weight_transpose"]
    print(
        f"{record['model']}: {args.weights}, {fold.get('transposes_removed', 0)} weight transposes folded, "
        f"{record['matmul_nbits']} of {record['eligible_matmuls']} eligible MatMuls -> MatMulNBits "
        f"(lm_head {record.get('lm_head_weights') or 'float32'}), "
        f"{record.get('fuse_gqa', {}).get('fused', 0)} attentions -> GroupQueryAttention "
        f"({record['io_kind']}), nodes {record['nodes_before']} -> {record['nodes_after']}, "
        f"weights {record['weight_bytes'] / 1e6:.1f} MB"
    )
    if "gptq" in record:
        calibration = record["gptq"]["calibration"]
        print(f"GPTQ: {record['gptq']['weights']} weights from {calibration['windows']} x {calibration['seq_len']} "
              f"tokens of {calibration['data']}")
    if "quant_method_fallback" in record:
        print(f"{args.weights} weights by round to nearest, not GPTQ: {record['quant_method_fallback']}. "
              "--quant-method rtn chooses it without this note")
    print(f"record: {Path(args.output) / 'deploy.json'}")
    if "genai_package" in record:
        files = ", ".join(record["genai_package"])
        print(f"ONNX Runtime GenAI package: {files} (onnxruntime_genai.Model('{args.output}'))")
    return 0
