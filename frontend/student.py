"""The student model: its per-layer shape description, building it, loading weights into it,
saving it and loading it back.

A ``StudentSpec`` is what a Hugging Face config cannot say: per-layer head counts, KV groups and
FFN widths, the post-norms that became the identity, and Gemma's embedding scale. ``build_student``
makes the standard Hugging Face class of the architecture and resizes its modules to the spec::

    layer i     q_proj [h_i d, H']  k_proj, v_proj [g_i d, H']  o_proj [H', h_i d]
                num_key_value_groups = h_i / g_i   (eager and SDPA attention view heads with -1
                                                    and repeat K/V by this per-module count)
                gate, up [I_i, H']  (GLM4 gate_up [2 I_i, H'])  down [H', I_i]
                every hidden norm gamma [H']

Saving (``save_student``): a model whose layers all have one shape and whose norms are all there
(and whose config transformers accepts: Llama and Gemma configs need the hidden size to be a
multiple of the query heads) is written as a standard Hugging Face directory
(``AutoModelForCausalLM.from_pretrained`` loads it with no custom code; a Gemma whose hidden size
was sliced gets an untied lm_head and an embedding multiplied by sqrt(H_orig / H'), so the
standard sqrt(H') scale gives the same numbers). Any other model is written as
``pangu_light_student.json`` + ``model.safetensors`` and read back by ``load_student``, which
rebuilds the per-layer shapes from the description.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from pangu_light.core.contract import HEADS_DIVIDE_HIDDEN
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_directory

__all__ = [
    "EMBED_SCALE",
    "STUDENT_FILE",
    "LayerShape",
    "StudentSpec",
    "build_student",
    "hf_config",
    "load_student",
    "load_tensors",
    "save_student",
]

STUDENT_FILE = "pangu_light_student.json"
STUDENT_FORMAT = "pangu-light-student"
STUDENT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"

EMBED_SCALE = "model.embed_tokens.embed_scale"  # Gemma's sqrt(hidden), a buffer and a graph constant


@dataclasses.dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    identity_norms: tuple[str, ...] = ()  # post-norm modules that became the identity


@dataclasses.dataclass
class StudentSpec:
    """Everything needed to build the student's modules (weights aside)."""

    family: str
    config: dict[str, Any]  # HF config: hidden H', n layers, layer 0's shape
    hidden_size: int
    head_dim: int
    tied: bool
    layers: list[LayerShape]
    embed_scale: float | None = None  # Gemma: the graph's constant
    origin: list[int] | None = None  # original index of each layer (informative)

    @property
    def uniform(self) -> bool:
        """One shape for every layer and no norm replaced: a standard HF config describes it."""
        def shape(layer: LayerShape) -> tuple[int, int, int]:
            return layer.num_heads, layer.num_kv_heads, layer.intermediate_size

        return all(shape(layer) == shape(self.layers[0]) and not layer.identity_norms for layer in self.layers)

    @property
    def standard_config(self) -> bool:
        """``uniform``, and transformers accepts the config: Llama and Gemma configs refuse a hidden
        size that is not a multiple of the query heads, even with an explicit head_dim."""
        heads = self.layers[0].num_heads
        return self.uniform and (self.family not in HEADS_DIVIDE_HIDDEN or self.hidden_size % heads == 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STUDENT_FORMAT, "version": STUDENT_VERSION, "family": self.family,
            "hidden_size": self.hidden_size, "head_dim": self.head_dim, "tied": self.tied,
            "embed_scale": self.embed_scale, "origin": self.origin,
            "layers": [dataclasses.asdict(l) | {"identity_norms": list(l.identity_norms)} for l in self.layers],
            "config": self.config,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> StudentSpec:
        if not isinstance(data, dict) or data.get("format") != STUDENT_FORMAT or data.get("version") != STUDENT_VERSION:
            raise PanguLightError(f"{where} is not a pangu-light student description (version {STUDENT_VERSION})")
        try:
            return cls(
                family=data["family"], config=dict(data["config"]), hidden_size=int(data["hidden_size"]),
                head_dim=int(data["head_dim"]), tied=bool(data["tied"]),
                layers=[LayerShape(int(l["num_heads"]), int(l["num_kv_heads"]), int(l["intermediate_size"]),
                                   tuple(l.get("identity_norms", ()))) for l in data["layers"]],
                embed_scale=None if data.get("embed_scale") is None else float(data["embed_scale"]),
                origin=data.get("origin"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PanguLightError(f"{where} is malformed ({type(error).__name__}: {error})") from None



# ----------------------------------------------------------------------------- building


def hf_config(config: Mapping[str, Any]) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(**copy.deepcopy(dict(config)))


def build_student(spec: StudentSpec, *, attn_implementation: str = "eager") -> transformers.PreTrainedModel:
    """The HF model of ``spec``'s architecture with every module at its per-layer shape.

    Parameters are left uninitialised: load weights next (``load_tensors``)."""
    from transformers.initialization import no_init_weights

    config = hf_config(spec.config)
    config._attn_implementation = attn_implementation
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module, shape in zip(model.model.layers, spec.layers):
            attention = module.self_attn
            rows_q, rows_kv = shape.num_heads * spec.head_dim, shape.num_kv_heads * spec.head_dim
            _resize(attention, "q_proj", rows_q, spec.hidden_size)
            _resize(attention, "k_proj", rows_kv, spec.hidden_size)
            _resize(attention, "v_proj", rows_kv, spec.hidden_size)
            _resize(attention, "o_proj", spec.hidden_size, rows_q)
            if shape.num_heads % shape.num_kv_heads:
                raise PanguLightError(f"{shape.num_heads} query heads do not split into {shape.num_kv_heads} KV groups")
            attention.num_key_value_groups = shape.num_heads // shape.num_kv_heads
            mlp = module.mlp
            if hasattr(mlp, "gate_up_proj"):
                _resize(mlp, "gate_up_proj", 2 * shape.intermediate_size, spec.hidden_size)
            else:
                _resize(mlp, "gate_proj", shape.intermediate_size, spec.hidden_size)
                _resize(mlp, "up_proj", shape.intermediate_size, spec.hidden_size)
            _resize(mlp, "down_proj", spec.hidden_size, shape.intermediate_size)
            for path in shape.identity_norms:
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent), leaf, torch.nn.Identity())
        if spec.embed_scale is not None:
            embedding = model.model.embed_tokens
            embedding.embed_scale.fill_(spec.embed_scale)
            embedding.scalar_embed_scale = spec.embed_scale
        if spec.tied:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _resize(parent: torch.nn.Module, name: str, out_features: int, in_features: int) -> None:
    old = getattr(parent, name)
    if (old.out_features, old.in_features) == (out_features, in_features):
        return
    linear = torch.nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta")
    setattr(parent, name, linear.to_empty(device="cpu"))


def load_tensors(model: torch.nn.Module, spec: StudentSpec, tensors: Mapping[str, Any], *, where: str) -> None:
    """Copy ``tensors`` (state_dict names) into ``model``: every parameter must be found with its
    exact shape, and every tensor must be used."""
    tensors = dict(tensors)
    tensors.pop(EMBED_SCALE, None)
    parameters = dict(model.named_parameters())  # tied: lm_head.weight is not listed again
    with torch.no_grad():
        for name, parameter in parameters.items():
            if name not in tensors:
                raise PanguLightError(f"{where} has no weight {name!r}, which the {spec.family} student needs")
            value = torch.tensor(np.asarray(tensors.pop(name)), dtype=torch.float32)
            if tuple(value.shape) != tuple(parameter.shape):
                raise PanguLightError(
                    f"{where}: weight {name!r} has shape {list(value.shape)}, the student expects "
                    f"{list(parameter.shape)}"
                )
            parameter.copy_(value)
    if spec.tied:
        tensors.pop("lm_head.weight", None)
    if tensors:
        raise PanguLightError(
            f"{where} has weights the {spec.family} student has no place for: {sorted(tensors)[:5]}"
        )


# ----------------------------------------------------------------------------- saving, loading


def save_student(
    model: transformers.PreTrainedModel,
    spec: StudentSpec,
    directory: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> str:
    """Write the student to ``directory`` (created through a rename); returns ``"hf"`` for a
    standard Hugging Face directory (``spec.standard_config``), ``"pangu-light"`` for the per-layer
    format that ``load_student`` reads."""
    directory = Path(directory)
    with atomic_directory(directory) as work:
        state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
        if spec.standard_config:
            kind = "hf"
            _save_hf(state, spec, work)
        else:
            kind = "pangu-light"
            from safetensors.torch import save_file

            state = {k: v for k, v in state.items() if not (spec.tied and k == "lm_head.weight")}
            state.pop(EMBED_SCALE, None)
            state = {k: v for k, v in state.items() if not k.endswith("inv_freq")}
            save_file(state, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
            (work / STUDENT_FILE).write_text(json.dumps(spec.to_json(), indent=1) + "\n")
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), work)
        if directory.exists():  # checked last: atomic_directory would replace it
            raise PanguLightError(f"{directory} exists; inputs and earlier outputs are never overwritten")
    return kind


def _save_hf(state: dict[str, torch.Tensor], spec: StudentSpec, work: Path) -> None:
    config = dict(spec.config)
    state = {k: v for k, v in state.items() if k != EMBED_SCALE and not k.endswith("inv_freq")}
    if spec.embed_scale is not None and not math.isclose(spec.embed_scale, spec.hidden_size ** 0.5, rel_tol=1e-7):
        # The standard class scales by sqrt(H'); fold the graph's constant into an untied embedding.
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        factor = spec.embed_scale / spec.hidden_size ** 0.5
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * factor
        config["tie_word_embeddings"] = False
    config = hf_config(config)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    expected_missing = {EMBED_SCALE, "lm_head.weight"} if config.tie_word_embeddings else {EMBED_SCALE}
    missing = [k for k in missing if k not in expected_missing and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise PanguLightError(
            f"the uniform student does not fit its own HF config: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(str(work), safe_serialization=True)


def _copy_tokenizer(source: Path, target: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
    for name in names:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)


def load_student(directory: str | os.PathLike, *, attn_implementation: str = "eager") -> transformers.PreTrainedModel:
    """Load a directory written by ``save_student`` (either kind) as an eval-mode float32 model."""
    directory = Path(directory)
    description = directory / STUDENT_FILE
    if not description.is_file():
        if (directory / "config.json").is_file():
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=torch.float32, attn_implementation=attn_implementation
            ).eval()
        raise PanguLightError(
            f"{directory} holds neither {STUDENT_FILE} nor config.json: pass a `pangu-light distill` output"
        )
    from safetensors.torch import load_file

    spec = StudentSpec.from_json(json.loads(description.read_text()), where=str(description))
    model = build_student(spec, attn_implementation=attn_implementation)
    load_tensors(model, spec, load_file(str(directory / WEIGHTS_FILE)), where=str(directory / WEIGHTS_FILE))
    return model.eval()
