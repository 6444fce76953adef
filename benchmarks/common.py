"""What several benchmark scripts share (they run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

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
