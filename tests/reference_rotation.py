"""The rotation edit done on the PyTorch module: the independent reference for rotate-hidden.

Deliberately the plain form of the edit: fold every pre-norm gamma into its readers, rotate by
Q_k (the first k columns of the basis, not turned inside its span), set each norm's gamma to its
RMS correction, and, for tied embeddings, put the k x k matrix M = Q_k^T diag(g_final) Q_k
between the final norm and the lm_head (a Linear). The pass instead diagonalises M inside the kept
span; equal logits show that its shortcut is the same function.
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def _t(array: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


def _w(module) -> np.ndarray:
    return module.weight.detach().double().numpy()


def torch_rotate_hidden(model, basis: np.ndarray, kept: int, correction: dict[str, float] | None = None):
    """A copy of pre-norm ``model`` folded, rotated by ``basis[:, :kept]`` and cut to ``kept``
    components; ``correction`` maps a norm's weight name (``model.norm.weight``) to its gamma c."""
    model = copy.deepcopy(model)
    q = np.asarray(basis, dtype=np.float64)[:, :kept]
    correction = correction or {}

    def set_norm(name: str, norm) -> np.ndarray:
        gamma = _w(norm)
        norm.weight = _t(np.full(kept, correction.get(f"{name}.weight", 1.0)))
        return gamma

    def fold_rotate(linear, gamma: np.ndarray) -> None:
        linear.weight = _t((_w(linear) * gamma[None, :]) @ q)
        linear.in_features = kept

    with torch.no_grad():
        embedding = model.model.embed_tokens
        embedding.weight = _t(_w(embedding) @ q)
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}"
            attn, mlp = layer.self_attn, layer.mlp
            g = set_norm(f"{prefix}.input_layernorm", layer.input_layernorm)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                fold_rotate(linear, g)
            g = set_norm(f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm)
            for linear in (mlp.gate_proj, mlp.up_proj):
                fold_rotate(linear, g)
            for linear in (attn.o_proj, mlp.down_proj):
                linear.weight = _t(q.T @ _w(linear))
                linear.out_features = kept
                if linear.bias is not None:
                    linear.bias = _t(linear.bias.detach().double().numpy() @ q)
        g_final = set_norm("model.norm", model.model.norm)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
            mix = torch.nn.Linear(kept, kept, bias=False)
            mix.weight = _t((q.T * g_final[None, :]) @ q)  # symmetric: y = x M
            model.model.norm = torch.nn.Sequential(model.model.norm, mix)
        else:
            fold_rotate(model.lm_head, g_final)
    return model
