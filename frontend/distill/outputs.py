"""What a finished run writes (rank 0): the distilled student as a model directory, the student
re-exported to ONNX and checked against PyTorch under ONNX Runtime, and ``summary.json``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write, write_json
from pangu_light.core.paths import record_path
from pangu_light.frontend.distill.config import DistillConfig, DistillResult
from pangu_light.frontend.distill.usage import Stages
from pangu_light.frontend.reimport import Reimported, reimport
from pangu_light.frontend.student import save_student

__all__ = ["GRAPH_FILE", "MODEL_DIR", "SUMMARY_FILE", "export_checked", "write_outputs"]

MODEL_DIR = "model"
GRAPH_FILE = "distilled.onnx"
SUMMARY_FILE = "summary.json"


def write_outputs(config: DistillConfig, student: Reimported, model_state: dict[str, torch.Tensor], *,
                  history: list[dict[str, Any]], fingerprint: dict[str, Any], tokens: int, global_batch: int,
                  world: int, run_info: dict[str, Any], say: Callable[[str], None], stages: Stages | None = None,
                  model: torch.nn.Module | None = None) -> DistillResult:
    """The distilled weights as a model directory, re-exported as ONNX (unless ``config.export``
    is off), and the summary naming them (with ``run_info``: steps taken, why the run stopped, the
    time budget, set-up and training seconds; ``stages`` adds the timings of these outputs).

    ``model`` is the trained module itself when the caller has it whole (one process, or DDP):
    it is exported as it is (moved to the CPU) instead of a fresh re-import of the graph loaded
    with ``model_state`` (what an FSDP run, whose module is sharded, needs)."""
    out = Path(config.output)
    spec = student.spec
    stages = Stages() if stages is None else stages
    with stages("output_model"):
        if model is None:
            final = reimport(config.graph, attn_implementation="eager").model
            final.load_state_dict({k: v.detach().cpu() for k, v in model_state.items()})
        else:
            final = model.cpu()
        final.eval()
    model_dir = out / MODEL_DIR
    if model_dir.exists():  # our own earlier output (a resumed run that had finished)
        shutil.rmtree(model_dir)
    with stages("model_dir"):
        kind = save_student(final, spec, model_dir, tokenizer_dir=config.tokenizer_dir)
    if kind == "hf":
        how = "a standard Hugging Face directory"
    else:
        why = ("transformers refuses a config whose hidden size is not a multiple of its query heads"
               if spec.uniform else "its layers differ in shape")
        how = f"per-layer shapes ({why}): load it with pangu_light.frontend.student.load_student"
    say(f"... wrote {model_dir} ({how})")
    graph_path = diff = None
    if config.export:
        graph_path = out / GRAPH_FILE
        kv_cache = student.graph_kind == "decode"
        if kv_cache and len({layer.num_kv_heads for layer in spec.layers}) > 1:
            # frontend/export.py builds its example past inputs from config.num_key_value_heads,
            # one count for all layers; until it reads them per layer, export without a cache.
            say("... the layers have different KV head counts, which the exporter cannot give a decode "
                "graph yet: exporting the no-cache graph (re-export with a cache later)")
            kv_cache = False
        with stages("export"):
            diff = export_checked(final, student, graph_path, config.eval_windows, kv_cache=kv_cache,
                                  tokenizer="model" if config.tokenizer_dir else None, say=say)
    summary_path = out / SUMMARY_FILE
    write_json(summary_path, {  # paths relative to the summary's folder, absolute beside them
        "graph": record_path(config.graph, summary_path), "teacher": record_path(config.teacher_dir, summary_path),
        **run_info, "stages": stages.to_json(), "tokens": tokens, "global_batch": global_batch,
        "seq_len": int(config.train_windows.shape[1]), "world_size": world,
        "model_dir": record_path(model_dir, summary_path), "model_format": kind,
        "distilled_graph": record_path(graph_path, summary_path) if graph_path else None,
        "export_max_abs_diff": diff,
        "first_eval": next((h for h in history if "eval_kl" in h), None),
        "last_eval": next((h for h in reversed(history) if "eval_kl" in h), None),
        "fingerprint": fingerprint,
    })
    return DistillResult(out, run_info["steps"], history, model_dir, kind, graph_path, diff, run_info["stopped"])


def export_checked(model, info: Reimported, path: Path, windows: np.ndarray, *, kv_cache: bool,
                   tokenizer: str | None, say=print) -> float:
    """Export ``model`` with the project's clean exporter (a decode graph when ``kv_cache``), save it
    atomically, and check ORT against PyTorch on two held-out windows; returns max |diff|."""
    import onnx_ir as ir

    from pangu_light.frontend.distill.reexport import export_student
    from pangu_light.runtime.layout import DecodeLayout
    from pangu_light.runtime.session import create_session

    say(f"... exporting the distilled student to {path}")
    exported = export_student(model, info.spec, kv_cache=kv_cache, say=say)
    if contract.SOURCE_MODEL in info.metadata:
        exported.metadata_props[contract.SOURCE_MODEL] = info.metadata[contract.SOURCE_MODEL]
    if tokenizer is not None:
        exported.metadata_props[contract.TOKENIZER] = tokenizer
    elif contract.TOKENIZER in info.metadata:
        exported.metadata_props[contract.TOKENIZER] = info.metadata[contract.TOKENIZER]
    if contract.PIPELINE in info.metadata:
        exported.metadata_props[contract.DISTILLED_FROM_PIPELINE] = info.metadata[contract.PIPELINE]
    ids = np.ascontiguousarray(windows[:2, :64], dtype=np.int64)
    mask = np.ones_like(ids)
    with atomic_write(path) as temporary:
        ir.save(exported, str(temporary))
        session = create_session(temporary, provider="cpu", optimization_level="disabled").session
        feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask}
        if kv_cache:
            feeds.update(DecodeLayout.from_session(session).empty_past(len(ids)))
        got = session.run([contract.LOGITS], feeds)[0]
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        diff = float(np.abs(got - expected).max())
        # float32 rounding over 30 layers: SmolLM2 measured 1.1e-4 (exported) to 3.8e-4 (distilled) on
        # logits of magnitude ~30; an export bug is off by orders of magnitude more.
        bound = 2e-4 + 3e-5 * float(np.abs(expected).max())
        if not diff <= bound:  # trained weights can round more: measure PyTorch's own float32 error on them
            bound = max(bound, 8 * _float32_error(model, ids, mask, expected))
        if not diff <= bound:
            raise PanguLightError(
                f"the re-exported graph disagrees with PyTorch (max |diff| {diff:.3g} > {bound:.3g}); this is a "
                "bug, please report it"
            )
    say(f"... {path}: ORT matches PyTorch (max |diff| {diff:.2e})")
    return diff


def _float32_error(model, ids: np.ndarray, mask: np.ndarray, logits: np.ndarray) -> float:
    """max |float32 logits - float64 logits| of ``model`` itself on these tokens: what float32 rounding
    gives with these weights (an ORT graph computing the same function differs from PyTorch by about
    its own error plus PyTorch's)."""
    import copy

    wide = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        reference = wide(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    del wide
    return float(np.abs(logits - reference).max())
