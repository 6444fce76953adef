"""Independent references for the post-norm passes: the same edit on the PyTorch module.

The post-norms are named here per family, from the Hugging Face modules (not from the model
map), so a wrong role or order in the map shows up as a mismatch:

    gemma2, gemma3   post_attention_layernorm, post_feedforward_layernorm   (1 + w)
    glm4             post_self_attn_layernorm, post_mlp_layernorm           (w)
"""

from __future__ import annotations

import copy

import numpy as np
import torch

POST_NORM_MODULES = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "glm4": ("post_self_attn_layernorm", "post_mlp_layernorm"),
}
ONE_PLUS_W = {"gemma2": True, "gemma3": True, "glm4": False}
# Nodes of one RMSNorm at opset 18: Pow, ReduceMean, Add(eps), Sqrt, Reciprocal, Mul, Mul(gamma),
# and for 1 + w gammas the Add(w, 1).
NODES_PER_NORM = {"gemma2": 8, "gemma3": 8, "glm4": 7}


def family_of(model) -> str:
    return {"gemma2": "gemma2", "gemma3_text": "gemma3", "glm4": "glm4"}[model.config.model_type]


def post_norm_names(model) -> list[str]:
    """Module paths of every post-norm, layer by layer, post-attention then post-FFN."""
    attn, ffn = POST_NORM_MODULES[family_of(model)]
    return [f"model.layers.{i}.{leaf}" for i in range(len(model.model.layers)) for leaf in (attn, ffn)]


def gamma_names(model) -> list[str]:
    return [f"{name}.weight" for name in post_norm_names(model)]


def effective_gamma(model, name: str) -> np.ndarray:
    """float64 gamma_eff of the norm module ``name``: w, or 1 + w (Gemma)."""
    w = model.get_submodule(name).weight.detach().double().numpy()
    return 1.0 + w if ONE_PLUS_W[family_of(model)] else w


class ConstantScale(torch.nn.Module):
    """y = x * scale (per channel): what a post-norm becomes once its RMS is a constant."""

    def __init__(self, scale: np.ndarray):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _replace(model, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def torch_scale_post_norms(model, s_inv: list[float], keep: frozenset[str] = frozenset()):
    """A copy of ``model`` whose post-norms are ``x * gamma_abs``, gamma_abs = s_inv * gamma_eff
    (paper eqs. 8-9), one s_inv per post-norm in ``post_norm_names`` order; the norms whose
    module name is in ``keep`` stay as they are."""
    names = post_norm_names(model)
    assert len(s_inv) == len(names)
    scaled = copy.deepcopy(model)
    for name, s in zip(names, s_inv):
        if name in keep:
            continue
        _replace(scaled, name, ConstantScale(s * effective_gamma(model, name)))
    return scaled


def torch_identity_post_norms(model):
    """A copy of ``model`` whose post-norms are the identity (the paper's "Direct Prune")."""
    dropped = copy.deepcopy(model)
    for name in post_norm_names(model):
        _replace(dropped, name, torch.nn.Identity())
    return dropped


def with_output_biases(model, seed: int = 1):
    """A copy of ``model`` whose o_proj and down_proj have random biases (no family ships
    them, but the fold must scale them too)."""
    generator = torch.Generator().manual_seed(seed)
    biased = copy.deepcopy(model)
    with torch.no_grad():
        for layer in biased.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.bias = torch.nn.Parameter(torch.randn(linear.out_features, generator=generator) * 0.3)
    return biased
