"""Cross-encoder reranker on a tiny, randomly initialised BERT cross-encoder built here (none is packaged):
the ranking must follow the model's own pair scores, computed independently with transformers."""
import numpy as np
import pytest

from blockrag.documents import Chunk


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from blockrag.models import resolve_embedder

    tok = AutoTokenizer.from_pretrained(resolve_embedder())  # a BERT word-piece tokenizer
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _reference_scores(path, query, texts):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path).eval()
    enc = tok([query] * len(texts), texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[:, 0].numpy()


def test_cross_encoder_ranks_by_the_models_pair_scores(tiny_cross_encoder):
    from blockrag.rerankers.cross_encoder import CrossEncoderReranker

    texts = ["Kelp bread is baked in stone ovens.", "The river Osk flows north.", "Copper roofs turn green.",
             "Lighthouses guide ships at night.", "Stone ovens need dry wood."]
    chunks = [Chunk(id=f"c{i}", doc_id=f"d{i}", position=0, text=t) for i, t in enumerate(texts)]
    rr = CrossEncoderReranker(tiny_cross_encoder, batch_size=2)
    query = "how is kelp bread baked"
    hits = rr.rerank(query, chunks)
    ref = _reference_scores(tiny_cross_encoder, query, texts)
    assert [h.chunk_id for h in hits] == [f"c{i}" for i in np.argsort(-ref, kind="stable")]
    # one-label models score through a sigmoid: same order, values = sigmoid(logit)
    np.testing.assert_allclose([h.score for h in hits], 1 / (1 + np.exp(-np.sort(ref)[::-1])), atol=1e-5)
    assert [h.chunk_id for h in rr.rerank(query, chunks, k=2)] == [h.chunk_id for h in hits[:2]]
    assert rr.rerank(query, []) == []
    by_pair = rr.rerank(query, [(c.id, c.text) for c in chunks])
    assert [h.chunk_id for h in by_pair] == [h.chunk_id for h in hits]


def test_cross_encoder_needs_a_model(monkeypatch, tmp_path):
    from blockrag.rerankers.cross_encoder import CrossEncoderReranker

    monkeypatch.delenv("BLOCKRAG_CROSS_ENCODER", raising=False)
    with pytest.raises(ValueError, match="needs a model"):
        CrossEncoderReranker()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        CrossEncoderReranker("no-such/cross-encoder").score("q", ["a"])


def test_registry_names_the_cross_encoder_and_warns_for_a_losing_reranker(tiny_cross_encoder):
    from blockrag import registry

    assert "cross-encoder" in registry.reranker_names() and not registry.reranker_spec("cross-encoder").llm
    rr = registry.reranker("cross-encoder", model_name=tiny_cross_encoder)
    assert [h.chunk_id for h in rr.rerank("q", [("a", "x"), ("b", "y")])]
    registry.register_reranker("losing-test", "blockrag.rerankers.cross_encoder:CrossEncoderReranker", llm=False,
                               warning="nDCG@10 0.70 -> 0.40 on the benchmark")
    try:
        with pytest.warns(registry.RerankerWarning, match="losing-test.*0.70 -> 0.40"):
            registry.reranker("losing-test", model_name=tiny_cross_encoder)
    finally:
        registry._RERANKERS.pop("losing-test")


def test_measured_losing_rerankers_warn_when_chosen(tiny_cross_encoder):
    import warnings

    from blockrag import registry

    for name in ("blockrank", "pointwise"):  # constructing them loads no model
        with pytest.warns(registry.RerankerWarning, match="lowered SciFact train nDCG@10"):
            registry.reranker(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.RerankerWarning)
        registry.reranker("cross-encoder", model_name=tiny_cross_encoder)
