"""Re-import a pruned graph as a trainable PyTorch model, with per-layer shapes; save and load it.

No generic ONNX-to-torch conversion: the graph's weights keep their ``state_dict`` names and the
exporter recorded the original Hugging Face config (``pangu_light.source_config``), so the model
is the standard Hugging Face class of that architecture with resized modules::

    config      source config with hidden H', n layers (sliding/full types of the layers kept),
                and the shapes of layer 0 (an HF config holds one shape for all layers)
    layer i     q_proj [h_i d, H']  k_proj, v_proj [g_i d, H']  o_proj [H', h_i d]
                num_key_value_groups = h_i / g_i   (eager and SDPA attention view heads with -1
                                                    and repeat K/V by this per-module count)
                gate, up [I_i, H']  (GLM4 gate_up [2 I_i, H'])  down [H', I_i]
                every hidden norm gamma [H']
    post-norms  removed by absorb-post-norm or drop-post-norm become the identity: absorb folded
                the fixed scale gamma_abs = s_inv * gamma_eff (eqs. 8-10) into the o_proj /
                down_proj rows, which is where the re-imported weights carry it
    Gemma       the embedding scale stays the graph's constant sqrt(original hidden), not sqrt(H')

Weights are loaded by name (a tied embedding is the one tensor the embedding Gather and the
lm_head MatMul share, whatever it is called), every parameter must be found with its exact shape,
and every graph weight must be used. Layer numbering follows the graph (drop-layers renumbers);
the original index of each kept layer comes from the drop-layers records in the graph's
``pangu_light.pass_stats``.

Saving (``save_student``): a model whose layers all have one shape and whose norms are all there
(and whose config transformers accepts: Llama and Gemma configs need the hidden size to be a
multiple of the query heads) is written as a standard Hugging Face directory (``AutoModelForCausalLM.from_pretrained`` loads it
with no custom code; a Gemma whose hidden size was sliced gets an untied lm_head and an embedding
multiplied by sqrt(H_orig / H'), so the standard sqrt(H') scale gives the same numbers). Any other
model is written as ``pangu_light_student.json`` + ``model.safetensors`` and read back by
``load_student``, which rebuilds the per-layer shapes from the tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import transformers

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.export import check_supported
from pangu_light.frontend.loading import share_permissions
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = [
    "STUDENT_FILE",
    "LayerShape",
    "StudentSpec",
    "Reimported",
    "build_student",
    "graph_tensors",
    "load_student",
    "reimport",
    "save_student",
    "spec_from_graph",
]

SOURCE_CONFIG_KEY = "pangu_light.source_config"
PASS_STATS_KEY = "pangu_light.pass_stats"
STUDENT_FILE = "pangu_light_student.json"
STUDENT_FORMAT = "pangu-light-student"
STUDENT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"

# Post-norm role -> module name inside a decoder layer, for the sandwich-norm families.
POST_NORM_MODULES = {
    "gemma2": {"post_attn": "post_attention_layernorm", "post_ffn": "post_feedforward_layernorm"},
    "gemma3": {"post_attn": "post_attention_layernorm", "post_ffn": "post_feedforward_layernorm"},
    "glm4": {"post_attn": "post_self_attn_layernorm", "post_ffn": "post_mlp_layernorm"},
}
# Families whose config validation requires hidden_size % num_attention_heads == 0 (transformers 5).
HEADS_DIVIDE_HIDDEN = frozenset({"llama", "gemma2", "gemma3"})
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
        first = self.layers[0]
        return all(
            (l.num_heads, l.num_kv_heads, l.intermediate_size) == (first.num_heads, first.num_kv_heads, first.intermediate_size)
            and not l.identity_norms
            for l in self.layers
        )

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


@dataclasses.dataclass
class Reimported:
    model: transformers.PreTrainedModel
    spec: StudentSpec
    graph_kind: str
    metadata: dict[str, str]


# ----------------------------------------------------------------------------- from a graph


def origin_layers(metadata: Mapping[str, str], original_count: int, count: int) -> list[int]:
    """Original index of each of the graph's ``count`` layers, from its drop-layers records."""
    origin = list(range(original_count))
    try:
        records = json.loads(metadata.get(PASS_STATS_KEY) or "[]")
    except json.JSONDecodeError:
        records = []
    for record in records:
        if record.get("pass") != "drop-layers" or not record.get("modified"):
            continue
        removed = set((record.get("stats") or {}).get("removed") or [])
        origin = [o for i, o in enumerate(origin) if i not in removed]
    if len(origin) != count:
        raise PanguLightError(
            f"the graph has {count} layers, but its source config has {original_count} and its "
            f"drop-layers records leave {len(origin)}; re-import graphs made by `pangu-light compile`"
        )
    return origin


def spec_from_graph(model: ir.Model, model_map: ModelMap | None = None) -> StudentSpec:
    """The student's shapes: per-layer head counts and FFN widths from the model map."""
    model_map = model_map or ModelMap.from_model(model)
    meta = dict(model.metadata_props)
    raw = meta.get(SOURCE_CONFIG_KEY)
    if not raw:
        raise PanguLightError(
            f"the graph records no {SOURCE_CONFIG_KEY}; re-import needs a graph exported by "
            "`pangu-light export` (and then compiled)"
        )
    source = json.loads(raw)
    family = check_supported(transformers.AutoConfig.for_model(**copy.deepcopy(source)))
    layers_map = model_map.layers
    head_dims = {l.attention.head_dim for l in layers_map}
    if len(head_dims) != 1:
        raise PanguLightError(f"layers have different head sizes {sorted(head_dims)}; pangu-light never prunes head_dim")
    head_dim = head_dims.pop()
    posts = POST_NORM_MODULES.get(family, {})
    shapes = []
    for layer in layers_map:
        missing = tuple(f"model.layers.{layer.index}.{leaf}" for role, leaf in posts.items() if role not in layer.norms)
        shapes.append(LayerShape(
            layer.attention.num_heads, layer.attention.num_kv_heads, layer.ffn.intermediate_size, missing,
        ))
    origin = origin_layers(meta, int(source["num_hidden_layers"]), len(layers_map))
    config = dict(source)
    # The modules get their per-layer head counts after construction; the config only has to be
    # one transformers accepts (see StudentSpec.standard_config), so where layer 0's query heads do
    # not divide the hidden size it names gcd(hidden, heads) of them.
    heads = shapes[0].num_heads
    if family in HEADS_DIVIDE_HIDDEN and model_map.hidden_size % heads:
        heads = math.gcd(model_map.hidden_size, heads)
    config.update(
        hidden_size=model_map.hidden_size, num_hidden_layers=len(layers_map), head_dim=head_dim,
        num_attention_heads=heads, num_key_value_heads=shapes[0].num_kv_heads,
        intermediate_size=shapes[0].intermediate_size, vocab_size=model_map.vocab_size,
        tie_word_embeddings=model_map.tied_embeddings, use_cache=False,
    )
    types = source.get("layer_types")
    if isinstance(types, list) and len(types) == int(source["num_hidden_layers"]):
        config["layer_types"] = [types[o] for o in origin]
    scale = None
    if EMBED_SCALE in model.graph.initializers:
        scale = float(model.graph.initializers[EMBED_SCALE].const_value.numpy())
    elif family in ("gemma2", "gemma3"):
        scale = float(source["hidden_size"]) ** 0.5
    return StudentSpec(
        family=family, config=config, hidden_size=model_map.hidden_size, head_dim=head_dim,
        tied=model_map.tied_embeddings, layers=shapes, embed_scale=scale, origin=origin,
    )


def graph_tensors(model: ir.Model, model_map: ModelMap) -> dict[str, np.ndarray]:
    """The graph's weights under their ``state_dict`` names (embedding and lm_head by role)."""
    tensors = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and (name.endswith((".weight", ".bias")) or name == EMBED_SCALE):
            tensors[name] = value.const_value.numpy()
    tensors.pop(model_map.embedding.name, None)
    tensors.pop(model_map.lm_head.weight.name, None)
    tensors["model.embed_tokens.weight"] = model_map.embedding.const_value.numpy()
    if not model_map.tied_embeddings:
        tensors["lm_head.weight"] = model_map.lm_head.weight.const_value.numpy()
    return tensors


def reimport(graph: str | os.PathLike | ir.Model, *, attn_implementation: str = "eager") -> Reimported:
    """A float32 PyTorch model computing what ``graph`` computes, in train-ready form."""
    model = graph if isinstance(graph, ir.Model) else _load_graph(graph)
    model_map = ModelMap.from_model(model)
    spec = spec_from_graph(model, model_map)
    student = build_student(spec, attn_implementation=attn_implementation)
    load_tensors(student, spec, graph_tensors(model, model_map), where="the graph")
    for module, layer in zip(student.model.layers, model_map.layers):
        attention = module.self_attn
        assert attention.q_proj.out_features == layer.attention.num_heads * spec.head_dim
    return Reimported(
        model=student.eval(), spec=spec, graph_kind=model_map.graph_kind, metadata=dict(model.metadata_props),
    )


def _load_graph(path: str | os.PathLike) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise PanguLightError(f"{path}: no such file; pass the path of a pruned .onnx graph")
    try:
        return ir.load(str(path))
    except Exception as error:  # protobuf raises several unrelated types for a corrupt file
        raise PanguLightError(f"{path} is not a readable ONNX model ({type(error).__name__}: {error})") from None


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
    setattr(parent, name, torch.nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta").to_empty(device="cpu"))


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
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
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
        if directory.exists():
            raise PanguLightError(f"{directory} exists; inputs and earlier outputs are never overwritten")
        share_permissions(work)
        os.replace(work, directory)
    finally:
        if work.exists():
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return kind


def _save_hf(state: dict[str, torch.Tensor], spec: StudentSpec, work: Path) -> None:
    config = dict(spec.config)
    state = {k: v for k, v in state.items() if k != EMBED_SCALE and not k.endswith("inv_freq")}
    if spec.embed_scale is not None and not math.isclose(spec.embed_scale, spec.hidden_size ** 0.5, rel_tol=1e-7):
        # The standard class scales by sqrt(H'); fold the graph's constant into an untied embedding.
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * (spec.embed_scale / spec.hidden_size ** 0.5)
        config["tie_word_embeddings"] = False
    config = hf_config(config)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight") and not k.endswith("inv_freq") and k != EMBED_SCALE]
    if missing or unexpected:
        raise PanguLightError(f"the uniform student does not fit its own HF config: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(str(work), safe_serialization=True)


def _copy_tokenizer(source: Path, target: Path) -> None:
    import shutil

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
        raise PanguLightError(f"{directory} holds neither {STUDENT_FILE} nor config.json: pass a `pangu-light distill` output")
    from safetensors.torch import load_file

    spec = StudentSpec.from_json(json.loads(description.read_text()), where=str(description))
    model = build_student(spec, attn_implementation=attn_implementation)
    load_tensors(model, spec, load_file(str(directory / WEIGHTS_FILE)), where=str(directory / WEIGHTS_FILE))
    return model.eval()
