"""Reranker fine-tuning: the held-back split never overlaps tune, the losses go down on a tiny problem (LoRA through
peft), a saved reranker folder scores like the in-memory model, and fusion with the first-stage rank."""
import random

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama

pytest.importorskip("peft")

from blockrag.eval.bench_rerank_ft import dev_split  # noqa: E402
from blockrag.eval.rerank_split import split_queries  # noqa: E402
from blockrag.rerankers import finetune  # noqa: E402
from blockrag.rerankers.blockrank import BlockRankReranker  # noqa: E402
from blockrag.rerankers.pointwise import PointwiseReranker  # noqa: E402


class CharTokenizer:
    """Enough of a tokenizer for the rerankers' prompts: one id per character, no chat template."""

    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 290 for c in text]}

    def get_vocab(self):
        return {chr(i): 3 + i for i in range(32, 127)}


WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "orbit", "maple", "delta"]


def toy_problem(n_queries=6, n_docs=4, seed=0):
    """Each query is one word; its relevant document repeats that word, the others repeat other words."""
    rng = random.Random(seed)
    corpus = {f"d{i}": " ".join([w] * 3) for i, w in enumerate(WORDS)}
    queries, data = {}, []
    for q in range(n_queries):
        i = q % len(WORDS)
        queries[f"q{q}"] = WORDS[i]
        negs = rng.sample([f"d{j}" for j in range(len(WORDS)) if j != i], n_docs - 1)
        docs = negs + [f"d{i}"]
        rng.shuffle(docs)
        data.append((f"q{q}", docs, [int(d == f"d{i}") for d in docs]))
    return corpus, queries, data


def test_split_halves_are_disjoint_fixed_and_complete():
    qids = [str(i) for i in range(809)]
    tune, held = split_queries(qids)
    assert not set(tune) & set(held) and set(tune) | set(held) == set(qids)
    assert len(tune) == 404 and len(held) == 405
    assert (tune, held) == split_queries(list(reversed(qids)))         # order of the input does not matter
    assert split_queries(qids, seed=14) != (tune, held)
    train, dev = dev_split(tune)
    assert set(train) | set(dev) == set(tune) and not set(train) & set(dev) and not set(dev) & set(held)


def test_examples_always_have_a_positive():
    cands = {"q": [["a", 1.0], ["b", 0.5], ["c", 0.1]]}
    data = finetune.examples(cands, {"q": "x"}, {"q": {"z": 1}}, ["q"], depth=3, rng=random.Random(0))
    assert data == [("q", ["a", "b", "z"], [0, 0, 1])]


@pytest.mark.parametrize("kind", ["blockrank", "pointwise"])
def test_training_loss_decreases_on_a_tiny_problem(kind):
    corpus, queries, data = toy_problem()
    model = finetune.add_lora(tiny_llama(3, layers=3), r=4, alpha=8)
    before = [p.detach().clone() for n, p in model.named_parameters() if "lora" not in n]
    log = finetune.train(kind, model, CharTokenizer(), data, corpus, queries, steps=36, lr=2e-2, layers=(1, 2),
                         answer_tokens=3, doc_tokens=16, log_every=0)
    losses = np.array(log["losses"])                     # blockrank: (total, lm, contrastive); pointwise: (total,)
    assert log["steps"] == 36 and np.isfinite(losses).all()
    first, last = losses[:6].mean(0), losses[-6:].mean(0)  # one pass over the data = 6 steps
    assert last[0] < 0.95 * first[0]
    if kind == "blockrank":
        assert last[2] < 0.95 * first[2]                 # the attention (contrastive) term itself goes down
    after = [p for n, p in model.named_parameters() if "lora" not in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after))          # only the adapter was trained


def test_blockrank_loss_reads_relevance():
    """The contrastive term is the InfoNCE of exactly the scores the reranker ranks by."""
    corpus, queries, data = toy_problem(1)
    model = tiny_llama(2, layers=3)
    br = BlockRankReranker(model=model, tokenizer=CharTokenizer(), layer=2, attn="sdpa", query_rows="tail",
                           doc_tokens=16)
    qid, docs, labels = data[0]
    prompt = br.build_prompt(queries[qid], [corpus[d] for d in docs])
    with torch.no_grad():
        _, _, con = finetune.blockrank_loss(br, prompt, [5, 6], [labels.index(1)], layers=(2,), temperature=0.1)
        scores = torch.tensor(br.score(queries[qid], [corpus[d] for d in docs]), dtype=torch.float64)
    want = torch.logsumexp(scores / 0.1, 0) - scores[labels.index(1)] / 0.1
    assert abs(float(con) - float(want)) < 1e-4


@pytest.mark.parametrize("kind", ["blockrank", "pointwise"])
def test_saved_folder_scores_like_the_trained_model(kind, tmp_path, monkeypatch):
    corpus, queries, data = toy_problem()
    model = finetune.add_lora(tiny_llama(5, layers=3), r=4, alpha=8)
    finetune.train(kind, model, CharTokenizer(), data, corpus, queries, steps=6, lr=5e-3, layers=(2,),
                   answer_tokens=3, doc_tokens=16, log_every=0)
    extra = {"layer": 2, "query_rows": "tail"} if kind == "blockrank" else {}
    folder = finetune.save_folder(tmp_path / kind, model, kind, "tiny-base", doc_tokens=16, fuse_weight=0.5, **extra)
    assert (folder / "adapter_model.safetensors").stat().st_size < 200_000
    import blockrag.models

    from blockrag.attention_kv.lora import merge_adapter

    def load_base(name=None, dtype=None, device=None, adapter=None):  # the tiny base, the folder's adapter merged
        base = tiny_llama(5, layers=3)
        return (merge_adapter(base, adapter) if adapter else base), CharTokenizer()

    monkeypatch.setattr(blockrag.models, "load_generator", load_base)
    finetune._load_folder.cache_clear()
    cls = BlockRankReranker if kind == "blockrank" else PointwiseReranker
    other = tiny_llama(9, layers=3)              # a generator's model handed in is not used for a folder
    loaded = cls(model_name=str(folder), model=other, tokenizer=CharTokenizer())
    live = cls(model=model, tokenizer=CharTokenizer(), doc_tokens=16, **(
        {"layer": 2, "query_rows": "tail", "attn": "sdpa"} if kind == "blockrank" else {}))
    texts = [corpus[d] for d in data[0][1]]
    got, want = loaded.score("apple", texts), live.score("apple", texts)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)              # merged bf16 adapter vs live fp32
    assert loaded.fuse_weight == 0.5 and loaded.doc_tokens == 16
    hits = loaded.rerank("apple", list(zip(data[0][1], texts)))
    order = np.argsort(-finetune.fuse(got, 0.5), kind="stable")
    assert [h.chunk_id for h in hits] == [data[0][1][i] for i in order]
    finetune._load_folder.cache_clear()


def test_folder_of_the_other_kind_is_refused(tmp_path):
    (tmp_path / "reranker.json").write_text('{"kind": "pointwise"}')
    with pytest.raises(ValueError, match="is a 'pointwise' reranker folder, not 'blockrank'"):
        BlockRankReranker(model_name=str(tmp_path))


def test_fuse_interpolates_with_the_first_stage_rank():
    s = np.array([0.1, 0.9, 0.5, 0.2])
    assert np.array_equal(finetune.fuse(s, 1.0), s) and np.array_equal(finetune.fuse(s, None), s)
    assert list(np.argsort(-finetune.fuse(s, 0.0), kind="stable")) == [0, 1, 2, 3]   # w = 0: first-stage order
    assert list(np.argsort(-finetune.fuse(s, 0.9), kind="stable")) == list(np.argsort(-s, kind="stable"))


def test_bundled_folder_resolves_by_name():
    folder = finetune.reranker_folder("blockrank-scifact")
    assert folder is not None and "blockrank-scifact" in finetune.bundled_names()
    s = finetune.read_settings(folder)
    assert s["kind"] == "blockrank" and isinstance(s["layer"], int) and s["query_rows"] in ("tail", "last", "all")
    assert 0 <= s["fuse_weight"] <= 1
    assert (folder / "adapter_model.safetensors").stat().st_size < 4_000_000      # a few MB: committed
    assert finetune.reranker_folder("no-such-reranker") is None


def test_cli_passes_rerank_model_to_the_reranker(tmp_path):
    import json

    from blockrag import registry
    from blockrag.cli import main
    from blockrag.retrievers.base import Hit

    seen = {}

    class Recorder:
        name = "recorder"

        def __init__(self, **opts):
            seen.update(opts)

        def rerank(self, query, chunks, k=None):
            return [Hit(c.id, 0.0) for c in chunks][:k]

    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"word{i} text"})
                                               + "\n" for i in range(4)))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "word1"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("q\td1\t1\n")
    registry.register_reranker("recorder-test", Recorder, llm=False)
    try:
        assert main(["eval", "beir", "--data", str(root), "--rerank", "recorder-test", "--rerank-model", "my-folder",
                     "--rerank-depth", "3"]) == 0
    finally:
        registry._RERANKERS.pop("recorder-test")
    assert seen.get("model_name") == "my-folder"
