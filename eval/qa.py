"""End-to-end answer quality: retrieve -> generate in several modes -> score against gold answers.

    blockrag eval qa --data ../shared/datasets/squad-xquad/dev.json --modes full,turbo,blend -k 5

``run_qa`` reads a SQuAD / XQuAD JSON file or a JSONL file (:func:`blockrag.datasets.load_qa`), indexes every
context of the file into a store (bm25 + dense + kv, one chunk per context unless ``chunk_tokens`` is set),
retrieves the top ``k`` passages for each question through :class:`blockrag.pipeline.Pipeline`, and generates
an answer in every mode from the *same* passages (modes interleaved per question, so that timings share the
machine's state). Per mode it reports exact match and token F1 (SQuAD normalisation, best over the gold
answers), "the answer contains a gold answer", agreement with ``full`` (identical normalised answers), median
TTFT and decode tokens/s, each with a bootstrap 90% interval over questions; and once, the retrieval recall@k
of the gold context (the same passages feed every mode). ``ratio_to_full`` is mean F1(mode) / mean F1(full)
with a paired bootstrap interval.

Answers are decoded greedily with the same rules in every mode (:data:`QA_STOP`, :data:`QA_REPETITION_GUARD`,
``max_new_tokens``; Generator options), and :func:`extract_answer` takes the first line without an "Answer:"
prefix. The prompt is the generator's (``attention_kv.cache_store.prompt_parts``); the report records it.
"""
from __future__ import annotations

import json
import logging
import platform
import random
import re
import statistics
import string
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

# the reader is the product's (blockrag finetune trains on QA files); re-exported for the tests and scripts
from blockrag.datasets import QADataset, QAExample, load_qa  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_MODES = ("full", "turbo", "blend")
N_BOOTSTRAP = 1000
# Decoding for short answers, the same in every mode (chosen on train.json; see the README): one line, a
# 32-token budget, and a guard that ends a loop of 4 repeated tokens.
QA_STOP = ("\n",)
QA_REPETITION_GUARD = 4
QA_MAX_NEW_TOKENS = 32


# --------------------------------------------------------------------------------------- data
def select(examples: Sequence[QAExample], limit: int | None, seed: int = 0) -> list[QAExample]:
    """``limit`` questions in a fixed seeded order (all of them, in that order, when ``limit`` is None)."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:limit] if limit else order


# ------------------------------------------------------------------------------------ metrics
def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def exact_match(pred: str, golds: Iterable[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in golds))


def token_f1(pred: str, golds: Iterable[str]) -> float:
    """Best SQuAD token F1 over the gold answers."""
    return max((_f1(pred, g) for g in golds), default=0.0)


def contains_gold(pred: str, golds: Iterable[str]) -> float:
    """1 when a normalised gold answer occurs in the normalised prediction on word boundaries."""
    p = f" {normalize_answer(pred)} "
    return float(any(n and f" {n} " in p for n in (normalize_answer(g) for g in golds)))


def bootstrap_ci(values: Sequence[float], level: float = 0.9, n: int = N_BOOTSTRAP, seed: int = 0,
                 stat=statistics.fmean) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the items (resampled with replacement)."""
    vals = list(values)
    if not vals:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    stats = sorted(stat([vals[rng.randrange(len(vals))] for _ in vals]) for _ in range(n))
    lo = stats[int((1 - level) / 2 * (n - 1))]
    hi = stats[int((1 + level) / 2 * (n - 1))]
    return (lo, hi)


def ratio_ci(num: Sequence[float], den: Sequence[float], level: float = 0.9, n: int = N_BOOTSTRAP,
             seed: int = 0) -> tuple[float, float, float]:
    """mean(num) / mean(den) and a paired bootstrap interval (the same questions resampled for both)."""
    pairs = list(zip(num, den))
    if not pairs:
        return (float("nan"),) * 3

    def ratio(ps):
        d = sum(b for _, b in ps)
        return sum(a for a, _ in ps) / d if d else float("nan")

    rng = random.Random(seed)
    stats = sorted(ratio([pairs[rng.randrange(len(pairs))] for _ in pairs]) for _ in range(n))
    stats = [s for s in stats if s == s] or [float("nan")]
    return (ratio(pairs), stats[int((1 - level) / 2 * (len(stats) - 1))],
            stats[int((1 + level) / 2 * (len(stats) - 1))])


# ------------------------------------------------------------------------------------- answers
_PREAMBLE = re.compile(r"^(?:the\s+)?(?:short\s+|correct\s+)?answer\b(?:\s+to\s+(?:this|the|your)\s+question)?"
                       r"(?:\s+is)?\s*[:\-]?\s*", re.I)


def extract_answer(text: str) -> str:
    """The short answer in a generated text, the same for every mode: the first non-empty line (the line
    after it when the first ends with a colon, as in "The answer is:"), without a leading "Answer:" / "The
    answer is" and without trailing punctuation."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return _PREAMBLE.sub("", line).strip().rstrip(" .;,")


# --------------------------------------------------------------------------------------- run
def _open_collection(store_dir: Path, dataset: QADataset, generator_name: str | None,
                     chunk_tokens: int | None, modes: Sequence[str], progress: bool, adapter: str | None = None):
    from blockrag.attention_kv.index import KVIndex
    from blockrag.collection import Collection

    fresh = not (store_dir / "store.sqlite").exists()
    col = Collection(store_dir, tokenizer_name=generator_name, chunk_tokens=chunk_tokens,
                     overlap=0 if chunk_tokens is None else min(32, chunk_tokens // 8), progress=progress)
    kinds = ["bm25", "dense"] + (["kv"] if modes else [])
    kv_params = {"model_name": generator_name, "adapter": adapter}  # a kv index records its adapter
    for kind in kinds:
        old = col.indexes.get(kind)
        stale = kind == "kv" and isinstance(old, KVIndex) and not old.matches(generator_name, adapter)
        if stale:  # built with another generator or adapter: its caches are not this model's
            log.info("rebuilding the kv index of %s for adapter %s", store_dir, adapter or "none")
        if kind not in col.indexes or stale or getattr(old, "reason", None):
            col.build_index(kind, **(kv_params if kind == "kv" else {}))
    rep = col.add_documents(dataset.documents)
    log.info("store %s (%s): %s", store_dir, "new" if fresh else "reused", rep.summary())
    return col


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarize(records: Sequence[dict], modes: Sequence[str], k: int) -> dict:
    """Per-mode means with bootstrap 90% intervals, medians of the timings, ratios to ``full``."""
    out: dict = {"n_questions": len(records)}
    rec = [r["recall"] for r in records]
    out["retrieval"] = {f"recall@{k}": statistics.fmean(rec) if rec else float("nan"),
                        f"recall@{k}_ci90": bootstrap_ci(rec),
                        "retrieve_ms_median": _median([r["retrieve_ms"] for r in records])}
    per_mode = {}
    for mode in modes:
        rows = [r["modes"][mode] for r in records]
        row: dict = {}
        for key in ("em", "f1", "contains") + (("agree_full",) if "full" in modes else ()):
            vals = [x[key] for x in rows]
            row[key] = statistics.fmean(vals) if vals else float("nan")
            row[key + "_ci90"] = bootstrap_ci(vals)
        for key in ("ttft_ms", "tokens_per_s"):
            vals = [x[key] for x in rows]
            row[key + "_median"] = _median(vals)
            row[key + "_median_ci90"] = bootstrap_ci(vals, stat=_median)
        row["answer_tokens_mean"] = statistics.fmean([x["n_tokens"] for x in rows]) if rows else float("nan")
        if "full" in modes and mode != "full":
            r, lo, hi = ratio_ci([x["f1"] for x in rows], [r["modes"]["full"]["f1"] for r in records])
            row["f1_ratio_to_full"], row["f1_ratio_to_full_ci90"] = r, (lo, hi)
        per_mode[mode] = row
    out["modes"] = per_mode
    return out


def run_qa(data_path: str | Path, modes: Sequence[str] = DEFAULT_MODES, retriever: str = "hybrid", k: int = 5,
           limit: int | None = None, seed: int = 0, store_dir: str | Path | None = None,
           generator_name: str | None = None, adapter: str | None = "default", chunk_tokens: int | None = None,
           max_new_tokens: int = QA_MAX_NEW_TOKENS, threads: int | None = None,
           report_path: str | Path | None = None, records_path: str | Path | None = None,
           progress: bool = True, command: str | None = None) -> dict:
    """Evaluate retrieval + generation on a QA file; returns the report dict (see the module docstring).

    ``adapter``: a block-attention LoRA adapter folder (``blockrag finetune``), ``"default"`` (the bundled one
    when the generator is the bundled model; none for other generators) or None / ``"none"`` (the plain
    model). A reused store whose kv index was built with another adapter gets that index rebuilt.
    ``modes`` may be empty (retrieval only). ``store_dir``: build the store there, or reuse the one there
    (the file's contexts are added; unchanged ones are skipped). ``limit``: that many questions in a fixed
    order seeded by ``seed``. ``threads``: torch CPU threads (on a shared or small machine 1 can be several
    times faster than the default). ``records_path`` receives one JSON line per question.
    """
    from tqdm.auto import tqdm

    from blockrag.attention_kv.generate import MODES
    from blockrag.pipeline import Pipeline, collection_generator

    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    from blockrag.attention_kv.lora import adapter_revision, resolve_adapter

    lora = resolve_adapter(adapter, generator_name) if modes else None  # fails now, before any indexing
    adapter = None if lora is None else ("default" if adapter == "default" else str(lora))
    dataset = load_qa(data_path)
    examples = select(dataset.examples, limit, seed)
    if threads:
        import torch

        torch.set_num_threads(threads)
    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="blockrag-qa-")
        store_dir = tmp.name
    t_index = time.perf_counter()
    col = _open_collection(Path(store_dir), dataset, generator_name, chunk_tokens, modes, progress, adapter)
    index_s = time.perf_counter() - t_index
    generator = (collection_generator(col, generator_name, stop=QA_STOP, repetition_guard=QA_REPETITION_GUARD)
                 if modes else None)
    pipe = Pipeline(col, retriever, k=k, generator=generator, mode=modes[0] if modes else "full",
                    max_new_tokens=max_new_tokens)
    prompt = None
    if generator is not None:
        st = generator.store
        prompt = {"prefix": st.prefix_text, "passage_separator": st.tokenizer.decode(st.sep_ids),
                  "question": st.question_template}
    records: list[dict] = []
    try:
        if examples:  # warm-up outside the measurement (embedder, model and first-call loads)
            warm = pipe.retrieve(examples[0].question)
            for mode in modes:
                generator.generate(examples[0].question, warm.chunks, mode=mode, max_new_tokens=2)
        bar = tqdm(examples, desc="eval qa", unit="q", disable=not progress)
        for ex in bar:
            retrieval = pipe.retrieve(ex.question)  # once: every mode answers from the same passages
            docs = list(dict.fromkeys(p.doc_id for p in retrieval.passages))
            gold = set(ex.gold_doc_ids)
            r = {"id": ex.id, "question": ex.question, "answers": ex.answers, "gold_doc_ids": ex.gold_doc_ids,
                 "retrieved_doc_ids": docs, "retrieved_chunk_ids": [p.chunk_id for p in retrieval.passages],
                 "recall": len(gold & set(docs)) / len(gold) if gold else 0.0,
                 "retrieve_ms": retrieval.total_ms, "modes": {}}
            for mode in modes:
                pipe.mode = mode
                res = pipe.ask(ex.question, retrieval=retrieval)
                ans, t = extract_answer(res.text or ""), res.timings
                r["modes"][mode] = {"answer": ans, "raw": res.text, "em": exact_match(ans, ex.answers),
                                    "f1": token_f1(ans, ex.answers), "contains": contains_gold(ans, ex.answers),
                                    "ttft_ms": t["ttft_ms"], "tokens_per_s": t["tokens_per_s"],
                                    "n_tokens": t["answer_tokens"], "n_context_tokens": t["context_tokens"]}
            if "full" in modes:
                ref = normalize_answer(r["modes"]["full"]["answer"])
                for mode in modes:
                    r["modes"][mode]["agree_full"] = float(normalize_answer(r["modes"][mode]["answer"]) == ref)
            records.append(r)
            if records_path is not None:  # as we go: a long run that is stopped keeps what it measured
                _append(Path(records_path), r, first=len(records) == 1)
            if modes:
                n = len(records)
                bar.set_postfix({m: f"{sum(x['modes'][m]['f1'] for x in records) / n:.2f}" for m in modes})
    finally:
        col.close()
        if tmp is not None:
            tmp.cleanup()
    report = {"dataset": str(data_path), "n_questions_in_file": len(dataset.examples),
              "n_contexts": len(dataset.documents), "limit": limit, "seed": seed, "modes": modes,
              "retriever": retriever, "k": k, "generator": generator_name or "default",
              "adapter": None if lora is None else {"spec": adapter, "path": str(lora),
                                                    "revision": adapter_revision(lora)},
              "chunk_tokens": chunk_tokens, "max_new_tokens": max_new_tokens, "stop": list(QA_STOP),
              "repetition_guard": QA_REPETITION_GUARD, "prompt": prompt,
              "threads": threads, "index_s": index_s, "command": command, "machine": platform.platform(),
              "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **summarize(records, modes, k)}
    if report_path is not None:
        _write(Path(report_path), json.dumps(report, indent=2))
    return report


def _append(path: Path, record: dict, first: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if first else "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def format_qa_table(report: dict) -> str:
    """A markdown table, one row per mode (90% bootstrap intervals in brackets), retrieval recall on top."""
    k = report["k"]
    ret = report["retrieval"]
    lines = [f"{report['n_questions']} questions, {report['retriever']} top-{k}: recall@{k} of the gold context "
             f"{ret[f'recall@{k}']:.3f} {_ci(ret[f'recall@{k}_ci90'])}"]
    if not report["modes"]:
        return lines[0]
    agree = "full" in report["modes"]
    head = "| mode | EM | F1 | contains gold |" + (" agrees with full | F1 / full F1 |" if agree else "") + \
           " TTFT ms (median) | tokens/s (median) |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for mode, row in report["modes"].items():
        cells = [mode] + [f"{row[m]:.3f} {_ci(row[m + '_ci90'])}" for m in ("em", "f1", "contains")]
        if agree:
            cells.append(f"{row['agree_full']:.3f}")
            cells.append("1" if mode == "full" else
                         f"{row['f1_ratio_to_full']:.3f} {_ci(row['f1_ratio_to_full_ci90'])}")
        cells += [f"{row['ttft_ms_median']:.1f}", f"{row['tokens_per_s_median']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
