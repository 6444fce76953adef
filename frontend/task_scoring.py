"""Zero-shot task accuracy of any model `pangu-light eval` accepts: a graph (ONNX Runtime) or a
PyTorch model (a Hugging Face directory, an alias, a `pangu-light distill` output).

Everything but the forward call is ``calib.scoring``'s: the same items, tokenisation, batching,
log-likelihoods and metrics, so a model and the graph exported from it get the same numbers (up
to the float32 rounding of the two runtimes; tests/calib/test_task_scoring.py checks this).

``open_model(spec)`` resolves what was named on the command line:

    spec                                        backend        positions (max_length)
    x.onnx (no-cache or decode graph)           onnxruntime    the source config recorded in the graph
    directory with pangu_light_student.json     pytorch        its config (``student.load_student``)
    directory with config.json                  pytorch        config.max_position_embeddings
    distill output (summary.json + model/)      pytorch        as model/
    an alias (smollm2-135m, gemma3-270m)        pytorch        as the converted directory
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pangu_light.calib.scoring import Encode, LogitsFn, ort_logits, score_tasks
from pangu_light.core.contract import SOURCE_CONFIG
from pangu_light.core.errors import PanguLightError

__all__ = ["OpenedModel", "model_encoder", "open_model", "score_model_tasks", "torch_logits"]

_DISTILL_MODEL_DIR = "model"  # frontend.distill.outputs.MODEL_DIR, read here without importing the loop
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def torch_logits(model: torch.nn.Module) -> LogitsFn:
    """The float32 logits of ``model`` (eval mode, no gradients) for numpy inputs."""
    device = next(model.parameters()).device

    def logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
        return output.logits.float().cpu().numpy()

    return logits


def score_model_tasks(
    model: torch.nn.Module,
    encode: Encode,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    label: str = "",
) -> dict[str, dict[str, float]]:
    """``calib.scoring.score_tasks`` through the model's forward pass."""
    model.eval()
    return score_tasks(tasks, torch_logits(model), encode, limit=limit, batch_size=batch_size,
                       progress=progress, label=label, max_length=_positions(model.config.to_dict()))


@dataclasses.dataclass
class OpenedModel:
    """A model ready to score: its forward call, where its tokenizer is, how many positions it reads."""

    spec: str
    backend: str  # "onnxruntime" or "pytorch"
    logits: LogitsFn
    max_length: int | None
    path: Path  # the graph file or the model directory
    metadata: dict[str, str]  # the graph's metadata (empty for a directory)


def open_model(spec: str, *, provider: str = "cpu", threads: int | None = None, device: str = "cpu") -> OpenedModel:
    """Load ``spec`` (see the module docstring) for scoring."""
    from pangu_light.frontend.loading import ALIASES, resolve_model

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        from pangu_light.passes.infra.graph_io import load_model_metadata

        metadata = load_model_metadata(path)
        config = json.loads(metadata.get(SOURCE_CONFIG, "{}"))
        logits = ort_logits(path, provider=provider, threads=threads)
        return OpenedModel(spec, "onnxruntime", logits, _positions(config), path, metadata)
    if path.is_dir() and (path / "summary.json").is_file() and (path / _DISTILL_MODEL_DIR).is_dir():
        path = path / _DISTILL_MODEL_DIR  # a `pangu-light distill` output folder
    elif not path.is_dir():
        if spec not in ALIASES:
            raise PanguLightError(
                f"model {spec!r}: pass an .onnx graph, a Hugging Face model directory (config.json), a "
                f"`pangu-light distill` output folder, or an alias ({', '.join(ALIASES)})")
        path = resolve_model(spec)
    from pangu_light.frontend.student import load_student

    model = load_student(path).to(device)
    return OpenedModel(spec, "pytorch", torch_logits(model), _positions(model.config.to_dict()), path, {})


def model_encoder(opened: OpenedModel, tokenizer: Path | None = None) -> Callable[[str], list[int]]:
    """``encode(text)`` as lm-eval's HF model builds requests: no special tokens, except the BOS
    of tokenizers that add one by default (Gemma's), which starts every context."""
    from pangu_light.calib.text import graph_tokenizer

    if tokenizer is None and opened.backend == "pytorch":
        if not any((opened.path / name).is_file() for name in _TOKENIZER_FILES):
            raise PanguLightError(f"{opened.path} holds no tokenizer: pass --tokenizer DIR (the Hugging Face "
                                  "directory the model came from)")
        tokenizer = opened.path
    encode, bos_id = graph_tokenizer(opened.path, opened.metadata, tokenizer)
    if bos_id is None:
        return encode
    return lambda text: [bos_id, *encode(text)]


def _positions(config: dict) -> int | None:
    """The positions a model reads (max_position_embeddings; Gemma's sliding window does not cap it)."""
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None
