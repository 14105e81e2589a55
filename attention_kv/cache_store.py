"""Per-chunk KV cache store (TurboRAG / Block-Attention), on disk as one safetensors file per chunk.

Each chunk is encoded once as ``shared prefix + chunk`` (the prefix is the only attention sink) and its
per-layer K (**un-rotated**, captured before RoPE) and V are kept, layout ``kv[layer, token, 0|1, kv_head, dim]``
(0 = K, 1 = V), bf16 by default or int8 with per-channel scales (``quant="int8"``).

A file's name is a hash of (model revision, tokenizer hash, prefix hash, chunk content hash, dtype/quant),
and the same fields sit in its metadata and in the store's ``manifest.json``: opening a store with another
model, tokenizer or prefix raises :class:`KVCacheMismatch`, and a stale file is never picked up.

Loading memory-maps the file (safetensors), an in-memory LRU tier (pinned host memory when CUDA is there)
keeps hot chunks; host->device copies are done layer by layer by :class:`attention_kv.block_cache.BlockKVCache`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

FORMAT_VERSION = 1
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the passages."
PASSAGE_SEPARATOR = "\n\n"


class KVCacheMismatch(RuntimeError):
    """The cache was built with another model, tokenizer or prefix (or format): it is refused."""


# ----------------------------------------------------------------------------- prompt layout
def prompt_parts(tokenizer, system_prompt: str | None = None, prefix: str | None = None) -> tuple[str, str]:
    """(prefix text, question template) for a chat model; ``{question}`` is filled in at query time.

    The prefix ends inside the user turn, so passages follow it and the question closes the turn.
    """
    system_prompt = system_prompt or DEFAULT_SYSTEM_PROMPT
    if prefix is not None:  # explicit prefix text (may be empty: then each block is its own sink)
        return prefix, "Question: {question}\nAnswer:"
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00QUESTION\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": marker}],
            tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        return head + "Passages:\n\n", "Question: {question}" + tail
    bos = tokenizer.bos_token or ""
    return f"{bos}{system_prompt}\n\nPassages:\n\n", "Question: {question}\nAnswer:"


def _ids_hash(ids: Sequence[int]) -> str:
    return hashlib.sha256(torch.tensor(list(ids), dtype=torch.int32).numpy().tobytes()).hexdigest()[:16]


def config_revision(model) -> str:
    """Revision hash for a model: its folder's files (or, without a local folder, its config), the revision
    of a LoRA adapter merged into it (``config.blockrag_adapter``), plus a sample of the weights in memory
    (:func:`weights_fingerprint`), so a model changed after loading (fine-tuned, merged, edited) never reuses
    caches computed with the original weights."""
    from blockrag.models import model_revision

    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if path and Path(path).exists():
        base = model_revision(path)
    else:
        base = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    lora = getattr(model.config, "blockrag_adapter", None)  # a LoRA adapter merged at load (attention_kv.lora)
    if lora:
        base += f"|lora:{lora['revision']}"
    return hashlib.sha256(f"{base}|{weights_fingerprint(model)}".encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model, per_tensor: int = 64) -> str:
    """Hash of every parameter's name, shape, dtype and ``per_tensor`` evenly spaced values (one host copy
    for the whole model; a training step changes essentially every value of the tensors it touches)."""
    h = hashlib.sha256()
    samples = []
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        k = min(per_tensor, flat.numel())
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(1, k - 1)
        samples.append(flat[idx].float())
    if samples:
        dev = samples[0].device
        h.update(torch.cat([t.to(dev) for t in samples]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- chunk KV
@dataclass
class ChunkKV:
    """One block's cache: token ids and ``kv[L, n, 2, Hkv, D]`` (or int8 ``kv`` + fp32 ``scale``)."""

    token_ids: torch.Tensor  # int32 [n]
    kv: torch.Tensor
    scale: torch.Tensor | None = None  # [L, 1, 2, Hkv, D] for int8

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + (0 if self.scale is None else
                                                           self.scale.numel() * self.scale.element_size())

    def dequant(self, dtype=torch.bfloat16) -> torch.Tensor:
        if self.scale is None:
            return self.kv.to(dtype)
        return (self.kv.float() * self.scale).to(dtype)

    def pin(self) -> "ChunkKV":
        if self.kv.is_pinned():
            return self
        return ChunkKV(self.token_ids, self.kv.pin_memory(),
                       None if self.scale is None else self.scale.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "ChunkKV":
        return ChunkKV(self.token_ids, self.kv.to(device, non_blocking=non_blocking),
                       None if self.scale is None else self.scale.to(device, non_blocking=non_blocking))


def quantize_int8(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per (layer, K/V, head, channel) over the chunk's tokens."""
    x = kv.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


# ----------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_blocks(model, prefix_ids: Sequence[int], blocks: Sequence[Sequence[int]], batch_size: int = 8,
                  progress: bool | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``prefix + block`` for every block; return (prefix kv, [block kv]) as ``[L, n, 2, Hkv, D]`` fp32.

    One seam forward per batch with plain causal attention; each layer's K is taken before RoPE (exact:
    the forward hands the keys un-rotated and the attention rotates them in fp32, as the kernel does at
    generation time) and V as projected.
    """
    from .model import ModelAdapter
    from .masks import attend_reference

    ad = ModelAdapter.of(model)
    device = ad.device
    P = len(prefix_ids)
    pad = ad.lm.config.pad_token_id if ad.lm.config.pad_token_id is not None else 0
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i]))  # similar lengths per batch
    out: list[torch.Tensor | None] = [None] * len(blocks)
    prefix_kv = None
    bar = None
    if progress or (progress is None and len(blocks) > 32):
        from tqdm.auto import tqdm
        bar = tqdm(total=len(blocks), desc="encoding KV", unit="chunk")
    try:
        for s in range(0, max(len(order), 1), batch_size):
            idx = order[s:s + batch_size] or []
            seqs = [list(prefix_ids) + list(blocks[i]) for i in idx] or [list(prefix_ids)]
            T = max(len(x) for x in seqs)
            ad.check_length(T)
            ids = torch.tensor([x + [pad] * (T - len(x)) for x in seqs], device=device)
            pos = torch.arange(T, device=device)
            inv = ad.inv_freq
            ks: list[torch.Tensor] = []
            vs: list[torch.Tensor] = []

            def attend(layer, q, k, v):  # k un-rotated: keep it, rotate in the attention
                ks.append(k)
                vs.append(v)
                return attend_reference(q, k, v, q_start=0, inv_freq=inv, k_positions=pos, scale=ad.scale)

            # right padding + causal attention: real tokens never see the padding, no mask needed
            ad.hidden_states(ids, pos, attend, rotate_keys=False)
            kv = torch.stack([torch.stack(ks), torch.stack(vs)], dim=-1)  # [L, B, Hkv, T, D, 2]
            kv = kv.permute(0, 1, 3, 5, 2, 4).float().cpu()  # [L, B, T, 2, Hkv, D]
            if prefix_kv is None:
                prefix_kv = kv[:, 0, :P].contiguous()
            for b, i in enumerate(idx):
                out[i] = kv[:, b, P:P + len(blocks[i])].contiguous()
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return prefix_kv, out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- store
def _atomic_save(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class KVCacheStore:
    """Per-chunk KV caches for one (model, tokenizer, prefix).

    ``KVCacheStore(folder, model, tokenizer, system_prompt=None, dtype=torch.bfloat16, quant=None,
    lru_bytes=1<<30, model_name=None, batch_size=8, prefix=None, kv_policy="precompute", tiers=None)``
    (``prefix`` overrides the chat-template prefix text verbatim); ``add(chunks) -> int`` (chunks newly
    encoded), ``delete(chunk_ids) -> int``, ``get(chunk) -> ChunkKV``, ``prefix_kv() -> ChunkKV``,
    ``chunk_token_ids(chunk)``, ``question_ids(q)``.

    ``kv_policy``: ``"precompute"`` encodes chunks when they are added (indexing time); ``"on-demand"`` only
    records them, and a chunk's KV is computed the first time a question needs it (prefill of that chunk
    alone after the shared prefix — the same computation as at indexing time), stored and served from then
    on. ``tiers``: a :class:`~blockrag.attention_kv.tiers.TierStack` (host RAM -> disk -> remote, shared by
    several processes) that holds the chunk entries instead of this folder's ``chunks/`` and in-memory LRU;
    its entries are content-addressed and shared, so :meth:`delete` forgets the chunk here and leaves the
    entry to the tiers' eviction. The prefix cache stays in the folder.
    """

    def __init__(self, folder: str | Path, model, tokenizer, *, system_prompt: str | None = None,
                 dtype: torch.dtype = torch.bfloat16, quant: str | None = None, lru_bytes: int = 1 << 30,
                 model_name: str | None = None, batch_size: int = 8, prefix: str | None = None,
                 kv_policy: str = "precompute", tiers=None):
        from blockrag.models import tokenizer_hash

        if quant not in (None, "int8"):
            raise ValueError("quant must be None or 'int8'")
        if kv_policy not in ("precompute", "on-demand"):
            raise ValueError(f"kv_policy must be 'precompute' or 'on-demand', not {kv_policy!r}")
        self.kv_policy, self.tiers = kv_policy, tiers
        self.folder = Path(folder)
        (self.folder / "chunks").mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = model, tokenizer
        self.dtype, self.quant, self.batch_size = dtype, quant, batch_size
        self.prefix_text, self.question_template = prompt_parts(tokenizer, system_prompt, prefix)
        self._fast_encode = None  # the tokenizer's backend once it is known to agree (question_ids), else False
        self.prefix_ids = tokenizer(self.prefix_text, add_special_tokens=False)["input_ids"]
        self.sep_ids = tokenizer(PASSAGE_SEPARATOR, add_special_tokens=False)["input_ids"]
        from .model import ModelAdapter

        cfg, dims = model.config, ModelAdapter.of(model)  # an unsupported model is refused here, in one line
        self.identity = {
            "format_version": FORMAT_VERSION,
            "model": model_name or getattr(model, "name_or_path", "") or cfg.model_type,
            "revision": config_revision(model),
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "prefix_hash": _ids_hash(self.prefix_ids),
            "n_layers": dims.n_layers,
            "n_kv_heads": dims.n_kv_heads,
            "head_dim": dims.head_dim,
            "dtype": str(dtype).replace("torch.", ""),
            "quant": quant or "none",
        }
        self._lock = threading.RLock()
        self._check_manifest()
        self._index = self._read_index()
        self._lru: OrderedDict[str, ChunkKV] = OrderedDict()
        self._lru_bytes, self._lru_used = lru_bytes, 0
        self._pin = torch.cuda.is_available()
        self._prefix: ChunkKV | None = None

    # ---------------------------------------------------------------- identity
    def _check_manifest(self) -> None:
        path = self.folder / "manifest.json"
        keys = ("format_version", "revision", "tokenizer_hash", "prefix_hash", "n_layers", "n_kv_heads",
                "head_dim", "dtype", "quant")
        if path.exists():
            old = json.loads(path.read_text())
            bad = [k for k in keys if old.get(k) != self.identity[k]]
            if bad:
                raise KVCacheMismatch(
                    f"KV cache at {self.folder} was built with a different "
                    + ", ".join(f"{k} ({old.get(k)!r} != {self.identity[k]!r})" for k in bad)
                    + "; delete the folder or use another one to rebuild")
        else:
            path.write_text(json.dumps({**self.identity, "prefix_text": self.prefix_text}, indent=1))

    def _read_index(self) -> dict:
        p = self.folder / "index.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def _write_index(self) -> None:
        p = self.folder / "index.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._index))
        os.replace(tmp, p)

    def manifest(self) -> dict:
        """What identifies this cache (for ``DocStore.record_index``): model, revision, hashes, dims."""
        return {**self.identity, "prefix_text": self.prefix_text, "chunks": len(self._index)}

    # ---------------------------------------------------------------- token ids
    def chunk_token_ids(self, chunk) -> list[int]:
        """The ids encoded for a chunk: its stored ``token_ids`` (never re-tokenised) + separator."""
        ids = list(getattr(chunk, "token_ids", None) or [])
        if not ids:
            ids = self.tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
        return ids + list(self.sep_ids)

    def question_ids(self, question: str) -> list[int]:
        """The templated question's ids. Straight from the fast tokenizer's Rust backend when it gives the same ids
        as the tokenizer's own call (checked on the first question): the call's Python layers cost ~0.6 ms per
        question on an H200 host, on the critical path of the time to the first token."""
        text = self.question_template.format(question=question)
        fast = self._fast_encode
        if fast is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            try:
                same = backend is not None and backend.encode(text, add_special_tokens=False).ids == ids
            except Exception:  # noqa: BLE001 - a backend that cannot say keeps the tokenizer's own call
                same = False
            self._fast_encode = backend if same else False
            return ids
        if fast is False:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return fast.encode(text, add_special_tokens=False).ids

    def key(self, chunk) -> str:
        h = hashlib.sha256("|".join([self.identity["revision"], self.identity["tokenizer_hash"],
                                     self.identity["prefix_hash"], _ids_hash(self.chunk_token_ids(chunk)),
                                     self.identity["dtype"], self.identity["quant"]]).encode())
        return h.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / "chunks" / f"{key}.safetensors"

    # ---------------------------------------------------------------- add / delete
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, chunk) -> bool:
        return self._has(self.key(chunk))

    def _has(self, key: str) -> bool:
        return key in self.tiers if self.tiers is not None else self._path(key).exists()

    def add(self, chunks: Iterable, progress: bool | None = None) -> int:
        """Record the chunks and (``kv_policy="precompute"``) encode and store those not stored yet; returns
        how many were encoded."""
        chunks = list(chunks)
        with self._lock:
            for c in chunks:
                self._index[c.id] = self.key(c)
        self._ensure_prefix_file()
        n = self._materialize(chunks, progress) if self.kv_policy == "precompute" else 0
        with self._lock:
            self._write_index()
        return n

    def _materialize(self, chunks: Sequence, progress: bool | None = None) -> int:
        """Encode (in batches) and store the chunks whose entry is missing; returns how many."""
        todo, keys = [], []
        for c in chunks:
            k = self.key(c)
            if not self._has(k) and k not in keys:
                todo.append(c)
                keys.append(k)
        if todo:
            blocks = [self.chunk_token_ids(c) for c in todo]
            _, kvs = encode_blocks(self.model, self.prefix_ids, blocks, self.batch_size, progress)
            for c, k, ids, kv in zip(todo, keys, blocks, kvs):
                if self.tiers is not None:
                    self.tiers.put(k, self._entry(ids, kv))
                else:
                    self._save(self._path(k), ids, kv, {"chunk_id": c.id})
        return len(todo)

    def delete(self, chunk_ids: Iterable[str]) -> int:
        n = 0
        with self._lock:
            for cid in chunk_ids:
                k = self._index.pop(cid, None)
                if k is None:
                    continue
                if self.tiers is None and k not in self._index.values():
                    self._path(k).unlink(missing_ok=True)
                    ent = self._lru.pop(k, None)
                    if ent is not None:
                        self._lru_used -= ent.nbytes
                n += 1
            self._write_index()
        return n

    def _entry(self, ids: Sequence[int], kv: torch.Tensor) -> ChunkKV:
        """An encoded chunk in this store's form (dtype, or int8 + scales)."""
        token_ids = torch.tensor(list(ids), dtype=torch.int32)
        if self.quant == "int8":
            q, scale = quantize_int8(kv)
            return ChunkKV(token_ids, q.contiguous(), scale.contiguous())
        return ChunkKV(token_ids, kv.to(self.dtype).contiguous())

    def _save(self, path: Path, ids: Sequence[int], kv: torch.Tensor, meta: dict) -> None:
        ent = self._entry(ids, kv)
        tensors = {"token_ids": ent.token_ids, "kv": ent.kv}
        if ent.scale is not None:
            tensors["scale"] = ent.scale
        meta = {**{k: str(v) for k, v in self.identity.items()}, **meta}
        _atomic_save(path, tensors, meta)

    def _compute(self, chunk) -> ChunkKV:
        """A chunk's entry computed now (on a miss): the chunk alone after the shared prefix."""
        ids = self.chunk_token_ids(chunk)
        _, (kv,) = encode_blocks(self.model, self.prefix_ids, [ids], self.batch_size, False)
        return self._entry(ids, kv)

    def _ensure_prefix_file(self) -> None:
        path = self.folder / "prefix.safetensors"
        if path.exists():
            return
        if self.prefix_ids:
            prefix_kv, _ = encode_blocks(self.model, self.prefix_ids, [], self.batch_size, False)
        else:
            i = self.identity
            prefix_kv = torch.zeros(i["n_layers"], 0, 2, i["n_kv_heads"], i["head_dim"])
        tensors = {"token_ids": torch.tensor(self.prefix_ids, dtype=torch.int32),
                   "kv": prefix_kv.to(self.dtype).contiguous()}
        _atomic_save(path, tensors, {k: str(v) for k, v in self.identity.items()})

    # ---------------------------------------------------------------- load
    def _load_file(self, path: Path) -> ChunkKV:
        from safetensors import safe_open

        if not path.exists():
            raise KeyError(f"no KV cache for {path.stem}: add() the chunk first")
        with safe_open(str(path), framework="pt") as f:  # memory-mapped
            meta = f.metadata() or {}
            for k in ("revision", "tokenizer_hash", "prefix_hash", "quant"):
                if meta.get(k) != str(self.identity[k]) and not (path.name == "prefix.safetensors" and k == "quant"):
                    raise KVCacheMismatch(f"{path}: built with {k}={meta.get(k)!r}, expected {self.identity[k]!r}")
            names = set(f.keys())
            ent = ChunkKV(f.get_tensor("token_ids"), f.get_tensor("kv"),
                          f.get_tensor("scale") if "scale" in names else None)
        return ent.pin() if self._pin else ent

    def prefix_kv(self) -> ChunkKV:
        if self._prefix is None:
            self._ensure_prefix_file()
            self._prefix = self._load_file(self.folder / "prefix.safetensors")
        return self._prefix

    def get(self, chunk) -> ChunkKV:
        """The chunk's cache (LRU tier first, then the memory-mapped file; with ``tiers``, the tier stack,
        which computes a missing entry; with ``kv_policy="on-demand"``, a missing file is computed first)."""
        k = self.key(chunk)
        if self.tiers is not None:
            return self.tiers.get(k, compute=lambda: self._compute(chunk))
        if self.kv_policy == "on-demand" and not self._path(k).exists():
            self._ensure_prefix_file()
            self._materialize([chunk])
        with self._lock:
            ent = self._lru.get(k)
            if ent is not None:
                self._lru.move_to_end(k)
                return ent
        ent = self._load_file(self._path(k))
        with self._lock:
            self._lru[k] = ent
            self._lru_used += ent.nbytes
            while self._lru_used > self._lru_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_used -= old.nbytes
        return ent

    def get_many(self, chunks: Sequence, add_missing: bool = True) -> list[ChunkKV]:
        if add_missing or self.kv_policy == "on-demand":
            missing = [c for c in chunks if c not in self]
            if missing:  # encoded together (one batched prefill), then served like the others
                if self.kv_policy == "precompute":
                    self.add(missing)
                else:
                    self._ensure_prefix_file()
                    self._materialize(missing)
        return [self.get(c) for c in chunks]

    def prefetch(self, chunks: Sequence) -> threading.Thread:
        """Warm the LRU tier (disk -> pinned host) in a background thread."""
        t = threading.Thread(target=lambda: [self.get(c) for c in chunks if c in self], daemon=True)
        t.start()
        return t
