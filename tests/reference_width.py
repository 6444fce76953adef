"""Width edits done on the PyTorch module, the independent references for the width passes.

Per-layer shapes cannot be written in an HF config, so each edit copies the model and
resizes its Linear modules in place; attention in transformers 5 views q/k/v with -1 heads
and repeats K/V ``module.num_key_value_groups`` times, which is set per layer. Head and
group indices are in the model's original numbering (query head h is in KV group
h // (num_heads / num_kv_heads)).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def _take(linear: torch.nn.Linear, index: list[int] | torch.Tensor, dim: int) -> None:
    index = torch.as_tensor(index, dtype=torch.long)
    linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, index).clone())
    if dim == 0:
        linear.out_features = len(index)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias[index].clone())
    else:
        linear.in_features = len(index)


def _rows(heads, head_dim: int) -> torch.Tensor:
    heads = torch.as_tensor(sorted(heads), dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _rep(model) -> int:
    return model.config.num_attention_heads // model.config.num_key_value_heads


def torch_prune_attention(model, kv_groups: list[list[int]], heads: list[list[int]]):
    """A copy of ``model`` keeping, per layer, KV groups ``kv_groups[i]`` and query heads
    ``heads[i]`` (each kept head in a kept group, the same number in every kept group)."""
    model = copy.deepcopy(model)
    rep = _rep(model)
    with torch.no_grad():
        for layer, groups, kept in zip(model.model.layers, kv_groups, heads):
            attn = layer.self_attn
            d = attn.head_dim
            assert all(h // rep in groups for h in kept)
            _take(attn.q_proj, _rows(kept, d), 0)
            _take(attn.o_proj, _rows(kept, d), 1)
            _take(attn.k_proj, _rows(groups, d), 0)
            _take(attn.v_proj, _rows(groups, d), 0)
            assert len(kept) % len(groups) == 0
            attn.num_key_value_groups = len(kept) // len(groups)
    return model


def torch_prune_heads(model, keep: list[list[int]]):
    """Keep query heads ``keep[i]`` in layer i; every KV group stays."""
    groups = list(range(model.config.num_key_value_heads))
    return torch_prune_attention(model, [groups] * len(keep), keep)


def torch_prune_kv_groups(model, keep: list[list[int]]):
    """Keep KV groups ``keep[i]`` (with all their query heads) in layer i."""
    rep = _rep(model)
    return torch_prune_attention(model, keep, [[g * rep + r for g in groups for r in range(rep)] for groups in keep])


def torch_zero_heads(model, keep: list[list[int]]):
    """A copy of the UNPRUNED model whose o_proj columns of the heads not in ``keep[i]`` are
    zero: the removed heads then contribute nothing, the rest compute as before."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in zip(model.model.layers, keep):
            attn = layer.self_attn
            removed = [h for h in range(attn.o_proj.in_features // attn.head_dim) if h not in kept]
            if removed:
                attn.o_proj.weight[:, _rows(removed, attn.head_dim)] = 0.0
    return model


def torch_prune_ffn(model, keep: list[list[int]]):
    """Keep FFN neurons ``keep[i]`` in layer i: gate/up rows (GLM4's fused gate_up: rows
    K and I + K), down columns."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in zip(model.model.layers, keep):
            mlp = layer.mlp
            kept = torch.as_tensor(sorted(kept), dtype=torch.long)
            if hasattr(mlp, "gate_up_proj"):
                width = mlp.gate_up_proj.out_features // 2
                _take(mlp.gate_up_proj, torch.cat([kept, width + kept]), 0)
            else:
                _take(mlp.gate_proj, kept, 0)
                _take(mlp.up_proj, kept, 0)
            _take(mlp.down_proj, kept, 1)
    return model


def torch_zero_ffn(model, keep: list[list[int]]):
    """A copy of the UNPRUNED model whose down_proj columns of removed neurons are zero."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in zip(model.model.layers, keep):
            down = layer.mlp.down_proj
            removed = [m for m in range(down.in_features) if m not in set(kept)]
            down.weight[:, removed] = 0.0
    return model


def _hidden_norms(model):
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module).__name__.endswith("RMSNorm") and leaf not in ("q_norm", "k_norm"):
            yield name, module


def one_plus_w(module) -> bool:
    """Gemma's RMSNorm scales by (1 + weight); the others by weight."""
    return type(module).__name__.startswith("Gemma")


def torch_slnp(sliced, original):
    """A copy of ``sliced`` (a hidden-sliced ``original``) whose hidden-norm gammas are
    rescaled by eq. 6 on the effective gamma: g_new = g_sliced * ||g_orig|| / ||g_sliced||."""
    sliced = copy.deepcopy(sliced)
    before = dict(_hidden_norms(original))
    with torch.no_grad():
        for name, module in _hidden_norms(sliced):
            offset = 1.0 if one_plus_w(module) else 0.0
            g_orig = before[name].weight.double().numpy() + offset
            g = module.weight.double().numpy() + offset
            g_new = g * np.linalg.norm(g_orig) / np.linalg.norm(g)
            module.weight.copy_(torch.from_numpy(g_new - offset))
    return sliced
