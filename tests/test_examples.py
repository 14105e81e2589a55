"""examples/qa_cli.py answers through Pipeline: one retrieval and one generation per question, hits and
timings printed. (The web example is tested with the server.)"""
import io
import sys

from blockrag.collection import Collection
from blockrag.demo_corpus import write_demo_corpus
from blockrag.documents import load_folder


def test_qa_cli_answers_through_the_pipeline(tmp_path, monkeypatch, capsys):
    import blockrag.pipeline as pipeline_mod
    from examples import qa_cli
    from test_pipeline import FakeGenerator

    col = Collection(tmp_path / "store", chunk_tokens=128, overlap=16, progress=False)
    col.build_index("bm25")
    col.add_documents(load_folder(write_demo_corpus(tmp_path / "corpus")))
    col.close()
    gen = FakeGenerator()
    monkeypatch.setattr(pipeline_mod, "collection_generator", lambda col, name=None, **kw: gen)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who founded the savings bank?\n\n"))
    assert qa_cli.main(["--store", str(tmp_path / "store"), "--retriever", "bm25", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert gen.calls == 1 and len(gen.seen[0]) == 2
    assert "Tobias Renn." in out and "[bank.md]" in out and "retrieve_ms=" in out and "ttft_ms=" in out


def test_qa_cli_refuses_an_unknown_retriever_in_one_line(tmp_path, capsys):
    from examples import qa_cli

    col = Collection(tmp_path / "store", progress=False)
    col.build_index("bm25")
    col.close()
    assert qa_cli.main(["--store", str(tmp_path / "store"), "--retriever", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown retriever 'nope'") and "\n" not in err
