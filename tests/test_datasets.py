"""blockrag.datasets: the product's QA data (read by blockrag finetune), and the rule that product code never
imports the benchmarks (eval/)."""
import ast
from pathlib import Path

import pytest

from blockrag import datasets

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml's package-dir)
PRODUCT = {"rag": "blockrag", "attention_kv": "blockrag.attention_kv", "retrievers": "blockrag.retrievers",
           "graph": "blockrag.graph", "rerankers": "blockrag.rerankers"}
# `blockrag eval ...` is a CLI command: the CLI is the one entry point allowed to load the benchmark code
ALLOWED = {"rag/cli.py"}


def _imported_modules(path: Path, package: str):
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # `from blockrag import eval`
                yield node.lineno, f"{base}.{alias.name}"


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    sub = list(rel.parts[1:-1])
    return ".".join([PRODUCT[rel.parts[0]]] + sub)


def test_product_code_never_imports_eval():
    bad = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            for line, mod in _imported_modules(path, _package_of(path)):
                if mod == "blockrag.eval" or mod.startswith("blockrag.eval.") or mod.split(".")[0] == "eval":
                    bad.append(f"{rel}:{line}: {mod}")
    assert not bad, "product code imports benchmark code:\n" + "\n".join(bad)


def test_import_check_resolves_relative_imports(tmp_path):
    # the check above must see `from ..eval import x` in a subpackage, not only absolute names
    f = tmp_path / "m.py"
    f.write_text("from ..eval.qa import load_qa\nfrom . import lora\n")
    mods = {m for _, m in _imported_modules(f, "blockrag.attention_kv")}
    assert "blockrag.eval.qa" in mods and "blockrag.attention_kv.lora" in mods


def test_eval_modules_reexport_the_product_readers():
    from blockrag.eval import bench_blockrank, bench_kv_quality, qa, synthetic

    assert qa.load_qa is datasets.load_qa and qa.QAExample is datasets.QAExample
    assert synthetic.make_multihop is datasets.make_multihop and synthetic.SyntheticSet is datasets.SyntheticSet
    assert bench_kv_quality.load_questions is datasets.multihop_questions
    assert bench_blockrank.load_scifact is datasets.load_beir_split


def test_multihop_questions_hold_their_gold_passages():
    a = datasets.multihop_questions(11, 5, 6)
    assert a == datasets.multihop_questions(11, 5, 6)  # seeded
    assert a != datasets.multihop_questions(12, 5, 6)
    world = datasets.make_multihop(seed=11)
    by_text = {q.text: q for q in world.questions}
    for text, answer, docs, hops in a:
        q = by_text[text]
        ids = [d.id for d in docs]
        assert answer == q.answer and hops == q.hops
        assert len(ids) == 6 == len(set(ids)) and set(q.gold_doc_ids) <= set(ids)


def test_load_beir_split(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "one"}\n'
                                           '{"_id": 2, "text": "two"}\n', encoding="utf-8")
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "first?"}\n'
                                            '{"_id": "q2", "text": "unjudged?"}\n', encoding="utf-8")
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\t0\n")
    corpus, queries, qrels = datasets.load_beir_split(str(tmp_path), "train")
    assert corpus == {"d1": "T\none", "2": "\ntwo"}
    assert queries == {"q1": "first?"}  # only the judged queries
    assert qrels == {"q1": {"d1": 1, "2": 0}}  # the header line is skipped
    with pytest.raises(FileNotFoundError):
        datasets.load_beir_split(tmp_path, "test")
