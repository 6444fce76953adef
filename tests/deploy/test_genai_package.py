"""The ONNX Runtime GenAI package of a fused deployment graph: onnxruntime_genai loads it and its
greedy tokens equal our runtime's (batch 1, 12 new tokens after a 9-token prompt, past and
present one shared buffer in both); per-layer shapes and unfused graphs are refused with the
reason. The load test is skipped where onnxruntime-genai (the optional extra ``genai``) is not
installed."""

from __future__ import annotations

import json

import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.deploy.build import DeployOptions, build_deployment
from pangu_light.runtime.generate import generate

from reference import compile_graph, save_char_tokenizer, session

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_genai_loads_the_package_and_decodes_as_our_runtime(family, exported_graph, tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install -e .[genai])")
    _, path = exported_graph(family, kv_cache=True)
    save_char_tokenizer(tmp_path / "tok")
    out = tmp_path / "pkg"
    record = build_deployment(path, out, DeployOptions(weights="fp32", max_length=64), genai_tokenizer=tmp_path / "tok")
    assert {"genai_config.json", "tokenizer.json"} <= set(record["genai_package"])
    config = json.loads((out / "genai_config.json").read_text())["model"]
    decoder = config["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (4, 2, 4)
    # GenAI stops at the eos token: so does our loop here
    ours = generate(session(out / "model.onnx"), [PROMPT], 12, stop_tokens=[config["eos_token_id"]]).tokens[0]
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + 12)
    generator = og.Generator(model, params)
    generator.append_tokens([PROMPT])
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours


def test_per_layer_shapes_and_unfused_graphs_are_refused(exported_graph, tmp_path):
    _, path = exported_graph("llama", kv_cache=True)
    save_char_tokenizer(tmp_path / "tok")
    compile_graph(path, "prune-kv-groups{keep=[[0,1],[1],[0,1],[0]]}", tmp_path / "p.onnx")
    with pytest.raises(PanguLightError, match="one head count"):
        build_deployment(tmp_path / "p.onnx", tmp_path / "a", DeployOptions(weights="fp32", max_length=64),
                         genai_tokenizer=tmp_path / "tok")
    assert not (tmp_path / "a" / "model.onnx").exists()
    with pytest.raises(PanguLightError, match="GroupQueryAttention"):
        build_deployment(path, tmp_path / "b", DeployOptions(weights="fp32", fuse=False),
                         genai_tokenizer=tmp_path / "tok")
