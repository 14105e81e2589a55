"""KVCacheStore: stored-then-loaded == fresh, stale caches refused, add/delete, int8 fidelity."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.test_kv_generate import QUESTION, TEXTS, _chunks, smol  # noqa: E402,F401


def test_store_roundtrip_and_refusal(smol, tmp_path):
    from blockrag.attention_kv import KVCacheMismatch, KVCacheStore
    from blockrag.attention_kv.cache_store import encode_blocks

    model, tok = smol
    chunks = _chunks(tok)
    store = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)
    assert store.add(chunks) == 3
    assert store.add(chunks) == 0  # incremental: nothing new
    fresh_prefix, fresh = encode_blocks(model, store.prefix_ids, [store.chunk_token_ids(c) for c in chunks])
    again = KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32)  # re-open from disk
    for c, f in zip(chunks, fresh):
        got = again.get(c)
        assert got.token_ids.tolist() == again.chunk_token_ids(c)
        assert torch.allclose(got.kv, f, atol=1e-4, rtol=0)
    assert torch.allclose(again.prefix_kv().kv, fresh_prefix, atol=1e-4, rtol=0)
    # un-rotated: the K of a chunk does not depend on where it was encoded beyond the prefix
    # another prefix (system prompt) -> refused
    with pytest.raises(KVCacheMismatch):
        KVCacheStore(tmp_path / "kv", model, tok, dtype=torch.float32, system_prompt="Other prompt.")
    # another model -> refused
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    other = LlamaForCausalLM(cfg).eval()
    with pytest.raises(KVCacheMismatch):
        KVCacheStore(tmp_path / "kv", other, tok, dtype=torch.float32)
    # a file copied from another store (other prefix) is refused on load
    other_store = KVCacheStore(tmp_path / "kv2", model, tok, dtype=torch.float32, system_prompt="Other prompt.")
    other_store.add(chunks[:1])
    import shutil

    shutil.copy(other_store._path(other_store.key(chunks[0])), again._path(again.key(chunks[0])))
    again._lru.clear()
    with pytest.raises(KVCacheMismatch):
        again.get(chunks[0])
    # delete
    assert again.delete(["c1", "missing"]) == 1
    assert chunks[1] not in again and chunks[2] in again and len(again) == 2


def test_int8_fidelity(smol, tmp_path):
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = smol
    chunks = _chunks(tok)
    s16 = KVCacheStore(tmp_path / "a", model, tok, dtype=torch.bfloat16)
    s8 = KVCacheStore(tmp_path / "b", model, tok, quant="int8")
    s16.add(chunks)
    s8.add(chunks)
    a, b = s16.get(chunks[1]), s8.get(chunks[1])
    assert b.kv.dtype == torch.int8 and b.nbytes < 0.6 * a.nbytes
    rel = ((b.dequant(torch.float32) - a.kv.float()).norm() / a.kv.float().norm()).item()
    assert rel < 0.02, rel
    la, _ = Generator(model=model, tokenizer=tok, store=s16).prefill(QUESTION, chunks, "turbo")
    lb, _ = Generator(model=model, tokenizer=tok, store=s8).prefill(QUESTION, chunks, "turbo")
    assert la[-1].argmax() == lb[-1].argmax()
    assert (la - lb).abs().max().item() < 1.0


def test_revision_follows_the_weights(tmp_path):
    """A model changed after loading, or rewritten on disk with identical file sizes, gets a new revision."""
    import torch

    from blockrag.attention_kv.cache_store import config_revision, weights_fingerprint
    from blockrag.models import model_revision
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    rev = config_revision(model)
    assert config_revision(model) == rev and weights_fingerprint(model) == weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    assert config_revision(model) != rev
    model.save_pretrained(tmp_path / "m")
    on_disk = model_revision(str(tmp_path / "m"))
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path / "m")  # same names, sizes and json: only the bytes differ
    assert model_revision(str(tmp_path / "m")) != on_disk
