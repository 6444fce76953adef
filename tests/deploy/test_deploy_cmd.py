"""`pangu-light deploy`: the files it writes, the fp32 deployment graph equal to the original on
every family (4 decode steps, batch 3 left-padded), the runtime's generation loop (what `run`
uses) on the int4 graph, errors, and the deploy package's import rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_architecture import imported_modules

from pangu_light.deploy.build import DeployOptions, build_deployment
from pangu_light.runtime.generate import generate
from pangu_light.runtime.session import create_session
from pangu_light.tools.cli import main

from families import FAMILIES
from reference import left_padded_batch, max_diff_on_tokens, ort_decode_logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_deployment_equals_original(family, exported_graph, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="fp32"))
    assert record["matmul_nbits"] == 0 and record["fold_weight_transpose"]["transposes_removed"] > 0
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    want, want_ids, _ = ort_decode_logits(path, ids, mask, steps=4)
    got, got_ids, all_mask = ort_decode_logits(tmp_path / "d" / "model.onnx", ids, mask, steps=4)
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    assert max_diff_on_tokens(got, want, all_mask) <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_command_writes_graph_and_record(exported_graph, tmp_path, capsys):
    _, path = exported_graph("qwen3", kv_cache=True)
    out = tmp_path / "deploy"
    assert main(["deploy", str(path), "-o", str(out), "--weights", "int4", "--block-size", "32"]) == 0
    record = json.loads((out / "deploy.json").read_text())
    assert record["options"]["weights"] == "int4" and record["matmul_nbits"] == record["eligible_matmuls"] > 0
    assert record["source"] == str(Path(path).resolve())
    assert "MatMulNBits" in capsys.readouterr().out and record["lm_head_weights"] == "int8"  # int4's default
    # the runtime's generation loop (what `pangu-light run` calls) runs the int4 graph, batch 3
    info = create_session(out / "model.onnx", provider="cpu")
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    bound = generate(info, prompts, 6)
    plain = generate(info, prompts, 6, io_binding=False)
    assert [len(t) for t in bound.tokens] == [6, 6, 6] and bound.tokens == plain.tokens


def test_command_refuses_bad_requests(exported_graph, tmp_path, capsys):
    _, path = exported_graph("llama", kv_cache=True)
    assert main(["deploy", str(path), "-o", str(tmp_path / "a"), "--weights", "fp32", "--asymmetric"]) == 2
    assert "int8/int4 only" in capsys.readouterr().err
    assert main(["deploy", str(path), "-o", str(tmp_path / "b"), "--block-size", "24"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert not (tmp_path / "b" / "model.onnx").exists()
    assert main(["deploy", str(path), "-o", str(tmp_path / "d"), "--no-quantize-lm-head", "--lm-head", "int8"]) == 2
    assert "contradicts --lm-head int8" in capsys.readouterr().err
    assert main(["deploy", str(path), "-o", str(tmp_path / "e"), "--weights", "fp32", "--lm-head", "int4"]) == 2
    assert "--lm-head int8/int4 needs --weights int8/int4" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    with pytest.raises(SystemExit):
        main(["deploy", str(path), "-o", str(tmp_path / "c"), "--provider", "cuda"])


def test_deploy_package_imports_neither_tools_nor_frontend():
    """pangu_light.deploy follows calib's rule (tests/test_architecture.py does not list it yet)."""
    root = Path(__file__).resolve().parents[2] / "deploy"
    problems = []
    for source in sorted(root.glob("*.py")):
        module = f"pangu_light.deploy.{source.stem}"
        for line, name in imported_modules(source.read_text(), module):
            if name.split(".")[:2] in (["pangu_light", "tools"], ["pangu_light", "frontend"]):
                problems.append(f"{module}:{line} imports {name}")
    assert not problems


def test_command_fuses_by_default_and_no_fuse_keeps_the_export(exported_graph, tmp_path, capsys):
    _, path = exported_graph("mistral", kv_cache=True)
    assert main(["deploy", str(path), "-o", str(tmp_path / "f"), "--weights", "fp32", "--max-length", "128"]) == 0
    assert "4 attentions -> GroupQueryAttention (gqa-shared-buffer)" in capsys.readouterr().out
    record = json.loads((tmp_path / "f" / "deploy.json").read_text())
    assert record["max_length"] == 128 and record["ops_after"]["GroupQueryAttention"] == 4
    assert main(["deploy", str(path), "-o", str(tmp_path / "n"), "--weights", "fp32", "--no-fuse"]) == 0
    record = json.loads((tmp_path / "n" / "deploy.json").read_text())
    assert record["io_kind"] == "past-present"
    assert not {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} & set(record["ops_after"])


def test_bench_reads_deployment_graphs(exported_graph, tmp_path):
    """`bench` runs fused deployment graphs (the shared-buffer loop, batch 2) and costs them from
    their source graph's FLOPs and their own per-token weight bytes (int4: about a quarter)."""
    _, path = exported_graph("qwen2", kv_cache=True)
    for weights in ("fp32", "int4"):
        assert main(["deploy", str(path), "-o", str(tmp_path / weights), "--weights", weights]) == 0
    graphs = [str(path), str(tmp_path / "fp32" / "model.onnx"), str(tmp_path / "int4" / "model.onnx")]
    report_path = tmp_path / "bench.json"
    assert main(["bench", *graphs, "--workload", "decode", "--scale", "64", "--batch", "2", "--repeats", "1",
                 "--warmup", "0", "--no-memory", "--threads", "1", "--json", str(report_path)]) == 0
    costs = [graph["cost"] for graph in json.loads(report_path.read_text())["graphs"]]
    assert costs[0]["decode_flops"] == costs[1]["decode_flops"] == costs[2]["decode_flops"]
    assert abs(costs[1]["weight_bytes"] / costs[0]["weight_bytes"] - 1) < 0.02  # MatMul weights only, no norms
    assert 0.1 < costs[2]["weight_bytes"] / costs[0]["weight_bytes"] < 0.35
