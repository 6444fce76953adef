"""The one table of rewrite passes: a pass exists because it is listed here.

Entries are ``"module:Class"`` strings resolved on lookup, so importing the registry imports
no pass, and a pass module that fails to import breaks only pipelines that name it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.base import PanguPass
from pangu_light.passes.infra.pipeline import PassSpec

__all__ = ["PASSES", "Registry", "available_passes", "build_pass", "get_pass"]

# name -> "module:Class" (or, in tests, the class itself).
Registry = Mapping[str, "str | type[PanguPass]"]

PASSES: dict[str, str | type[PanguPass]] = {
    "drop-layers": "pangu_light.passes.rewrites.drop_layers:DropLayersPass",
    "slice-hidden": "pangu_light.passes.rewrites.slice_hidden:SliceHiddenPass",
    "rotate-hidden": "pangu_light.passes.rewrites.rotate_hidden:RotateHiddenPass",
    "prune-heads": "pangu_light.passes.rewrites.prune_heads:PruneHeadsPass",
    "prune-kv-groups": "pangu_light.passes.rewrites.prune_kv_groups:PruneKVGroupsPass",
    "prune-ffn": "pangu_light.passes.rewrites.prune_ffn:PruneFFNPass",
    "slnp": "pangu_light.passes.rewrites.slnp:SLNPPass",
    "absorb-post-norm": "pangu_light.passes.rewrites.absorb_post_norm:AbsorbPostNormPass",
    "drop-post-norm": "pangu_light.passes.rewrites.drop_post_norm:DropPostNormPass",
    "set-projection": "pangu_light.passes.rewrites.set_projection:SetProjectionPass",
    "fold-weight-transpose": "pangu_light.passes.deploy.fold_weight_transpose:FoldWeightTransposePass",
    "fuse-gqa": "pangu_light.passes.deploy.fuse_gqa:FuseGQAPass",
    "pack-qkv": "pangu_light.passes.deploy.pack_qkv:PackQKVPass",
    "fuse-norms": "pangu_light.passes.deploy.fuse_norms:FuseNormsPass",
}


def available_passes(registry: Registry | None = None) -> list[str]:
    """The registered pass names, sorted."""
    return sorted(PASSES if registry is None else registry)


def get_pass(name: str, registry: Registry | None = None) -> type[PanguPass]:
    """The pass class registered as ``name``; an unknown name lists the valid ones."""
    table = PASSES if registry is None else registry
    if name not in table:
        raise PanguLightError(
            f"unknown pass {name!r}; available passes: {', '.join(available_passes(table)) or 'none'}"
        )
    entry = table[name]
    if isinstance(entry, str):
        module_name, _, class_name = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            raise PanguLightError(
                f"pass {name!r} is registered as {entry} but module {module_name} is not "
                "installed; reinstall pangu-light or remove the pass from the pipeline"
            ) from None
        try:
            entry = getattr(module, class_name)
        except AttributeError:
            raise PanguLightError(
                f"pass {name!r} is registered as {entry} but {module_name} has no {class_name}; "
                "fix the entry in pangu_light/passes/registry.py"
            ) from None
    if not (isinstance(entry, type) and issubclass(entry, PanguPass)):
        raise TypeError(f"registry entry {name!r} is {entry!r}, not a PanguPass subclass")
    if entry.name != name:
        raise TypeError(f"registry entry {name!r} points at {entry.__name__}, whose name is {entry.name!r}")
    return entry


def build_pass(spec: PassSpec, registry: Registry | None = None) -> PanguPass:
    """Instantiate the pass named by ``spec`` with its options (validated by the pass)."""
    return get_pass(spec.name, registry)(spec.options)
