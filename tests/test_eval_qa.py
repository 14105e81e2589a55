"""blockrag eval qa: loaders, SQuAD metrics, seeded selection, bootstrap intervals, and an end-to-end run
(tiny random Llama with the real tokenizer, so retrieval and every generation mode run for real)."""
import json

import pytest

from blockrag.documents import LoadError
from blockrag.eval import qa

PARAGRAPHS = [
    ("Lighthouses", "The lighthouse of Merrowgate was built in 1821 by the engineer Alda Venn. Its roof is copper."),
    ("Lighthouses", "Kelp bread is the national dish of Veloria, baked in stone ovens along the southern coast."),
    ("Rivers", "The river Osk flows north for 412 kilometres before it reaches the Grey Sea at Tammerby."),
]


def squad_file(tmp_path):
    data = {"version": "1.1", "data": []}
    qas = [("Who built the lighthouse of Merrowgate?", "Alda Venn"),
           ("What is the national dish of Veloria?", "Kelp bread"),
           ("How long is the river Osk?", "412 kilometres"),
           ("Where does the river Osk reach the Grey Sea?", "Tammerby")]
    owner = [0, 1, 2, 2]
    by_title: dict = {}
    for i, (title, text) in enumerate(PARAGRAPHS):
        para = {"context": text, "qas": []}
        for j, (q, a) in enumerate(qas):
            if owner[j] == i:
                para["qas"].append({"id": f"q{j}", "question": q,
                                    "answers": [{"text": a, "answer_start": text.find(a)}]})
        by_title.setdefault(title, []).append(para)
    data["data"] = [{"title": t, "paragraphs": ps} for t, ps in by_title.items()]
    path = tmp_path / "tiny_squad.json"
    path.write_text(json.dumps(data))
    return path


def test_squad_normalisation_and_metrics():
    assert qa.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert qa.exact_match("eiffel tower.", ["The Eiffel Tower"]) == 1.0
    assert qa.exact_match("Eiffel", ["The Eiffel Tower"]) == 0.0
    # precision 1/1, recall 1/2 -> F1 2/3; best over the gold answers
    assert qa.token_f1("Eiffel", ["the Eiffel Tower"]) == pytest.approx(2 / 3)
    assert qa.token_f1("Eiffel", ["Louvre", "Eiffel"]) == 1.0
    assert qa.token_f1("", ["x"]) == 0.0
    assert qa.contains_gold("It was Alda Venn, in 1821", ["alda venn"]) == 1.0
    assert qa.contains_gold("Aldavenn", ["alda venn"]) == 0.0
    assert qa.contains_gold("1821x", ["1821"]) == 0.0  # word boundaries, not substrings


def test_extract_answer_first_line_without_prefix():
    assert qa.extract_answer("Answer: Alda Venn.\nQuestion: who else?") == "Alda Venn"
    assert qa.extract_answer("\n\n  412 kilometres  \nmore") == "412 kilometres"
    assert qa.extract_answer("") == ""
    assert qa.extract_answer("The answer to this question is:\nPrivate schools.") == "Private schools"
    assert qa.extract_answer("The answer is 2.") == "2"
    assert qa.extract_answer("Answers vary by region") == "Answers vary by region"


def test_load_squad_and_gold_paragraphs(tmp_path):
    data = qa.load_qa(squad_file(tmp_path))
    assert len(data.examples) == 4 and len(data.documents) == 3
    by_id = {d.id: d for d in data.documents}
    for ex in data.examples:
        (gold,) = ex.gold_doc_ids
        assert any(a in by_id[gold].text for a in ex.answers)
    assert by_id[data.examples[0].gold_doc_ids[0]].title == "Lighthouses"


def test_load_jsonl_context_contexts_and_hotpot(tmp_path):
    path = tmp_path / "multi.jsonl"
    rows = [
        {"id": "a", "question": "Q1?", "answers": ["x"], "context": "x is here."},
        {"question": "Q2?", "answers": {"text": ["y"], "answer_start": [0]},
         "contexts": [{"title": "T", "text": "y lives here.", "is_supporting": True},
                      {"title": "U", "text": "a distractor.", "is_supporting": False}]},
        {"question": "Q3?", "answer": "z", "supporting_facts": [["Zed", 0]],
         "context": [["Zed", ["z is ", "a letter."]], ["Other", ["nothing."]]]},
        {"question": "Q4?", "answers": ["w"], "contexts": ["w one.", "x is here."]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = qa.load_qa(path)
    assert [e.id for e in data.examples] == ["a", "2", "3", "4"]
    docs = {d.id: d for d in data.documents}
    assert len(docs) == 6  # "x is here." is shared by rows 1 and 4: one document
    assert [docs[g].text for g in data.examples[1].gold_doc_ids] == ["y lives here."]
    assert [docs[g].title for g in data.examples[2].gold_doc_ids] == ["Zed"]
    assert docs[data.examples[2].gold_doc_ids[0]].text == "z is a letter."
    assert len(data.examples[3].gold_doc_ids) == 2  # no flags: every context counts as gold


@pytest.mark.parametrize("line, message", [
    ("not json", "multi.jsonl:2: not valid JSON"),
    ('{"answers": ["x"], "context": "c"}', "multi.jsonl:2: no 'question'"),
    ('{"question": "q", "context": "c"}', "multi.jsonl:2: no 'answers'"),
    ('{"question": "q", "answers": ["x"]}', "multi.jsonl:2: needs 'context'"),
])
def test_bad_jsonl_is_one_clear_line(tmp_path, line, message):
    path = tmp_path / "multi.jsonl"
    path.write_text('{"question": "q", "answers": ["a"], "context": "a c"}\n' + line + "\n")
    with pytest.raises(LoadError, match=message):
        qa.load_qa(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="QA data not found"):
        qa.load_qa(tmp_path / "nope.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoadError, match="no questions"):
        qa.load_qa(tmp_path / "empty.jsonl")


def test_limit_is_a_fixed_seeded_prefix():
    items = list(range(50))
    assert qa.select(items, 10, seed=0) == qa.select(items, 10, seed=0)
    assert qa.select(items, 10, seed=0) == qa.select(items, 20, seed=0)[:10]
    assert qa.select(items, 10, seed=0) != qa.select(items, 10, seed=1)
    assert sorted(qa.select(items, None)) == items


def test_bootstrap_intervals():
    lo, hi = qa.bootstrap_ci([1.0] * 20)
    assert lo == hi == 1.0
    vals = [0.0] * 50 + [1.0] * 50
    lo, hi = qa.bootstrap_ci(vals)
    assert 0.35 < lo < 0.5 < hi < 0.65
    r, lo, hi = qa.ratio_ci([0.5] * 30, [1.0] * 30)
    assert r == lo == hi == 0.5
    r, lo, hi = qa.ratio_ci([0.0, 1.0, 1.0, 0.0] * 10, [1.0, 1.0, 0.0, 0.0] * 10)
    assert r == pytest.approx(1.0) and lo < 1.0 < hi


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer (chat template, eos), saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockrag.models import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_eval_qa_cli_end_to_end(tmp_path, tiny_generator, capsys):
    from blockrag.cli import main

    data = squad_file(tmp_path)
    report, records = tmp_path / "qa.json", tmp_path / "qa.jsonl"
    rc = main(["eval", "qa", "--data", str(data), "--modes", "full,turbo,blend", "-k", "2", "--limit", "3",
               "--generator", tiny_generator, "--max-new-tokens", "4", "--store", str(tmp_path / "store"),
               "--report", str(report), "--records", str(records)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "| turbo |" in out and "| blend |" in out and "recall@2" in out
    rep = json.loads(report.read_text())
    assert rep["n_questions"] == 3 and rep["k"] == 2 and set(rep["modes"]) == {"full", "turbo", "blend"}
    assert rep["modes"]["full"]["agree_full"] == 1.0 and "f1_ratio_to_full" in rep["modes"]["turbo"]
    # three distinct made-up paragraphs, distinctive words: the gold paragraph is always in the top 2
    assert rep["retrieval"]["recall@2"] == 1.0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.id for e in qa.select(qa.load_qa(data).examples, 3)]
    for r in rows:
        assert len(r["retrieved_doc_ids"]) == 2 and r["gold_doc_ids"][0] in r["retrieved_doc_ids"]
        for mode in ("full", "turbo", "blend"):
            m = r["modes"][mode]
            assert m["f1"] == qa.token_f1(m["answer"], r["answers"]) and m["ttft_ms"] > 0
            assert 1 <= m["n_tokens"] <= 4 and m["n_context_tokens"] > 0
    # the store is reused: a second run adds nothing and answers the same
    rc = main(["eval", "qa", "--data", str(data), "--modes", "full,turbo", "-k", "2", "--limit", "3",
               "--generator", tiny_generator, "--max-new-tokens", "4", "--store", str(tmp_path / "store"),
               "--records", str(tmp_path / "again.jsonl")])
    assert rc == 0
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [a["modes"]["turbo"]["raw"] for a in again] == [r["modes"]["turbo"]["raw"] for r in rows]


def test_eval_qa_retrieval_only_and_bad_mode(tmp_path, capsys):
    from blockrag.cli import main

    data = squad_file(tmp_path)
    assert main(["eval", "qa", "--data", str(data), "--modes", "", "--retriever", "bm25", "-k", "1"]) == 0
    assert "recall@1" in capsys.readouterr().out
    assert main(["eval", "qa", "--data", str(data), "--modes", "full,fast"]) == 2
    assert "unknown mode 'fast'" in capsys.readouterr().err
    assert main(["eval", "qa", "--data", str(tmp_path / "missing.json")]) == 2
    assert "QA data not found" in capsys.readouterr().err
