"""A tiny random Llama (GQA: 4 query heads, 2 KV heads) shared by the tests; seeded, so every call with the same
arguments builds the same weights."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 64, head_dim: int = 16, max_positions: int = 4096,
               attention: str = "eager"):
    """``attention``: "eager" (HF eager attention) or "blockrag" (our implementation, SDPA without a
    BlockKVCache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rope_theta=1e4,
                      max_position_embeddings=max_positions)
    if attention == "eager":
        cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    if attention == "blockrag":
        from blockrag.attention_kv.hf_integration import use_blockrag_attention

        use_blockrag_attention(model)
    return model
