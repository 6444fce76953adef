"""What several benchmark scripts share (they run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def note(message: str) -> None:
    """A time-stamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def export_graph(alias: str, workdir: Path) -> Path:
    """``workdir/orig.onnx``: the no-cache graph of ``alias``, exported once through the CLI in a
    subprocess (benchmarks import no command module)."""
    path = workdir / "orig.onnx"
    if not path.exists():
        note(f"pangu-light export {alias} -o {path}")
        cli = Path(sys.executable).with_name("pangu-light")
        subprocess.run([str(cli), "export", alias, "-o", str(path)], check=True, stdout=sys.stderr)
    return path


def add_graph_arguments(parser: argparse.ArgumentParser, alias: str, *, workdir: str, eval_samples: int) -> None:
    """--workdir, --graph, --eval-samples, --seq-len and --threads, as the quality benchmarks take them."""
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    parser.add_argument("--graph", type=Path, help=f"an existing no-cache export of {alias} (default: export one)")
    parser.add_argument("--eval-samples", type=int, default=eval_samples)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)


def start(args: argparse.Namespace, alias: str) -> tuple[Path, float, tuple[float, float, float]]:
    """(the graph to prune: --graph or a fresh export, the start time, the load average now)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()
    return args.graph or export_graph(alias, args.workdir), started, load_start
