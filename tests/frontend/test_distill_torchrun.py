"""Scale-out: ``pangu-light distill`` under ``torchrun --nproc_per_node 2`` on CPU (gloo) produces
the weights of one process with the same global batch (2 x 2 windows per step either way: one
process accumulates two micro-batches, two processes take one each), with DDP and with FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from families import tiny_model

pytestmark = pytest.mark.slow

# Measured: DDP equal to 0, FSDP2 to 1.4e-8 (float32, one thread per process).
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_distill import PER_LAYER

    from pangu_light.calib.corpora import load_documents
    from pangu_light.tools.cli import main

    from reference import compile_graph, save_char_tokenizer

    root = tmp_path_factory.mktemp("torchrun")
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.norm.weight.mul_(20.0)
    teacher.save_pretrained(root / "teacher")
    save_char_tokenizer(root / "teacher")
    assert main(["export", str(root / "teacher"), "-o", str(root / "orig.onnx"), "--quiet"]) == 0
    compile_graph(root / "orig.onnx", PER_LAYER, root / "pruned.onnx")
    (root / "text.txt").write_text("\n\n".join(load_documents("wiki")[:6]))
    return root


def command(setup, out, *extra):
    return [
        "distill", str(setup / "pruned.onnx"), "--teacher", str(setup / "teacher"), "-o", str(out),
        "--data", str(setup / "text.txt"), "--seq-len", "32", "--eval-samples", "4", "--steps", "3",
        "--batch-size", "2", "--lr", "1e-3", "--no-bf16", "--no-export", "--quiet",
        "--teacher-cache", str(setup / "cache"), *extra,
    ]


def run(args, *, nproc: int | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if nproc is None:
        argv = [sys.executable, "-m", "pangu_light.tools.cli", *args, "--threads", "1"]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "-m", "pangu_light.tools.cli", *args]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(setup):
    out = setup / "single"
    run(command(setup, out, "--grad-accum", "2"))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, single, mode):
    out = setup / mode
    run(command(setup, out, *(["--fsdp"] if mode == "fsdp" else [])), nproc=2)
    a, b = weights(single), weights(out)
    assert sorted(a) == sorted(b)
    assert torch.load(out / "checkpoints" / "step-000003.pt", weights_only=False)["step"] == 3
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE
    histories = [[json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (single, out)]
    for x, y in zip(*histories):
        for key in ("loss", "eval_kl"):
            if key in x:
                assert abs(x[key] - y[key]) <= TOLERANCE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    # Only rank 0 wrote: one set of outputs, no stray partial files.
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_weights_changed(setup, single):
    """The comparison above is not between two untouched copies of the pruned graph."""
    from pangu_light.frontend.reimport import reimport

    original = reimport(setup / "pruned.onnx").model.state_dict()
    trained = weights(single)
    assert max(float((trained[k] - original[k]).abs().max()) for k in trained) > 1e-4
