"""Export a Hugging Face decoder-only model to a *clean* ONNX graph that passes can rewrite.

``torch.onnx.export(dynamo=True)`` with its default optimiser makes graphs hard to rewrite
(weights transposed and renamed, identical tensors shared across layers, shape subgraphs
CSE'd across layers). So the graph is exported with ``optimize=False`` and then cleaned here:

* constants are folded, except any node that reads a named parameter: weights keep their
  ``state_dict`` names and ``[out, in]`` layout behind a Transpose (ORT folds it at load);
* nothing is deduplicated or CSE'd, so each layer keeps its own shape constants (the head
  counts live in them) and each norm its own gamma;
* the wrapper's module prefix is removed from initializer names and name-scope metadata,
  so names read ``model.layers.3.self_attn.q_proj.weight`` as in the checkpoint.

Two graph kinds (names as ONNX Runtime GenAI and optimum use them)::

    no-cache  input_ids[b, s], attention_mask[b, s]                      -> logits[b, s, V]
    decode    input_ids[b, s], attention_mask[b, p + s],
              past_key_values.{i}.key/value[b, kv_i, p, d]               -> logits,
                                                                            present.{i}.key/value[b, kv_i, p + s, d]

Positions are computed inside the graph from the attention mask (cumsum - 1), so batches
with left padding need no extra input. Attention is exported in its eager form (explicit
MatMul/Softmax) so every family, Gemma2's logit soft-capping included, has one shape.

A float16/bfloat16 model exports as the torch modules compute it: weights, activations, the
past/present cache and the logits in the half dtype, while each RMSNorm (``x.to(float32)``,
then the normalised x cast back before the gamma; Gemma's ``x * (1 + w.float())`` cast back
after), the softmax (``dtype=float32``) and the rotary angles compute in float32 between Casts.
The model map reads those Casts as part of the norm (``patterns.RMS_NORM``).

``export_to_file`` (one graph kind) and ``export_stage.export_graphs`` (both) are the export
stage: resolve, check, trace on empty weights or reuse a traced structure, attach the
checkpoint's weights by name, save atomically (see ``export_stage``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
import transformers
from onnxscript.optimizer import _constant_folding
from transformers.cache_utils import DynamicCache

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ExportOptions", "export_model", "export_to_file", "check_supported",
]

# config.model_type -> the family name used across the project.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "glm4": "glm4",
}

OPSET = 18
_WRAPPED = "m"  # attribute name of the HF model inside the export wrappers
_NOISY_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace")


@dataclass(frozen=True)
class ExportOptions:
    kv_cache: bool = False
    opset: int = OPSET


def check_supported(config: transformers.PretrainedConfig) -> str:
    """Return the family of ``config`` or raise a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        raise PanguLightError(
            "this is a multimodal Gemma3ForConditionalGeneration checkpoint; export its text "
            "model (Gemma3ForCausalLM) instead"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(set(SUPPORTED_MODEL_TYPES.values())))
        raise PanguLightError(
            f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])}) "
            f"is not supported; supported decoder-only families: {supported}"
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def _positions(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position of every query token: number of real tokens before it (left padding safe)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -query_length:]


class _NoCacheWrapper(torch.nn.Module):
    def __init__(self, model: transformers.PreTrainedModel):
        super().__init__()
        setattr(self, _WRAPPED, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = getattr(self, _WRAPPED)
        position_ids = _positions(attention_mask, input_ids.shape[1])
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits


class _DecodeWrapper(torch.nn.Module):
    def __init__(self, model: transformers.PreTrainedModel):
        super().__init__()
        setattr(self, _WRAPPED, model)
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, *past_flat):
        model = getattr(self, _WRAPPED)
        # A cache of full-attention layers for every layer: sliding-window layers get their
        # window from the attention mask, so every present tensor has length p + s.
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past_flat[2 * layer], past_flat[2 * layer + 1], layer)
        query_length = input_ids.shape[1]
        past_length = past_flat[0].shape[2]
        cache_position = torch.arange(past_length, past_length + query_length)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask, query_length),
            past_key_values=cache,
            cache_position=cache_position,
            use_cache=True,
        )
        present = []
        for layer in range(self.num_layers):
            present.extend((out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values))
        return (out.logits, *present)


def _kv_shape(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def _example_and_dynamic(model, kv_cache: bool):
    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=1, max=65536)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (2, 5), dtype=torch.long)
    if not kv_cache:
        attention_mask = torch.ones(2, 5, dtype=torch.long)
        return (
            (input_ids, attention_mask),
            {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            ["input_ids", "attention_mask"],
            ["logits"],
        )
    past_sequence = torch.export.Dim("past_sequence", min=0, max=65536)
    num_kv, head_dim = _kv_shape(model.config)
    past_length = 3
    attention_mask = torch.ones(2, past_length + 5, dtype=torch.long)
    past = []
    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]
    total_sequence = torch.export.Dim("total_sequence", min=1, max=131072)
    dynamic: list = [{0: batch, 1: sequence}, {0: batch, 1: total_sequence}]
    for layer in range(model.config.num_hidden_layers):
        for kind in ("key", "value"):
            past.append(torch.randn(2, num_kv, past_length, head_dim, dtype=model.dtype))
            input_names.append(f"past_key_values.{layer}.{kind}")
            output_names.append(f"present.{layer}.{kind}")
            dynamic.append({0: batch, 2: past_sequence})
    # The wrapper takes the past as *args: torch.export sees it as one nested tuple.
    dynamic_shapes = (dynamic[0], dynamic[1], tuple(dynamic[2:]))
    return (input_ids, attention_mask, *past), dynamic_shapes, input_names, output_names


def export_model(
    model: transformers.PreTrainedModel, options: ExportOptions = ExportOptions()
) -> ir.Model:
    """Export ``model`` (eval mode, in its own dtype) to a clean onnx-ir model (see module docstring)."""
    family = check_supported(model.config)
    model = model.eval()
    model.config._attn_implementation = "eager"
    model.config.use_cache = options.kv_cache
    wrapper = _DecodeWrapper(model) if options.kv_cache else _NoCacheWrapper(model)
    args, dynamic_shapes, input_names, output_names = _example_and_dynamic(model, options.kv_cache)
    if not options.kv_cache:
        dynamic_shapes = tuple(dynamic_shapes[name] for name in input_names)
    with _quiet_exporter(), _layer_types_in_sorted_order(), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            optimize=False,
            opset_version=options.opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            report=False,
        )
    onnx_model = program.model
    _strip_wrapper_prefix(onnx_model)
    clean_graph(onnx_model)
    onnx_model.metadata_props[contract.FAMILY] = family
    onnx_model.metadata_props[contract.GRAPH_KIND] = "decode" if options.kv_cache else "no-cache"
    onnx_model.metadata_props[contract.SOURCE_CONFIG] = model.config.to_json_string(use_diff=False)
    return onnx_model


def clean_graph(model: ir.Model) -> None:
    """Fold constants that read no named parameter, then drop what became unused."""
    parameter_names = frozenset(model.graph.initializers)

    def should_fold(node: ir.Node) -> bool | None:
        if any(value is not None and value.name in parameter_names for value in node.inputs):
            return False
        return None  # let the folder decide (it folds what is constant and small enough)

    folder = _constant_folding.FoldConstantsPass(
        shape_inference=False,
        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        should_fold=should_fold,
    )
    passes = ir.passes.Sequential(
        folder,
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
    )
    passes(model)


def _strip_wrapper_prefix(model: ir.Model) -> None:
    prefix = _WRAPPED + "."
    for value in list(model.graph.initializers.values()):
        if value.name.startswith(prefix):
            model.graph.initializers.pop(value.name)
            value.name = value.name[len(prefix):]
            model.graph.register_initializer(value)
    for node in model.graph:
        for noisy in _NOISY_METADATA:  # local file paths and FX dumps, megabytes on big models
            node.metadata_props.pop(noisy, None)
        scopes = node.metadata_props.get(contract.TORCH_NAME_SCOPES)
        if scopes is None:
            continue
        node.metadata_props[contract.TORCH_NAME_SCOPES] = _strip_scopes(scopes, prefix)


def _strip_scopes(scopes: str, prefix: str) -> str:
    parts = ast.literal_eval(scopes)
    stripped = [p[len(prefix):] if p.startswith(prefix) else ("" if p == _WRAPPED else p) for p in parts]
    return repr(stripped)


class _SortedSet(set):
    """A set that iterates in sorted order (of ``repr``); otherwise the builtin set."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self), key=repr))


# Modules whose forward iterates ``set(config.layer_types)``: Gemma3 builds one rotary table per
# layer type in that order, which Python's per-process string hashing shuffles, so two exports of
# one model in two processes ordered and named their nodes differently (the structure cache and a
# fresh trace disagreed: same function, different graphs).
_SET_ORDER_MODULES = ("transformers.models.gemma3.modeling_gemma3",)


@contextlib.contextmanager
def _layer_types_in_sorted_order():
    """Make the modules above iterate their sets in sorted order while tracing."""
    import importlib

    patched = []
    for name in _SET_ORDER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        patched.append((module, module.__dict__.get("set")))
        module.set = _SortedSet
    try:
        yield
    finally:
        for module, previous in patched:
            if previous is None:
                del module.set
            else:
                module.set = previous


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and warnings that are noise for our users."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(previous)


def export_to_file(spec: str, output: Path | None, *, kv_cache: bool, progress: Callable[[str], None] | None = None):
    """Resolve, check, export and save ``spec``; return ``(ir_model, model_map, seconds)``
    (``export_stage.export_graphs`` writes both graph kinds in one run)."""
    from pangu_light.frontend.export_stage import export_graphs

    start = time.perf_counter()
    ((ir_model, model_map),) = export_graphs(spec, {kv_cache: output}, progress=progress).values()
    return ir_model, model_map, time.perf_counter() - start
