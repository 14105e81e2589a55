"""Block-Attention fine-tuning (attention_kv/finetune.py) on a tiny random Llama: masks, loss, training, revision."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama as _tiny_llama

from blockrag.attention_kv.finetune import (Example, example_loss, finetune_block_attention, make_example, save,
                                   synthetic_examples, training_mask)
from blockrag.attention_kv.masks import block_ids, block_mask_4d


def tiny_llama(seed=0):
    return _tiny_llama(seed, layers=2, max_positions=512)


def rand_example(rng, n_blocks=3) -> Example:
    ids = lambda n: [rng.randrange(3, 300) for _ in range(n)]  # noqa: E731
    return Example(ids(5), [ids(rng.randrange(3, 9)) for _ in range(n_blocks)], ids(6), ids(3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation (and the CPU is shared)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    try:
        from blockrag.models import load_tokenizer

        return load_tokenizer()
    except Exception as e:  # pragma: no cover - no local SmolLM2 tokenizer
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")


def test_training_mask_is_block_attention():
    ex = Example([1, 2], [[3, 4, 5], [6, 7]], [8, 9], [10, 11])
    m = training_mask(ex, block=True)
    ref = block_mask_4d(block_ids(2, [3, 2], 4))
    assert torch.equal(m, ref)
    vis = m[0, 0] == 0
    P, B1, B2 = 2, 3, 2
    p2 = P + B1  # first token of passage 2
    assert vis[p2, :P].all() and not vis[p2, P:P + B1].any()  # passage 2: prefix yes, passage 1 no
    assert vis[P:P + B1, :P + B1].tril(P).any()
    q0 = P + B1 + B2
    for r in range(q0, len(ex.input_ids)):  # question and answer rows: everything before them
        assert vis[r, :r + 1].all() and not vis[r, r + 1:].any()
    causal = training_mask(ex, block=False)[0, 0] == 0
    L = len(ex.input_ids)
    assert torch.equal(causal, torch.ones(L, L, dtype=torch.bool).tril())


def test_loss_is_answer_tokens_only():
    model = tiny_llama()
    ex = rand_example(random.Random(0))
    for block in (True, False):
        loss = example_loss(model, ex, block)
        ids = torch.tensor([ex.input_ids])
        L = ids.shape[1]
        out = model(input_ids=ids, attention_mask=training_mask(ex, block), position_ids=torch.arange(L)[None])
        lab = ex.labels()
        assert (lab != -100).sum() == len(ex.answer_ids)
        ref = F.cross_entropy(out.logits[0, :-1], lab[1:], ignore_index=-100)  # shifted LM loss, answer only
        assert abs(loss.item() - ref.item()) < 1e-5
    # the block mask matters: with it, the loss differs from the causal one
    assert abs(example_loss(model, ex, True).item() - example_loss(model, ex, False).item()) > 1e-6


def test_block_forward_blocks_cross_passage_information():
    """Changing passage 1 changes nothing at passage 2's rows under the block mask (it does under causal)."""
    model = tiny_llama()
    ex = rand_example(random.Random(1))
    ex2 = Example(ex.prefix_ids, [[(t + 7) % 300 for t in ex.blocks[0]]] + ex.blocks[1:], ex.question_ids,
                  ex.answer_ids)
    s = len(ex.prefix_ids) + len(ex.blocks[0])
    e = s + len(ex.blocks[1])

    def rows(x, block):
        L = len(x.input_ids)
        return model(input_ids=torch.tensor([x.input_ids]), attention_mask=training_mask(x, block),
                     position_ids=torch.arange(L)[None]).logits[0, s:e]

    with torch.no_grad():
        assert torch.allclose(rows(ex, True), rows(ex2, True), atol=1e-5)
        assert not torch.allclose(rows(ex, False), rows(ex2, False), atol=1e-5)


def test_steps_reduce_training_loss():
    model = tiny_llama()
    rng = random.Random(2)
    exs = [rand_example(rng) for _ in range(2)]

    def total():
        with torch.no_grad():
            return sum(example_loss(model, e, b).item() for e in exs for b in (True, False))

    before = total()
    hist = finetune_block_attention(model, None, exs, steps=30, lr=3e-3, block_prob=0.5, warmup=2,
                                    progress=False)
    after = total()
    assert len(hist["loss"]) == 30 and hist["steps_done"] == 30
    assert 0 < sum(hist["block"]) < 30  # both masks were used
    assert after < 0.5 * before
    assert not model.training


def test_saved_model_reloads_with_new_revision(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from blockrag.attention_kv.cache_store import KVCacheMismatch, KVCacheStore, config_revision

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # name_or_path = a local folder
    rev0 = config_revision(base)
    KVCacheStore(tmp_path / "kv", base, tok, dtype=torch.float32)  # a cache built with the base model
    exs = [rand_example(random.Random(3))]
    hist = finetune_block_attention(base, tok, exs, steps=2, lr=1e-3, progress=False)
    assert hist["base_revision"] == rev0
    assert config_revision(base) != rev0  # in memory already: the base folder no longer describes the weights
    save(base, tok, tmp_path / "ft")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    assert tuned.config.blockrag_finetune["weights_sha256"] == hist["weights_sha256"]
    assert tuned.config.blockrag_finetune["base_revision"] == rev0
    rev1 = config_revision(tuned)
    assert rev1 != rev0
    with torch.no_grad():
        ids = torch.tensor([exs[0].input_ids])
        assert torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(KVCacheMismatch):
        KVCacheStore(tmp_path / "kv", tuned, tok, dtype=torch.float32)
    # a second fine-tune saved into the same folder (same file names and sizes) still gets another revision
    finetune_block_attention(tuned, tok, exs, steps=1, lr=1e-3, progress=False)
    save(tuned, tok, tmp_path / "ft")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert config_revision(again) not in (rev0, rev1)


def test_examples_are_formatted_like_inference(tmp_path, tok):
    from blockrag.attention_kv.cache_store import KVCacheStore
    from blockrag.documents import Chunk

    fmt = KVCacheStore(tmp_path / "kv", tiny_llama(), tok, dtype=torch.float32)
    chunks = [Chunk(id=f"c{i}", doc_id=f"c{i}", position=0, text=t,
                    token_ids=tok(t, add_special_tokens=False)["input_ids"])
              for i, t in enumerate(["Ada lives in Paris.", "Bob works at Acme."])]
    ex = make_example(fmt, tok, "Where does Ada live?", "Paris", chunks)
    assert ex.prefix_ids == fmt.prefix_ids
    assert ex.blocks == [fmt.chunk_token_ids(c) for c in chunks]
    assert ex.question_ids == fmt.question_ids("Where does Ada live?")
    assert ex.answer_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ex.answer_ids[:-1]) == "Paris"
    with pytest.raises(ValueError):
        synthetic_examples(fmt, tok, [1, 10])  # evaluation seeds are held out


def test_lora_wrapped_model_trains_through_the_seam():
    """The seam runs the model's own modules, so a peft (LoRA) model works as is: the loss equals the
    unwrapped model's before training (LoRA's B starts at zero) and gradients reach only the LoRA weights."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(5)
    ex = rand_example(random.Random(4))
    with torch.no_grad():
        base_loss = example_loss(model, ex, True).item()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    loss = example_loss(lora, ex, True)
    assert abs(loss.item() - base_loss) < 1e-5
    loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
