"""Property-based fuzzing (hypothesis) of the loaders, the chunker, CLI arguments and queries.

Each property counts the cases it ran (1,000+ in all at this size). Properties: loaders either yield
Documents or raise LoadError; the chunker's windows are exactly the tokenizer's tokens of the text (also
when tokenised a segment at a time); the CLI never fails with an internal error (exit 1) or a traceback,
and rejected commands leave the store byte-for-byte unchanged; any query returns chunk ids of the store.
"""
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blockrag.chunking import TokenChunker  # noqa: E402
from blockrag.cli import main  # noqa: E402
from blockrag.documents import Document, LoadError, LoadReport, load_folder, load_jsonl  # noqa: E402

def fuzz(n: int):
    """``n`` cases, reproducible (derandomised), no example database written into the checkout."""
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS: dict[str, int] = {}


def _count(name):
    COUNTS[name] = COUNTS.get(name, 0) + 1


# ------------------------------------------------------------------------------------------ chunker
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=600) | \
    st.lists(st.sampled_from(["alpha", " ", "  ", "\n", "don't", "1234", "é", "日本", "🙂", "--", "\t", "x"]),
             max_size=200).map("".join)


def test_chunker_windows_are_the_tokens_of_the_text(tokenizer):
    @fuzz(200)
    @given(text=texts, title=st.sampled_from(["", "T", "A title"]),
           size=st.integers(1, 40), overlap=st.integers(0, 39), segment=st.integers(8, 300))
    def prop(text, title, size, overlap, segment):
        _count("chunker")
        overlap = overlap % size
        doc = Document(id="d", text=text, title=title)
        plain = TokenChunker(tokenizer, size, overlap, segment_chars=10**9).split(doc)
        streamed = TokenChunker(tokenizer, size, overlap, segment_chars=segment).split(doc)
        assert [(c.id, c.text, c.token_ids) for c in streamed] == [(c.id, c.text, c.token_ids) for c in plain]
        ids = tokenizer(doc.full_text, add_special_tokens=False)["input_ids"]
        rebuilt = []
        for i, c in enumerate(plain):
            assert c.position == i and 1 <= len(c.token_ids) <= size and c.text in doc.full_text
            rebuilt += c.token_ids if i == 0 else c.token_ids[overlap:]
        assert rebuilt == list(ids)

    prop()
    assert COUNTS["chunker"] >= 200


# ------------------------------------------------------------------------------------------ loaders
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=8)
objects = st.fixed_dictionaries({}, optional={"id": json_values, "_id": json_values, "text": json_values,
                                              "title": json_values, "extra": json_values})
lines = st.one_of(objects.map(json.dumps).map(str.encode), st.binary(max_size=80),
                  st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
                  json_values.map(json.dumps).map(str.encode))


def test_jsonl_loader_yields_documents_or_load_error(tmp_path):
    path = tmp_path / "x.jsonl"

    @fuzz(250)
    @given(st.lists(lines, min_size=1, max_size=4))
    def prop(raw_lines):
        _count("jsonl")
        path.write_bytes(b"\n".join(raw_lines) + b"\n")
        try:
            docs = list(load_jsonl(path, LoadReport()))
        except LoadError as err:
            assert str(path) in str(err)
            return
        for d in docs:
            assert isinstance(d.id, str) and isinstance(d.text, str) and isinstance(d.title, str) and d.text.strip()

    prop()
    assert COUNTS["jsonl"] >= 250


def test_folder_loader_never_raises(tmp_path):
    names = st.sampled_from(["a.txt", "b.md", "c.TXT", "d.bin", "sub/e.txt", "sub/deeper/f.md", ".hidden.txt"])

    @fuzz(100)
    @given(st.dictionaries(names, st.binary(max_size=120) | st.text(max_size=120).map(
        lambda t: t.encode("utf-8", "surrogatepass")), max_size=5))
    def prop(files):
        _count("folder")
        root = tmp_path / f"r{COUNTS['folder']}"
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        root.mkdir(exist_ok=True)
        report = LoadReport()
        docs = list(load_folder(root, report))
        for d in docs:
            assert (root / d.id).is_file() and "\x00" not in d.text
        assert report.loaded == len(docs)

    prop()
    assert COUNTS["folder"] >= 100


# -------------------------------------------------------------------------------- CLI and queries
def _fingerprint(store: Path):
    db = sqlite3.connect(store / "store.sqlite")
    rows = [db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("documents", "chunks", "manifest", "journal")]
    rows.append(db.execute("SELECT * FROM settings WHERE key != 'journal_floor' ORDER BY 1").fetchall())
    db.close()
    files = {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((store / "indexes").rglob("*")) if p.is_file()}
    return rows, files


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    docs = root / "docs"
    docs.mkdir()
    for i, t in enumerate(["Cats purr when content.", "The stock market fell sharply.", "Sourdough rises slowly."]):
        (docs / f"d{i}.txt").write_text(t)
    assert main(["index", str(docs), "--store", str(root / "s"), "--index", "bm25", "--chunk-tokens", "16",
                 "--overlap", "2"]) == 0
    return root / "s"


tokens = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["-k", "0", "-1", "5", "99999999999999999999", "--retriever", "bm25", "hybrid", "dense", "nope", "--mode", "local",
     "--rerank-depth", "--chunk-tokens", "--overlap", "--store", "--debug", "--generate", "--gen-mode", "blend", "",
     " ", "\x00", "--", "-", "--index", "graph", "kv", "d0.txt", "NaN", "1e9", "\ud800"])
commands = st.tuples(st.sampled_from(["query", "delete", "info", "index", "eval", "nosuch", "demo"]),
                     st.lists(tokens, max_size=6))


def test_cli_never_crashes_and_rejected_commands_change_nothing(fuzz_store, tmp_path, capsys):
    before = _fingerprint(fuzz_store)

    @fuzz(280)
    @given(commands)
    def prop(cmd):
        _count("cli")
        command, rest = cmd
        if command == "demo" or "--generate" in rest or "--debug" in rest:
            rest = [t for t in rest if t not in ("--generate", "--debug")]
            command = "query" if command == "demo" else command
        if command == "index":  # a path that holds nothing to add: any outcome must leave the store as it was
            rest = [str(tmp_path / "missing")] + rest
        if command == "delete":
            rest = [t for t in rest if t != "d0.txt"]
        if command == "eval":
            rest = ["beir", "--data", str(tmp_path / "nodata")] + rest
        argv = [command, *rest, "--store", str(fuzz_store)]
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)
        assert code in (0, 2), (argv, code, err)
        assert _fingerprint(fuzz_store) == before, argv

    prop()
    assert COUNTS["cli"] >= 280


def test_any_query_returns_chunks_of_the_store(fuzz_store):
    from blockrag.collection import Collection

    c = Collection(fuzz_store, progress=False)
    ids = set(c.store.chunk_ids())
    bm25 = c.retriever("bm25")
    hybrid = c.retriever("hybrid")

    @fuzz(250)
    @given(st.text(max_size=200), st.integers(1, 50))
    def prop(query, k):
        _count("query")
        for r in (bm25, hybrid):
            hits = r.retrieve(query, k)
            assert len(hits) <= k and {h.chunk_id for h in hits} <= ids

    prop()
    assert COUNTS["query"] >= 250


def test_fuzz_case_total():
    # runs last in this module: the total the report quotes
    total = sum(COUNTS.values())
    print(f"fuzz cases: {COUNTS} total {total}")
    if len(COUNTS) == 5:
        assert total >= 1000
