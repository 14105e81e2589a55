"""Answer quality of the cached modes with the real SmolLM2-135M-Instruct on the synthetic multi-hop set.

Per question: its gold passages plus distractors (``--passages`` in total, shuffled deterministically),
each mode side by side:
  (a) mean per-token log-likelihood of the gold answer, teacher-forced after the question;
  (b) agreement of the greedy answer with the ``full`` mode's greedy answer (exact, normalised);
  (c) token-F1 of the greedy answer against the gold answer.
``gap recovered`` = (LL(mode) - LL(turbo)) / (LL(full) - LL(turbo)): the share of the turbo->full
log-likelihood gap a mode closes (goal for blend: >= 0.8). The gap is a small mean of large per-question
differences of both signs, so this ratio is noisy at 30 questions: ``gap 90% CI`` is a bootstrap over
questions. ``KL rec.`` = 1 - KL(full || mode) / KL(full || turbo), the per-token KL divergence of the
teacher-forced answer distributions from the ``full`` ones (a much less noisy measure of closeness to full).
Blend modes score the context with the question rows only (``n_score``), not with the appended answer.

  PYTHONPATH=. python -m blockrag.eval.bench_kv_quality --questions 30 --out quality.json

Several seeds in one run (``--seed 1-7`` or ``--seed 1,2,3``) print one table per seed and a pooled row:
the same formulas over all questions of all seeds (gap recovered = ratio of the mean LL differences,
bootstrap over the pooled questions). Per-question records (LL, KL, agreement, F1, ...) are saved in
``examples``, so ``--pool a.json b.json`` re-pools saved results without running the model.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import string
import sys
import tempfile
import time
from collections import Counter

import torch

# the product's sampler (blockrag finetune trains on it): [(question, answer, passages, hops)]
from blockrag.datasets import multihop_questions as load_questions


def normalize(s: str) -> list[str]:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return s.split()


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred), normalize(gold)
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    n = sum(common.values())
    if n == 0:
        return 0.0
    prec, rec = n / len(p), n / len(g)
    return 2 * prec * rec / (prec + rec)


@torch.no_grad()
def answer_logprobs(gen, question, chunks, mode, answer_ids, **kw) -> tuple[float, torch.Tensor]:
    """(mean log-likelihood of the teacher-forced answer, log-probs [n_answer, V] at its positions)."""
    opts = gen.blend_opts
    if mode == "blend":  # the answer tokens must not take part in choosing what to recompute
        gen.blend_opts = {**opts, "n_score": len(gen.store.question_ids(question))}
    try:
        logits, info = gen.prefill(question, chunks, mode, extra_ids=answer_ids, **kw)
    finally:
        gen.blend_opts = opts
    n = len(answer_ids)
    lp = torch.log_softmax(logits[-n - 1:-1].float(), dim=-1)
    return lp.gather(1, torch.tensor(answer_ids, device=lp.device)[:, None]).mean().item(), lp


def answer_loglik(gen, question, chunks, mode, answer_ids, **kw) -> float:
    return answer_logprobs(gen, question, chunks, mode, answer_ids, **kw)[0]


def kl_div(lp_ref: torch.Tensor, lp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || other), log-prob inputs [n, V]."""
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()


def bootstrap_gap(ll_mode, ll_turbo, ll_full, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of the gap-recovered ratio over questions resampled with replacement."""
    rng = random.Random(seed)
    n, out = len(ll_mode), []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        t = sum(ll_turbo[i] for i in idx)
        g = sum(ll_full[i] for i in idx) - t
        if g != 0:
            out.append((sum(ll_mode[i] for i in idx) - t) / g)
    out.sort()
    if not out:
        return float("nan"), float("nan")
    return out[int(0.05 * (len(out) - 1))], out[int(0.95 * (len(out) - 1))]


METRICS = ("ll", "agree", "f1", "ttft", "recomputed", "kl")


def summarize(per: dict) -> dict:
    """{mode: {metric: [per question]}} -> {mode: {metric: mean, gap_recovered, gap_ci90, kl_recovered}}."""
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    summary = {m: {k: mean(v) for k, v in d.items()} for m, d in per.items()}
    if "full" in summary and "turbo" in summary:
        gap = summary["full"]["ll"] - summary["turbo"]["ll"]
        kl_t = summary["turbo"]["kl"]
        for m in summary:
            summary[m]["gap_recovered"] = (summary[m]["ll"] - summary["turbo"]["ll"]) / gap if gap else float("nan")
            summary[m]["gap_ci90"] = bootstrap_gap(per[m]["ll"], per["turbo"]["ll"], per["full"]["ll"])
            summary[m]["kl_recovered"] = 1 - summary[m]["kl"] / kl_t if kl_t else float("nan")
    return summary


def per_question(examples: list[dict], modes) -> dict:
    """Per-question records of saved ``examples`` -> {mode: {metric: [..]}} (missing metrics: NaN)."""
    nan = float("nan")
    return {m: {k: [float(ex[m].get(k, nan)) for ex in examples] for k in METRICS} for m in modes}


def pool_runs(runs: list[dict]) -> dict:
    """Pooled summary over the questions of several single-seed results (the modes all of them have)."""
    modes = [m for m in runs[0]["summary"] if all(m in r["summary"] for r in runs)]
    examples = [ex for r in runs for ex in r["examples"]]
    return {"seeds": [r["seed"] for r in runs], "questions": len(examples),
            "summary": summarize(per_question(examples, modes))}


def parse_seeds(spec: str) -> list[int]:
    """'1-7' / '1,2,5' / '0' -> list of seeds."""
    seeds = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return seeds


def load_runs(paths) -> list[dict]:
    """Single-seed results from saved JSONs (one result, or {"runs": {name: result}})."""
    out = []
    for p in paths:
        d = json.load(open(p))
        out += list(d["runs"].values()) if "runs" in d else [d]
    return out


def print_table(summary: dict, title: str) -> None:
    print()
    print(title)
    print("| mode | gold-answer LL/token | gap recovered | gap 90% CI | KL to full | KL rec. | agree w/ full "
          "| token-F1 | recomputed | TTFT ms (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for m, s in summary.items():
        lo, hi = s.get("gap_ci90", (nan, nan))
        print(f"| {m} | {s['ll']:.3f} | {s.get('gap_recovered', nan):.2f} | {lo:.2f}..{hi:.2f} | {s['kl']:.3f} | "
              f"{s.get('kl_recovered', nan):.2f} | {s['agree']:.2f} | {s['f1']:.3f} | {s['recomputed']:.2f} | "
              f"{s['ttft']:.0f} |")


def run_seed(gen, gen8, tok, seed: int, args, root: str) -> dict:
    """One seed: index its passages, run every mode on every question; the single-seed result dict."""
    from blockrag.attention_kv import KVCacheStore
    from blockrag.documents import Chunk

    modes = args.modes.split(",")
    # the synthetic worlds of different seeds reuse passage ids: one store folder per seed
    gen.store = KVCacheStore(f"{root}/seed{seed}/fp32", gen.model, tok, dtype=torch.float32)
    if gen8 is not None:
        gen8.store = KVCacheStore(f"{root}/seed{seed}/int8", gen8.model, tok, quant="int8")
    data = load_questions(seed, args.questions, args.passages)
    # index every passage once (the KV store's job at indexing time)
    seen, chunks_all = set(), []
    qsets = []
    for qtext, ans, docs, hops in data:
        cs = []
        for d in docs:
            c = Chunk(id=d.id, doc_id=d.id, position=0, text=d.full_text,
                      token_ids=tok(d.full_text, add_special_tokens=False)["input_ids"])
            cs.append(c)
            if c.id not in seen:
                seen.add(c.id)
                chunks_all.append(c)
        qsets.append((qtext, ans, cs, hops))
    t = time.time()
    gen.store.add(chunks_all, progress=True)
    if gen8 is not None:
        gen8.store.add(chunks_all, progress=True)
    print(f"seed {seed}: {len(data)} questions, {len(chunks_all)} passages encoded in {time.time() - t:.1f}s",
          flush=True)

    def run(mode, qtext, cs, ans_ids, greedy=True):
        g, m, kw = gen, mode, {}
        if mode.startswith("blend"):
            m = "blend"
            kw = {"blend_ratio": float(mode[5:] or 15) / 100}
        if mode == "turbo_int8":
            g, m = gen8, "turbo"
        ll, lp = answer_logprobs(g, qtext, cs, m, ans_ids, **kw)
        res = g.generate(qtext, cs, mode=m, max_new_tokens=args.max_new_tokens, **kw) if greedy else None
        return ll, lp, res

    examples = []
    for i, (qtext, ans, cs, hops) in enumerate(qsets):
        ans_ids = tok(ans, add_special_tokens=False)["input_ids"]
        full_answer = full_lp = None
        row = {"question": qtext, "gold": ans, "hops": hops}
        for m in modes:
            ll, lp, res = run(m, qtext, cs, ans_ids)
            if m == "full":
                full_answer, full_lp = res.answer, lp
            row[m] = {"answer": res.answer, "ll": ll,
                      "kl": kl_div(full_lp, lp) if full_lp is not None else float("nan"),
                      "agree": float(normalize(res.answer) == normalize(full_answer or "")),
                      "f1": token_f1(res.answer, ans), "ttft": res.ttft_ms,
                      "recomputed": res.n_recomputed / max(1, res.n_context_tokens)}
        examples.append(row)
        print(f"[seed {seed} {i + 1}/{len(qsets)}] {qtext} gold={ans!r} " +
              " ".join(f"{m}={row[m]['answer']!r}({row[m]['ll']:.2f})" for m in modes), flush=True)

    summary = summarize(per_question(examples, modes))
    return {"model": f"{args.model or 'SmolLM2-135M-Instruct'} (fp32, CPU)", "questions": len(qsets),
            "passages": args.passages, "seed": seed, "blend_opts": gen.blend_opts, "summary": summary,
            "examples": examples}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--passages", type=int, default=6, help="passages per question (5-10)")
    ap.add_argument("--seed", default="0", help="seed, or several pooled: '1-7' or '1,2,3'")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--modes", default="full,turbo,blend,blend30,turbo_int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="KV store folder (default: a temporary one)")
    ap.add_argument("--blend-opts", default=None,
                    help='JSON overriding Generator.blend_opts, e.g. \'{"gradual": 1.0}\' (the pre-gradual CacheBlend)')
    ap.add_argument("--model", default=None, help="generator path / id (default: the bundled SmolLM2), e.g. a "
                    "block-attention fine-tune from blockrag.attention_kv.finetune")
    ap.add_argument("--pool", nargs="+", default=None, metavar="JSON",
                    help="no model run: pool the per-question records of saved results and print the pooled table")
    ap.add_argument("--note", default=None, help="free text stored in the --out JSON (several seeds)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.pool:
        pooled = pool_runs(load_runs(args.pool))
        print_table(pooled["summary"], f"pooled over seeds {pooled['seeds']}: {pooled['questions']} questions")
        if args.out:
            json.dump(pooled, open(args.out, "w"), indent=1)
        return pooled

    torch.set_num_threads(args.threads)
    from blockrag.attention_kv import Generator, KVCacheStore
    from blockrag.models import load_generator

    model, tok = load_generator(args.model, dtype=torch.float32, device="cpu")
    root = args.cache_dir or tempfile.mkdtemp(prefix="kvq-")
    gen = Generator(model=model, tokenizer=tok, store=KVCacheStore(f"{root}/fp32", model, tok, dtype=torch.float32))
    if args.blend_opts:
        gen.blend_opts = {**gen.blend_opts, **json.loads(args.blend_opts)}
    gen8 = None
    if "turbo_int8" in args.modes.split(","):
        gen8 = Generator(model=model, tokenizer=tok, store=KVCacheStore(f"{root}/int8", model, tok, quant="int8"))
    seeds = parse_seeds(args.seed)
    command = "PYTHONPATH=. python -m blockrag.eval.bench_kv_quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs, t0 = [], time.time()

    def title(r):
        return (f"{r['model']}, {r['questions']} synthetic multi-hop questions, {r['passages']} passages each "
                f"(seed {r['seed']}); blend options {r['blend_opts']}")

    result = None
    for seed in seeds:
        runs.append(run_seed(gen, gen8, tok, seed, args, root))
        print_table(runs[-1]["summary"], title(runs[-1]))
        if len(seeds) == 1:
            result = runs[0]
        else:
            result = {"command": command, "note": args.note, "seeds": seeds, "questions_per_seed": args.questions,
                      "passages": args.passages, "max_new_tokens": args.max_new_tokens,
                      "blend_opts": gen.blend_opts, "wall_s": time.time() - t0,
                      "runs": {f"seed{r['seed']}": r for r in runs}}
            if len(runs) > 1:
                result["pooled"] = pool_runs(runs)
        if args.out:  # after every seed: a long run that stops keeps what it has
            json.dump(result, open(args.out, "w"), indent=1)
    if len(runs) > 1:
        p = result["pooled"]
        print_table(p["summary"], f"pooled over seeds {p['seeds']}: {p['questions']} questions")
    print(f"\n{len(runs)} seed(s) in {time.time() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
