"""Cached generation: ``Generator(model_name).generate(question, chunks, mode=...)``.

Modes
  ``full``   ordinary prefill of ``prefix + passages + question`` (HF's public forward with a
             ``DynamicCache``: the reference the cached modes are compared with), then decoding.
  ``turbo``  TurboRAG / Block-Attention: passages' K/V come from the :class:`KVCacheStore`, are stitched
  ``block``  after the shared prefix at contiguous positions (RoPE in fp32, once while stitching or by
             the kernel as keys are loaded), and only the question block is prefilled (``block`` is the same computation;
             the papers differ in fine-tuning, not inference).
  ``blend``  CacheBlend: like ``turbo`` but the first layers (up to ``check_layer``) are recomputed for all
             tokens, the ``blend_ratio`` of context tokens whose K/V deviate most from the cache there
             (weighted by the question's attention to them) are recomputed in the later layers (attending
             causally to the full, partly updated cache), the rest reused. Gradual filtering
             (``Generator.blend_opts["gradual"]``): more tokens in the first recomputed layers, re-ranked by
             their deviation at each layer and shrinking, the mean per layer staying ``blend_ratio``.
Every mode builds ``input_ids`` from stored per-chunk token ids (no re-tokenisation of joined text).
"""
from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache_store import ChunkKV, KVCacheStore
from .blend import blend_prefill
from .block_cache import BlockKVCache, GraphedStep, forward_block
from .model import ModelAdapter

MODES = ("full", "turbo", "block", "blend")


@dataclass
class GenerationResult:
    answer: str
    token_ids: list[int]
    mode: str
    chunk_ids: list[str]
    ttft_ms: float
    decode_tokens_per_s: float
    n_context_tokens: int
    n_question_tokens: int
    n_recomputed: int = 0
    timings: dict = field(default_factory=dict)


class GenerationStream:
    """Iterator over text pieces; ``.result`` holds the :class:`GenerationResult` once exhausted."""

    def __init__(self, it: Iterator):
        self._it = it
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while True:
            item = next(self._it)
            if isinstance(item, GenerationResult):
                self.result = item
                raise StopIteration
            return item


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Entry point. ``Generator(model_name=None, *, cache_dir=None, model=None, tokenizer=None, device=None,
    dtype=None, store=None, system_prompt=None, quant=None, kv_dtype=None, rope="stitch", cuda_graphs=True,
    max_cache_len=None, device_cache_bytes=None, compile_decode=False, compile_question=False)``.

    ``generate(question, chunks, mode="turbo", max_new_tokens=64, stream=False, blend_ratio=0.15,
    check_layer=1)`` -> :class:`GenerationResult` (or :class:`GenerationStream` with ``stream=True``).
    Chunks are ``rag.documents.Chunk``-like (``.id``, ``.text``, ``.token_ids``); missing caches are
    built on the fly (and stored).

    On CUDA: ``cuda_graphs`` (cached modes reuse one buffer of ``max_cache_len`` tokens; the decode step and
    the question forward, per question length, are captured as CUDA graphs after an answer and replayed by
    later requests); ``device_cache_bytes`` (chunk caches kept on the GPU, default 2 GiB); ``compile_decode``
    (the decode step is compiled with torch.compile before its capture: 1.1-1.9x faster decoding on an
    H100, paid once with 10-20 s of compilation after the first answer); ``compile_question`` (the same
    for the question forward: ~1.2-1.3x lower TTFT, paid once per new question length). One generation at
    a time per Generator: finish (or close) a stream before starting the next request.
    """

    def __init__(self, model_name: str | None = None, *, cache_dir: str | Path | None = None, model=None,
                 tokenizer=None, device: str | None = None, dtype=None, store: KVCacheStore | None = None,
                 system_prompt: str | None = None, quant: str | None = None, kv_dtype=None,
                 rope: str = "stitch", cuda_graphs: bool = True, max_cache_len: int | None = None,
                 device_cache_bytes: int | None = None, compile_decode: bool = False,
                 compile_question: bool = False):
        if model is None:
            from blockrag.models import shared_generator as load_generator  # one copy per process

            model, tok = load_generator(model_name, dtype=dtype, device=device)
            tokenizer = tokenizer or tok
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapter = ModelAdapter.of(model)  # the cached modes run the decoder through the model seam
        self.device = next(model.parameters()).device
        if store is None:
            if cache_dir is None:
                from blockrag.models import cache_dir as _cd

                from .cache_store import config_revision
                cache_dir = _cd() / "kv" / config_revision(model)
                if system_prompt:
                    import hashlib
                    cache_dir = Path(str(cache_dir) + "-" + hashlib.sha256(system_prompt.encode()).hexdigest()[:8])
                if quant:
                    cache_dir = Path(str(cache_dir) + "-" + quant)
            store = KVCacheStore(cache_dir, model, tokenizer, system_prompt=system_prompt, quant=quant,
                                 dtype=kv_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32))
        self.store = store
        # "stitch": context keys rotated once while stitching (measured faster with the current kernel);
        # "kernel": left un-rotated, the attention kernel rotates them as it loads them
        self.rope = rope
        # On CUDA the cached modes reuse one static cache buffer of max_cache_len tokens, so that the decode
        # step is captured once as a CUDA graph and replayed for every token of every answer (no per-layer
        # launch overhead); longer requests fall back to a fresh buffer and eager decoding.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and rope == "stitch"
        mpe = getattr(model.config, "max_position_embeddings", None) or 8192
        self.max_cache_len = int(max_cache_len or min(mpe, 8192, self.adapter.max_context or 8192))
        self._cache = None
        self._epoch = 0  # requests that used the shared buffer (a suspended stream must not resume after another)
        self._step_graph = None
        self.compile_decode, self.compile_question = compile_decode, compile_question
        self._q_graphs: dict[int, GraphedStep] = {}  # question length -> graph of the question forward
        # A device tier above the store's host tier: chunk caches kept on the model's device, dequantised (LRU,
        # keyed by the store's content key), so that stitching is one device-side concatenation instead of
        # per-layer host->device copies. Default 2 GiB on CUDA, off on the CPU.
        if device_cache_bytes is None:
            device_cache_bytes = (2 << 30) if self.device.type == "cuda" else 0
        self.device_cache_bytes = int(device_cache_bytes)
        self._dev_tier: OrderedDict[str, ChunkKV] = OrderedDict()
        self._dev_used = 0
        self.blend_select = "dev*attn"  # CacheBlend token selection: "dev" (K/V deviation), "attn", "dev*attn"
        # CacheBlend options (see blend_prefill); gradual filtering + per-layer question attention measured best
        # on SmolLM2-135M (eval/bench_kv_quality.py); {"gradual": 1.0, "reattend": False} = fixed selection
        self.blend_opts = {"sink_tokens": 0, "gradual": 2.5, "probe": False, "reattend": True, "carry": True}
        self.eos_ids = set()
        for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id:
                self.eos_ids.add(t)

    # ------------------------------------------------------------------ public API
    def generate(self, question: str, chunks: Sequence, mode: str = "turbo", max_new_tokens: int = 64,
                 stream: bool = False, blend_ratio: float = 0.15, check_layer: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        it = self._run(question, list(chunks), mode, max_new_tokens, blend_ratio, check_layer)
        s = GenerationStream(it)
        if stream:
            return s
        for _ in s:
            pass
        return s.result

    @torch.no_grad()
    def prefill(self, question: str, chunks: Sequence, mode: str, blend_ratio: float = 0.15,
                check_layer: int = 1, extra_ids: Sequence[int] = (), cache_max_len: int | None = None,
                blend_select: str | None = None, last_only: bool = False):
        """Prefill only; returns (logits [T, V] for the question (+extra) tokens, state dict).

        ``extra_ids`` are appended after the question (teacher forcing of an answer). ``last_only``: only the
        last position's logits are needed (lets a captured question graph serve the turbo/block modes).
        """
        store = self.store
        q_ids = store.question_ids(question) + list(extra_ids)
        block_ids = [store.chunk_token_ids(c) for c in chunks]
        ctx_ids = list(store.prefix_ids) + [t for b in block_ids for t in b]
        Lc, Lq = len(ctx_ids), len(q_ids)
        dev = self.device
        info = {"n_context": Lc, "n_question": Lq, "n_recomputed": 0}
        if mode == "full":
            cache = self.adapter.new_hf_cache()
            ids = torch.tensor([ctx_ids + q_ids], device=dev)
            logits = self.adapter.hf_forward(ids, cache, logits_rows=Lq)
            info["cache"] = cache
            info["length"] = Lc + Lq
            return logits[0], info
        cache = self._cache_for(Lc + Lq + 256, cache_max_len)
        stream = None
        if self.device_cache_bytes:
            cache.load_gathered(self._device_parts(chunks))
        else:
            parts = [store.prefix_kv()] + store.get_many(chunks)
            stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
            cache.load(parts, 0, stream=stream)
        info["cache"] = cache
        q = torch.tensor(q_ids, device=dev)
        graph = self._q_graphs.get(Lq) if (last_only and cache is self._cache) else None
        if mode in ("turbo", "block") and graph is not None:
            cache.drop_events()
            if stream is not None:  # the graph does not wait on per-layer events
                torch.cuda.current_stream(dev).wait_stream(stream)
            logits = graph.replay(q, Lc)[0]
            info["question_graph"] = True
        elif mode in ("turbo", "block"):
            logits = forward_block(self.model, cache, q, Lc, logits_to_keep=Lq)[0]
        else:
            starts, off = [], len(store.prefix_ids)
            for b in block_ids:
                starts.append(off)
                off += len(b)
            opts = dict(self.blend_opts)
            check_layer = opts.pop("check_layer", check_layer)  # blend_opts may set it too
            logits, nsel = blend_prefill(self.model, cache, torch.tensor(ctx_ids, device=dev), q,
                                         blend_ratio, check_layer, logits_to_keep=Lq,
                                         select=blend_select or self.blend_select, chunk_starts=starts, **opts)
            info["n_recomputed"] = nsel
        cache.drop_events()
        info["length"] = cache.length
        return logits, info

    # ------------------------------------------------------------------ internals
    def _device_parts(self, chunks) -> list[ChunkKV]:
        """Prefix + chunk caches as device tensors (dequantised), from the device tier or copied into it."""
        store = self.store
        missing = [c for c in chunks if store.key(c) not in self._dev_tier and c not in store]
        if missing:
            store.add(missing)
        keys = ["prefix"] + [store.key(c) for c in chunks]
        out = []
        for key, c in zip(keys, [None] + list(chunks)):
            ent = self._dev_tier.get(key)
            if ent is None:
                host = store.prefix_kv() if c is None else store.get(c)
                dev = host.to(self.device, non_blocking=True)
                ent = ChunkKV(host.token_ids, dev.dequant(self._cache_dtype()))
                self._dev_tier[key] = ent
                self._dev_used += ent.nbytes
            else:
                self._dev_tier.move_to_end(key)
            out.append(ent)
        pinned = set(keys)  # never evict what this request uses
        for key in list(self._dev_tier):
            if self._dev_used <= self.device_cache_bytes:
                break
            if key not in pinned:
                self._dev_used -= self._dev_tier.pop(key).nbytes
        return out

    def _cache_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _cache_for(self, need: int, max_len: int | None) -> BlockKVCache:
        """The shared static buffer when graphs are on and the request fits, else a fresh buffer."""
        if self.cuda_graphs and max_len is None and need <= self.max_cache_len - 1:
            if self._cache is None:
                self._cache = BlockKVCache(self.model, self.max_cache_len, device=self.device, rope=self.rope)
            return self._cache
        return BlockKVCache(self.model, max_len or need, device=self.device, rope=self.rope)

    def _capture_graphs(self, cache, n_question: int) -> float:
        """After an answer (never inside TTFT or decode timings): capture the decode step once and the question
        forward once per question length, so that later requests replay them. Returns the time spent (ms)."""
        if cache is not self._cache or not self.cuda_graphs:
            return 0.0
        t = time.perf_counter()
        if self._step_graph is None:
            self._step_graph = self._graph(cache, 1, "compile_decode")
        if n_question not in self._q_graphs and n_question <= 256:
            if len(self._q_graphs) >= 64:  # keep the most recent lengths
                self._q_graphs.pop(next(iter(self._q_graphs)))
            self._q_graphs[n_question] = self._graph(cache, n_question, "compile_question")
        _sync(self.device)
        return (time.perf_counter() - t) * 1e3

    def _graph(self, cache, n: int, flag: str) -> GraphedStep:
        """A graph of an n-token forward, compiled first when the Generator's ``flag`` option is on; if
        compilation fails (an optimisation only) the option is switched off and the plain graph is used."""
        if getattr(self, flag):
            try:
                return GraphedStep(self.model, cache, n=n, compile=True)
            except Exception as ex:  # noqa: BLE001
                warnings.warn(f"{flag}: torch.compile failed ({type(ex).__name__}: {ex}); using the plain graph")
                setattr(self, flag, False)
        return GraphedStep(self.model, cache, n=n)

    @torch.no_grad()
    def _step(self, mode: str, cache, token: int, pos: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        if mode == "full":
            return self.adapter.hf_forward(ids, cache, torch.tensor([pos], device=self.device))[0, -1]
        return forward_block(self.model, cache, ids[0], pos)[0, -1]

    def _run(self, question, chunks, mode, max_new_tokens, blend_ratio, check_layer):
        t0 = time.perf_counter()
        logits, info = self.prefill(question, chunks, mode, blend_ratio, check_layer,
                                    cache_max_len=None, last_only=True)
        cache = info["cache"]
        if cache is self._cache:
            self._epoch += 1
        epoch = self._epoch
        tok = int(logits[-1].argmax())
        _sync(self.device)
        t_first = time.perf_counter()
        out_ids = [tok]
        text_so_far = ""
        piece = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        if tok not in self.eos_ids:
            yield piece
            text_so_far = piece
        pos = info["length"]
        graph = self._step_graph if (mode != "full" and cache is self._cache) else None
        limit = cache.max_len - 1 if graph is not None else (cache.max_len if mode != "full" else None)
        while len(out_ids) < max_new_tokens and tok not in self.eos_ids:
            if limit is not None and pos >= limit:
                break  # the buffer reserves 256 tokens beyond the prompt
            if cache is self._cache and self._epoch != epoch:
                raise RuntimeError("another request reused this Generator's cache buffer while this stream was "
                                   "suspended: finish (or close) a stream before starting the next request")
            if graph is not None:
                tok = int(graph.replay(tok, pos)[1])
            else:
                tok = int(self._step(mode, cache, tok, pos).argmax())
            pos += 1
            out_ids.append(tok)
            if tok in self.eos_ids:
                break
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                yield text[len(text_so_far):]
                text_so_far = text
        _sync(self.device)
        t_end = time.perf_counter()
        capture_ms = self._capture_graphs(cache, info["n_question"]) if mode != "full" else 0.0
        n_dec = len(out_ids) - 1
        ids = [t for t in out_ids if t not in self.eos_ids]
        yield GenerationResult(
            answer=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=ids, mode=mode,
            chunk_ids=[c.id for c in chunks], ttft_ms=(t_first - t0) * 1e3,
            decode_tokens_per_s=(n_dec / (t_end - t_first)) if n_dec and t_end > t_first else 0.0,
            n_context_tokens=info["n_context"], n_question_tokens=info["n_question"],
            n_recomputed=info["n_recomputed"],
            timings={"prefill_ms": (t_first - t0) * 1e3, "decode_ms": (t_end - t_first) * 1e3,
                     "decode_graph": graph is not None, "question_graph": info.get("question_graph", False),
                     "graph_capture_ms": capture_ms})
