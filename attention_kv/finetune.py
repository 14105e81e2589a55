"""Block-Attention fine-tuning of the generator (Sun et al., "Block-Attention for Efficient RAG", 2024).

Goal: answering with passages encoded independently (``turbo``/``block`` modes: each passage sees only the
shared prefix and itself, the question and the answer see everything, positions contiguous) should match
ordinary full attention. Each training step is ONE full forward over
``prefix + passages + question + answer`` (token ids built exactly as at inference: the KV store's
``prefix_ids``, per-chunk ``chunk_token_ids``, ``question_ids``; answer = gold answer tokens + end of turn)
at contiguous positions through the model seam (``ModelAdapter.forward``), with the block mask
(:func:`attention_kv.masks.visibility` of the block ids, probability ``block_prob``) or the plain causal mask (the paper's mixed training, so full attention is kept);
loss = cross-entropy on the answer tokens only. AdamW, linear warm-up then linear decay, grad clipping.

    python -m blockrag.eval.bench_finetune --train-seeds 10,11,12 --steps 300 --lr 3e-5 --threads 1 \\
        --out runs/block-ft --eval-seed 1 --eval-questions 30     # full-weight fine-tune + its evaluation

The saved config carries a ``blockrag_finetune`` field (hash of the trained weights, base revision, training
options); :func:`attention_kv.cache_store.config_revision` hashes the folder (or the config) together with a
sample of the weights in memory, so KV caches built with the base model (or another fine-tune) are refused
(:class:`~attention_kv.cache_store.KVCacheMismatch`) instead of being reused.
The evaluation (``eval/bench_finetune.py --eval-seed``, held out: training seeds must differ) reports the
gold-answer mean log-likelihood per token for ``full`` and ``turbo`` with the base and the fine-tuned model.
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from blockrag.datasets import load_qa, multihop_questions

from .masks import block_ids, block_mask_4d, visibility

EVAL_SEEDS = (0, 1, 2)


@dataclass
class Example:
    """One training sequence: ``prefix + blocks + question + answer`` (token ids as at inference)."""

    prefix_ids: list[int]
    blocks: list[list[int]]
    question_ids: list[int]
    answer_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return list(self.prefix_ids) + [t for b in self.blocks for t in b] + list(self.question_ids) + list(self.answer_ids)

    def block_ids(self) -> torch.Tensor:
        """0 = prefix, 1..N = passages, -1 = question + answer (sees everything before it)."""
        return block_ids(len(self.prefix_ids), [len(b) for b in self.blocks],
                         len(self.question_ids) + len(self.answer_ids))

    def labels(self) -> torch.Tensor:
        """-100 everywhere except the answer tokens (the targets, not shifted)."""
        ids = self.input_ids
        lab = torch.full((len(ids),), -100, dtype=torch.long)
        A = len(self.answer_ids)
        lab[len(ids) - A:] = torch.tensor(self.answer_ids, dtype=torch.long)
        return lab


def end_of_turn_id(tokenizer) -> int | None:
    t = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id:
        return t
    return tokenizer.eos_token_id


def make_example(fmt, tokenizer, question: str, answer: str, chunks: Sequence) -> Example:
    """``fmt``: a :class:`~attention_kv.cache_store.KVCacheStore` (or anything with ``prefix_ids``,
    ``chunk_token_ids(chunk)``, ``question_ids(q)``), so that the sequence is the one seen at inference."""
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        ans = ans + [eot]
    return Example(list(fmt.prefix_ids), [list(fmt.chunk_token_ids(c)) for c in chunks],
                   list(fmt.question_ids(question)), ans)


def to_chunks(docs, tokenizer) -> list:
    """``Document`` -> ``Chunk`` with stored token ids (one chunk per document)."""
    from blockrag.documents import Chunk

    return [Chunk(id=d.id, doc_id=d.id, position=0, text=d.full_text,
                  token_ids=tokenizer(d.full_text, add_special_tokens=False)["input_ids"]) for d in docs]


def synthetic_examples(fmt, tokenizer, seeds: Sequence[int], n_passages: int = 6,
                       per_seed: int | None = None) -> list[Example]:
    """Training examples from :func:`blockrag.datasets.multihop_questions` (synthetic multi-hop worlds: gold
    passages + distractors, shuffled)."""
    bad = set(seeds) & set(EVAL_SEEDS)
    if bad:
        raise ValueError(f"training seeds {sorted(bad)} overlap the evaluation seeds {EVAL_SEEDS}")
    out = []
    for seed in seeds:
        for qtext, ans, docs, _hops in multihop_questions(seed, per_seed or 10 ** 6, n_passages):
            out.append(make_example(fmt, tokenizer, qtext, ans, to_chunks(docs, tokenizer)))
    return out


def qa_examples(fmt, tokenizer, path, n_distractors: int = 2, distractor_tokens: int | None = 80,
                seed: int = 0, limit: int | None = None) -> list[Example]:
    """Training examples from a SQuAD-format QA file (read by :func:`blockrag.datasets.load_qa`): the gold
    context plus ``n_distractors`` other contexts of the file (from the same article where it has enough,
    as a retriever would return them), shuffled, each one block, as ``blockrag eval qa`` indexes them (one
    chunk per context, title + text). Distractors are cut to their first ``distractor_tokens`` tokens to keep
    CPU training short; the gold context is kept whole (the answer may be anywhere in it). Answer = the first
    gold answer."""
    ds = load_qa(path)
    docs = {d.id: d for d in ds.documents}
    chunks = {c.id: c for c in to_chunks(ds.documents, tokenizer)}
    rng = random.Random(seed)
    title = {d.id: d.title for d in ds.documents}
    out = []
    for ex in ds.examples[:limit] if limit else ds.examples:
        gold = [g for g in ex.gold_doc_ids if g in docs][:1]
        if not gold:
            continue
        same = [d for d in docs if d not in gold and title[d] == title[gold[0]]]
        other = [d for d in docs if d not in gold and title[d] != title[gold[0]]]
        pick = rng.sample(same, min(n_distractors, len(same)))
        pick += rng.sample(other, n_distractors - len(pick))
        blocks = [chunks[gold[0]]]
        for d in pick:
            c = chunks[d]
            if distractor_tokens is not None and len(c.token_ids) > distractor_tokens:
                c = type(c)(id=c.id, doc_id=c.doc_id, position=0, text=c.text, token_ids=c.token_ids[:distractor_tokens])
            blocks.append(c)
        rng.shuffle(blocks)
        out.append(make_example(fmt, tokenizer, ex.question, ex.answers[0], blocks))
    return out


def training_mask(ex: Example, block: bool, dtype=torch.float32, device=None) -> torch.Tensor:
    """Additive [1, 1, L, L] mask: block attention (``block_mask_4d``) or plain causal."""
    bid = ex.block_ids() if block else torch.zeros(len(ex.input_ids), dtype=torch.int32)
    return block_mask_4d(bid.to(device), dtype)


def example_loss(model, ex: Example, block: bool) -> torch.Tensor:
    """One full seam forward (contiguous positions) with the chosen mask; mean CE over the answer tokens.
    The model's own modules run (peft-wrapped layers included), so gradients reach whatever is trainable."""
    from .model import ModelAdapter, causal_attention

    ad = ModelAdapter.of(model)
    dev = ad.device
    ids = torch.tensor([ex.input_ids], device=dev)
    L, A = ids.shape[1], len(ex.answer_ids)
    ad.check_length(L)
    pos = torch.arange(L, device=dev)
    visible = None
    if block:
        bid = ex.block_ids().to(dev)
        visible = visibility(pos, L, bid, bid)[None, None]

    def attend(layer, q, k, v):
        return causal_attention(q, k, v, ad.scale, visible)

    # logits only where they predict an answer token: rows L-A-1 .. L-2
    logits = ad.forward(ids, pos, attend, logits_rows=A + 1)[0, :A]
    return F.cross_entropy(logits.float(), torch.tensor(ex.answer_ids, device=dev))


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def mark_revision(model, base_revision: str, **info) -> str:
    """Write ``blockrag_finetune`` (weights hash + base revision + options) into the config; returns the hash."""
    wh = weights_hash(model)
    model.config.blockrag_finetune = {"weights_sha256": wh, "base_revision": base_revision, **info}
    # config_revision() hashes the model's folder when ``name_or_path`` exists: the weights in memory no longer
    # match that folder, so point it elsewhere (the config hash, with the marker, is used until saved/reloaded)
    for obj, attr in ((model, "name_or_path"), (model.config, "_name_or_path")):
        name = str(getattr(obj, attr, "") or "")
        if name and Path(name).exists():
            setattr(obj, attr, f"{name}+blockrag_finetune-{wh}")
    return wh


def train_loop(model, examples: Sequence[Example], *, steps: int, lr: float, block_prob: float = 0.5,
               warmup: int | None = None, weight_decay: float = 0.0, max_grad_norm: float = 1.0, accum: int = 1,
               seed: int = 0, progress: bool = True, log_every: int = 10, time_budget_s: float | None = None,
               desc: str = "block-attention fine-tune") -> dict:
    """The Block-Attention training loop over ``model``'s trainable parameters (all weights, or a peft model's
    LoRA weights); returns a history dict (per-step loss, mask kind, grad norm, timing).

    Each optimiser step accumulates ``accum`` examples (one full forward each, :func:`example_loss`), each drawn
    at random with the block mask (probability ``block_prob``) or the plain causal mask. AdamW, linear warm-up
    then linear decay to 10%, gradient clipping. ``time_budget_s``: stop early (after the step that crosses it;
    the schedule still spans ``steps``). ``hist["cpu_s"]`` is the process CPU time the loop used.
    """
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup = max(1, steps // 20) if warmup is None else warmup

    def lr_at(s):  # linear warm-up, then linear decay to 10%
        if s < warmup:
            return (s + 1) / warmup
        return max(0.1, 1 - 0.9 * (s - warmup) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    hist = {"loss": [], "block": [], "grad_norm": [], "s_per_step": None}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, unit="step")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            tot, kinds = 0.0, []
            for _ in range(accum):
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                ex = examples[order.pop()]
                blk = rng.random() < block_prob
                loss = example_loss(model, ex, blk)
                (loss / accum).backward()
                tot += loss.item() / accum
                kinds.append(blk)
            gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            hist["loss"].append(tot)
            hist["block"].append(sum(kinds) / len(kinds))
            hist["grad_norm"].append(float(gn))
            if bar is not None:
                bar.update(1)
                if step % log_every == 0 or step == steps - 1:
                    k = hist["loss"][-log_every:]
                    bar.set_postfix(loss=f"{sum(k) / len(k):.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    done = len(hist["loss"])
    hist["steps_done"] = done
    hist["wall_s"] = time.perf_counter() - t0
    hist["cpu_s"] = time.process_time() - c0
    hist["s_per_step"] = hist["wall_s"] / max(1, done)
    return hist


def finetune_block_attention(model, tokenizer, examples: Sequence[Example], *, steps: int, lr: float,
                             block_prob: float = 0.5, accum: int = 1, **loop) -> dict:
    """Fine-tune every weight of ``model`` in place (:func:`train_loop`); returns the history dict.

    The config gets a ``blockrag_finetune`` marker (see :func:`mark_revision`), so the fine-tuned model's
    KV-cache revision differs from the base's. (A LoRA adapter instead: :mod:`attention_kv.lora`.)
    """
    from .cache_store import config_revision

    base_rev = config_revision(model)
    hist = train_loop(model, examples, steps=steps, lr=lr, block_prob=block_prob, accum=accum, **loop)
    hist["weights_sha256"] = mark_revision(model, base_rev, steps=hist["steps_done"], planned_steps=steps, lr=lr,
                                           block_prob=block_prob, accum=accum, n_examples=len(examples))
    hist["base_revision"] = base_rev
    hist["revision"] = config_revision(model)
    return hist


def save(model, tokenizer, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
