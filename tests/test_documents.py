import json

import pytest

from blockrag.chunking import TokenChunker
from blockrag.documents import (Chunk, Document, LoadError, LoadReport, from_langchain, load_folder, load_jsonl,
                           load_path, to_langchain)


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    with pytest.raises(LoadError, match=r"docs\.jsonl:2: malformed JSON"):
        list(load_jsonl(path))


def test_jsonl_empty_documents_skipped_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"id": "a", "text": "real text"}, {"id": "b", "text": "   \n"}, {"_id": "c", "title": "T", "text": "x"}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    report = LoadReport()
    docs = list(load_jsonl(path, report))
    assert [d.id for d in docs] == ["a", "c"]
    assert report.skipped_empty == 1 and report.loaded == 2
    assert docs[1].title == "T"


def test_folder_reports_non_utf8_without_crashing(tmp_path):
    (tmp_path / "good.md").write_text("# Heading\nbody text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe")
    (tmp_path / "empty.txt").write_text("  ")
    report = LoadReport()
    docs = list(load_folder(tmp_path, report))
    assert [d.id for d in docs] == ["good.md"]
    assert docs[0].title == "Heading" and docs[0].text == "body text"
    assert len(report.skipped_undecodable) == 1 and report.skipped_empty == 1


def test_load_path_rejects_unknown(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_path(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LoadError):
        load_path(tmp_path / "x.csv")


def test_chunker_windows_overlap_and_stable_ids(tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    doc = Document(id="d1", text=text)
    chunker = TokenChunker(tokenizer, chunk_tokens=64, overlap=16)
    chunks = chunker.split(doc)
    assert len(chunks) > 5
    assert all(len(c.token_ids) <= 64 for c in chunks)
    # windows overlap by exactly `overlap` tokens
    assert chunks[0].token_ids[-16:] == chunks[1].token_ids[:16]
    # every token of the document is covered, in order
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rebuilt = chunks[0].token_ids + [t for c in chunks[1:] for t in c.token_ids[16:]]
    assert rebuilt == all_ids
    # ids are stable across runs and distinct within a document
    again = chunker.split(doc)
    assert [c.id for c in chunks] == [c.id for c in again]
    assert len({c.id for c in chunks}) == len(chunks)
    assert chunks[0].text.startswith("word0")


def test_chunker_whole_document_and_bad_settings(tokenizer):
    doc = Document(id="d", text="short text", title="Title")
    (chunk,) = TokenChunker(tokenizer, chunk_tokens=None).split(doc)
    assert chunk.text == "Title\nshort text"
    with pytest.raises(ValueError):
        TokenChunker(tokenizer, chunk_tokens=10, overlap=10)


def test_langchain_round_trip():
    doc = Document(id="x1", text="hello", title="Greeting", metadata={"lang": "en"})
    lc = to_langchain(doc)
    assert lc.page_content == "hello" and lc.metadata["lang"] == "en"
    back = from_langchain(lc)
    assert (back.id, back.text, back.title, back.metadata) == ("x1", "hello", "Greeting", {"lang": "en"})
    chunk_lc = to_langchain(Chunk(id="c", doc_id="x1", position=2, text="piece"))
    assert chunk_lc.metadata["doc_id"] == "x1" and chunk_lc.metadata["position"] == 2
