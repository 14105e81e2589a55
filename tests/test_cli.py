import json

from blockrag.cli import main


def test_index_query_info_delete(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "title": "Apples", "text": "Apples grow on trees in orchards."},
        {"id": "b", "title": "Boats", "text": "Boats sail across the harbour at dawn."},
        {"id": "c", "text": "   "},
    ]))
    store = str(tmp_path / "store")
    assert main(["index", str(docs), "--store", store, "--index", "bm25"]) == 0
    out = capsys.readouterr().out
    assert "2 documents, 1 empty skipped" in out
    assert main(["query", "harbour boats", "--store", store, "--retriever", "bm25", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "[b #" in out
    assert main(["info", "--store", store]) == 0
    assert "index bm25" in capsys.readouterr().out
    assert main(["delete", "b", "--store", store]) == 0
    main(["query", "harbour boats", "--store", store, "--retriever", "bm25", "-k", "1"])
    assert "[b #" not in capsys.readouterr().out


def test_bad_jsonl_is_reported_with_line(tmp_path, capsys):
    docs = tmp_path / "bad.jsonl"
    docs.write_text('{"id": "a", "text": "ok"}\nnot json\n')
    assert main(["index", str(docs), "--store", str(tmp_path / "s"), "--index", "bm25"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_query_without_store_is_a_clear_error(tmp_path, capsys):
    assert main(["query", "x", "--store", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no store" in err and len(err.strip().splitlines()) == 1


def _bm25_store(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "title": "Apples", "text": "Apples grow on trees in orchards."},
        {"id": "b", "title": "Boats", "text": "Boats sail across the harbour at dawn."},
    ]))
    store = str(tmp_path / "store")
    assert main(["index", str(docs), "--store", store, "--index", "bm25"]) == 0
    return docs, store


def test_query_names_are_checked_in_one_line(tmp_path, capsys):
    _, store = _bm25_store(tmp_path)
    capsys.readouterr()
    assert main(["query", "boats", "--store", store, "--retriever", "bm52"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown retriever 'bm52'; choose from bm25, dense, hybrid") and "\n" not in err
    assert main(["query", "boats", "--store", store, "--mode", "local"]) == 2  # graph mode, no graph index
    err = capsys.readouterr().err.strip()
    assert "needs a graph index" in err and "\n" not in err
    assert main(["query", "boats", "--store", store, "--retriever", "dense"]) == 2
    assert "needs a dense index" in capsys.readouterr().err


def test_unchanged_reindex_loads_no_tokenizer(tmp_path, capsys, monkeypatch):
    import blockrag.models as models

    docs, store = _bm25_store(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("a no-op re-index loaded the tokenizer")

    monkeypatch.setattr(models, "load_tokenizer", refuse)
    assert main(["index", str(docs), "--store", store, "--index", "bm25"]) == 0
    assert "0 documents added (0 chunks), 2 unchanged" in capsys.readouterr().out
