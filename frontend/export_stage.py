"""The export stage: resolve a model, check its family, trace or reuse its structure, attach
its weights, save each graph kind.

``export_graphs(spec, {False: no_cache_path, True: decode_path})`` resolves the model (alias,
directory or hub id) and checks its family from config.json once, before any weights are read.
When the checkpoint is safetensors holding every parameter under its ``state_dict`` name, the
structure is traced on an empty model (``weights.empty_model``: no weight is read or held) and
each parameter initializer then points at its bytes in the checkpoint, so saving copies the
weights file to file; a structure traced before for the same config is reused
(``structure_cache``). Other checkpoints are loaded in float32 and traced as before. Each graph
gets the tokenizer directory and the model spec in its metadata, its model map is derived (the
check that passes can read it) and it is saved atomically (weights in a side file above
``graph_io.EXTERNAL_DATA_THRESHOLD_BYTES``). ``dtype`` makes a float16 or bfloat16 graph: the
model is built (or loaded) in that dtype and each weight converted once, as torch rounds it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch
import transformers

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.export import OPSET, ExportOptions, check_supported, export_model
from pangu_light.frontend.loading import load_hf_model, resolve_model
from pangu_light.frontend.random_models import is_random_dir, random_tensor
from pangu_light.frontend.structure_cache import load_structure, store_structure, structure_key
from pangu_light.frontend.weights import attach_weights, empty_model, safetensors_index, safetensors_source
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import refuse_overwrite_input, save_model_atomic

__all__ = ["DTYPES", "export_graphs"]

DTYPES = ("float32", "float16", "bfloat16")


def export_graphs(
    spec: str,
    outputs: dict[bool, Path | None],
    *,
    progress: Callable[[str], None] | None = None,
    reuse_structure: bool = True,
    dtype: str = "float32",
) -> dict[bool, tuple[ir.Model, ModelMap]]:
    """Export ``spec`` once per graph kind in ``outputs`` (``{kv_cache: path}``) and save each.

    The model is resolved and checked once. When its weights are safetensors under their
    ``state_dict`` names, the structure is traced on an empty model (``weights.empty_model``)
    and every initializer points at its bytes in the checkpoint, so the weights are copied
    file to file and never held in memory; otherwise the model is loaded in float32. With
    ``reuse_structure`` a structure traced before for the same config is reused
    (``structure_cache``). ``dtype`` (float32, float16 or bfloat16) is the graph's: its weights
    (converted from the checkpoint's as torch's ``.to(dtype)`` rounds, one tensor at a time),
    activations, cache and logits (see ``export``)."""
    if dtype not in DTYPES:
        raise PanguLightError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    note = progress or (lambda message: None)
    for output in outputs.values():
        _check_output(output)
    model_dir = resolve_model(spec)
    for output in outputs.values():
        _check_output(output, model_dir)

    # The architecture is checked from config.json before any weights are read.
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except Exception as error:  # transformers raises ValueError/KeyError/OSError variously
        raise PanguLightError(
            f"cannot read the config of {model_dir} ({type(error).__name__}: {error}); "
            "pass a Hugging Face model directory with a valid config.json"
        ) from None
    check_supported(config)

    hf_model, source = _structure_model(config, model_dir, spec, note, dtype)
    n_params = sum(p.numel() for p in hf_model.parameters())
    aliases = _parameter_aliases(hf_model)
    results = {}
    for kv_cache, output in outputs.items():
        kind = "decode (KV cache)" if kv_cache else "no-cache"
        note(f"exporting the {kind} graph of {n_params / 1e6:.1f}M parameters in {dtype}")
        ir_model = _traced(hf_model, kv_cache, source, aliases, reuse_structure, note, dtype)
        ir_model.metadata_props[contract.TOKENIZER] = str(model_dir)
        ir_model.metadata_props[contract.SOURCE_MODEL] = str(spec)
        note("deriving the model map")
        try:
            model_map = ModelMap.from_model(ir_model)
        except PanguLightError as error:
            raise PanguLightError(
                f"the exported graph is not one the passes can read ({error}); this is a bug in "
                "pangu-light's exporter, please report it with the model's config.json"
            ) from None
        note(f"saving {output}")
        save_model_atomic(ir_model, output)
        results[kv_cache] = (ir_model, model_map)
    return results


def _traced(hf_model, kv_cache: bool, source, aliases, reuse: bool, note: Callable[[str], None],
            dtype: str) -> ir.Model:
    """The cleaned graph of one kind, parameters attached: from the structure cache when it
    holds this config and kind, else traced (and then stored there)."""
    key = None
    if source is not None and reuse:
        hf_model.config.use_cache = kv_cache  # as export_model sets it, so the key and metadata match
        config_json = hf_model.config.to_json_string(use_diff=False)
        key = structure_key(config_json, kv_cache, OPSET, dtype)
        cached = load_structure(key, kv_cache)
        if cached is not None and attach_weights(cached, source, aliases):
            cached.metadata_props[contract.SOURCE_CONFIG] = config_json  # its own path, not the first's
            note("reusing the structure traced before for this config (delete <cache>/structures to trace again)")
            return cached
    note("tracing (torch.onnx dynamo export) and cleaning (constant folding)")
    ir_model = export_model(hf_model, ExportOptions(kv_cache=kv_cache))
    if source is not None:
        if not attach_weights(ir_model, source, aliases):
            raise PanguLightError("the checkpoint's weights do not match the traced structure; this is a bug")
        if key is not None:
            store_structure(ir_model, key, kv_cache, aliases)
    return ir_model


def _structure_model(config, model_dir: Path, spec: str, note: Callable[[str], None], dtype: str):
    """(model to trace, TensorSource or None), in ``dtype``: an empty model when the weights
    come from the checkpoint's safetensors (every parameter there under its name) or are
    generated (``random:``), else the model loaded (and None)."""
    if is_random_dir(model_dir):
        note(f"loading {spec} as an empty model (seeded random weights are generated while saving)")
        return empty_model(config, dtype), lambda names, shape, dtype: random_tensor(model_dir, names[0], shape, dtype)
    index = safetensors_index(model_dir)
    if index is not None:
        model = empty_model(config, dtype)
        check_supported(model.config)
        if all(any(n in index for n in names) for names in _parameter_aliases(model).values()):
            note(f"loading {spec} from {model_dir} as an empty model (its weights stay in the "
                 "safetensors and are copied when the graph is saved)")
            return model, safetensors_source(index)
        del model
    note(f"loading {spec} from {model_dir} ({dtype})")
    try:
        hf_model = load_hf_model(model_dir, dtype)
    except PanguLightError:
        raise
    except Exception as error:  # missing or truncated weights, unknown classes, ...
        raise PanguLightError(
            f"cannot load the model in {model_dir} ({type(error).__name__}: {error}); "
            "check that its weight files are complete"
        ) from None
    check_supported(hf_model.config)
    return hf_model, None


def _parameter_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> all names of that tensor (a tied embedding has two)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _check_output(output: Path | None, model_dir: Path | None = None) -> None:
    if output is None:
        raise PanguLightError(
            "export needs -o OUTPUT, e.g. `pangu-light export smollm2-135m -o model.onnx`"
        )
    if output.is_dir():
        raise PanguLightError(f"output {output} is a directory; pass a file path such as {output / 'model.onnx'}")
    if model_dir is not None and model_dir.is_dir():
        refuse_overwrite_input(output, *sorted(model_dir.iterdir()))
