"""Block-attention LoRA adapters (attention_kv/lora.py): training through peft, merged loading, the adapter's
revision in the KV caches (base caches refused, rebuilt for the adapter), and the --adapter plumbing of
Generator, KV index, eval qa and the CLI. Tiny random models only (CPU, seconds)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from tiny_models import tiny_llama

peft = pytest.importorskip("peft")

from blockrag.attention_kv.finetune import Example, example_loss  # noqa: E402
from blockrag.attention_kv.lora import (DEFAULT_ADAPTER, AdapterNotAvailable, INFO_FILE, adapter_revision,  # noqa: E402
                                        merge_adapter, resolve_adapter, train_adapter)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices (and a shared CPU)
    yield
    torch.set_num_threads(n)


def rand_examples(n, vocab=300, seed=0):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [Example(ids(4), [ids(rng.randrange(4, 9)) for _ in range(3)], ids(5), ids(3)) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter trained for a few steps on one repeated example of a tiny Llama (its history too)."""
    out = tmp_path_factory.mktemp("lora") / "adapter"
    ex = rand_examples(1)
    hist = train_adapter(tiny_llama(3, layers=2, max_positions=512), ex * 4, out, steps=8, lr=2e-2, rank=4,
                         progress=False, warmup=1)
    return out, hist, ex[0]


def test_training_lowers_the_loss_and_saves_a_peft_adapter(trained):
    out, hist, ex = trained
    assert hist["steps_done"] == 8 and all(math.isfinite(x) for x in hist["loss"])
    assert sum(hist["loss"][-2:]) < sum(hist["loss"][:2])  # one example, repeated: the loss must fall
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "README.md").exists()  # peft's card names the local base folder: not kept
    info = json.loads((out / INFO_FILE).read_text())
    assert info["rank"] == 4 and info["steps"] == 8 and info["cpu_s"] > 0 and info["adapter_bytes"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a name, not a local folder
    # 2 layers x (q: 4*(64+64), k: 4*(64+32), v: same, o: 4*(64+64)) LoRA parameters, stored as fp16
    assert hist["lora_parameters"] == 2 * 4 * (128 + 96 + 96 + 128)
    assert info["adapter_bytes"] < hist["lora_parameters"] * 2 + 4096


def test_merged_model_equals_the_peft_model(trained):
    """merge_and_unload must not change the function: logits of the merged model = the peft-wrapped model's
    (fp32, atol 1e-5), and both differ from the base model's (the adapter learned something)."""
    out, _, ex = trained
    ids = torch.tensor([ex.input_ids])
    base = _logits(tiny_llama(3, layers=2, max_positions=512), ids)
    wrapped = peft.PeftModel.from_pretrained(tiny_llama(3, layers=2, max_positions=512), str(out)).eval()
    ref = _logits(wrapped, ids)
    merged = merge_adapter(tiny_llama(3, layers=2, max_positions=512), out)
    got = _logits(merged, ids)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # a plain model: base speed
    assert merged.config.blockrag_adapter["revision"] == adapter_revision(out)
    with torch.no_grad():  # the Block-Attention loss through the seam agrees too
        assert abs(example_loss(merged, ex, True).item() - example_loss(wrapped, ex, True).item()) < 1e-4


def test_copy_leaves_the_given_model_unchanged(trained):
    out, _, ex = trained
    base = tiny_llama(3, layers=2, max_positions=512)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge_adapter(base, out, copy_model=True)
    assert merged is not base and not hasattr(base.config, "blockrag_adapter")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(AdapterNotAvailable, match="already has an adapter"):
        merge_adapter(merged, out)


def test_resolve_adapter(tmp_path):
    assert resolve_adapter(None) is None and resolve_adapter("none") is None
    with pytest.raises(AdapterNotAvailable, match="no LoRA adapter at"):
        resolve_adapter(tmp_path / "missing")
    assert resolve_adapter("default", "some-org/another-model") is None  # the bundled one fits SmolLM2 only
    if (DEFAULT_ADAPTER / "adapter_config.json").exists():
        assert resolve_adapter("default") == DEFAULT_ADAPTER


# ------------------------------------------------------------------ with a tokenizer: KV store, Generator, CLI
@pytest.fixture(scope="module")
def smol_like(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer saved as a model folder, and an adapter trained on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockrag.models import load_tokenizer

    try:
        tok = load_tokenizer()
    except Exception as e:  # pragma: no cover - no local SmolLM2 tokenizer
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("smol-like")
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    from blockrag.models import load_generator

    model, _ = load_generator(str(root / "model"), dtype=torch.float32, device="cpu")
    train_adapter(model, rand_examples(4, vocab=len(tok)), root / "adapter", steps=3, lr=5e-2, rank=2,
                  progress=False, warmup=1)
    return str(root / "model"), root / "adapter", tok


def _chunks(tok):
    from blockrag.documents import Chunk

    texts = ["The lighthouse of Merrowgate was built by Alda Venn.", "Kelp bread is the dish of Veloria."]
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", position=0, text=t, token_ids=tok(t, add_special_tokens=False)["input_ids"])
            for i, t in enumerate(texts)]


def test_base_kv_caches_are_refused_and_rebuilt_for_the_adapter(smol_like, tmp_path, monkeypatch):
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.attention_kv.cache_store import KVCacheMismatch, config_revision
    from blockrag.models import load_generator

    monkeypatch.setenv("BLOCKRAG_CACHE", str(tmp_path / "cache"))
    path, adapter, tok = smol_like
    base, _ = load_generator(path, dtype=torch.float32, device="cpu")
    merged, _ = load_generator(path, dtype=torch.float32, device="cpu", adapter=adapter)
    assert config_revision(merged) != config_revision(base)
    chunks = _chunks(tok)
    base_store = KVCacheStore(tmp_path / "kv", base, tok, dtype=torch.float32)
    base_store.add(chunks, progress=False)
    with pytest.raises(KVCacheMismatch, match="revision"):
        KVCacheStore(tmp_path / "kv", merged, tok, dtype=torch.float32)  # the base model's caches: refused
    with pytest.raises(KVCacheMismatch):
        Generator(model=base, tokenizer=tok, store=base_store, adapter=adapter)
    plain = Generator(model=base, tokenizer=tok)
    gen = Generator(model=base, tokenizer=tok, adapter=adapter)
    assert gen.adapter_path == str(adapter) and plain.adapter_path is None
    assert gen.model is not base and gen.store.folder != plain.store.folder  # its own caches, keyed by revision
    res = gen.generate("Who built the lighthouse?", chunks, mode="turbo", max_new_tokens=3)
    assert res.token_ids is not None
    ref = KVCacheStore(tmp_path / "kv-merged", merged, tok, dtype=torch.float32)
    ref.add(chunks, progress=False)
    for c in chunks:  # rebuilt with the adapter's weights, not copied from the base's
        assert torch.allclose(gen.store.get(c).kv.float(), ref.get(c).kv.float(), atol=1e-6)
        assert not torch.allclose(gen.store.get(c).kv.float(), base_store.get(c).kv.float(), atol=1e-4)
    # turbo with the adapter = the merged model's own block-masked computation (same greedy tokens as its Generator)
    again = Generator(model=merged, tokenizer=tok, store=ref)
    assert again.generate("Who built the lighthouse?", chunks, mode="turbo", max_new_tokens=3).token_ids == res.token_ids


def _squad(tmp_path):
    data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "The lighthouse of Merrowgate was built in 1821 by Alda Venn.",
         "qas": [{"id": "q0", "question": "Who built the lighthouse?", "answers": [{"text": "Alda Venn"}]}]},
        {"context": "Kelp bread is the national dish of Veloria.",
         "qas": [{"id": "q1", "question": "What is the dish of Veloria?", "answers": [{"text": "Kelp bread"}]}]},
        {"context": "The river Osk flows north for 412 kilometres.",
         "qas": [{"id": "q2", "question": "How long is the Osk?", "answers": [{"text": "412 kilometres"}]}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_finetune_cli_trains_and_saves(smol_like, tmp_path, capsys):
    from blockrag.cli import main

    path, _, _ = smol_like
    out = tmp_path / "ad"
    rc = main(["finetune", "--data", str(_squad(tmp_path)), "--generator", path, "--out", str(out), "--steps", "2",
               "--synthetic", "0", "--distractors", "1", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 steps" in text and "LoRA parameters" in text and "3 training examples" in text
    info = json.loads((out / INFO_FILE).read_text())
    assert info["command"].startswith("blockrag ") and info["n_examples"] == 3
    assert resolve_adapter(out) == out
    assert main(["finetune", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")]) == 2
    assert "training data not found" in capsys.readouterr().err


def test_eval_qa_and_query_use_the_adapter(smol_like, tmp_path, capsys, monkeypatch):
    from blockrag.cli import main
    from blockrag.collection import Collection

    monkeypatch.setenv("BLOCKRAG_CACHE", str(tmp_path / "cache"))
    path, adapter, _ = smol_like
    data, store = _squad(tmp_path), tmp_path / "store"
    common = ["eval", "qa", "--data", str(data), "--modes", "full,turbo", "-k", "2", "--generator", path,
              "--max-new-tokens", "3", "--store", str(store)]
    assert main(common + ["--adapter", str(adapter), "--report", str(tmp_path / "a.json")]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["adapter"]["revision"] == adapter_revision(adapter)
    col = Collection(store)
    assert col.index("kv").adapter == str(adapter.resolve())
    col.close()
    # the same store without the adapter: its kv index (the adapter's caches) is rebuilt for the plain model
    assert main(common + ["--adapter", "none", "--report", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["adapter"] is None
    col = Collection(store)
    assert col.index("kv").adapter is None
    col.close()
    assert main(common + ["--adapter", str(tmp_path / "missing")]) == 2
    assert "no LoRA adapter at" in capsys.readouterr().err
    # query --generate --adapter: another adapter than the kv index's gets its own, rebuilt caches
    capsys.readouterr()
    rc = main(["query", "Who built the lighthouse?", "--store", str(store), "--generate", "--gen-mode", "turbo",
               "--generator", path, "--adapter", str(adapter), "-k", "1"])
    assert rc == 0
    assert "ttft_ms" in capsys.readouterr().out


def test_a_refused_kv_cache_is_a_one_line_user_error():
    from blockrag.attention_kv.cache_store import KVCacheMismatch
    from blockrag.cli import _user_error

    code, text = _user_error(KVCacheMismatch("KV cache at x was built with a different revision"))
    assert code == 2 and text.startswith("KV cache at x")
