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
