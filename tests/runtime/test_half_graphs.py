"""`run` and `bench` on half graphs with the CPU provider, which lacks half-precision kernels:
`run` generates with a float32 copy (``calib.half``) and says so; `bench` refuses with one line
that names the cause and the way out instead of ONNX Runtime's NOT_IMPLEMENTED.

The reference for `run` is the float32 export of the same model with its weights rounded to
bfloat16: the copy computes exactly that function, and without ONNX Runtime's optimisations
(``--optimization disabled``) its logits are bit-identical, so the greedy tokens must be equal."""

from __future__ import annotations

import copy

import onnx_ir as ir
import torch

from pangu_light.frontend.export import ExportOptions, export_model
from pangu_light.runtime.generate import greedy_generate
from pangu_light.runtime.session import create_session
from pangu_light.tools import cli

PROMPT = [5, 17, 33, 48, 64]


def test_run_generates_with_a_float32_copy_of_a_bf16_graph(exported_graph, tiny_tokenizer_dir, tmp_path, capsys):
    model, path = exported_graph("llama", True, dtype="bfloat16")
    rounded = tmp_path / "rounded.onnx"
    ir.save(export_model(copy.deepcopy(model).to(torch.float32), ExportOptions(kv_cache=True)), rounded)
    rc = cli.main(["run", str(path), "--prompt", " ".join(f"w{i}" for i in PROMPT), "--max-new-tokens", "6",
                   "--provider", "cpu", "--optimization", "disabled", "--tokenizer", str(tiny_tokenizer_dir)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "generation runs a float32 copy of this bfloat16 graph" in captured.err
    session = create_session(rounded, provider="cpu", optimization_level="disabled")
    expected = greedy_generate(session, [PROMPT], 6, stop_tokens=[2])[0]
    assert expected and 2 not in expected
    assert captured.out.split("\n\n")[0].splitlines()[1] == " ".join(f"w{i}" for i in expected)


def test_bench_of_a_bf16_graph_on_the_cpu_is_one_clear_line(exported_graph, capsys):
    _, path = exported_graph("llama", False, dtype="bfloat16")
    rc = cli.main(["bench", str(path), "--provider", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ONNX Runtime has no kernel") and len(err.strip().splitlines()) == 1
    assert "float16/bfloat16" in err and "--dtype float32" in err
