"""The prune plan: every data-dependent decision, written down so the passes can stay pure.

The planner (``pangu_light.calib.planner``) turns calibration statistics and targets into a
``PrunePlan``. ``compile --plan plan.json`` records the plan in the graph's metadata
(``core.contract.PLAN``) and runs ``plan.pipeline()``, whose passes take the option
``plan=true``: they read the plan from the graph they rewrite, so a pass stays a pure
function of its input graph, and the output graph carries the plan that made it. The JSON
form is meant to be read by people::

    {
      "format": "pangu-light-plan", "version": 1,
      "model":   {"family": "llama", "hidden_size": 576, "num_layers": 30,
                  "layers": [{"num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536}, ...]},
      "hidden":  {"keep": [0, 3, 4, ...], "method": "select"},   kept residual channels (rotate:
                 the leading components of "rotation": {"file": "rotation.npz", "rms_correction": {...}})
      "layers":  [{"index": 0, "kv_groups": [0, 1, 2],           kept KV groups
                   "heads": [0, 1, 3, 4, 6, 7],                 kept query heads
                   "ffn": [5, 17, ...]}, ...],                  kept FFN neurons
      "drop_layers": [12, 13],
      "clap": {"enabled": false, "merges": [{"removed": 13, "into": 11,
                                            "groups": [[11, 0], [13, 2]]}]},
      "slnp": {"enabled": true, "scales": {"model.norm.weight": 1.13, ...}},
      "post_norms": {"absorb": false, "s_inv": {"model.layers.0.post_attention_layernorm.weight": 0.21},
                     "keep": ["model.layers.13.post_feedforward_layernorm.weight"]},   not absorbed
      "targets": {...}, "source": {...}, "estimate": {...}
    }

Every index is in the ORIGINAL model's numbering (query head h belongs to KV group
h // (num_heads / num_kv_heads)). Passes apply the plan to a graph that other passes of the
same plan may already have edited: ``kept_*`` translate the plan into the graph's current
numbering, and return "keep everything" for an axis that was already pruned to the plan's
shape. Layer numbering changes only in ``drop-layers``, so it runs last.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import write_text
from pangu_light.passes.infra.base import check_indices
from pangu_light.passes.infra.pipeline import PassSpec, Pipeline
from pangu_light.passes.infra.readable_json import readable_json

if TYPE_CHECKING:
    from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["LayerPlan", "LayerShape", "PrunePlan", "ClapMerge", "load_plan", "PLAN_FORMAT"]

PLAN_FORMAT = "pangu-light-plan"
PLAN_VERSION = 1


@dataclasses.dataclass
class LayerShape:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass
class LayerPlan:
    index: int
    kv_groups: list[int]
    heads: list[int]
    ffn: list[int]


@dataclasses.dataclass
class ClapMerge:
    removed: int
    into: int
    groups: list[tuple[int, int]]  # (source layer, KV group) in the merged attention, in order


@dataclasses.dataclass
class PrunePlan:
    family: str | None
    hidden_size: int
    shapes: list[LayerShape]  # the original model, one per layer
    hidden: list[int]
    layers: list[LayerPlan]
    hidden_method: str = "select"  # "select": channels by S_channel; "rotate": leading PCA components
    rotation: dict[str, Any] = dataclasses.field(default_factory=dict)  # rotate: {"file", "rms_correction"}
    drop_layers: list[int] = dataclasses.field(default_factory=list)
    clap: bool = False
    clap_merges: list[ClapMerge] = dataclasses.field(default_factory=list)
    slnp: bool = True
    slnp_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    absorb_post_norms: bool = False
    post_norm_s_inv: dict[str, float] = dataclasses.field(default_factory=dict)
    post_norm_keep: list[str] = dataclasses.field(default_factory=list)  # gammas of norms absorption keeps
    targets: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    estimate: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def identity(cls, model_map: ModelMap) -> PrunePlan:
        """The plan that keeps everything of ``model_map`` (the planner starts from it)."""
        shapes = [LayerShape(l.attention.num_heads, l.attention.num_kv_heads, l.ffn.intermediate_size)
                  for l in model_map.layers]
        layers = [LayerPlan(i, list(range(s.num_kv_heads)), list(range(s.num_heads)), list(range(s.intermediate_size)))
                  for i, s in enumerate(shapes)]
        return cls(family=model_map.family, hidden_size=model_map.hidden_size, shapes=shapes,
                   hidden=list(range(model_map.hidden_size)), layers=layers)

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {
                "family": self.family,
                "hidden_size": self.hidden_size,
                "num_layers": len(self.shapes),
                "layers": [dataclasses.asdict(s) for s in self.shapes],
            },
            "hidden": {"keep": list(self.hidden), "method": self.hidden_method,
                       **({"rotation": self.rotation} if self.rotation else {})},
            "layers": [dataclasses.asdict(l) for l in self.layers],
            "drop_layers": list(self.drop_layers),
            "clap": {
                "enabled": self.clap,
                "merges": [
                    {"removed": m.removed, "into": m.into, "groups": [list(g) for g in m.groups]}
                    for m in self.clap_merges
                ],
            },
            "slnp": {"enabled": self.slnp, "scales": dict(self.slnp_scales)},
            "post_norms": {"absorb": self.absorb_post_norms, "s_inv": dict(self.post_norm_s_inv),
                           "keep": list(self.post_norm_keep)},
            "targets": self.targets,
            "source": self.source,
            "estimate": self.estimate,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "plan") -> PrunePlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PanguLightError(f"{where} is not a pangu-light plan (no \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            raise PanguLightError(
                f"{where} has plan version {data.get('version')!r}; this pangu-light reads version {PLAN_VERSION}"
            )
        try:
            model = data["model"]
            plan = cls(
                family=model.get("family"),
                hidden_size=int(model["hidden_size"]),
                shapes=[LayerShape(**s) for s in model["layers"]],
                hidden=[int(i) for i in data["hidden"]["keep"]],
                layers=[LayerPlan(**l) for l in data["layers"]],
                hidden_method=str(data["hidden"].get("method", "select")),
                rotation=dict(data["hidden"].get("rotation", {})),
                drop_layers=[int(i) for i in data.get("drop_layers", [])],
                clap=bool(data.get("clap", {}).get("enabled", False)),
                clap_merges=[
                    ClapMerge(int(m["removed"]), int(m["into"]), [(int(a), int(b)) for a, b in m["groups"]])
                    for m in data.get("clap", {}).get("merges", [])
                ],
                slnp=bool(data.get("slnp", {}).get("enabled", True)),
                slnp_scales={k: float(v) for k, v in data.get("slnp", {}).get("scales", {}).items()},
                absorb_post_norms=bool(data.get("post_norms", {}).get("absorb", False)),
                post_norm_s_inv={k: float(v) for k, v in data.get("post_norms", {}).get("s_inv", {}).items()},
                post_norm_keep=[str(name) for name in data.get("post_norms", {}).get("keep", [])],
                targets=dict(data.get("targets", {})),
                source=dict(data.get("source", {})),
                estimate=dict(data.get("estimate", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PanguLightError(f"{where} is malformed ({type(error).__name__}: {error})") from None
        plan.validate(where)
        return plan

    def dumps(self) -> str:
        return readable_json(self.to_json())

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan atomically (``core.files``: never half a file)."""
        write_text(path, self.dumps() + "\n")

    # -- checks ----------------------------------------------------------------------------

    def validate(self, where: str = "plan") -> None:
        """Raise PanguLightError naming the first inconsistency: indices out of range or
        repeated, an axis pruned to nothing, heads not evenly spread over the kept groups."""

        def check_keep(keep: list[int], size: int, what: str) -> None:
            if not keep:
                raise PanguLightError(f"{where}: {what} keeps nothing; keep at least one")
            check_indices(
                keep, size,
                out_of_range=lambda i: f"{where}: {what} names index {i}, but there are only {size} (0..{size - 1})",
                repeated=lambda i: f"{where}: {what} names an index twice",
            )

        n_layers = len(self.shapes)
        if len(self.layers) != n_layers:
            raise PanguLightError(f"{where}: {len(self.layers)} layer entries for a model of {n_layers} layers")
        check_keep(self.hidden, self.hidden_size, "hidden")
        if self.hidden_method not in ("select", "rotate"):
            raise PanguLightError(f"{where}: hidden method {self.hidden_method!r} is neither select nor rotate")
        for i, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
            if layer.index != i:
                raise PanguLightError(f"{where}: layer entry {i} has index {layer.index}")
            if shape.num_kv_heads <= 0 or shape.num_heads % shape.num_kv_heads:
                raise PanguLightError(
                    f"{where}: layer {i} has {shape.num_heads} heads in {shape.num_kv_heads} KV groups"
                )
            check_keep(layer.kv_groups, shape.num_kv_heads, f"layer {i} kv_groups")
            check_keep(layer.heads, shape.num_heads, f"layer {i} heads")
            check_keep(layer.ffn, shape.intermediate_size, f"layer {i} ffn")
            per_group = self.heads_per_kept_group(i)
            counts = set(per_group.values())
            if len(counts) != 1 or 0 in counts:
                raise PanguLightError(
                    f"{where}: layer {i} keeps {sorted(per_group.items())} (group: heads) query heads; "
                    "every kept KV group must keep the same number (at least one), so GQA stays regular"
                )
            stray = [h for h in layer.heads if h // shape.heads_per_group not in layer.kv_groups]
            if stray:
                raise PanguLightError(f"{where}: layer {i} keeps head {stray[0]} of a removed KV group")
        bad = [i for i in self.drop_layers if not 0 <= i < n_layers]
        if bad:
            raise PanguLightError(
                f"{where}: drop_layers names layer {bad[0]}; the model has {n_layers} (0..{n_layers - 1})"
            )
        if len(set(self.drop_layers)) == n_layers:
            raise PanguLightError(f"{where}: drop_layers removes all {n_layers} layers; keep at least one")

    def heads_per_kept_group(self, index: int) -> dict[int, int]:
        shape, layer = self.shapes[index], self.layers[index]
        counts = {g: 0 for g in layer.kv_groups}
        for h in layer.heads:
            group = h // shape.heads_per_group
            if group in counts:
                counts[group] += 1
        return counts

    # -- the plan in a graph's current numbering --------------------------------------------

    def _check_layers(self, model_map: ModelMap, pass_name: str) -> None:
        if len(model_map.layers) != len(self.shapes):
            raise PanguLightError(
                f"pass {pass_name}: the plan is for {len(self.shapes)} layers but the graph has "
                f"{len(model_map.layers)}; apply the plan to the graph it was made for, with drop-layers last"
            )
        if model_map.hidden_size not in (self.hidden_size, len(self.hidden)):
            raise PanguLightError(
                f"pass {pass_name}: the graph's hidden size {model_map.hidden_size} is neither the plan's "
                f"original {self.hidden_size} nor its kept {len(self.hidden)}; the plan is for another model"
            )

    def kept_hidden(self, model_map: ModelMap, pass_name: str) -> list[int]:
        self._check_layers(model_map, pass_name)
        return _in_current_numbering(model_map.hidden_size, self.hidden_size, self.hidden, lambda: self._mismatch(
            pass_name, "-", "hidden size", model_map.hidden_size, self.hidden_size, len(self.hidden)))

    def kept_ffn(self, model_map: ModelMap, pass_name: str) -> list[list[int]]:
        self._check_layers(model_map, pass_name)
        result = []
        for layer, plan, shape in zip(model_map.layers, self.layers, self.shapes):
            current = layer.ffn.intermediate_size
            result.append(_in_current_numbering(current, shape.intermediate_size, plan.ffn, lambda: self._mismatch(
                pass_name, layer.index, "FFN width", current, shape.intermediate_size, len(plan.ffn))))
        return result

    def kept_kv_groups(self, model_map: ModelMap, pass_name: str) -> list[list[int]]:
        self._check_layers(model_map, pass_name)
        result = []
        for layer, plan, shape in zip(model_map.layers, self.layers, self.shapes):
            current = layer.attention.num_kv_heads
            result.append(_in_current_numbering(current, shape.num_kv_heads, plan.kv_groups, lambda: self._mismatch(
                pass_name, layer.index, "KV group count", current, shape.num_kv_heads, len(plan.kv_groups))))
        return result

    def kept_heads(self, model_map: ModelMap, pass_name: str) -> list[list[int]]:
        """Per layer, the query heads to keep in the graph's current numbering.

        Works whether or not prune-kv-groups already ran: with groups still present, groups
        the plan removes keep their first k heads (they go with their group later)."""
        self._check_layers(model_map, pass_name)
        result = []
        for layer, plan, shape in zip(model_map.layers, self.layers, self.shapes):
            attention = layer.attention
            kept_per_group = len(plan.heads) // len(plan.kv_groups)
            current_rep = attention.num_heads // attention.num_kv_heads
            groups = sorted(plan.kv_groups)
            if attention.num_kv_heads == shape.num_kv_heads:
                current_groups = list(range(shape.num_kv_heads))
            elif attention.num_kv_heads == len(groups):
                current_groups = groups  # current group position i holds original group groups[i]
            else:
                raise self._mismatch(
                    pass_name, layer.index, "KV group count", attention.num_kv_heads, shape.num_kv_heads, len(groups)
                )
            if current_rep == kept_per_group:
                result.append(list(range(attention.num_heads)))
                continue
            if current_rep != shape.heads_per_group:
                raise self._mismatch(
                    pass_name, layer.index, "query heads per group", current_rep, shape.heads_per_group, kept_per_group
                )
            keep = []
            for position, group in enumerate(current_groups):
                members = sorted(h % shape.heads_per_group for h in plan.heads if h // shape.heads_per_group == group)
                if not members:
                    members = list(range(kept_per_group))
                keep.extend(position * current_rep + r for r in members)
            result.append(keep)
        return result

    @staticmethod
    def _mismatch(pass_name, index, what, current, original, planned) -> PanguLightError:
        return PanguLightError(
            f"pass {pass_name}: layer {index} has {what} {current}, but the plan expects {original} "
            f"(before pruning) or {planned} (after); the plan is for another graph"
        )

    # -- what to run -----------------------------------------------------------------------

    def attach(self, model: ir.Model) -> None:
        """Record the plan in ``model``'s metadata, where ``plan=true`` passes read it."""
        model.metadata_props[contract.PLAN] = json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_model(cls, model: ir.Model, pass_name: str) -> PrunePlan:
        """The plan recorded in ``model`` (by ``attach``); a clear error when there is none."""
        text = model.metadata_props.get(contract.PLAN)
        if not text:
            raise PanguLightError(
                f"pass {pass_name}: plan=true but the graph carries no plan; run it through "
                "`pangu-light compile --plan plan.json`, or give the kept indices explicitly"
            )
        return cls.from_json(json.loads(text), where=f"the plan recorded in the graph (pass {pass_name})")

    def pipeline(self, *, slnp: bool | None = None, clap: bool | None = None) -> Pipeline:
        """The passes that carry out this plan (attached to the graph), in an order in which
        they compose."""
        specs: list[PassSpec] = []
        path = True
        if any(len(l.kv_groups) < s.num_kv_heads for l, s in zip(self.layers, self.shapes)):
            specs.append(PassSpec("prune-kv-groups", {"plan": path}))
        if any(len(l.heads) < s.num_heads for l, s in zip(self.layers, self.shapes)):
            specs.append(PassSpec("prune-heads", {"plan": path}))
        if any(len(l.ffn) < s.intermediate_size for l, s in zip(self.layers, self.shapes)):
            specs.append(PassSpec("prune-ffn", {"plan": path}))
        if len(self.hidden) < self.hidden_size and self.hidden_method == "rotate":
            specs.append(PassSpec("rotate-hidden", {"plan": path}))  # its RMS correction replaces SLNP
        elif len(self.hidden) < self.hidden_size:
            specs.append(PassSpec("slice-hidden", {"plan": path}))
            if self.slnp if slnp is None else slnp:
                specs.append(PassSpec("slnp"))
        if self.absorb_post_norms:
            specs.append(PassSpec("absorb-post-norm", {"plan": path}))
        if self.drop_layers:
            use_clap = self.clap if clap is None else clap
            options: dict[str, Any] = {"plan": path}
            if use_clap != self.clap:
                options["clap"] = use_clap
            specs.append(PassSpec("drop-layers", options))
        return Pipeline(specs)


def _in_current_numbering(current: int, original: int, kept: list[int], mismatch) -> list[int]:
    """The plan's ``kept`` indices for an axis now ``current`` wide: as planned while the axis still
    has its ``original`` width, all of them once a pass already cut it to the plan's width."""
    if current == original:
        return sorted(kept)
    if current == len(kept):
        return list(range(current))
    raise mismatch()


def load_plan(path: str | os.PathLike) -> PrunePlan:
    """Read and validate a plan file; a missing or malformed file is a PanguLightError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise PanguLightError(f"cannot read the plan {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise PanguLightError(
            f"the plan {path} is not valid JSON ({error}); write it with `pangu-light plan`"
        ) from None
    return PrunePlan.from_json(data, where=f"the plan {path}")
