"""The model seam (attention_kv/model.py): our decoder forward, with plain causal attention through the
callback, equals HF's own forward on tiny random Llama, Qwen2 (with q/k/v biases) and Mistral models (CPU,
fp32: max |logit diff| < 1e-4 on logits of size ~1, i.e. a relative error below 1e-4); unsupported
families and RoPE variants are refused in one line."""
from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS

from blockrag.attention_kv.model import ModelAdapter, UnsupportedModel

TOL = 1e-4


@pytest.mark.parametrize("family", sorted(MODELS))
@torch.no_grad()
def test_seam_forward_equals_hf_forward(family):
    model = MODELS[family](seed=3)
    ad = ModelAdapter.of(model)
    assert ad.family == family and ModelAdapter.of(model) is ad
    assert (ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.head_dim) == (model.config.num_hidden_layers, 4, 2, 16)
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids).logits
    got = ad.forward(ids, torch.arange(23))
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err < TOL, err
    assert err / ref.abs().max().item() < TOL
    # selected rows, and positions that do not start at 0 (RoPE is relative: same as HF with position_ids)
    pos = torch.arange(40, 63)
    ref = model(input_ids=ids, position_ids=pos[None].expand(2, -1)).logits[:, -3:]
    assert (ad.forward(ids, pos, logits_rows=3) - ref).abs().max().item() < TOL


@torch.no_grad()
def test_callback_sees_every_layer_and_unrotated_keys():
    """The callback gets each layer's q/k/v once, in order; rotate_keys=False hands the keys before RoPE
    (what the KV store keeps): they equal k_proj's output."""
    model = MODELS["qwen2"](seed=1)
    ad = ModelAdapter.of(model)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    seen = []

    def attend(layer, q, k, v):
        seen.append((layer, k))
        cos, sin = ad.rope(torch.arange(9))
        return torch.nn.functional.scaled_dot_product_attention(q, ad.rotate(k, cos, sin), v, is_causal=True,
                                                                scale=ad.scale, enable_gqa=True)

    h_ref = model.model(input_ids=ids).last_hidden_state
    h = ad.final_norm(ad.hidden_states(ids, torch.arange(9), attend, rotate_keys=False))
    assert (h - h_ref).abs().max().item() < TOL
    assert [l for l, _ in seen] == [0, 1, 2]
    x0 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    k0 = model.model.layers[0].self_attn.k_proj(x0).view(1, 9, 2, 16).transpose(1, 2)
    assert torch.allclose(seen[0][1], k0, atol=1e-6)


def test_unsupported_family_and_rope_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel, match="supported: llama, mistral, qwen2"):
        ModelAdapter.of(gpt2)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                       "original_max_position_embeddings": 512})
    with pytest.raises(UnsupportedModel, match="RoPE variant 'yarn'"):
        ModelAdapter.of(LlamaForCausalLM(cfg))


def test_sliding_window_is_a_length_limit():
    ad = ModelAdapter.of(MODELS["mistral"](sliding_window=64))
    assert ad.max_context == 64
    ad.check_length(64)
    with pytest.raises(ValueError, match="sliding-window"):
        ad.check_length(65)
    assert ModelAdapter.of(MODELS["qwen2"]()).max_context is None  # use_sliding_window=False


@pytest.mark.parametrize("family", sorted(MODELS))
@torch.no_grad()
def test_turbo_with_one_passage_equals_full_prefill(family, tokenizer, tmp_path):
    """One passage: the stitched cache (shared prefix + the passage, encoded together through the seam) is
    the full prefill's cache, so the cached modes (both RoPE placements, and CacheBlend at ratio 1) give
    HF's full-prefill logits, and greedy answers agree."""
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.documents import Chunk

    model = MODELS[family](seed=5, vocab=len(tokenizer), attention="sdpa")
    store = KVCacheStore(tmp_path / "kv", model, tokenizer, dtype=torch.float32)
    gen = Generator(model=model, tokenizer=tokenizer, store=store)
    text = "The lighthouse of Merrowgate has a copper roof and a red door."
    chunk = Chunk(id="c0", doc_id="d", position=0, text=text,
                  token_ids=tokenizer(text, add_special_tokens=False)["input_ids"])
    question = "What roof does the lighthouse have?"
    full, _ = gen.prefill(question, [chunk], "full")
    for rope in ("kernel", "stitch"):
        gen.rope = rope
        turbo, info = gen.prefill(question, [chunk], "turbo")
        assert turbo.shape == full.shape and info["n_context"] > 20
        assert (turbo - full).abs().max().item() < TOL, (rope, (turbo - full).abs().max().item())
    blend, info = gen.prefill(question, [chunk], "blend", blend_ratio=1.0)
    assert info["n_recomputed"] == info["n_context"]
    assert (blend - full).abs().max().item() < TOL
    a = gen.generate(question, [chunk], mode="turbo", max_new_tokens=5)
    b = gen.generate(question, [chunk], mode="full", max_new_tokens=5)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@torch.no_grad()
def test_inv_freq_only_rope_variants_are_reproduced(rope):
    """Linear and Llama-3 RoPE scaling only change inv_freq: the seam reproduces HF's forward with them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      rope_parameters={"rope_theta": 1e4, **rope})
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(4))
    ref = model(input_ids=ids).logits
    assert (ModelAdapter.of(model).forward(ids, torch.arange(200)) - ref).abs().max().item() < TOL
