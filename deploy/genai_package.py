"""An ONNX Runtime GenAI package of a fused deployment graph: ``genai_config.json`` and the
tokenizer files beside ``model.onnx``, so ``onnxruntime_genai.Model(OUTDIR)`` loads it.

GenAI's config takes ONE head count, KV-head count and head size for all layers, so a package
is written only when every layer has the same shapes (``--uniform`` plans, or the unpruned
model); per-layer pruned graphs run in our runtime (``pangu-light run``), which reads each
layer's shapes from the graph. The graph must be ``gqa-shared-buffer``: GenAI binds past and
present to one buffer of ``max_length`` positions (``past_present_share_buffer``) and feeds
``attention_mask`` [batch, total], from which our graph computes ``seqlens_k`` and
``total_sequence_length`` itself. Input and output names are ours (GenAI's defaults are the
same: ``past_key_values.%d.key``, ``present.%d.key``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import write_json
from pangu_light.passes.deploy.fuse_gqa import IO_KIND_GQA

__all__ = ["TOKENIZER_FILES", "genai_config", "write_genai_package"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def genai_config(model: ir.Model, record: dict[str, Any], filename: str = "model.onnx") -> dict[str, Any]:
    """The genai_config.json of ``model`` (a deployment graph) or a PanguLightError saying why not."""
    if record.get("io_kind") != IO_KIND_GQA:
        raise PanguLightError(
            "a GenAI package needs every layer's attention fused into GroupQueryAttention (io_kind "
            f"{IO_KIND_GQA}); this graph is {record.get('io_kind')}: run it with `pangu-light run` instead"
        )
    layers = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    shapes = {(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads")) for n in layers}
    past = [v for v in model.graph.inputs if v.name.startswith(contract.PAST_PREFIX)]
    head_sizes = {v.shape[3] for v in past}
    if len(shapes) != 1 or len(head_sizes) != 1:
        raise PanguLightError(
            "ONNX Runtime GenAI takes one head count, KV-head count and head size for all layers; this graph has "
            f"{sorted(shapes)} (heads, kv heads) and head sizes {sorted(head_sizes)}: per-layer shapes run with "
            "`pangu-light run` (or plan with --uniform for a GenAI package)"
        )
    (heads, kv_heads), head_size = shapes.pop(), head_sizes.pop()
    config = json.loads(model.metadata_props.get(contract.SOURCE_CONFIG, "{}"))
    logits = next(v for v in model.graph.outputs if v.name == contract.LOGITS)
    max_length = int(record["max_length"])
    hidden = int(config.get("hidden_size", heads * head_size))
    for node in model.graph:  # the (possibly pruned) hidden size: the width a norm's gamma has
        if node.op_type in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"):
            gamma = node.inputs[2 if node.op_type.startswith("Skip") else 1]
            if gamma is not None and gamma.shape is not None and gamma.shape[0] != head_size:
                hidden = int(gamma.shape[0])
                break
    eos = config.get("eos_token_id", 0)
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id", 0),
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(head_size),
                "hidden_size": hidden,
                "inputs": {
                    "input_ids": contract.INPUT_IDS,
                    "attention_mask": contract.ATTENTION_MASK,
                    "past_key_names": contract.PAST_PREFIX + "%d.key",
                    "past_value_names": contract.PAST_PREFIX + "%d.value",
                },
                "outputs": {
                    "logits": contract.LOGITS,
                    "present_key_names": contract.PRESENT_PREFIX + "%d.key",
                    "present_value_names": contract.PRESENT_PREFIX + "%d.value",
                },
                "num_attention_heads": int(heads),
                "num_hidden_layers": len(layers),
                "num_key_value_heads": int(kv_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": config.get("pad_token_id") if config.get("pad_token_id") is not None else eos,
            "type": "llama",  # a plain decoder: GenAI feeds exactly the inputs named above
            "vocab_size": int(logits.shape[-1]),
        },
        "search": {
            "do_sample": False,
            "max_length": max_length,
            "num_beams": 1,
            "past_present_share_buffer": True,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_genai_package(outdir: Path, model: ir.Model, record: dict[str, Any], tokenizer: Path | None) -> list[str]:
    """Write genai_config.json and copy the tokenizer files into ``outdir``; the files written."""
    config = genai_config(model, record)
    tokenizer = tokenizer or (Path(model.metadata_props[contract.TOKENIZER])
                              if contract.TOKENIZER in model.metadata_props else None)
    if tokenizer is None or not (tokenizer / "tokenizer.json").is_file():
        raise PanguLightError(
            f"a GenAI package needs the model's tokenizer.json ({tokenizer or 'no tokenizer recorded in the graph'}): "
            "pass --tokenizer DIR, the Hugging Face model directory"
        )
    write_json(outdir / "genai_config.json", config)
    written = ["genai_config.json"]
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, outdir / name)
            written.append(name)
    return written
