"""Tiny random-weight models, one per supported family, built from configs (no downloads).

Shapes are small but keep every structural feature that matters to the passes: grouped-query
attention (2 KV groups of 2 query heads), q/k norms (Qwen3, Gemma3), sandwich norms with
1 + w gammas and sliding-window layers (Gemma2, Gemma3), sandwich norms under other names
and a fused gate_up projection (GLM4), tied and untied embeddings.
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "glm4")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=160,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**_COMMON, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=None)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **_COMMON, sliding_window=4, query_pre_attn_scalar=16, tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **_COMMON, sliding_window=4, query_pre_attn_scalar=16, tie_word_embeddings=True,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        )
    if family == "glm4":
        return transformers.Glm4Config(**_COMMON, tie_word_embeddings=False)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 eval-mode model whose norm gammas are randomised too (all-ones gammas
    would hide channel-slicing and scaling mistakes)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if _one_plus_w(family) else 1.0))
    return model.eval()


def _one_plus_w(family: str) -> bool:
    return family in ("gemma2", "gemma3")
