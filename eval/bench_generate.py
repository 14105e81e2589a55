"""End-to-end `Generator.generate` on a GPU: defaults (CUDA graphs, GPU tier) vs plain, every mode, same answers.

Measures what a user of the SDK sees: time to first token and decode tokens/s of `generate()` for
``turbo``, ``blend`` and ``full`` over a ~4K-token context of 12 passages, with the Generator's CUDA graphs
(one decode-step graph, one question graph per question length, captured after an answer) and its GPU
tier of chunk caches (defaults), and without either (eager steps, caches copied from pinned host memory).
The first call of each Generator builds the passages' KV caches and captures the graphs; the table
reports it separately and the median of the later calls. Greedy answers of the two Generators are
compared token by token.

  PYTHONPATH=. python -m blockrag.eval.bench_generate                       # SmolLM2-135M (installed package)
  PYTHONPATH=. python -m blockrag.eval.bench_generate --model DIR --random-weights   # config + tokenizer only

``--random-weights`` builds the model from ``DIR``'s config with random weights (speed does not depend on
the weights; the answers are then meaningless but must still agree).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def build(model_name: str | None, random_weights: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from blockrag.models import load_generator, resolve_generator

    if not random_weights:
        return load_generator(model_name, dtype=torch.bfloat16, device="cuda")
    path = resolve_generator(model_name) if model_name is None else model_name
    cfg = AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()
    return model, AutoTokenizer.from_pretrained(path)


def passages(tok, n: int, seed: int = 0):
    from blockrag.documents import Chunk

    rng = random.Random(seed)
    words = ("river port chemist mayor elected company industries born headquartered works valley north "
             "archive treaty harbour council").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(200, 380))) for _ in range(n)]
    return [Chunk(id=f"c{i}", doc_id="d", position=i, text=t, token_ids=tok(t, add_special_tokens=False)["input_ids"])
            for i, t in enumerate(texts)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local path / hub id (default: the bundled SmolLM2)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--passages", type=int, default=12)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true",
                    help="also a Generator with compile_decode=True and compile_question=True")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_generate needs a CUDA GPU", file=sys.stderr)
        return 2
    from blockrag.attention_kv import Generator, KVCacheStore

    model, tok = build(args.model, args.random_weights)
    chunks = passages(tok, args.passages)
    store = KVCacheStore(Path(tempfile.mkdtemp()) / "kv", model, tok, dtype=torch.bfloat16)
    gens = {"graphs": Generator(model=model, tokenizer=tok, store=store, cuda_graphs=True),
            "eager": Generator(model=model, tokenizer=tok, store=store, cuda_graphs=False, device_cache_bytes=0)}
    if args.compile:
        gens["graphs+compile"] = Generator(model=model, tokenizer=tok, store=store, cuda_graphs=True,
                                           compile_decode=True, compile_question=True)
    question = "Which company does the chemist born in the river port work for, and who is the mayor there?"
    rows, answers = [], {}
    for mode in ("turbo", "blend", "full"):
        for name, g in gens.items():
            rs = [g.generate(question, chunks, mode=mode, max_new_tokens=args.max_new_tokens)
                  for _ in range(args.calls)]
            later = rs[2:] if len(rs) > 2 else rs[1:]
            answers[(mode, name)] = rs[-1].token_ids
            row = dict(mode=mode, generator=name, context=rs[-1].n_context_tokens, question=rs[-1].n_question_tokens,
                       first_ttft_ms=rs[0].ttft_ms, first_capture_ms=rs[0].timings.get("graph_capture_ms", 0.0),
                       ttft_ms=statistics.median(r.ttft_ms for r in later),
                       decode_tok_s=statistics.median(r.decode_tokens_per_s for r in later),
                       question_graph=rs[-1].timings.get("question_graph", False),
                       decode_graph=rs[-1].timings.get("decode_graph", False))
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    agree = {}
    for mode in ("turbo", "blend", "full"):
        a, b = answers[(mode, "graphs")], answers[(mode, "eager")]
        agree[mode] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if (mode, "graphs+compile") in answers:
            c = answers[(mode, "graphs+compile")]
            agree[mode + " (compiled vs eager)"] = next((i for i, (x, y) in enumerate(zip(c, b)) if x != y),
                                                        min(len(c), len(b)))
    res = dict(device=torch.cuda.get_device_name(), model=args.model or "SmolLM2-135M-Instruct",
               random_weights=args.random_weights, rows=rows, tokens_agree=agree, max_new_tokens=args.max_new_tokens)
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)
    print(f"\n{res['device']}, {res['model']}{' (random weights)' if args.random_weights else ''}; "
          f"median of calls 3..{args.calls}")
    print("| mode | Generator | context | TTFT ms | decode tok/s | first call TTFT ms | graph capture ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['generator']} | {r['context']} | {r['ttft_ms']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['first_ttft_ms']:.0f} | {r['first_capture_ms']:.0f} |")
    print("greedy tokens equal (graphs vs eager), first k of", args.max_new_tokens, ":", agree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
