"""The ``blockrag`` command line: index, query, delete, info, eval, demo."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import registry

DEFAULT_STORE = ".blockrag/store"


def _collection(args, create: bool = False):
    from .collection import Collection

    store = Path(args.store)
    if not create and not (store / "store.sqlite").exists():
        raise FileNotFoundError(f"no store at {store}; create one with `blockrag index PATH --store {store}`")
    # chunk settings only when given: they must then match an existing store's (Collection refuses others)
    given = {k: getattr(args, k) for k in ("chunk_tokens", "overlap") if getattr(args, k, None) is not None}
    return Collection(store, tokenizer_name=getattr(args, "tokenizer", None), **given)


def cmd_index(args) -> int:
    from .documents import LoadError, LoadReport, load_path

    if getattr(args, "ray", None) is not None:
        from .distributed import RayNotInstalled, require_ray

        try:
            require_ray()  # before anything is loaded or created
        except RayNotInstalled as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    collection = _collection(args, create=True)
    report = LoadReport()
    try:
        docs = list(load_path(args.path, report))
    except (LoadError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"loaded {report.summary()}")
    for kind in args.index:
        refused = getattr(collection.indexes.get(kind), "reason", None)
        if refused:  # an index that cannot be opened (other model, corrupt files): rebuilt from the store
            print(f"note: rebuilding index {kind}: {refused}")
        if kind not in collection.indexes or refused:
            params = {"kv_policy": args.kv_policy, "adapter": args.adapter} if kind == "kv" else {}
            collection.build_index(kind, **params)  # empty now; filled by add_documents below
    start = time.perf_counter()
    # the chunker (a tokenizer load, seconds) only when a document is new or changed: a no-op re-index skips it
    if getattr(args, "ray", None) is not None:  # chunk + encode on a Ray cluster, commit here as below
        from .distributed import ray_index

        ingest = ray_index(collection, docs, address=args.ray or None, workers=args.ray_workers,
                           shard_docs=args.ray_shard_docs)
    else:
        ingest = collection.add_documents(docs, chunks_for=lambda doc: collection.chunker.iter_split(doc))
    print(f"{ingest.summary()} in {time.perf_counter() - start:.1f}s")
    for note in ingest.notes:
        print(f"note: {note}")
    print(f"store {args.store}: {collection.store.count_documents()} documents, "
          f"{collection.store.count_chunks()} chunks, indexes: {', '.join(sorted(collection.indexes))}")
    return 0


def _retriever_name(args) -> str:
    """``--mode MODE`` (graph RAG) wins over ``--retriever``; both are registry names."""
    return registry.graph_mode_name(args.mode) if getattr(args, "mode", None) else args.retriever


def _pipeline(args, collection, generate: bool):
    """The one query path for ``query``: retriever, reranker (sharing the generator's LLM) and generator."""
    from .pipeline import Pipeline, collection_generator

    retriever = registry.retriever(collection, _retriever_name(args))  # a bad name fails before any model loads
    lora = {"adapter": args.adapter} if getattr(args, "adapter", None) else {}  # else: the kv index's own
    generator = collection_generator(collection, args.generator, **lora) if generate else None
    opts = {}
    if args.rerank and registry.reranker_spec(args.rerank).llm and generator is None and args.generator:
        opts["model_name"] = args.generator
    if args.rerank and getattr(args, "rerank_model", None):  # its own weights: never the generator's copy
        opts.update(model_name=args.rerank_model, model=None, tokenizer=None)
    return Pipeline(collection, retriever, k=args.k, reranker=args.rerank or None,
                    rerank_depth=args.rerank_depth, generator=generator, mode=args.gen_mode, reranker_opts=opts)


def _hit_line(passage) -> str:
    text = " ".join(passage.text.split())[:160]
    return f"{passage.rank:>2}. {passage.score:8.4f}  [{passage.doc_id} #{passage.chunk_id}] {text}"


def cmd_query(args) -> int:
    collection = _collection(args)
    if collection.store.count_chunks() == 0:
        print("the store is empty: nothing to retrieve (index some documents first)")
        return 0
    try:
        pipe = _pipeline(args, collection, args.generate)
    except registry.RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    retrieval = pipe.retrieve(args.question)  # once: printed now, then answered from
    via = pipe.retriever_name + (f" + {args.rerank}" if args.rerank else "")
    print(f"{len(retrieval.passages)} results in {retrieval.total_ms:.1f} ms ({via})")
    for passage in retrieval.passages:
        print(_hit_line(passage))
    if args.generate:
        answer = pipe.ask(args.question, stream=lambda t: print(t, end="", flush=True), retrieval=retrieval)
        print()
        print(_timing_line(answer.timings))
    return 0


def _timing_line(timings: dict) -> str:
    return "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in timings.items())


def cmd_delete(args) -> int:
    collection = _collection(args)
    removed = collection.delete_documents(args.doc_ids)
    print(f"removed {removed} chunks from {len(args.doc_ids)} requested documents")
    return 0


def cmd_info(args) -> int:
    collection = _collection(args)
    store = collection.store
    print(f"store {args.store}: {store.count_documents()} documents, {store.count_chunks()} chunks, "
          f"generation {collection.generation}, chunking {collection.chunking}")
    for m in store.manifests():
        print(f"  index {m['name']}: kind={m['kind']} model={m['model']} dim={m['dimension']} "
              f"format={m['format_version']} applied={m['params'].get('generation')}")
        refused = getattr(collection.indexes.get(m["name"]), "reason", None)
        if refused:
            print(f"    UNUSABLE: {refused}")
    return 0


def cmd_eval(args) -> int:
    from blockrag.eval.evaluate import format_table, run_beir

    rerank = [r.strip() for r in (args.rerank or "").split(",") if r.strip()]
    for name in rerank:
        registry.reranker_spec(name)  # an unknown name fails before any index is built
    results = run_beir(args.data, args.split, args.retriever, store_dir=args.store, report_path=args.report,
                       max_queries=args.max_queries, rerank=rerank, rerank_depth=args.rerank_depth,
                       reranker_opts={"model_name": args.rerank_model} if args.rerank_model else None)
    print(format_table(results))
    if args.report:
        print(f"report written to {args.report}")
    return 0


def cmd_eval_qa(args) -> int:
    """Retrieve -> generate in each mode -> score against gold answers (see blockrag.eval.qa)."""
    from blockrag.eval.qa import format_qa_table, run_qa

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    report = run_qa(args.data, modes, retriever=args.retriever, k=args.k, limit=args.limit, seed=args.seed,
                    store_dir=args.store, generator_name=args.generator, adapter=args.adapter,
                    chunk_tokens=args.chunk_tokens, max_new_tokens=args.max_new_tokens,
                    threads=args.threads, report_path=args.report,
                    records_path=args.records, command=" ".join(["blockrag"] + sys.argv[1:]))
    print(format_qa_table(report))
    for path in (args.report, args.records):
        if path:
            print(f"written to {path}")
    return 0


def cmd_finetune(args) -> int:
    """Train a block-attention LoRA adapter (see blockrag.attention_kv.lora)."""
    import torch

    from blockrag.attention_kv.lora import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.synthetic_seeds.split(",") if s.strip()]
    hist = finetune(args.out, args.data or [], generator=args.generator, steps=args.steps, lr=args.lr,
                    rank=args.rank, block_prob=args.block_prob, synthetic_seeds=seeds, synthetic=args.synthetic,
                    n_distractors=args.distractors, distractor_tokens=args.distractor_tokens,
                    max_tokens=args.max_tokens, seed=args.seed, time_budget_s=args.time_budget,
                    command=" ".join(["blockrag"] + sys.argv[1:]))
    i = hist["info"]
    print(f"{i['steps']} steps in {i['wall_s']:.0f} s ({i['s_per_step']:.2f} s/step, CPU time {i['cpu_s']:.0f} s, "
          f"{i['threads']} thread(s)); answer loss {i['loss_first']:.3f} -> {i['loss_last']:.3f}")
    print(f"adapter {args.out}: {i['lora_parameters']:,} LoRA parameters, {i['adapter_bytes'] / 1e6:.2f} MB, "
          f"revision {hist['revision']}")
    return 0


def cmd_demo(args) -> int:
    """Index the bundled demo corpus, then answer its questions with the cited chunks."""
    from .demo_corpus import QUESTIONS, write_demo_corpus
    from .collection import Collection
    from .documents import load_folder
    from .pipeline import Pipeline, collection_generator

    root = Path(args.workdir)
    corpus = write_demo_corpus(root / "corpus")
    collection = Collection(root / "store", chunk_tokens=128, overlap=16)
    kinds = ("bm25", "dense") if args.no_generate else ("bm25", "dense", "kv")
    for kind in kinds:
        old = collection.indexes.get(kind)
        stale = kind == "kv" and hasattr(old, "matches") and not old.matches(args.generator, args.adapter)
        if kind not in collection.indexes or stale or getattr(old, "reason", None):
            params = {"model_name": args.generator, "adapter": args.adapter} if kind == "kv" else {}
            collection.build_index(kind, **params)
    print(collection.add_documents(load_folder(corpus)).summary())
    generator = None if args.no_generate else collection_generator(collection)
    pipe = Pipeline(collection, "hybrid", k=3, generator=generator, mode=args.mode)
    pipe.retrieve("warm-up")  # load the embedder now, not in the middle of the first answer
    for question in QUESTIONS:
        print(f"\nQ: {question}")
        print("A: ", end="", flush=True)
        answer = pipe.ask(question, stream=(lambda t: print(t, end="", flush=True)) if generator else None)
        if answer.text is None:
            print("(no generator)", end="")
        print()
        print(f"   {_timing_line(answer.timings)}")
        if generator is not None and args.mode != "full" and not args.no_compare:
            # the same passages through a plain full prefill: what the cache saves, and what it costs
            full = generator.generate(question, answer.chunks, mode="full", max_new_tokens=pipe.max_new_tokens)
            print(f"   full prefill: {full.answer.strip()}")
            print(f"   ttft_ms={full.ttft_ms:.1f} (full) vs {answer.timings['ttft_ms']:.1f} ({args.mode})")
        for hit in answer.hits:
            print(f"   [{hit.doc_id}] {' '.join(hit.text.split())[:110]}")
    return 0


def cmd_serve(args) -> int:
    """An OpenAI-compatible HTTP API and a web UI over the store (see blockrag.server)."""
    from .server import run

    return run(args)


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="blockrag", description="RAG with precomputed per-passage KV caches")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--version", action="version", version=f"blockrag {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("index", help="add a folder of .txt/.md, a .jsonl file or a BEIR folder to a store")
    s.add_argument("path")
    s.add_argument("--store", default=DEFAULT_STORE)
    s.add_argument("--index", action="append", choices=registry.index_kinds(),
                   help="indexes to keep (repeatable; default bm25 + dense; kv = passage KV caches)")
    s.add_argument("--chunk-tokens", type=_positive_int, default=None,
                   help="tokens per chunk for a new store (default 256; an existing store keeps its own)")
    s.add_argument("--overlap", type=_count, default=None, help="tokens shared by neighbouring chunks (default 32)")
    s.add_argument("--tokenizer", default=None, help="generator whose tokenizer chunks the text")
    s.add_argument("--kv-policy", choices=["precompute", "on-demand"], default="precompute",
                   help="a new kv index: encode every chunk's KV now (precompute) or the first time a "
                        "question needs it (on-demand)")
    s.add_argument("--adapter", default="default",
                   help="a new kv index: the LoRA adapter whose KV is cached (default: the bundled block-attention "
                        "adapter for the bundled generator, as the demo and eval qa use; 'none': the plain model)")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="chunk and encode on a Ray cluster (ADDRESS, else RAY_ADDRESS or a new local one); "
                        "needs the ray extra")
    s.add_argument("--ray-workers", type=_positive_int, default=None,
                   help="encoder actors on Ray (default: one per GPU, else 1)")
    s.add_argument("--ray-shard-docs", type=_positive_int, default=64,
                   help="documents per Ray shard (the unit of work, of staging and of resuming)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("query", help="retrieve (and optionally answer) a question")
    s.add_argument("question")
    s.add_argument("--store", default=DEFAULT_STORE)
    s.add_argument("--retriever", default="hybrid",
                   help=f"{', '.join(registry.retriever_names())} or an index name of the store")
    s.add_argument("--mode", choices=registry.GRAPH_MODES, help="graph RAG mode (needs a graph index)")
    s.add_argument("-k", type=_positive_int, default=5)
    s.add_argument("--rerank", choices=registry.reranker_names(), help="rerank the retrieved candidates")
    s.add_argument("--rerank-depth", type=_positive_int, default=50, help="candidates passed to the reranker")
    s.add_argument("--rerank-model", default=None, metavar="PATH",
                   help="the reranker's model: a fine-tuned reranker folder "
                        "(python -m blockrag.eval.bench_rerank_ft) or a generator (default: the generator's)")
    s.add_argument("--generate", action="store_true", help="answer with the cached generator")
    s.add_argument("--gen-mode", default="turbo", choices=["full", "turbo", "block", "blend"])
    s.add_argument("--generator", default=None)
    s.add_argument("--adapter", default=None,
                   help="LoRA adapter folder for --generate ('default': the bundled one; 'none': the plain model; "
                        "default: the one the kv index was built with)")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("delete", help="delete documents by id")
    s.add_argument("doc_ids", nargs="+")
    s.add_argument("--store", default=DEFAULT_STORE)
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("info", help="describe a store and its indexes")
    s.add_argument("--store", default=DEFAULT_STORE)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="evaluate retrieval")
    esub = s.add_subparsers(dest="suite", required=True)
    b = esub.add_parser("beir", help="a BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/)")
    b.add_argument("--data", required=True)
    b.add_argument("--split", default="test")
    b.add_argument("--retriever", default="bm25", choices=registry.retriever_names() + ["all"],
                   help="a retriever name, or all (bm25, dense, hybrid)")
    b.add_argument("--store", default=None, help="keep the built store here (default: a temp dir)")
    b.add_argument("--report", default=None, help="write a JSON report here")
    b.add_argument("--max-queries", type=_positive_int, default=None)
    b.add_argument("--rerank", default=None,
                   help=f"reranker(s), comma-separated ({', '.join(registry.reranker_names())}): reported beside each "
                        "first-stage row")
    b.add_argument("--rerank-depth", type=_positive_int, default=20, help="first-stage candidates reranked")
    b.add_argument("--rerank-model", default=None, metavar="PATH",
                   help="the reranker's model: a fine-tuned reranker folder "
                        "(python -m blockrag.eval.bench_rerank_ft) or a generator (default: SmolLM2-135M)")
    b.set_defaults(func=cmd_eval)
    q = esub.add_parser("qa", help="answer quality: SQuAD/XQuAD JSON or JSONL (question, answers, context(s))")
    q.add_argument("--data", required=True)
    q.add_argument("--modes", default="full,turbo,blend", help="comma-separated generation modes ('' = retrieval only)")
    q.add_argument("--retriever", default="hybrid", help=f"{', '.join(registry.retriever_names())}")
    q.add_argument("-k", type=_positive_int, default=5)
    q.add_argument("--limit", type=_positive_int, default=None, help="N questions in a fixed seeded order")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--store", default=None, help="build (or reuse) the store here (default: a temp dir)")
    q.add_argument("--generator", default=None)
    q.add_argument("--adapter", default="default",
                   help="block-attention LoRA adapter folder (blockrag finetune); default: the bundled one for the "
                        "bundled generator; 'none': the plain model")
    q.add_argument("--chunk-tokens", type=_positive_int, default=None,
                   help="split contexts into chunks of this many tokens (default: one chunk per context)")
    q.add_argument("--max-new-tokens", type=_positive_int, default=32)
    q.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    q.add_argument("--report", default=None, help="write a JSON report here")
    q.add_argument("--records", default=None, help="write one JSON line per question here")
    q.set_defaults(func=cmd_eval_qa)

    s = sub.add_parser("finetune", help="train a block-attention LoRA adapter (lossless turbo answers)")
    s.add_argument("--data", action="append", help="SQuAD-format QA file to train on (repeatable)")
    s.add_argument("--out", required=True, help="adapter folder to write")
    s.add_argument("--generator", default=None, help="base generator (default: the bundled SmolLM2-135M)")
    s.add_argument("--steps", type=_positive_int, default=200)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (q/k/v/o projections)")
    s.add_argument("--block-prob", type=float, default=0.5, help="share of steps with the block mask")
    s.add_argument("--synthetic", type=_count, default=300, help="synthetic-generator examples added")
    s.add_argument("--synthetic-seeds", default="10,11", help="synthetic worlds (not the eval seeds 0-2)")
    s.add_argument("--distractors", type=_count, default=2, help="other passages beside the gold one")
    s.add_argument("--distractor-tokens", type=_positive_int, default=80, help="distractors cut to this length")
    s.add_argument("--max-tokens", type=_positive_int, default=512, help="longer examples are dropped")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    s.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("demo", help="index a bundled corpus and answer questions about it")
    s.add_argument("--workdir", default=".blockrag/demo")
    s.add_argument("--mode", default="turbo", choices=["full", "turbo", "block", "blend"])
    s.add_argument("--generator", default=None)
    s.add_argument("--adapter", default="default",
                   help="block-attention LoRA adapter folder; default: the bundled one for the bundled generator; "
                        "'none': the plain model")
    s.add_argument("--no-generate", action="store_true")
    s.add_argument("--no-compare", action="store_true", help="skip the full-prefill answer shown beside each one")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="serve a store: OpenAI-compatible HTTP API, streaming, web UI at /")
    from .server.config import add_arguments as add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)
    return p


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other user error."""

    def error(self, message):
        self.exit(2, _printable(f"{self.prog}: error: {message} (see {self.prog} --help)") + "\n")


def _printable(text: str) -> str:
    """Arguments that were not valid UTF-8 arrive as lone surrogates: shown escaped, never a crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, refused in one line otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _validate(args) -> None:
    """Checks argparse cannot express; raise ValueError (one line, exit 2)."""
    question = getattr(args, "question", None)
    if args.command == "query" and (not isinstance(question, str) or not question.strip()):
        raise ValueError("the question is empty")
    if args.command == "query" and len(question) > 100_000:
        raise ValueError(f"the question is {len(question)} characters long; at most 100000 are accepted")
    ct, ov = getattr(args, "chunk_tokens", None), getattr(args, "overlap", None)
    if ct is not None and ov is not None and ov >= ct:
        raise ValueError(f"--overlap ({ov}) must be smaller than --chunk-tokens ({ct})")
    if args.command == "delete" and any(not d for d in args.doc_ids):
        raise ValueError("a document id is empty")


def _user_error(err: BaseException) -> tuple[int, str]:
    """(exit code, one line): 2 for bad input, a busy or incompatible store; 1 for anything unexpected."""
    import sqlite3

    from .lock import StoreBusy
    from .store import IndexMismatch

    text = err.args[0] if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str) else str(err)
    text = " ".join(text.split())[:600] or type(err).__name__
    user = (ValueError, LookupError, OSError, IndexMismatch, StoreBusy, sqlite3.DatabaseError)
    try:
        from .models import ModelNotAvailable

        user += (ModelNotAvailable,)
    except ImportError:
        pass
    kv = sys.modules.get("blockrag.attention_kv.cache_store")  # loaded if a KV cache was opened (no torch import)
    if kv is not None:
        user += (kv.KVCacheMismatch,)  # caches of another model or adapter: the message says what to do
    if isinstance(err, user):
        return 2, text
    return 1, f"internal error ({type(err).__name__}): {text} (run with --debug for the traceback)"


def main(argv=None) -> int:
    """The ``blockrag`` command: user errors print one line and exit 2 (``--debug`` shows tracebacks)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "index", None) is None and args.command == "index":
        args.index = ["bm25", "dense"]
    try:
        _validate(args)
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted; the store keeps its last committed state", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
        if getattr(args, "debug", False):
            raise
        code, message = _user_error(err)
        print(_printable(f"error: {message}"), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
