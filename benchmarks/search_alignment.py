"""Does width alignment matter on this CPU? (issue 18: "measure whether alignment matters".)

    nice -n 10 .venv/bin/python benchmarks/search_alignment.py [--rounds 30] [--threads 1]

The pruned widths reach ONNX Runtime as MatMul shapes: x [M, K] @ W [K, N] with K or N the
kept hidden or FFN width. For SmolLM2's projections (K = 576 -> N = FFN width, and K = FFN
width -> N = 576) this times one MatMul per width, M = 1 (a decode step) and M = 64 (a
prefill), at widths around 1024 aligned to 64, 32, 16, 8 and not at all. Widths are timed in
interleaved rounds (each round runs every width once, in a shuffled order); the result is the
median time per kept column (ns), so a width that costs more per column than its neighbours
shows the alignment penalty. One thread, the machine's load reported.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pangu_light.runtime.machine import describe_machine, load_average

WIDTHS = (1024, 1016, 1012, 1008, 1000, 992, 984, 977, 960)


def matmul_session(m: int, k: int, n: int, threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20, help="MatMul calls per timing")
    args = parser.parse_args()
    print(f"machine: {describe_machine()['cpu_model']}; load {load_average()}; onnx {onnx.__version__}")
    rng = np.random.default_rng(1)
    for m in (1, 64):
        for axis in ("N", "K"):
            shapes = {w: (576, w) if axis == "N" else (w, 576) for w in WIDTHS}
            sessions = {w: matmul_session(m, k, n, args.threads) for w, (k, n) in shapes.items()}
            feeds = {w: {"x": rng.standard_normal((m, k)).astype(np.float32)} for w, (k, n) in shapes.items()}
            times = {w: [] for w in WIDTHS}
            for w in WIDTHS:
                sessions[w].run(None, feeds[w])
            for _ in range(args.rounds):
                for w in rng.permutation(WIDTHS):
                    w = int(w)
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        sessions[w].run(None, feeds[w])
                    times[w].append((time.perf_counter() - start) / args.calls)
            print(f"\nM={m}, the width is {'N (output columns)' if axis == 'N' else 'K (inputs)'} of a 576-wide side")
            print("| width | largest power-of-2 divisor | median us | ns per kept column |")
            print("|---:|---:|---:|---:|")
            for w in WIDTHS:
                med = float(np.median(times[w]))
                print(f"| {w} | {w & -w} | {med * 1e6:.1f} | {med * 1e9 / w:.2f} |")
    print(f"\nload after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
