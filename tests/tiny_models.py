"""Tiny random decoders shared by the tests (seeded: the same arguments build the same weights): a Llama with
GQA (4 query heads, 2 KV heads), a Qwen2 (q/k/v biases, made non-zero) and a Mistral."""
from __future__ import annotations

import torch


def _common(vocab: int, hidden: int, layers: int, head_dim: int, max_positions: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rope_theta=1e4,
                max_position_embeddings=max_positions)


def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 64, head_dim: int = 16, max_positions: int = 4096,
               attention: str = "eager", vocab: int = 300):
    """``attention``: HF's attention implementation for its own forward (the reference in tests):
    "eager" or "sdpa". blockrag's paths never use it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**_common(vocab, hidden, layers, head_dim, max_positions))
    cfg._attn_implementation = attention
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, layers: int = 3, hidden: int = 64, head_dim: int = 16, max_positions: int = 4096,
               attention: str = "eager", vocab: int = 300):
    """Qwen2: biases on q/k/v (randomised: HF initialises them to zero, which would test nothing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**_common(vocab, hidden, layers, head_dim, max_positions), use_sliding_window=False)
    cfg._attn_implementation = attention
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0.0, 0.5)
    return model


def tiny_mistral(seed: int = 0, layers: int = 3, hidden: int = 64, head_dim: int = 16, max_positions: int = 4096,
                 attention: str = "eager", vocab: int = 300, sliding_window: int | None = 1024):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(**_common(vocab, hidden, layers, head_dim, max_positions), sliding_window=sliding_window)
    cfg._attn_implementation = attention
    return MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def tiny_llama_folder(path, tokenizer, **kw) -> str:
    """A random :func:`tiny_llama` (``kw``) saved with ``tokenizer`` as a local model folder."""
    tiny_llama(vocab=len(tokenizer), **kw).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
