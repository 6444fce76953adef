"""CLAP with the receiver refit (calib.clap_refit) against plain layer removal, one-shot, on
SmolLM2-135M: each variant is a `pangu-light prune` run (its default calibration and refit), scored
on the LAMBADA and wiki eval splits, one run.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/clap_refit.py [--drops 6,10]
        [--variants plain,clap,own,next,span,m15-own,m15-next,m15-span] [--workdir /tmp/clap-refit]
        [--eval-samples 32] [--seq-len 256] [--threads 2]

Variants (prune flags after ``--drop-layers N``):

    plain      plain removal (lowest Block Influence)
    clap       --clap --clap-margin 1 --clap-refit none: the paper's CLAP, the merged weights as copied
    own        --clap --clap-margin 1 --clap-refit own: each receiver's o_proj refit to its own attention
    next       --clap --clap-margin 1 --clap-refit next: ... plus the removed layer next to it's
    span       --clap --clap-margin 1 --clap-refit span: ... plus every merged layer's
    m15-X      the same with prune's default margin, 1.5 (a moved group must outscore the receiver's
               own by 1.5x); m15-next is what `prune --clap` does

Measured 2026-12-07 (AMD EPYC, 2 cores, load 1.2-2, one job at a time; calibration: prune's default
64 x 256 of wiki+lambada; eval 32 x 256 per set; perplexity x unpruned, LAMBADA / wiki, unpruned
58.62 / 23.51)::

    removed  plain          clap           own            next           span
    6        2.261 / 2.494  2.246 / 2.540  2.249 / 2.527  2.162 / 2.529  2.130 / 2.597
    10       4.138 / 4.738  6.063 / 7.971  4.421 / 5.689  3.908 / 5.320  6.448 / 9.199
    removed  m15-own        m15-next       m15-span
    6        2.280 / 2.505  2.121 / 2.377  2.121 / 2.377
    10       4.074 / 4.924  3.883 / 4.659  4.363 / 5.783

The refit removes what CLAP costs one-shot (10 layers: 6.06x -> 3.91x LAMBADA with ``next``). With
the 1.5 margin and ``next`` CLAP beats plain removal on both sets at both depths (-6% / -5% and
-6% / -2%). ``span`` helps where each receiver stands for few removed layers and hurts where one
receiver stands for a long run (10: layer 11 for layers 12-17): the merged heads read layer 11's
input and cannot stand in for six layers' attention. (These rows were run as `prune` commands one
after another; this script runs the same commands.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import note
from refit_quality import held_out_perplexities

from pangu_light.tools.cli import main as cli

ALIAS = "smollm2-135m"
REFIT = {"clap": "none", "own": "own", "next": "next", "span": "span"}  # CLAP variant -> --clap-refit


def flags(variant: str) -> list[str]:
    """prune's flags after --drop-layers N for ``variant`` (see the module docstring)."""
    base = variant.removeprefix("m15-")
    if variant == "plain":
        return []
    if base not in REFIT:
        raise SystemExit(f"unknown variant {variant!r}; use plain, {', '.join(REFIT)}, or m15- before one of those")
    margin = [] if base != variant else ["--clap-margin", "1"]  # m15-: prune's default margin, 1.5
    return ["--clap", *margin, "--clap-refit", REFIT[base]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drops", default="6,10", help="numbers of removed layers, comma-separated")
    parser.add_argument("--variants", default="plain,clap,own,next,span,m15-own,m15-next,m15-span")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clap-refit"))
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started, load_start = time.perf_counter(), os.getloadavg()
    variants = args.variants.split(",")
    for variant in variants:
        flags(variant)  # unknown names fail before any work
    rows, scores, original = [], None, None
    for drop in args.drops.split(","):
        for variant in variants:
            out = args.workdir / f"d{drop}-{variant}"
            note(f"{drop} layers, {variant}: prune {' '.join(flags(variant))}")
            code = cli(["prune", ALIAS, "--drop-layers", drop, *flags(variant), "--no-kv-cache", "--no-eval",
                        "--threads", str(args.threads), "--quiet", "-o", str(out)])
            if code != 0:
                raise SystemExit(f"prune failed for {drop} layers, {variant} (exit {code})")
            if scores is None:
                original = out / "original.onnx"
                scores = held_out_perplexities(original, args.eval_samples, args.seq_len, args.threads)
                rows.append({"removed": 0, "variant": "unpruned", **scores(original)})
            rows.append({"removed": int(drop), "variant": variant, **scores(out / "pruned.onnx")})
    base = rows[0]
    print(f"SmolLM2-135M one-shot, eval {args.eval_samples} x {args.seq_len} per set; "
          f"load average at start {load_start}, at end {os.getloadavg()}")
    print(f"{'removed':>7} {'variant':<10} {'lambada':>18} {'wiki':>18}")
    for r in rows:
        cells = " ".join(f"{r[k]:>9.2f} ({r[k] / base[k]:>5.3f}x)" for k in ("lambada", "wiki"))
        print(f"{r['removed']:>7} {r['variant']:<10} {cells}")
    (args.workdir / "clap_refit.json").write_text(json.dumps(rows, indent=2) + "\n")
    note(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
