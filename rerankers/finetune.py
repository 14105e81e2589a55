"""Fine-tune an LLM reranker (BlockRank or pointwise) as a LoRA adapter (peft), saved as a *reranker folder*.

    python -m blockrag.rerankers.finetune --kind blockrank --data ../shared/datasets/scifact \\
        --candidates runs/scifact_rerank_cands.json --layers 9,13,17,21,25 --steps 600 --out runs/blockrank-ft
    python -m blockrag.rerankers.finetune --kind pointwise ... --out runs/pointwise-ft
    # candidates: python -m blockrag.eval.rerank_split (hybrid top-20 per train query, tune / held-back halves);
    # only the tune half is trained on

Losses (one query and its first-stage candidates per step; a relevant document the first stage missed
replaces the last candidate, so every step has a positive):

* ``blockrank``: the reranker's own block-sparse forward (same masks, positions and prompt), run through
  every layer for the query block; ``CE(answer) + lambda * InfoNCE(relevance / temperature)``, where the
  answer is the first ``answer_tokens`` tokens of one relevant passage (the prompt has no document ids, so
  the answer quotes the passage) and ``relevance`` is exactly what :class:`BlockRankReranker` ranks by, read
  at each of ``layers`` from the query rows before the answer (averaged over the layers, so that the layer
  can be chosen afterwards; several relevant documents all count as positives).
* ``pointwise``: binary cross-entropy of the yes/no log-odds :class:`PointwiseReranker` ranks by.

A reranker folder holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``) and
``reranker.json`` (``kind``, ``base`` model, and the settings chosen on the tune half: ``layer``,
``query_rows``, ``fuse_weight``, ``doc_tokens``). ``BlockRankReranker(model_name=FOLDER)``,
``PointwiseReranker(model_name=FOLDER)`` and ``--rerank-model FOLDER`` load it (base + adapter, merged).

``fuse_weight`` w < 1 interpolates the reranker's standardised score with the standardised first-stage rank
(the candidates arrive in first-stage order): ``w * z(score) + (1 - w) * z(-rank)``; w = 1 is the pure reranker.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

RERANKER_JSON = "reranker.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------------- folders
BUNDLED = Path(__file__).resolve().parent / "finetuned"   # reranker folders shipped with blockrag, by name


def bundled_names() -> list[str]:
    return sorted(q.parent.name for q in BUNDLED.glob(f"*/{RERANKER_JSON}"))


def reranker_folder(name) -> Path | None:
    """``name`` as a reranker folder (a directory with ``reranker.json``, or the name of a bundled one such as
    ``blockrank-scifact``), else None."""
    if name is None:
        return None
    for p in (Path(str(name)).expanduser(), BUNDLED / str(name)):
        if (p / RERANKER_JSON).is_file():
            return p
    return None


def read_settings(folder) -> dict:
    return json.loads((Path(folder) / RERANKER_JSON).read_text())


def folder_settings(model_name, kind: str) -> tuple[Path | None, dict]:
    """(folder, settings) when ``model_name`` names a fine-tuned reranker folder of ``kind``, else (None, {})."""
    folder = reranker_folder(model_name)
    if folder is None:
        return None, {}
    settings = read_settings(folder)
    if settings.get("kind") != kind:
        raise ValueError(f"{model_name} is a {settings.get('kind')!r} reranker folder, not {kind!r}")
    return folder, settings


@lru_cache(maxsize=4)
def _load_folder(folder: str, dtype_name: str | None, device: str | None):
    import torch

    from blockrag.models import load_generator

    dtype = getattr(torch, dtype_name) if dtype_name else None
    return load_generator(read_settings(folder).get("base"), dtype=dtype, device=device, adapter=folder)


def load_folder(folder, dtype=None, device: str | None = None):
    """(model, tokenizer) of a reranker folder: its base model with the adapter merged, one copy per process."""
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    return _load_folder(str(Path(folder).resolve()), name, device)


def save_folder(folder, peft_model, kind: str, base: str | None, **settings) -> Path:
    """Write the adapter (:func:`blockrag.attention_kv.lora.save_adapter`: fp16, base by name) and
    ``reranker.json``."""
    from blockrag.attention_kv.lora import save_adapter
    from blockrag.models import DEFAULT_GENERATOR

    folder = Path(folder)
    base = base or DEFAULT_GENERATOR
    save_adapter(peft_model, folder, base_name=base)
    (folder / RERANKER_JSON).write_text(json.dumps({"kind": kind, "base": base, **settings}, indent=1))
    return folder


def add_lora(model, r: int = 16, alpha: int = 32, targets: Sequence[str] = LORA_TARGETS, dropout: float = 0.0):
    """A peft LoRA wrapper on the attention projections (the only trainable parameters)."""
    from peft import get_peft_model

    from blockrag.attention_kv.lora import lora_config

    return get_peft_model(model, lora_config(r, alpha, targets, dropout))


# ------------------------------------------------------------------------------------------- fusion
def fuse(scores, weight: float | None) -> np.ndarray:
    """``weight * z(scores) + (1 - weight) * z(-rank)`` (rank = input order, the first stage's); None or 1: scores."""
    s = np.asarray(scores, dtype=np.float64)
    if weight is None or weight >= 1 or len(s) < 2:
        return s

    def z(x):
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else x * 0.0
    return weight * z(s) + (1 - weight) * z(-np.arange(len(s), dtype=np.float64))


# ------------------------------------------------------------------------------------------- losses
def blockrank_loss(br, prompt, answer: list[int], positives: Sequence[int], layers: Sequence[int],
                   lam: float = 1.0, temperature: float = 0.05, rows: str = "tail"):
    """(loss, lm_loss, contrastive_loss) of one BlockRank prompt (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from blockrag.rerankers.blockrank import BlockPrompt

    Lq = len(prompt.query)
    full = BlockPrompt(prompt.instruction, prompt.docs, prompt.query + list(answer), prompt.tail)
    sel = list(range(Lq - prompt.tail, Lq)) if rows == "tail" else list(range(Lq))
    mass, h = br.mass_ids(full, br.n_layers - 1, mass_layers=tuple(layers), rows=sel, return_hidden=True)
    logits = br.adapter.logits(h)[0]                                     # [Lq + A, vocab]
    target = torch.tensor(list(answer), device=logits.device)
    lm = F.cross_entropy(logits[Lq - 1:Lq - 1 + len(answer)].float(), target)
    n = len(prompt.docs)
    pos = torch.zeros(n, dtype=torch.bool, device=logits.device)
    pos[list(positives)] = True
    cons = []
    for layer in layers:
        docs = mass[layer][..., 1:n + 1]
        scores = (docs / docs.sum(-1, keepdim=True).clamp_min(1e-30)).mean(dim=(0, 1))   # == relevance()
        logit = scores / temperature
        cons.append(torch.logsumexp(logit, 0) - torch.logsumexp(logit[pos], 0))      # multi-positive InfoNCE
    con = torch.stack(cons).mean()
    return lm + lam * con, lm.detach(), con.detach()


def pointwise_loss(pw, query: str, doc_texts: Sequence[str], labels: Sequence[int]):
    """(loss, loss): binary cross-entropy of the yes/no log-odds against the labels."""
    import torch
    import torch.nn.functional as F

    logodds = pw.logodds([pw.prompt_ids(query, d) for d in doc_texts])
    y = torch.tensor([float(v > 0) for v in labels], device=logodds.device)
    loss = F.binary_cross_entropy_with_logits(logodds.float(), y)
    return loss, loss.detach()


# ------------------------------------------------------------------------------------------- training
def examples(cands: dict, queries: dict, qrels: dict, qids: Sequence[str], depth: int,
             rng: random.Random) -> list[tuple[str, list[str], list[int]]]:
    """(qid, doc ids, labels) per query: its first-stage top ``depth``; a missed relevant document
    replaces the last candidate."""
    out = []
    for q in qids:
        rel = {d for d, r in qrels.get(q, {}).items() if r > 0}
        docs = [d for d, _ in cands[q][:depth]]
        if not rel or not docs:
            continue
        if not rel & set(docs):
            docs[-1] = rng.choice(sorted(rel))
        out.append((q, docs, [int(d in rel) for d in docs]))
    return out


def train(kind: str, model, tok, data: list[tuple[str, list[str], list[int]]], corpus: dict, queries: dict, *,
          steps: int, lr: float = 2e-4, layers: Sequence[int] = (17,), lam: float = 1.0, temperature: float = 0.05,
          answer_tokens: int = 8, doc_tokens: int = 160, seed: int = 0, time_budget: float | None = None,
          log_every: int = 25, attn: str = "sdpa") -> dict:
    """Train ``model`` (a peft model: only the adapter is trainable) for ``steps`` steps, cycling through ``data``
    in seeded shuffled order. Returns {"losses": [...], "steps": n, "seconds": s}."""
    import torch

    from blockrag.rerankers.blockrank import BlockRankReranker
    from blockrag.rerankers.pointwise import PointwiseReranker

    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    if kind == "blockrank":
        rr = BlockRankReranker(model=model, tokenizer=tok, doc_tokens=doc_tokens, attn=attn)
    elif kind == "pointwise":
        rr = PointwiseReranker(model=model, tokenizer=tok, doc_tokens=doc_tokens, batch_size=32)
    else:
        raise ValueError(f"unknown reranker kind {kind!r}; choose blockrank or pointwise")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (wrap the model with add_lora first)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    order: list = []
    losses, t0, n = [], time.perf_counter(), 0
    for step in range(steps):
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
        if not order:
            order = list(range(len(data)))
            rng.shuffle(order)
        qid, docs, labels = data[order.pop()]
        texts = [corpus[d] for d in docs]
        if kind == "blockrank":
            prompt = rr.build_prompt(queries[qid], texts)
            pos = [i for i, y in enumerate(labels) if y]
            answer = rr._ids(texts[rng.choice(pos)])[:answer_tokens]
            loss, lm, con = blockrank_loss(rr, prompt, answer, pos, layers, lam, temperature)
            parts = (float(lm), float(con))
        else:
            loss, _ = pointwise_loss(rr, queries[qid], texts, labels)
            parts = ()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append((float(loss.detach()),) + parts)
        n += 1
        if log_every and step % log_every == 0:
            print(f"{kind} step {step} loss {float(loss):.4f} {parts} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return {"losses": losses, "steps": n, "seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("blockrank", "pointwise"), required=True)
    ap.add_argument("--data", type=Path, required=True, help="BEIR folder with qrels/train.tsv")
    ap.add_argument("--candidates", type=Path, required=True, help="eval.rerank_split output")
    ap.add_argument("--model", default=None, help="base generator (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", default="9,13,17,21,25", help="blockrank: layers the attention loss reads")
    ap.add_argument("--layer", type=int, default=None, help="blockrank: scoring layer written to reranker.json")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lambda-contrastive", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--doc-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from blockrag.datasets import load_beir_split
    from blockrag.models import load_generator

    corpus, queries, qrels = load_beir_split(args.data, "train")
    split = json.loads(args.candidates.read_text())
    model, tok = load_generator(args.model)
    peft_model = add_lora(model, r=args.rank, alpha=2 * args.rank)
    data = examples(split["candidates"]["train"], queries, qrels, split["tune"], args.depth, random.Random(args.seed))
    layers = tuple(int(x) for x in args.layers.split(","))
    log = train(args.kind, peft_model, tok, data, corpus, queries, steps=args.steps, lr=args.lr, layers=layers,
                lam=args.lambda_contrastive, temperature=args.temperature, doc_tokens=args.doc_tokens, seed=args.seed)
    settings = {"doc_tokens": args.doc_tokens, "steps": log["steps"], "lr": args.lr, "lora_rank": args.rank,
                "trained_on": "tune half of SciFact train (eval.rerank_split)"}
    if args.kind == "blockrank":
        settings.update(layer=args.layer if args.layer is not None else layers[len(layers) // 2],
                        query_rows="tail", loss_layers=list(layers), lambda_contrastive=args.lambda_contrastive,
                        temperature=args.temperature)
    save_folder(args.out, peft_model, args.kind, args.model, **settings)
    print(f"{log['steps']} steps in {log['seconds']:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
