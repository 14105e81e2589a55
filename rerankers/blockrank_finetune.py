"""Fine-tune a generator for BlockRank: LM loss on the answer + contrastive loss on the attention (Gupta et al.).

    python -m rerankers.blockrank_finetune --data ../shared/datasets/scifact \\
        --candidates runs/scifact_cands.json --layer 17 --docs-per-prompt 10 --steps 200 \\
        --lambda-contrastive 0.1 --temperature 0.05 --lr 1e-5 --out runs/blockrank-ft
    # candidates: eval.bench_blockrank --candidates-out (hybrid top-k per train query, hard negatives)

Each step builds one BlockRank prompt: the instruction, ``docs-per-prompt`` documents (one relevant
document from the qrels + hard negatives from the candidates, shuffled), the query block, then the answer
(the relevant passage's first ``answer-tokens`` tokens: the prompt has no document ids, so the answer
quotes the passage). The forward is the reranker's own block-sparse forward (same masks, same positions),
run through every layer for the query block so that the LM loss can be computed.

    loss = CE(answer tokens)  +  lambda * InfoNCE(scores / temperature, positive)

where ``scores`` are the per-document relevance read at ``--layer`` from the query rows before the answer
(exactly what :class:`BlockRankReranker` ranks by). The model is saved with ``save_pretrained`` to
``--out``; pass that folder as ``model_name`` to ``BlockRankReranker``. Not run in the benchmarks (CPU only).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from blockrag.rerankers.blockrank import BlockPrompt, BlockRankReranker


def train_step(br: BlockRankReranker, prompt: BlockPrompt, answer: list[int], positive: int, layer: int,
               lam: float = 0.1, temperature: float = 0.05):
    """One loss evaluation (no optimiser step). Returns (loss, lm_loss, contrastive_loss) tensors."""
    import torch
    import torch.nn.functional as F

    n_layers = br.n_layers
    Lq = len(prompt.query)
    full = BlockPrompt(prompt.instruction, prompt.docs, prompt.query + answer, prompt.tail)
    rows = list(range(Lq - prompt.tail, Lq)) if br.query_rows == "tail" else list(range(Lq))
    mass, h = br.mass_ids(full, n_layers - 1, mass_layers=(layer,), rows=rows, return_hidden=True)
    logits = br.adapter.logits(h)[0]                                # [Lq + A, vocab]
    A = len(answer)
    target = torch.tensor(answer, device=logits.device)
    lm = F.cross_entropy(logits[Lq - 1:Lq - 1 + A].float(), target)
    docs = mass[layer][..., 1:len(prompt.docs) + 1]
    scores = (docs / docs.sum(-1, keepdim=True).clamp_min(1e-30)).mean(dim=(0, 1))   # == relevance()
    con = F.cross_entropy((scores / temperature)[None], torch.tensor([positive], device=scores.device))
    return lm + lam * con, lm.detach(), con.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="BEIR folder with qrels/train.tsv")
    ap.add_argument("--candidates", type=Path, required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--docs-per-prompt", type=int, default=10)
    ap.add_argument("--doc-tokens", type=int, default=160)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lambda-contrastive", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    from blockrag.eval.bench_blockrank import load_scifact
    from blockrag.models import load_generator

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus, queries, qrels = load_scifact(args.data, "train")
    cands = json.loads(args.candidates.read_text())
    model, tok = load_generator(args.model, dtype=torch.float32)
    model.train()
    br = BlockRankReranker(args.model, model=model, tokenizer=tok, layer=args.layer, doc_tokens=args.doc_tokens,
                           attn="sdpa")
    layer = br.layer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    qids = [q for q in queries if q in cands and any(d in corpus for d in qrels[q])]
    t0 = time.perf_counter()
    for step in range(args.steps):
        qid = rng.choice(qids)
        pos = rng.choice([d for d in qrels[qid] if d in corpus and qrels[qid][d] > 0])
        negs = [d for d, _ in cands[qid] if d not in qrels[qid]][:4 * args.docs_per_prompt]
        docs = [pos] + rng.sample(negs, min(len(negs), args.docs_per_prompt - 1))
        rng.shuffle(docs)
        prompt = br.build_prompt(queries[qid], [corpus[d] for d in docs])
        answer = br._ids(corpus[pos])[:args.answer_tokens]
        loss, lm, con = train_step(br, prompt, answer, docs.index(pos), layer, args.lambda_contrastive,
                                   args.temperature)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} lm {lm.item():.4f} contrastive {con.item():.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "blockrank_finetune.json").write_text(json.dumps({**vars(args), "layer": layer}, default=str))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
