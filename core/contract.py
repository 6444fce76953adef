"""The names our files agree on: graph metadata keys and the graph's input/output names.

Every package reads and writes these through this module, so a key is spelled in one place.

Graph I/O (what ``export`` writes and ``run``, ``bench``, ``calibrate`` and ``eval`` feed)::

    inputs   input_ids [B, S]   attention_mask [B, P + S]   past_key_values.{i}.key/value [B, kv_i, P, d_i]
    outputs  logits [B, S, V]   present.{i}.key/value [B, kv_i, P + S, d_i]      (decode graphs only)
"""

from __future__ import annotations

__all__ = [
    "INPUT_IDS", "ATTENTION_MASK", "LOGITS", "PAST_PREFIX", "PRESENT_PREFIX",
    "past_key", "past_value", "present_key", "present_value", "is_past_input",
    "FAMILY", "GRAPH_KIND", "SOURCE_CONFIG", "SOURCE_MODEL", "TOKENIZER", "PIPELINE",
    "PASS_STATS", "PASS_TAG", "PLAN", "LAYER_ORIGINS", "GAMMA_L2_BEFORE_SLICE", "SLNP_APPLIED",
    "DISTILLED_FROM_PIPELINE", "TORCH_NAME_SCOPES", "HEADS_DIVIDE_HIDDEN",
]

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def past_key(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.key"


def past_value(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.value"


def present_key(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.key"


def present_value(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.value"


def is_past_input(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


# Model-level metadata_props written by export.
FAMILY = "pangu_light.family"  # the transformers model_type the graph was exported from
GRAPH_KIND = "pangu_light.graph_kind"  # "no-cache" or "decode"
SOURCE_CONFIG = "pangu_light.source_config"  # the HF config as JSON (reimport rebuilds from it)
SOURCE_MODEL = "pangu_light.source_model"  # where the weights came from (a path or an alias)
TOKENIZER = "pangu_light.tokenizer"  # the tokenizer directory the graph was exported with

# Model-level metadata_props written by the pass manager and compile.
PIPELINE = "pangu_light.pipeline"  # the pipeline text, e.g. "slice-hidden{keep=[...]},slnp"
PASS_STATS = "pangu_light.pass_stats"  # JSON list of one record per pass run
PLAN = "pangu_light.plan"  # the plan `compile --plan` applied, as JSON
LAYER_ORIGINS = "pangu_light.layer_origins"  # JSON list: original index of each layer kept
DISTILLED_FROM_PIPELINE = "pangu_light.distilled_from_pipeline"

# metadata_props on values and nodes.
PASS_TAG = "pangu_light.pass"  # comma-separated names of the passes that changed it
GAMMA_L2_BEFORE_SLICE = "pangu_light.gamma_l2_before_slice"  # on a gamma: ||gamma_eff|| before slicing
SLNP_APPLIED = "pangu_light.slnp_applied"  # on a gamma: set by slnp, cleared when sliced again

# Families whose transformers config requires the hidden size to divide by the head count
# (a uniform pruned shape that breaks this cannot be written as a standard config).
HEADS_DIVIDE_HIDDEN = frozenset({"llama", "gemma2", "gemma3"})

# Written by the torch exporter on each node: the module scopes it came from.
TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
