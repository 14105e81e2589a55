"""Pointwise LLM reranker: each (query, passage) pair is judged alone; score = log P(yes) - log P(no).

Prompt (chat template of the generator; plain text for models without one)::

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n
    Query: {query}\\nPassage: {passage, truncated to doc_tokens}\\n
    Is the passage relevant to the query? Answer yes or no.<|im_end|>\\n<|im_start|>assistant\\n

The next-token log-probabilities of " yes"/"yes"/"Yes" (summed in probability) and the same for "no"
give the score. Pairs are batched with right padding; the logits are read at each row's last token.
This is the baseline BlockRank is compared against (same model, one forward per passage).

``model_name`` may be a fine-tuned reranker folder (:mod:`rerankers.finetune`): its base model with its LoRA
adapter merged (a private copy, never the generator's), and its ``fuse_weight`` applied to the scores.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from blockrag.models import LazyGenerator

from blockrag.retrievers.base import Hit

from .base import rank_items

SYSTEM = "You are a careful search engine that judges whether a passage is relevant to a query."


class PointwiseReranker(LazyGenerator):
    name = "pointwise"

    def __init__(self, model_name: str | None = None, doc_tokens: int = 160, query_tokens: int = 128,
                 batch_size: int = 8, model=None, tokenizer=None):
        from .finetune import folder_settings

        self.model_name = model_name
        self._model, self._tokenizer = model, tokenizer
        self.fuse_weight = None
        self._folder, settings = folder_settings(model_name, self.name)
        if self._folder is not None:           # a fine-tuned folder brings its own weights and settings
            self._model = self._tokenizer = None
            doc_tokens = settings.get("doc_tokens", doc_tokens)
            self.fuse_weight = settings.get("fuse_weight")
        self.doc_tokens, self.query_tokens, self.batch_size = doc_tokens, query_tokens, batch_size
        self._answer_ids = None
        self._chat = None

    def _load(self):
        if self._model is None and self._folder is not None:
            from .finetune import load_folder

            self._model, self._tokenizer = load_folder(self._folder)
        return super()._load()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _answers(self) -> tuple[list[int], list[int]]:
        if self._answer_ids is None:
            def firsts(words):
                return sorted({self._ids(w)[0] for w in words})
            self._answer_ids = (firsts(["yes", " yes", "Yes", " Yes"]), firsts(["no", " no", "No", " No"]))
        return self._answer_ids

    def prompt_ids(self, query: str, passage: str) -> list[int]:
        if self._chat is None:                  # get_vocab() builds a 49k-entry dict: ask once
            self._chat = "<|im_start|>" in self.tokenizer.get_vocab()
        chat = self._chat
        head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n" if chat else f"{SYSTEM}\n"
        tail = ("\nIs the passage relevant to the query? Answer yes or no."
                + ("<|im_end|>\n<|im_start|>assistant\n" if chat else "\nAnswer:"))
        return (self._ids(head) + self._ids("Query: ") + self._ids(query)[:self.query_tokens]
                + self._ids("\nPassage: ") + self._ids(passage)[:self.doc_tokens] + self._ids(tail))

    def logodds(self, prompts: Sequence[Sequence[int]]):
        """log P(yes) - log P(no) per prompt (a tensor, differentiable: the fine-tuning loss uses it)."""
        import torch

        from blockrag.attention_kv.model import ModelAdapter

        model, tok = self._load()
        ad = ModelAdapter.of(model)
        dev = ad.device
        yes, no = self._answers()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = []
        for b0 in range(0, len(prompts), self.batch_size):
            batch = prompts[b0:b0 + self.batch_size]
            width = max(len(p) for p in batch)
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            for j, p in enumerate(batch):
                x[j, :len(p)] = torch.tensor(p)
            # right padding + causal attention (the seam's default): real tokens never see the pads
            ad.check_length(width)
            hidden = ad.hidden_states(x.to(dev), torch.arange(width, device=dev))
            last = torch.tensor([len(p) - 1 for p in batch], device=dev)
            logits = ad.logits(hidden[torch.arange(len(batch), device=dev), last][:, None])[:, 0].float()
            logp = torch.log_softmax(logits, -1)
            out.append(torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1))
        return torch.cat(out)

    def score(self, query: str, doc_texts: Sequence[str]) -> np.ndarray:
        import torch

        if not doc_texts:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            return self.logodds([self.prompt_ids(query, d) for d in doc_texts]).cpu().numpy().astype(np.float32)

    def rerank(self, query: str, items: Sequence, k: int | None = None,
               texts: Mapping[str, str] | Callable[[str], str] | None = None) -> list[Hit]:
        from .finetune import fuse

        return rank_items(lambda q, docs, ids: fuse(self.score(q, docs), self.fuse_weight), query, items, k, texts)
