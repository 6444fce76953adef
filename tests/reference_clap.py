"""CLAP done on the PyTorch module: the independent reference for drop-layers with merges.

Everything is in the ORIGINAL numbering and built from the unpruned Hugging Face modules:
a merged layer's q/k/v rows, o_proj columns and q/k norm gammas are copied from the layers the
groups come from, the other layers get the plain width edit (tests/reference_width.py), then
the removed layers go (tests/reference.py). The q/k norms of a merged layer are always made
per head here, with the head axis taken from the Hugging Face source, not from the graph:

    qwen3   q_norm(q_proj(x).view(b, s, -1, d))   -> gamma [heads, d]
    gemma3  q_norm(q_proj(x).view(...).transpose(1, 2))  [b, heads, s, d] -> gamma [heads, 1, d]
"""

from __future__ import annotations

import copy

import torch

from reference import torch_drop_layers
from reference_width import _rows, torch_prune_attention

# How many axes follow the head axis in the tensor each family's q/k norm reads.
AXES_AFTER_HEADS = {"qwen3": 1, "gemma3_text": 2}


def torch_clap(model, kv_groups, heads, drop, merges: dict[int, list[tuple[int, int]]]):
    """A copy of ``model`` with, per layer i, KV groups ``kv_groups[i]`` and query heads
    ``heads[i]`` (original indices), then each receiver ``r`` of ``merges`` given the groups
    ``merges[r] = [(layer, group), ...]`` (in that order, each with the heads ``heads[layer]``
    keeps in it), then the layers ``drop`` removed."""
    original = model
    model = torch_prune_attention(model, kv_groups, heads)
    rep = original.config.num_attention_heads // original.config.num_key_value_heads
    with torch.no_grad():
        for into, groups in merges.items():
            attn = model.model.layers[into].self_attn
            d = attn.head_dim
            q_rows, kv_rows, q_gammas, k_gammas = [], [], [], []
            per_group = None
            for layer, group in groups:
                source = original.model.layers[layer].self_attn
                members = sorted(h for h in heads[layer] if h // rep == group)
                assert group in kv_groups[layer] and members
                assert per_group in (None, len(members))
                per_group = len(members)
                q_rows.append((source, _rows(members, d)))
                kv_rows.append((source, _rows([group], d)))
                if getattr(source, "q_norm", None) is not None:
                    q_gammas += [source.q_norm.weight.detach().clone()] * len(members)
                    k_gammas.append(source.k_norm.weight.detach().clone())
            attn.q_proj = _stacked([(s.q_proj, r) for s, r in q_rows])
            attn.k_proj = _stacked([(s.k_proj, r) for s, r in kv_rows])
            attn.v_proj = _stacked([(s.v_proj, r) for s, r in kv_rows])
            o = copy.deepcopy(attn.o_proj)
            o.weight = torch.nn.Parameter(torch.cat([s.o_proj.weight[:, r] for s, r in q_rows], 1).clone())
            o.in_features = o.weight.shape[1]
            attn.o_proj = o
            attn.num_key_value_groups = per_group
            if q_gammas:
                trailing = AXES_AFTER_HEADS[original.config.model_type]
                attn.q_norm = _per_head_norm(attn.q_norm, torch.stack(q_gammas), trailing)
                attn.k_norm = _per_head_norm(attn.k_norm, torch.stack(k_gammas), trailing)
    return torch_drop_layers(model, drop)


def _stacked(parts) -> torch.nn.Linear:
    """One Linear whose output rows are ``rows`` of each ``linear`` in turn (bias too)."""
    first = parts[0][0]
    weight = torch.cat([linear.weight[rows] for linear, rows in parts], 0)
    out = torch.nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None)
    out.weight = torch.nn.Parameter(weight.clone())
    if first.bias is not None:
        out.bias = torch.nn.Parameter(torch.cat([linear.bias[rows] for linear, rows in parts]).clone())
    return out


def _per_head_norm(norm, gammas: torch.Tensor, trailing: int):
    """A copy of ``norm`` whose weight is one gamma per head, broadcasting over the axes after
    the head axis (``[heads, d]`` or ``[heads, 1, d]``)."""
    norm = copy.deepcopy(norm)
    shape = (gammas.shape[0],) + (1,) * (trailing - 1) + (gammas.shape[1],)
    norm.weight = torch.nn.Parameter(gammas.reshape(shape).clone())
    return norm


def torch_fold_post_attention_scale(model, family_post_attn: str):
    """A copy of ``model`` (whose post-attention norms are ConstantScale modules, see
    reference_norm.torch_scale_post_norms) with each scale folded into o_proj's rows in
    float64 and the module made the identity: what absorb-post-norm leaves in the graph."""
    from reference_norm import ConstantScale

    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            scale_module = getattr(layer, family_post_attn)
            assert isinstance(scale_module, ConstantScale)
            o = layer.self_attn.o_proj
            scale = scale_module.scale.double()
            o.weight.copy_((o.weight.double() * scale[:, None]).float())
            setattr(layer, family_post_attn, torch.nn.Identity())
    return model

