"""Time and peak resident memory of each pipeline stage, each in a fresh process, beside the
model's weight bytes.

    python benchmarks/stage_memory.py smollm2-135m random:llama-1.1b -o results/stage_memory

For each MODEL, in a work directory under OUTDIR, it runs the `pangu-light` commands one after
another and reads each process's peak RSS (``os.wait4``: the child's own ``ru_maxrss``)::

    export     MODEL -o model.onnx --decode-output decode.onnx --dtype D   (both kinds, one run)
    calibrate  model.onnx --data wiki --samples 16 --seq-len 256      (--calib-samples N)
    plan       stats.npz --params 0.8 --drop-layers 2             (width + depth; --drop-layers N)
    compile    model.onnx --plan plan.json -o pruned.onnx
    compile    decode.onnx --plan plan.json -o pruned-kv.onnx
    eval       pruned.onnx --data lambada --samples 8 --seq-len 256
    run        pruned-kv.onnx --max-new-tokens 16

A stage whose resident memory passes ``--max-rss`` (default 12G) is killed and recorded as such,
with the memory measured then, so a model too big for the machine shows the stage that failed.
``--retrace`` makes the export trace again (a cold export; otherwise a structure traced before
for the model's config is reused). Prints a table and writes ``stage_memory.json`` (with the
machine, the load averages before and after, and every command line). Run it once, on a quiet
machine (``nice``), never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from pangu_light.core.files import write_json
from pangu_light.passes.infra.graph_io import data_files


def _stages(model: str, work: Path, retrace: bool, drop: int, dtype: str = "float32",
            samples: int = 16) -> list[tuple[str, list[str]]]:
    m, d = work / "model.onnx", work / "decode.onnx"
    return [
        ("export", ["export", model, "-o", str(m), "--decode-output", str(d), "--dtype", dtype,
                    *(["--retrace"] if retrace else [])]),
        (f"calibrate {samples}x256", ["calibrate", str(m), "--data", "wiki", "--samples", str(samples),
                                      "--seq-len", "256",
                              "-o", str(work / "stats.npz"), "--quiet"]),
        ("plan", ["plan", str(work / "stats.npz"), "--params", "0.8", "--drop-layers", str(drop),
                  "-o", str(work / "plan.json")]),
        ("compile (no-cache)", ["compile", str(m), "--plan", str(work / "plan.json"), "-o", str(work / "pruned.onnx")]),
        ("compile (decode)", ["compile", str(d), "--plan", str(work / "plan.json"),
                              "-o", str(work / "pruned-kv.onnx")]),
        ("eval 8x256", ["eval", str(work / "pruned.onnx"), "--data", "lambada", "--samples", "8",
                        "--seq-len", "256", "--quiet"]),
        ("run 16 tokens", ["run", str(work / "pruned-kv.onnx"), "--prompt", "The capital of France is",
                           "--max-new-tokens", "16"]),
    ]


def _measure(arguments: list[str], log: Path, max_rss: int | None) -> dict:
    """Run one command; its wall time and peak RSS (``wait4``). With ``max_rss`` the child's RSS
    is polled (``/proc``, every 0.2 s) and the child killed when it passes the limit: the row
    then says so and holds the RSS measured at that moment."""
    command = [sys.executable, "-m", "pangu_light.tools.cli", *arguments]
    start = time.perf_counter()
    killed_at = None
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(command) + "\n").encode())
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG if max_rss else 0)
            if pid:
                break
            rss = _rss(process.pid)
            if rss is not None and rss > max_rss and killed_at is None:
                killed_at = rss
                process.kill()
            time.sleep(0.2)
    row = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "exit_status": os.waitstatus_to_exitcode(status),
        "command": " ".join(arguments),
    }
    if killed_at is not None:
        row["killed_over_max_rss_at_bytes"] = killed_at
    return row


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _weight_bytes(graph: Path) -> int:
    import onnx

    if not graph.exists():
        return 0
    data = data_files(graph)
    if data:
        return sum(p.stat().st_size for p in data)
    proto = onnx.load(str(graph))
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model specs (aliases, directories, random:ARCH)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="work and result directory")
    parser.add_argument("--drop-layers", type=int, default=2, help="layers the plan drops (default 2)")
    parser.add_argument("--retrace", action="store_true", help="cold export: trace even if a structure is cached")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="export --dtype (default float32)")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration sequences of 256 (default 16)")
    parser.add_argument("--max-rss", default="12G",
                        help="kill a stage whose RSS passes this (default 12G; 0: no limit); the row says so")
    args = parser.parse_args()
    from pangu_light.calib.memory import parse_size

    max_rss = parse_size(args.max_rss) or None
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "load_average_start": os.getloadavg(), "models": {}}
    for model in args.models:
        suffix = "" if args.dtype == "float32" else "-" + args.dtype
        work = args.output / (model.replace(":", "-").replace("/", "-") + suffix)
        work.mkdir(parents=True, exist_ok=True)
        rows = {}
        for name, arguments in _stages(model, work, args.retrace, args.drop_layers, args.dtype, args.calib_samples):
            rows[name] = _measure(arguments, work / "log.txt", max_rss)
            print(f"{model:20s} {name:20s} {rows[name]['seconds']:8.1f} s "
                  f"{rows[name]['peak_rss_bytes'] / 2**30:7.2f} GiB  exit {rows[name]['exit_status']}", flush=True)
            if rows[name]["exit_status"] != 0:
                break
        weights = _weight_bytes(work / "model.onnx")
        report["models"][model] = {"dtype": args.dtype,
                                   "weight_bytes": weights, "pruned_weight_bytes": _weight_bytes(work / "pruned.onnx"),
                                   "stages": rows}
        print(f"{model}: weights {weights / 2**30:.2f} GiB; peak RSS / weights: " + ", ".join(
            f"{n} {r['peak_rss_bytes'] / max(weights, 1):.2f}x" for n, r in rows.items()), flush=True)
    report["load_average_end"] = os.getloadavg()
    write_json(args.output / "stage_memory.json", report)
    print(json.dumps({"load_average": [report["load_average_start"], report["load_average_end"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
