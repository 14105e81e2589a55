"""Full-weight Block-Attention fine-tune on synthetic data and its held-out evaluation (a benchmark command).

    python -m blockrag.eval.bench_finetune --train-seeds 10,11,12 --steps 300 --lr 3e-5 --threads 1 \\
        --out runs/block-ft --eval-seed 1 --eval-questions 30

Training runs :func:`blockrag.attention_kv.finetune.finetune_block_attention`; the evaluation reports the
gold-answer mean log-likelihood per token for ``full`` and ``turbo`` (eval/bench_kv_quality.py's measure)
with the base and the fine-tuned model, on a held-out synthetic seed. The LoRA adapter path users take is
``blockrag finetune`` (attention_kv/lora.py).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from blockrag.attention_kv.finetune import (EVAL_SEEDS, finetune_block_attention, save, synthetic_examples,
                                            to_chunks)


@torch.no_grad()
def evaluate(model, tokenizer, seed: int, n_questions: int, n_passages: int = 6,
             modes: Sequence[str] = ("full", "turbo")) -> dict:
    """Gold-answer mean log-likelihood per token per mode (eval/bench_kv_quality.py's measure)."""
    from blockrag.eval.bench_kv_quality import answer_loglik, load_questions

    from blockrag.attention_kv.cache_store import KVCacheStore
    from blockrag.attention_kv.generate import Generator

    root = tempfile.mkdtemp(prefix="ft-eval-")
    gen = Generator(model=model, tokenizer=tokenizer,
                    store=KVCacheStore(f"{root}/fp32", model, tokenizer, dtype=torch.float32))
    data = load_questions(seed, n_questions, n_passages)
    qsets = [(q, a, to_chunks(docs, tokenizer)) for q, a, docs, _ in data]
    seen, allc = set(), []
    for _, _, cs in qsets:
        for c in cs:
            if c.id not in seen:
                seen.add(c.id)
                allc.append(c)
    gen.store.add(allc, progress=False)
    per = {m: [] for m in modes}
    for q, a, cs in qsets:
        ans_ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        for m in modes:
            per[m].append(answer_loglik(gen, q, cs, m, ans_ids))
    return {"per_question": per, "mean": {m: sum(v) / len(v) for m, v in per.items()},
            "revision": gen.store.identity["revision"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base generator (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--train-seeds", default="10,11,12")
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--block-prob", type=float, default=0.5)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="save the fine-tuned model here (runs/...)")
    ap.add_argument("--skip-train", action="store_true", help="evaluate an already saved --out")
    ap.add_argument("--eval-seed", type=int, default=None)
    ap.add_argument("--eval-questions", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None, help="write history + evaluation here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from blockrag.models import load_generator

    from blockrag.attention_kv.cache_store import KVCacheStore

    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_train:
        if args.out is None:
            ap.error("--out is required for training")
        model, tok = load_generator(args.model, dtype=torch.float32, device="cpu")
        fmt = KVCacheStore(tempfile.mkdtemp(prefix="ft-fmt-"), model, tok, dtype=torch.float32)
        seeds = [int(s) for s in args.train_seeds.split(",") if s]
        examples = synthetic_examples(fmt, tok, seeds, args.passages)
        lens = [len(e.input_ids) for e in examples]
        print(f"{len(examples)} training examples (seeds {seeds}), {sum(lens) / len(lens):.0f} tokens on average",
              flush=True)
        hist = finetune_block_attention(model, tok, examples, steps=args.steps, lr=args.lr,
                                        block_prob=args.block_prob, warmup=args.warmup, accum=args.accum,
                                        max_grad_norm=args.max_grad_norm, seed=args.seed,
                                        time_budget_s=args.time_budget)
        save(model, tok, args.out)
        k = max(1, min(20, len(hist["loss"]) // 4))
        print(f"{hist['steps_done']} steps, {hist['s_per_step']:.2f} s/step, train loss first {k}: "
              f"{sum(hist['loss'][:k]) / k:.3f}, last {k}: {sum(hist['loss'][-k:]) / k:.3f}; "
              f"revision {hist['base_revision']} -> {hist['revision']}; saved to {args.out}", flush=True)
        result["train"] = {**hist, "n_examples": len(examples), "mean_tokens": sum(lens) / len(lens)}
        del model
    if args.eval_seed is not None:
        if args.eval_seed not in EVAL_SEEDS:
            print(f"warning: eval seed {args.eval_seed} is not one of the held-out seeds {EVAL_SEEDS}")
        ev = {}
        for name, path in (("base", args.model), ("tuned", str(args.out))):
            model, tok = load_generator(path, dtype=torch.float32, device="cpu")
            t = time.perf_counter()
            ev[name] = evaluate(model, tok, args.eval_seed, args.eval_questions, args.passages)
            print(f"{name}: {ev[name]['mean']} ({time.perf_counter() - t:.0f}s, revision {ev[name]['revision']})",
                  flush=True)
            del model
        gap = {n: ev[n]["mean"]["full"] - ev[n]["mean"]["turbo"] for n in ev}
        result["eval"] = {"seed": args.eval_seed, "questions": args.eval_questions, "passages": args.passages,
                          **ev, "gap_before": gap["base"], "gap_after": gap["tuned"]}
        print()
        print(f"gold-answer mean log-likelihood per token, seed {args.eval_seed} (held out), "
              f"{args.eval_questions} questions, {args.passages} passages")
        print("| model | full | turbo | gap (full - turbo) |")
        print("|---|---|---|---|")
        for n in ev:
            print(f"| {n} | {ev[n]['mean']['full']:.3f} | {ev[n]['mean']['turbo']:.3f} | {gap[n]:.3f} |")
        print(f"gap before {gap['base']:.3f} -> after {gap['tuned']:.3f} nats/token")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
