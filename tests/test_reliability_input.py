"""Bad input gets one clear line (exit 2 from the CLI), and nothing else changes."""
import json
import os
import sqlite3

import pytest

from blockrag.cli import main
from blockrag.documents import Document, LoadReport, load_folder, load_jsonl
from blockrag.eval import reliability as R


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _snapshot(store):
    db = sqlite3.connect(store / "store.sqlite")
    rows = (db.execute("SELECT id, title, text FROM documents ORDER BY id").fetchall(),
            db.execute("SELECT id FROM chunks ORDER BY id").fetchall(),
            db.execute("SELECT key, value FROM settings WHERE key != 'journal_floor' ORDER BY key").fetchall(),
            db.execute("SELECT name, params FROM manifest ORDER BY name").fetchall())
    db.close()
    return rows


@pytest.fixture()
def store(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Cats purr when they are content and sleep most of the day.")
    (docs / "b.md").write_text("# Bread\nSourdough rises slowly because of wild yeast.")
    code, _, err = _run(["index", str(docs), "--store", str(tmp_path / "s"), "--index", "bm25",
                         "--chunk-tokens", "64", "--overlap", "8"], capsys)
    assert code == 0, err
    return tmp_path / "s"


@pytest.mark.parametrize("args,needle", [
    (["query", "cats", "-k", "0"], "integer >= 1"),
    (["query", "cats", "-k", "-1", "--retriever", "hybrid"], "integer >= 1"),
    (["query", "cats", "-k", "many"], "integer >= 1"),
    (["query", "   "], "question is empty"),
    (["query", ""], "question is empty"),
    (["query", "cats", "--rerank-depth", "0"], "integer >= 1"),
    (["query", "cats", "--retriever", "nope"], "nope"),
    (["query", "cats", "--mode", "local"], "graph"),
    (["delete", "no-such-doc"], "not in store"),
    (["delete", "a.txt", "no-such-doc"], "nothing was deleted"),
    (["index", "DOCS", "--chunk-tokens", "0"], "integer >= 1"),
    (["index", "DOCS", "--chunk-tokens", "32"], "chunk_tokens=64"),
    (["index", "DOCS", "--overlap", "-3"], "integer >= 0"),
    (["index", "DOCS", "--overlap", "64", "--chunk-tokens", "64"], "smaller than"),
    (["index", "MISSING"], "no such file"),
    (["info", "--store", "NOSTORE"], "no store"),
])
def test_user_errors_are_one_line_exit_2_and_change_nothing(store, tmp_path, capsys, args, needle):
    before = _snapshot(store)
    args = [str(tmp_path / "docs") if a == "DOCS" else str(tmp_path / "missing") if a == "MISSING"
            else str(tmp_path / "none") if a == "NOSTORE" else a for a in args]
    if "--store" not in args:
        args += ["--store", str(store)]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors (one line, exit 2 too)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], (args, err)
    assert "Traceback" not in err
    assert _snapshot(store) == before


def test_debug_shows_the_traceback(store, capsys):
    from blockrag.collection import UnknownDocuments

    with pytest.raises(UnknownDocuments):
        main(["--debug", "delete", "nope", "--store", str(store)])


def test_unknown_delete_via_sdk_raises_before_any_change(store):
    from blockrag.collection import Collection, UnknownDocuments

    c = Collection(store, progress=False)
    n = c.store.count_documents()
    with pytest.raises(UnknownDocuments):
        c.delete_documents(["a.txt", "nope"])
    assert c.store.count_documents() == n
    assert c.delete_documents(["nope"], missing_ok=True) == 0
    with pytest.raises(TypeError, match="strings"):
        c.delete_documents([1])
    with pytest.raises(TypeError, match="single str"):
        c.delete_documents("a.txt")


def test_sdk_ids_must_be_strings_and_bad_unicode_is_skipped_and_counted(tmp_path):
    c = R.open_store(tmp_path / "s", create=True)
    with pytest.raises(TypeError, match="strings"):
        c.add_documents([Document(id="ok", text="fine"), Document(id=7, text="numeric id")],
                        chunks_for=R.simple_chunks)
    assert c.store.count_documents() == 0  # the whole call changed nothing
    good = [Document(id=f"g{i}", text=f"good document number {i}") for i in range(3)]
    bad = [Document(id="s1", text="lone \ud800 surrogate"), Document(id="s2", text="ok", title="\udfff")]
    report = c.add_documents(good[:2] + bad + good[2:], chunks_for=R.simple_chunks)
    assert report.documents_added == 3 and report.documents_skipped == 2
    assert sorted(c.store.document_ids()) == ["g0", "g1", "g2"]
    assert "skipped" in report.summary()


def test_untokenisable_document_is_skipped_and_the_previous_version_kept(tmp_path):
    c = R.open_store(tmp_path / "s", create=True)
    c.add_documents([Document(id="a", text="first version of a")], chunks_for=R.simple_chunks)

    def chunks(doc):
        if "BOOM" in doc.text:
            raise ValueError("tokenizer refused the text")
        return R.simple_chunks(doc)

    report = c.add_documents([Document(id="a", text="BOOM"), Document(id="b", text="b is fine")], chunks_for=chunks)
    assert report.documents_skipped == 1 and report.documents_added == 1
    assert c.store.document("a").text == "first version of a"
    assert R.check_store(tmp_path / "s", [{"a": "first version of a", "b": "b is fine"}])["ok"]


def test_real_tokenizer_on_lone_surrogates_in_jsonl(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in [
        {"id": "1", "text": "plain text"}, {"id": "2", "text": "bad \ud83d here"}, {"id": 3, "text": "int id"},
        {"id": "4", "title": 1999, "text": "numeric title"}]) + "\n")
    code, out, err = _run(["index", str(path), "--store", str(tmp_path / "s"), "--index", "bm25"], capsys)
    assert code == 0, err
    assert "3 documents added" in out and "1 skipped" in out
    code, out, _ = _run(["index", str(path), "--store", str(tmp_path / "s"), "--index", "bm25"], capsys)
    assert "0 documents added" in out and "3 unchanged" in out  # a numeric title is not "changed" every run


def test_folder_walk_deep_symlinks_binary(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    deep = root
    for _ in range(1500):  # deeper than the interpreter's recursion limit (Path.mkdir(parents=True) recurses)
        deep = deep / "d"
        deep.mkdir()
    (deep / "deep.txt").write_text("deep down")
    (root / "nul.txt").write_bytes(b"\x00" * 100)
    (root / "bin.md").write_bytes(b"text then \x00\x01\x02 binary")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the folder")
    os.symlink(outside, root / "link.txt")
    os.symlink(tmp_path, root / "uplink")  # a folder link out (and a cycle)
    (root / "inner.txt").write_text("inside")
    os.symlink(root / "inner.txt", root / "alias.txt")
    try:
        report = LoadReport()
        docs = {d.id: d for d in load_folder(root, report)}
        assert sorted(docs) == ["d/" * 1500 + "deep.txt", "inner.txt"]
        assert len(report.skipped_binary) == 2 and len(report.skipped_links) == 3
        docs = {d.id for d in load_folder(root, LoadReport(), follow_symlinks=True)}
        assert "alias.txt" in docs and "link.txt" not in docs  # followed only inside the folder
    finally:  # shutil.rmtree (pytest's clean-up) recurses: take the deep tree down bottom-up
        (deep / "deep.txt").unlink()
        while deep != root:
            deep.rmdir()
            deep = deep.parent


def test_jsonl_field_types(tmp_path):
    from blockrag.documents import LoadError

    for line, needle in [('{"id": [1], "text": "x"}', "string or an integer"), ('{"id": "", "text": "x"}', "empty"),
                         ('{"id": "a", "text": "x", "title": {"t": 1}}', "title"),
                         ("[" * 100000 + "]" * 100000, "nested too deeply")]:
        p = tmp_path / "x.jsonl"
        p.write_text(line + "\n")
        with pytest.raises(LoadError, match=needle):
            list(load_jsonl(p))


def test_index_command_rebuilds_an_unusable_index_it_names(store, tmp_path, capsys):
    folder = store / "indexes" / next(p.name for p in (store / "indexes").iterdir() if p.name.startswith("bm25@"))
    (folder / "bm25.json").write_text("[]")
    code, out, err = _run(["query", "cats", "--store", str(store), "--retriever", "bm25"], capsys)
    assert code == 2 and "bm25" in err
    code, out, err = _run(["index", str(tmp_path / "docs"), "--store", str(store), "--index", "bm25"], capsys)
    assert code == 0 and "rebuilding index bm25" in out, err
    code, out, err = _run(["query", "cats purr", "--store", str(store), "--retriever", "bm25"], capsys)
    assert code == 0 and "a.txt" in out
