"""Fine-tuned rerankers on SciFact: train on the tune half of train, choose on it, report on the held-back half.

Two steps (the first is the one that needs an accelerator for the full run; both run anywhere):

    # 1. train BlockRank and the pointwise baseline (LoRA adapters) on the tune half, score every candidate of
    #    tune-dev (a seeded quarter of tune, never trained on), held-back and test with every layer / row choice
    python -m blockrag.eval.bench_rerank_ft train --data ../shared/datasets/scifact \\
        --candidates runs/scifact_rerank_cands.json --out runs/rerank_ft
    # 2. choose layer, query rows and fusion weight on tune-dev only; nDCG@10 on held-back and test with paired
    #    bootstrap intervals of the gain over hybrid; write reranker.json into the adapter folders
    python -m blockrag.eval.bench_rerank_ft analyze --data ../shared/datasets/scifact \\
        --candidates runs/scifact_rerank_cands.json --scores runs/rerank_ft --out eval/results/blockrank_ft_scifact.json

Candidates come from :mod:`blockrag.eval.rerank_split` (the product's hybrid top-20). The fine-tuned folders
then load with ``--rerank blockrank --rerank-model FOLDER`` (``blockrag query`` and ``blockrag eval beir``).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

ROW_MODES = ("tail", "last", "all")
SWEEP_LAYERS = tuple(range(5, 30, 2))
LOSS_LAYERS = (9, 13, 17, 21, 25)
FUSE_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


def dev_split(tune, frac: float = 0.25, seed: int = 1):
    """(train, dev) of the tune half: a seeded ``frac`` of it is kept for choosing layer / rows / weight."""
    ids = sorted(tune)
    random.Random(seed).shuffle(ids)
    n = int(round(len(ids) * frac))
    return sorted(ids[n:]), sorted(ids[:n])


# ------------------------------------------------------------------------------------------- scoring
def blockrank_scores(br, queries, corpus, cands, qids, layers=SWEEP_LAYERS, depth: int = 20) -> dict:
    """{"LAYER:ROWS": {qid: [score per candidate, first-stage order]}} from one forward per query."""
    import torch

    from blockrag.rerankers.blockrank import relevance

    out: dict = {}
    top = max(layers)
    for q in qids:
        docs = [d for d, _ in cands[q][:depth]]
        prompt = br.build_prompt(queries[q], [corpus[d] for d in docs])
        Lq = len(prompt.query)
        with torch.inference_mode():
            mass = br.mass_ids(prompt, top, mass_layers=[l for l in layers if l != top], rows=list(range(Lq)))
        sel = {"tail": slice(Lq - prompt.tail, Lq), "last": slice(Lq - 1, Lq), "all": slice(0, Lq)}
        for layer in layers:
            for mode, s in sel.items():
                sc = relevance(mass[layer][:, s], len(docs))
                out.setdefault(f"{layer}:{mode}", {})[q] = [round(float(x), 7) for x in sc]
    return out


def pointwise_scores(pw, queries, corpus, cands, qids, depth: int = 20) -> dict:
    return {q: [round(float(x), 5) for x in pw.score(queries[q], [corpus[d] for d, _ in cands[q][:depth]])]
            for q in qids}


def train_cmd(args) -> None:
    import torch

    from blockrag.eval.bench_blockrank import load_scifact
    from blockrag.models import load_generator
    from blockrag.rerankers.blockrank import BlockRankReranker
    from blockrag.rerankers.finetune import add_lora, examples, save_folder, train
    from blockrag.rerankers.pointwise import PointwiseReranker

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = load_scifact(args.data, "train")
    split = json.loads(args.candidates.read_text())
    cands = {**split["candidates"]["train"], **{f"test:{q}": v for q, v in split["candidates"].get("test", {}).items()}}
    tune_train, tune_dev = dev_split(split["tune"])
    sets = {"tune_dev": tune_dev, "held": split["held"]}
    if "test" in split["candidates"]:                  # BEIR's test qrels, where the folder has them
        _, test_queries, _ = load_scifact(args.data, "test")
        queries = {**queries, **{f"test:{q}": t for q, t in test_queries.items()}}
        sets["test"] = sorted(f"test:{q}" for q in split["candidates"]["test"])
    if args.limit:
        sets = {k: v[:args.limit] for k, v in sets.items()}
        tune_train = tune_train[:args.limit]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False      # fp32 like the CPU path that serves the adapter
    log: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "sets": {
        k: len(v) for k, v in sets.items()}, "tune_train": len(tune_train), "phases": {}}

    def write(name, obj):
        (args.out / name).write_text(json.dumps(obj))

    def phase(name, t0):                    # the log is rewritten after every phase: a run cut short keeps it
        log["phases"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_start:.0f} s] {name}: {log['phases'][name]} s", flush=True)
        write("train_log.json", log)

    data = examples(cands, queries, qrels, tune_train, args.depth, random.Random(args.seed))
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        model, tok = load_generator(args.model, dtype=torch.float32, device=device)
        w = model.model.embed_tokens.weight
        log.setdefault("base_checksum", float(w.double().abs().sum()))
        peft_model = add_lora(model, r=args.rank, alpha=2 * args.rank)
        phase(f"{kind} load", t0)
        t0 = time.perf_counter()
        res = train(kind, peft_model, tok, data, corpus, queries, steps=args.steps, lr=args.lr, layers=LOSS_LAYERS,
                    lam=args.lam, temperature=args.temperature, doc_tokens=args.doc_tokens, seed=args.seed,
                    time_budget=args.train_budget, log_every=50)
        log[f"{kind}_train"] = {"steps": res["steps"], "seconds": round(res["seconds"], 1),
                                "loss_first50": float(np.mean([l[0] for l in res["losses"][:50]])),
                                "loss_last50": float(np.mean([l[0] for l in res["losses"][-50:]]))}
        phase(f"{kind} train", t0)
        settings = {"doc_tokens": args.doc_tokens, "steps": res["steps"], "lr": args.lr, "lora_rank": args.rank,
                    "trained_on": f"{len(data)} queries of the tune half of SciFact train (eval.rerank_split)"}
        if kind == "blockrank":
            settings.update(loss_layers=list(LOSS_LAYERS), lambda_contrastive=args.lam, temperature=args.temperature)
        save_folder(args.out / f"{kind}-ft", peft_model, kind, args.model, **settings)
        t0 = time.perf_counter()
        if kind == "blockrank":
            br = BlockRankReranker(model=peft_model, tokenizer=tok, doc_tokens=args.doc_tokens, attn="sdpa")
            write("scores_blockrank_ft.json", {k: blockrank_scores(br, queries, corpus, cands, v, depth=args.depth)
                                               for k, v in sets.items()})
            phase("blockrank-ft score", t0)
            if time.perf_counter() - t_start < args.deadline:
                t0 = time.perf_counter()
                with peft_model.disable_adapter():         # the same model zero-shot
                    write("scores_blockrank_zs.json", {k: blockrank_scores(br, queries, corpus, cands, v,
                                                                           depth=args.depth) for k, v in sets.items()})
                phase("blockrank zero-shot score", t0)
        else:
            pw = PointwiseReranker(model=peft_model, tokenizer=tok, doc_tokens=args.doc_tokens, batch_size=32)
            write("scores_pointwise_ft.json", {k: pointwise_scores(pw, queries, corpus, cands, v, args.depth)
                                               for k, v in sets.items()})
            phase("pointwise-ft score", t0)
        del peft_model, model
        if device == "cuda":
            torch.cuda.empty_cache()
    log["seconds"] = round(time.perf_counter() - t_start, 1)
    write("train_log.json", log)
    print(json.dumps(log))


# ------------------------------------------------------------------------------------------- analysis
def ndcg10(scores, docs, rels) -> float:
    """nDCG@10 of ``docs`` ordered by ``scores`` (ties: first-stage order), BEIR convention."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:10]
    dcg = sum(rels.get(docs[i], 0) / np.log2(r + 2) for r, i in enumerate(order))
    ideal = sorted((v for v in rels.values() if v > 0), reverse=True)[:10]
    idcg = sum(v / np.log2(r + 2) for r, v in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def per_query(run: dict, cands: dict, qrels: dict, weight=None) -> dict:
    from blockrag.rerankers.finetune import fuse

    return {q: ndcg10(fuse(s, weight), [d for d, _ in cands[q]][:len(s)], qrels.get(q, {})) for q, s in run.items()
            if any(v > 0 for v in qrels.get(q, {}).values())}


def paired_ci(a: dict, b: dict, n: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean of b - a over the shared queries and its percentile bootstrap interval."""
    qs = sorted(set(a) & set(b))
    d = np.array([b[q] - a[q] for q in qs])
    rng = np.random.default_rng(seed)
    boots = np.sort(d[rng.integers(0, len(d), (n, len(d)))].mean(1))
    return float(d.mean()), float(boots[int((1 - level) / 2 * (n - 1))]), float(boots[int((1 + level) / 2 * (n - 1))])


def analyze_cmd(args) -> None:
    from blockrag.eval.bench_blockrank import load_scifact

    split = json.loads(args.candidates.read_text())
    _, _, qrels = load_scifact(args.data, "train")
    cands = {**split["candidates"]["train"], **{f"test:{q}": v for q, v in split["candidates"].get("test", {}).items()}}
    if "test" in split["candidates"]:
        qrels.update({f"test:{q}": v for q, v in load_scifact(args.data, "test")[2].items()})
    log = json.loads((args.scores / "train_log.json").read_text())
    models = {}
    for name in ("blockrank_ft", "blockrank_zs", "pointwise_ft"):
        f = args.scores / f"scores_{name}.json"
        if f.exists():
            models[name] = json.loads(f.read_text())
    some_file = next(iter(models.values()))
    sets = tuple(s for s in ("tune_dev", "held", "test") if s in some_file)
    some = models.get("pointwise_ft") or next(iter(models.values()))
    qids = {s: sorted(next(iter(some[s].values()))) if "pointwise_ft" not in models else sorted(some[s]) for s in sets}
    hybrid = {s: per_query({q: [-i for i in range(len(cands[q][:args.depth]))] for q in qids[s]}, cands, qrels)
              for s in sets}
    mean = lambda d: float(np.mean(list(d.values())))  # noqa: E731
    res: dict = {"split": {"seed": split["seed"], "tune": len(split["tune"]), "held": len(split["held"]),
                           "tune_dev": len(qids["tune_dev"]), "test": len(qids.get("test", [])),
                           "depth": args.depth},
                 "train_log": log, "hybrid": {s: mean(hybrid[s]) for s in sets}, "rerankers": {}}
    for name, sc in models.items():
        configs = {k: {s: sc[s][k] for s in sets} for k in sc["tune_dev"]} if name.startswith("blockrank") else \
            {"score": {s: sc[s] for s in sets}}
        tune = {(k, w): mean(per_query(c["tune_dev"], cands, qrels, w)) for k, c in configs.items()
                for w in FUSE_WEIGHTS}
        pure = max((kw for kw in tune if kw[1] == 1.0), key=tune.get)
        fused = max(tune, key=tune.get)
        out = {}
        for label, (k, w) in (("pure", pure), ("fused", fused)):
            row = {"config": k, "fuse_weight": w, "tune_dev": tune[(k, w)]}
            for s in sets[1:]:
                pq = per_query(configs[k][s], cands, qrels, w)
                gain, lo, hi = paired_ci(hybrid[s], pq)
                row[s] = {"ndcg@10": mean(pq), "gain": gain, "gain_ci95": [lo, hi]}
            out[label] = row
        if name.startswith("blockrank"):
            out["layer_sweep_tune_dev"] = {k: tune[(k, 1.0)] for k in configs}
        res["rerankers"][name] = out
    res["not_measured"] = [m for m, missing in (
        ("pointwise_ft: the train step wrote no pointwise scores", "pointwise_ft" not in models),
        ("test: the dataset folder has no qrels/test.tsv", "test" not in sets)) if missing]
    res["commands"] = [f"python -m blockrag.eval.rerank_split --data DATA --depth {args.depth} --out CANDS",
                       "python -m blockrag.eval.bench_rerank_ft train --data DATA --candidates CANDS --out SCORES "
                       "--train-budget 45 --steps 500",
                       "python -m blockrag.eval.bench_rerank_ft analyze --data DATA --candidates CANDS --scores SCORES "
                       "--out RESULTS"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    for name, kind in (("blockrank_ft", "blockrank"), ("pointwise_ft", "pointwise")):
        folder = args.scores / f"{kind}-ft"
        if name in res["rerankers"] and (folder / "reranker.json").exists():
            settings = json.loads((folder / "reranker.json").read_text())
            best = res["rerankers"][name]["fused"]
            if kind == "blockrank":
                layer, rows = best["config"].split(":")
                settings.update(layer=int(layer), query_rows=rows)
            settings["fuse_weight"] = best["fuse_weight"]
            (folder / "reranker.json").write_text(json.dumps(settings, indent=1))
    print_table(res)


def print_table(res: dict) -> None:
    sp = res["split"]
    cols = [c for c in ("held", "test") if c in res["hybrid"]]
    print(f"\nSciFact, hybrid top-{sp['depth']} reranked; chosen on tune-dev ({sp['tune_dev']} of the {sp['tune']} tune "
          f"queries); held-back: {sp['held']} train queries" + (f"; test: {sp['test']} queries" if "test" in cols else ""))
    print("| ranking | layer:rows, fuse w | " + " | ".join(f"nDCG@10 {c} | gain [95% CI]" for c in cols) + " |")
    print("|---|---|" + "---|---|" * len(cols))
    print("| hybrid | - | " + " | ".join(f"{res['hybrid'][c]:.4f} | -" for c in cols) + " |")
    for name, out in res["rerankers"].items():
        for label in ("pure", "fused"):
            r = out[label]
            cells = [f"{r[c]['ndcg@10']:.4f} | {r[c]['gain']:+.4f} [{r[c]['gain_ci95'][0]:+.4f}, "
                     f"{r[c]['gain_ci95'][1]:+.4f}]" for c in cols]
            print(f"| {name} {label} | {r['config']}, w={r['fuse_weight']} | " + " | ".join(cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("train", "analyze"))
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--candidates", type=Path, required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, required=True, help="train: a folder; analyze: the results JSON")
    ap.add_argument("--scores", type=Path, default=None, help="analyze: the train step's folder")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--doc-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-budget", type=float, default=None, help="seconds per reranker's training")
    ap.add_argument("--deadline", type=float, default=1e9, help="skip the zero-shot scoring after S s")
    ap.add_argument("--limit", type=int, default=None, help="smoke test: N queries per set")
    ap.add_argument("--kinds", default="blockrank,pointwise", help="train: which rerankers (comma-separated)")
    args = ap.parse_args(argv)
    train_cmd(args) if args.step == "train" else analyze_cmd(args)


if __name__ == "__main__":
    main()
