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
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache_store import ChunkKV, KVCacheStore
from .decoding import GenerationResult, apply_stops, held_back, repeats  # noqa: F401 (re-exported)
from .blend import blend_prefill
from .block_cache import BlockKVCache, GraphedStep, StagedLoad, forward_block
from .model import ModelAdapter
from .paged_cache import PageArena, PagedKVCache

MODES = ("full", "turbo", "block", "blend")
MIN_BUCKET = 4096  # smallest cache size bucket (tokens); the next ones double up to max_cache_len
# question lengths one graph serves (a question is padded to the next size; see GraphedStep(select_row=True))
QUESTION_BUCKETS = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256)
WARMUP_QUESTIONS = (16, 32, 48, 64, 96, 128)
PAGED = "paged"  # the graphs' bucket key of the paged path (one graph per question length serves every context)
PAGE_TOKENS = 64  # tokens per page of the paged path on CUDA (16 elsewhere: small tiles for the interpreter)
# The stitching copy on a side stream in layer groups while the question graph runs (waiting per group).
# Off: no gain measured (H200, 8B shape, staged vs not, eval/results/e2e_staged_compare_h200.json: 7.8 vs 7.7 ms
# at 8K, 11.1 vs 11.4 at 32K, 26.7 vs 26.6 at 128K; the forward's kernels leave the copy no idle SMs to run on)
STAGED_STITCH = False
# Decode graphs over a stitched bucket: a second graph per bucket with the decoded token's attention through
# PyTorch SDPA over the whole bucket (keys past the valid ones masked; cuDNN on an H200), used when the context
# fills at least this share of the bucket: SDPA then reads padding, our kernel only the valid keys. H200, 8
# layers in one graph, 1,024 keys of padding: 41.4 vs 49.5 us at 32K keys, 130.5 vs 155.5 at 128K (Llama-3-8B
# heads; Qwen2-7B 27.8 vs 37.8, 71.2 vs 90.0): SDPA reads ~1.2x faster per key, so it wins above ~0.8 of the
# bucket (eval/results/attn_decode_sdpa_h200.json). None: always our kernel. (cuDNN only; where it cannot run, the
# capture warns and our kernel's graph serves. The SDPA graph is not compiled under ``compile_decode``.)
DECODE_SDPA_FILL = 0.85
TAIL_TOKENS = 2304  # paged path: positions after the context for the question (padded) and the answer


def size_buckets(max_len: int, min_bucket: int = MIN_BUCKET) -> list[int]:
    """Cache buffer sizes: powers of two from ``min_bucket`` below ``max_len``, then ``max_len`` itself."""
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def size_bucket(need: int, max_len: int, min_bucket: int = MIN_BUCKET) -> int | None:
    """The smallest bucket holding ``need`` positions, or None past ``max_len``."""
    for b in size_buckets(max_len, min_bucket):
        if need <= b:
            return b
    return None


def question_bucket(n: int, sizes: Sequence[int] = QUESTION_BUCKETS) -> int | None:
    """The padded length of an ``n``-token question block, or None when it is longer than every bucket."""
    for b in sorted(sizes):
        if n <= b:
            return b
    return None


def kv_bytes(adapter: ModelAdapter, n_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a stitched cache buffer of ``n_tokens`` positions (all layers, K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return adapter.n_layers * n_tokens * 2 * adapter.n_kv_heads * adapter.head_dim * elem


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
    max_cache_len=None, device_cache_bytes=None, compile_decode=False, compile_question=False, stop=(),
    repetition_guard=0, adapter=None, paged=False, fuse_layers=True)``.

    ``fuse_layers``: run the decoder layers of the cached modes over fused q/k/v and gate/up weights with
    fused norm / RoPE / SiLU kernels (:meth:`ModelAdapter.fuse`; the same values up to rounding order).

    ``adapter``: a block-attention LoRA adapter folder (``blockrag finetune``; ``"default"``: the bundled one
    for the bundled model), merged into the weights at load (same speed as the base model); its revision is
    part of the KV caches' revision, so caches built without it are not reused (:mod:`attention_kv.lora`).

    ``generate(question, chunks, mode="turbo", max_new_tokens=64, stream=False, blend_ratio=0.15,
    check_layer=1, stop=None, repetition_guard=None)`` -> :class:`GenerationResult` (or
    :class:`GenerationStream` with ``stream=True``).

    Stopping rules, the same in every mode (``generate``'s arguments override the Generator's): the end-of-turn
    token; ``max_new_tokens`` (the token budget); ``stop`` strings (e.g. ``("\n",)`` for one-line answers:
    decoding ends at the first one once the answer has begun, and the answer is cut before it; text that
    could begin a stop string is streamed only once it cannot); ``repetition_guard=n``: decoding ends when
    the last ``n`` tokens repeat an earlier window of the answer, and that repeat is dropped.
    ``GenerationResult.timings["stopped_by"]`` says which rule ended the answer.
    Chunks are ``rag.documents.Chunk``-like (``.id``, ``.text``, ``.token_ids``); missing caches are
    built on the fly (and stored).

    On CUDA the cached modes stitch the chunk caches into ``cuda_graphs``' buffer in size buckets — powers of
    two from 4K tokens up to ``max_cache_len`` (default the model's ``max_position_embeddings``) — with graphs
    per bucket. ``paged=True`` (opt-in: its kernel is still ~2.5x slower than the contiguous one at 32K on an H200) lets
    ``turbo``/``block`` read the chunk caches where they lie, through a page table (zero-copy stitching,
    :mod:`attention_kv.paged_cache`: no per-request copy, no second copy in memory), with one CUDA graph per
    padded question length and one decode-step graph serving every context; requests it cannot take (see
    ``_use_paged``) and ``blend`` keep the stitched buffer. A graph seen for the first time is captured before its
    first use: :meth:`warmup` does that ahead; :meth:`cache_memory` reports the arena and the buffer);
    ``device_cache_bytes`` (chunk caches kept on the GPU, default 2 GiB; the page arena grows to hold at
    least one request); ``compile_decode``
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
                 compile_question: bool = False, stop: Sequence[str] = (), repetition_guard: int = 0,
                 adapter: str | Path | None = None, paged: bool = False, fuse_layers: bool = True):
        if model is None:
            from blockrag.models import shared_generator as load_generator  # one copy per process

            model, tok = load_generator(model_name, dtype=dtype, device=device, adapter=adapter)
            tokenizer = tokenizer or tok
        elif adapter is not None:
            from .lora import with_adapter

            model = with_adapter(model, adapter, model_name)
        # the LoRA adapter folder merged into the weights, or None (``self.adapter`` is the model seam)
        self.adapter_path = (getattr(model.config, "blockrag_adapter", None) or {}).get("path")
        if adapter is not None and store is not None:
            from .cache_store import KVCacheMismatch, config_revision

            if store.identity["revision"] != config_revision(model):
                raise KVCacheMismatch(f"the KV store at {store.folder} was built with another model revision than "
                                      f"the generator with adapter {adapter}; use a store built with it")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapter = ModelAdapter.of(model)  # the cached modes run the decoder through the model seam
        # q/k/v and gate/up weights in one tensor each (views: no extra memory) and fused norm / RoPE / SiLU
        # kernels: ~11 instead of ~45 kernels per layer in the graphed decode step and question forward
        self.fused_layers = bool(fuse_layers) and self.adapter.fuse()
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
        # On CUDA the cached modes reuse one static buffer, grown in size buckets (powers of two from
        # MIN_BUCKET up to max_cache_len); each bucket is a view of its first positions with its own CUDA
        # graphs (decode step, question forward per padded length), so that any context up to max_cache_len
        # replays graphs. Requests past max_cache_len get a fresh buffer and run eagerly.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and rope == "stitch"
        self.share_buffers = self.cuda_graphs  # bucketed shared buffer (tests switch it on for the CPU)
        self.pad_questions = self.cuda_graphs  # question padded to its bucket (one graph, many lengths)
        # Zero-copy stitching (turbo/block): chunk caches stay in the pages of one arena and a request is a page
        # table read by the attention (RoPE re-positioning applied to the query rows); the stitched buffer is
        # then used only by blend and by requests the paged path cannot take (see _use_paged). Opt-in while its
        # kernel costs more than the stitching copy it saves (H200: ~280 vs 83-111 us per layer at 32K).
        self.paged = bool(paged) and self.cuda_graphs and self._paged_kernel_ok()
        self.page_tokens = PAGE_TOKENS if self.device.type == "cuda" else 16
        self.tail_tokens = TAIL_TOKENS
        self._arena: PageArena | None = None
        self._paged: PagedKVCache | None = None
        mpe = int(getattr(model.config, "max_position_embeddings", None) or 8192)
        self.max_cache_len = int(max_cache_len or min(mpe, self.adapter.max_context or mpe))
        self.min_bucket = MIN_BUCKET
        self.question_buckets = QUESTION_BUCKETS
        self._kv_buf: torch.Tensor | None = None  # the shared allocation (largest bucket used so far)
        # the shared buffer's staged stitching (side stream + per-layer-group events shared by its buckets'
        # caches and graphs); None: every load is queued on the current stream
        self._stages = StagedLoad(self.adapter.n_layers, self.device) if self.cuda_graphs else None
        self.staged_stitch = STAGED_STITCH
        self._caches: dict[int, BlockKVCache] = {}  # bucket -> cache over the first positions of _kv_buf
        self._graphs: dict[tuple, GraphedStep] = {}  # (bucket, tokens[, "sdpa"]) -> graph; 1 = decode step
        self._decode_sdpa_failed = False  # set when cuDNN could not run the SDPA decode graph
        self._epoch = 0  # requests that used the shared buffer (a suspended stream must not resume after another)
        self._captures = 0  # graphs captured so far
        self.compile_decode, self.compile_question = compile_decode, compile_question
        # A device tier above the store's host tier: chunk caches kept on the model's device, dequantised (LRU,
        # keyed by the store's content key), so that stitching is one device-side concatenation instead of
        # per-layer host->device copies. Default 2 GiB on CUDA, off on the CPU.
        if device_cache_bytes is None:
            device_cache_bytes = (2 << 30) if self.device.type == "cuda" else 0
        self.device_cache_bytes = int(device_cache_bytes)
        self._dev_tier: OrderedDict[str, ChunkKV] = OrderedDict()
        self._keys: dict = {}  # (chunk id, token ids) -> store key (see _store_key)
        self._keys_by_obj: dict = {}  # id(chunk object) -> (weak reference, token_ids list, signature, store key, store)
        self._dev_used = 0
        self.blend_select = "dev*attn"  # CacheBlend token selection: "dev" (K/V deviation), "attn", "dev*attn"
        # CacheBlend options (see blend_prefill); gradual filtering + per-layer question attention measured best
        # on SmolLM2-135M (eval/bench_kv_quality.py); {"gradual": 1.0, "reattend": False} = fixed selection
        self.blend_opts = {"sink_tokens": 0, "gradual": 2.5, "probe": False, "reattend": True, "carry": True}
        self.stop, self.repetition_guard = tuple(stop), int(repetition_guard)  # stopping rules (class docstring)
        self.eos_ids = set()
        for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id:
                self.eos_ids.add(t)

    # ------------------------------------------------------------------ public API
    def generate(self, question: str, chunks: Sequence, mode: str = "turbo", max_new_tokens: int = 64,
                 stream: bool = False, blend_ratio: float = 0.15, check_layer: int = 1,
                 stop: Sequence[str] | None = None, repetition_guard: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rules = (tuple(self.stop if stop is None else stop),
                 int(self.repetition_guard if repetition_guard is None else repetition_guard))
        it = self._run(question, list(chunks), mode, max_new_tokens, blend_ratio, check_layer, rules)
        s = GenerationStream(it)
        if stream:
            return s
        for _ in s:
            pass
        return s.result

    def generate_batch(self, requests: Sequence, mode: str = "turbo", max_batch: int = 16,
                       max_new_tokens: int = 64, stop: Sequence[str] | None = None,
                       repetition_guard: int | None = None, backend: str = "auto") -> list:
        """Several questions, each over its own passages, sharing forward passes (continuous batching, at most
        ``max_batch`` at once; cached modes): one :class:`GenerationResult` per request, in order. Requests are
        :class:`~attention_kv.batch.BatchRequest` (own ``max_new_tokens`` / ``stop`` / ``repetition_guard``),
        dicts of its fields or ``(question, chunks)`` pairs. See :mod:`attention_kv.batch`."""
        from .batch import generate_batch

        return generate_batch(self, requests, mode=mode, max_batch=max_batch, max_new_tokens=max_new_tokens,
                              stop=stop, repetition_guard=repetition_guard, backend=backend)

    @torch.no_grad()
    def prefill(self, question: str, chunks: Sequence, mode: str, blend_ratio: float = 0.15,
                check_layer: int = 1, extra_ids: Sequence[int] = (), cache_max_len: int | None = None,
                blend_select: str | None = None, last_only: bool = False, room: int = 256):
        """Prefill only; returns (logits [T, V] for the question (+extra) tokens, state dict).

        ``extra_ids`` are appended after the question (teacher forcing of an answer). ``last_only``: only the
        last position's logits are needed (lets a captured question graph serve the turbo/block modes; the
        returned rows other than the last are then undefined). ``room``: positions kept free after the
        question (tokens to decode).
        """
        store = self.store
        block = mode in ("turbo", "block")
        early = None
        if block:  # only the context's length is needed (no per-request list of every context token)
            sep = len(store.sep_ids)
            Lc = len(store.prefix_ids) + sum(len(c.token_ids) + sep if getattr(c, "token_ids", None)
                                             else len(store.chunk_token_ids(c)) for c in chunks)
            early = self._stitch_early(chunks, Lc, room, cache_max_len)
        q_ids = store.question_ids(question) + list(extra_ids)
        if not block:
            block_ids = [store.chunk_token_ids(c) for c in chunks]
            ctx_ids = list(store.prefix_ids) + [t for b in block_ids for t in b]
            Lc = len(ctx_ids)
        Lq = len(q_ids)
        dev = self.device
        info = {"n_context": Lc, "n_question": Lq, "n_recomputed": 0, "capture_ms": 0.0}
        if mode == "full":
            cache = self.adapter.new_hf_cache()
            ids = torch.tensor([ctx_ids + q_ids], device=dev)
            logits = self.adapter.hf_forward(ids, cache, logits_rows=Lq)
            info["cache"] = cache
            info["length"] = Lc + Lq
            return logits[0], info
        Lq_b = question_bucket(Lq, self.question_buckets) if (block and self.pad_questions) else None
        n_q = Lq_b or Lq
        if block and self._use_paged(Lc, n_q, room, cache_max_len):
            return self._prefill_paged(chunks, q_ids, Lc, Lq, Lq_b, last_only, info)
        # the question (padded) and the room after it; a graph's capture also writes its last n_q slots
        need = Lc + n_q + max(room, n_q) + 1
        chosen = early
        if early is not None and size_bucket(need, self.max_cache_len, self.min_bucket) != early[1]:
            # the question moved the request to another bucket: a view of the same buffer holds the stitched
            # context too (buckets are views of its first positions) unless the buffer had to grow (or the
            # request left the buckets): then it is stitched again below
            buf = self._kv_buf
            chosen = self._cache_for(need, cache_max_len)
            if chosen[1] is not None and self._kv_buf is buf:
                chosen[0].length = early[0].length
            else:
                early = None
        cache, bucket = chosen if chosen is not None else self._cache_for(need, cache_max_len)
        info["bucket"], info["question_bucket"] = bucket, Lq_b
        graph = None
        if bucket is not None and self.cuda_graphs:
            # captured before the context is loaded: warm-up and capture write the buffer's last slots
            t, n0 = time.perf_counter(), self._captures
            if block and Lq_b is not None and last_only:
                graph = self._graph_for(bucket, Lq_b)
            self._graph_for(bucket, 1)  # the decode step
            if self._decode_sdpa_on():
                self._graph_for(bucket, 1, sdpa=True)
            if self._captures != n0:
                info["capture_ms"] = (time.perf_counter() - t) * 1e3
        stream = None
        if early is not None:
            pass  # stitched already (see _stitch_early)
        elif self.device_cache_bytes:
            cache.load_gathered(self._device_parts(chunks), staged=graph is not None and self.staged_stitch)
        else:
            parts = [store.prefix_kv()] + store.get_many(chunks)
            stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
            cache.load(parts, 0, stream=stream)
        info["cache"] = cache
        q = torch.tensor(q_ids, device=dev)
        if graph is None:
            self._join_loads()  # the eager forwards below do not wait per layer group
        if graph is not None:
            cache.drop_events()
            if stream is not None:  # the graph does not wait on per-layer events
                torch.cuda.current_stream(dev).wait_stream(stream)
            logits = graph.replay(q, Lc, n_valid=Lq)[0]
            self._join_loads()  # (the graph waited for each group; later work is ordered after all of them)
            info["question_graph"] = True
        elif block and Lq_b is not None and Lq_b > Lq:
            # the same padded block, eagerly (CPU / no graphs): real rows exact, padding never seen
            pad = torch.cat([q, q[-1:].expand(Lq_b - Lq)])
            logits = forward_block(self.model, cache, pad, Lc, logits_to_keep=Lq_b)[0][:Lq]
            cache.length = Lc + Lq
        elif block:
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

    @torch.no_grad()
    def warmup(self, buckets: Sequence[int] | None = None, question_lengths: Sequence[int] = WARMUP_QUESTIONS,
               progress: bool | None = None) -> dict:
        """Compile the kernels and capture the CUDA graphs of the cached modes ahead of requests: for each
        cache size bucket (default: every bucket up to ``max_cache_len``), the decode step (two graphs on CUDA:
        our kernel, and SDPA for a context that fills the bucket, ``DECODE_SDPA_FILL``) and the question
        forward of each padded question length in ``question_lengths`` (rounded up to their buckets). A
        request whose context and question fall in warmed buckets then pays no compilation or capture.
        Compiled Triton kernels persist across processes in Triton's own cache; graphs do not.
        With the paged path (:attr:`paged`) one graph per question length (and one decode step) serves every
        context: the page arena is sized for the largest of ``buckets`` (default ``max_cache_len``) and only
        ``buckets`` given explicitly are captured for the stitched buffer as well (blend, fallbacks).
        Returns {"buckets", "question_buckets", "graphs", "seconds", "cache_bytes"} (no-op without graphs)."""
        t = time.perf_counter()
        if not self.cuda_graphs:
            return {"buckets": [], "question_buckets": [], "graphs": 0, "seconds": 0.0, "cache_bytes": 0}
        paged_for = None
        if self.paged:
            paged_for = max(buckets) if buckets else self.max_cache_len
            buckets = buckets if buckets is not None else []
        elif buckets is None:
            buckets = size_buckets(self.max_cache_len, self.min_bucket)
        bs = []
        for n in buckets:
            b = size_bucket(int(n), self.max_cache_len, self.min_bucket)
            if b is None:
                raise ValueError(f"bucket {n} exceeds max_cache_len {self.max_cache_len}")
            bs.append(b)
        bs = sorted(set(bs))
        qbs = []
        for n in question_lengths:
            qb = question_bucket(int(n), self.question_buckets)
            if qb is None:
                raise ValueError(f"question length {n} exceeds the largest question bucket "
                                 f"{max(self.question_buckets)}")
            qbs.append(qb)
        qbs = sorted(set(qbs))
        if bs:
            self._reserve(max(bs))
        todo = [(b, n, False) for b in bs for n in [1] + qbs]
        if self._decode_sdpa_on():
            todo += [(b, 1, True) for b in bs]
        if paged_for is not None:
            # pages for a context of paged_for tokens, with room for chunks' partly filled last pages
            self._paged_cache(-(-int(paged_for) * 3 // (2 * self.page_tokens)))
            self._paged.set_request(self._paged_parts([]), len(self.store.prefix_ids))
            todo = [(PAGED, n, False) for n in [1] + qbs] + todo
        from tqdm.auto import tqdm

        for b, n, sdpa in tqdm(todo, desc="capturing graphs",
                               disable=not progress if progress is not None else None, leave=False):
            self._graph_for(b, n, sdpa=sdpa)
        _sync(self.device)
        mem = self.cache_memory()
        return {"buckets": bs, "question_buckets": qbs, "graphs": len(self._graphs),
                "seconds": time.perf_counter() - t, "cache_bytes": mem["buffer_bytes"] + mem["arena_bytes"]}

    def cache_memory(self) -> dict:
        """The shared cache buffer: {"buffer_tokens", "buffer_bytes", "max_cache_len", "max_bytes", "buckets",
        "graphs"} (``max_bytes``: the buffer at ``max_cache_len``, the most it grows to), and the paged path's
        arena (chunk caches + the request tail): {"arena_pages", "arena_pages_used", "arena_bytes", "page_tokens"}."""
        n = 0 if self._kv_buf is None else int(self._kv_buf.shape[2])
        dt = self._cache_dtype()
        a = self._arena
        return {"buffer_tokens": n, "buffer_bytes": kv_bytes(self.adapter, n, dt), "max_cache_len": self.max_cache_len,
                "max_bytes": kv_bytes(self.adapter, self.max_cache_len, dt), "buckets": sorted(self._caches),
                "graphs": len(self._graphs), "arena_pages": 0 if a is None else a.n_pages,
                "arena_pages_used": 0 if a is None else a.n_pages - a.free_pages,
                "arena_bytes": 0 if a is None else a.nbytes, "page_tokens": self.page_tokens}

    # ------------------------------------------------------------------ internals
    def _device_parts(self, chunks) -> list[ChunkKV]:
        """Prefix + chunk caches as device tensors (dequantised), from the device tier or copied into it."""
        self._join_loads()  # the tier may evict a chunk that a staged load still reads
        store = self.store
        ckeys = [self._store_key(c) for c in chunks]
        missing = [c for c, k in zip(chunks, ckeys) if k not in self._dev_tier and c not in store]
        if missing:
            store.add(missing)
        keys = ["prefix"] + ckeys
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

    def _stitch_early(self, chunks, Lc: int, room: int, cache_max_len: int | None):
        """(cache, bucket) with the context already stitched, or None: when the device tier serves the stitched
        path, the context is queued for stitching before the question is tokenised, so the host's tokenising
        overlaps the GPU's copy. It goes to the bucket of the shortest question; a longer question that lands in
        a larger bucket reads it there as well, as long as the shared buffer already holds that bucket (buckets
        are views of the buffer's first positions; a buffer that would have to grow is not grown for it: the
        usual order runs). (A graph first seen afterwards is then captured over the loaded context: its
        warm-up and capture write only the buffer's last slots.)"""
        if not (self.device_cache_bytes and self.share_buffers and not self.paged and cache_max_len is None):
            return None
        qs = sorted(self.question_buckets)
        lo, hi = (size_bucket(Lc + n + max(room, n) + 1, self.max_cache_len, self.min_bucket) for n in (qs[0], qs[-1]))
        if lo is None:
            return None
        if lo != hi:
            held = 0 if self._kv_buf is None else int(self._kv_buf.shape[2])
            if hi is None or held < hi:
                return None
        cache, bucket = self._cache_for(Lc + qs[0] + max(room, qs[0]) + 1, None)
        cache.load_gathered(self._device_parts(chunks), staged=self.staged_stitch)
        return cache, bucket

    def _join_loads(self) -> None:
        """Order the current stream after a staged load (before anything but a question graph reads the
        buffer, a chunk it reads may be freed, or the buffer is dropped)."""
        if self._stages is not None:
            self._stages.join()

    def _store_key(self, chunk) -> str:
        """``store.key(chunk)``, memoised (hashing every passage's ids with sha256 on each request cost ~10-20 ms
        of TTFT at 128K tokens of context): first by the chunk object itself (the same object with the same
        ``token_ids`` list, its length and end tokens unchanged: a few hundred ns), then by its id and a hash of
        its token ids (``hash(tuple(ids))``: ~1-7 us a passage, ~0.8 ms per request at 32K on an H200 host)."""
        ids = getattr(chunk, "token_ids", None)
        sig = (len(ids), ids[0], ids[-1]) if ids else chunk.text
        hit = self._keys_by_obj.get(id(chunk))
        if hit is not None and hit[0]() is chunk and hit[1] is ids and hit[2] == sig and hit[4] is self.store:
            return hit[3]
        memo = (id(self.store), chunk.id) + ((len(ids), hash(tuple(ids))) if ids else (chunk.text,))
        key = self._keys.get(memo)
        if key is None:
            if len(self._keys) >= 1 << 18:
                self._keys.clear()
            key = self._keys[memo] = self.store.key(chunk)
        try:
            ref = weakref.ref(chunk)  # (a chunk type without weak references is memoised by content only)
        except TypeError:
            return key
        if len(self._keys_by_obj) >= 1 << 18:
            self._keys_by_obj.clear()
        self._keys_by_obj[id(chunk)] = (ref, ids, sig, key, self.store)
        return key

    def _cache_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _cache_for(self, need: int, max_len: int | None) -> tuple[BlockKVCache, int | None]:
        """(cache, bucket): the shared buffer's smallest bucket holding ``need`` positions, or (a fresh buffer,
        None) when buffers are not shared, ``max_len`` is given, or ``need`` exceeds ``max_cache_len``."""
        bucket = size_bucket(need, self.max_cache_len, self.min_bucket) if self.share_buffers else None
        if bucket is None or max_len is not None:
            if self.share_buffers and max_len is None:
                warnings.warn(f"a request of {need} positions exceeds max_cache_len={self.max_cache_len}: "
                              f"fresh buffer, eager decoding")
            return BlockKVCache(self.model, max_len or need, device=self.device, rope=self.rope), None
        cache = self._caches.get(bucket)
        if cache is None:
            self._reserve(bucket)
            cache = BlockKVCache(self.model, bucket, device=self.device, rope=self.rope, kv=self._kv_buf,
                                 stages=self._stages)
            self._caches[bucket] = cache
        return cache, bucket

    def _reserve(self, n_tokens: int) -> None:
        """Make the shared allocation hold ``n_tokens`` positions. Growing replaces it: the caches and graphs
        over the old one are dropped (captured again when next needed)."""
        if self._kv_buf is not None and self._kv_buf.shape[2] >= n_tokens:
            return
        self._join_loads()  # a staged load may still be writing the buffer about to be dropped
        self._graphs = {k: g for k, g in self._graphs.items() if k[0] == PAGED}  # (over the arena: kept)
        self._caches.clear()
        self._kv_buf = None
        self._epoch += 1  # a suspended stream over the old buffer must not resume
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        ad = self.adapter
        self._kv_buf = torch.empty(ad.n_layers, 1, n_tokens, 2, ad.n_kv_heads, ad.head_dim,
                                   dtype=self._cache_dtype(), device=self.device)

    def _shared(self, cache) -> bool:
        return (self._paged is not None and cache is self._paged) or any(c is cache for c in self._caches.values())

    # ------------------------------------------------------------------ the paged path (zero-copy stitching)
    def _paged_kernel_ok(self) -> bool:
        """Whether the paged kernel takes this model's heads (its PyTorch reference syncs with the host, so
        it cannot be captured in a graph: shapes the kernel refuses keep the stitched path)."""
        from .kernels.paged_attention import paged_ok

        ad, dt = self.adapter, self._cache_dtype()
        q = torch.empty(1, ad.n_heads, 1, ad.head_dim, dtype=dt, device=self.device)
        kv = torch.empty(1, PAGE_TOKENS, 2, ad.n_kv_heads, ad.head_dim, dtype=dt, device=self.device)
        return paged_ok(q, kv)

    def _use_paged(self, n_context: int, n_q: int, room: int, cache_max_len: int | None) -> bool:
        """The one place deciding between the paged path and the stitched buffer for turbo/block: paged unless
        it is off, an explicit buffer size is asked for, the question plus the answer's room overflow the tail,
        or the positions pass ``max_cache_len`` (the stitched path then warns and runs eagerly)."""
        need = n_q + max(room, n_q) + 1
        return (self.paged and cache_max_len is None and need <= self.tail_tokens
                and n_context + need <= self.max_cache_len)

    def _paged_cache(self, need_pages: int = 0) -> PagedKVCache:
        """The arena and its request view, made (or grown, dropping the entries and paged graphs) so that
        ``need_pages`` pages fit beside the tail. Size: ``device_cache_bytes`` or what one request needs."""
        ad, P = self.adapter, self.page_tokens
        tail = -(-self.tail_tokens // P)
        page_bytes = kv_bytes(ad, P, self._cache_dtype())
        if self._arena is not None and need_pages + tail <= self._arena.n_pages:
            return self._paged
        n = max(self.device_cache_bytes // page_bytes, need_pages + tail, 4 * tail)
        if self._arena is not None:
            n = max(n, 2 * self._arena.n_pages)
        self._graphs = {k: g for k, g in self._graphs.items() if k[0] != PAGED}
        self._paged = self._arena = None
        self._epoch += 1  # a suspended stream over the old arena must not resume
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._arena = PageArena(ad.n_layers, ad.n_kv_heads, ad.head_dim, n, P, self._cache_dtype(), self.device)
        self._paged = PagedKVCache(self.model, self._arena, self.max_cache_len + self.tail_tokens, self.tail_tokens)
        return self._paged

    def _paged_parts(self, chunks) -> list:
        """Prefix + chunk entries of the arena (copied in from the store when missing: host -> device once,
        dequantised, keys rotated to their in-chunk positions); the request's own entries are never evicted."""
        store = self.store
        keys = ["prefix"] + [self._store_key(c) for c in chunks]
        cache = self._paged_cache()
        arena = cache.arena
        missing = [c for c, k in zip(chunks, keys[1:]) if k not in arena.entries and c not in store]
        if missing:
            store.add(missing)
        out = []
        for key, c in zip(keys, [None] + list(chunks)):
            ent = arena.get(key)
            if ent is None:
                host = store.prefix_kv() if c is None else store.get(c)
                kv = host.to(self.device, non_blocking=True).dequant(self._cache_dtype())
                try:
                    ent = arena.put(key, kv, cache.cos, cache.sin, pinned=keys)
                except MemoryError:  # this request alone needs more pages: grow the arena, start over
                    n_tok = sum(len(getattr(x, "token_ids", None) or store.chunk_token_ids(x)) for x in chunks)
                    need = -(-(len(store.prefix_ids) + n_tok) // self.page_tokens) + len(keys)
                    self._paged_cache(need)
                    return self._paged_parts(chunks)
            out.append(ent)
        return out

    def _prefill_paged(self, chunks, q_ids, Lc: int, Lq: int, Lq_b: int | None, last_only: bool, info: dict):
        """Turbo/block prefill over the page table (no stitching copy): the question forward, from its graph
        when there is one (padded to ``Lq_b``), else eagerly."""
        parts = self._paged_parts(chunks)
        cache = self._paged
        cache.set_request(parts, Lc)
        info["bucket"], info["question_bucket"] = PAGED, Lq_b
        graph = None
        if self.cuda_graphs:
            t, n0 = time.perf_counter(), self._captures
            if Lq_b is not None and last_only:
                graph = self._graph_for(PAGED, Lq_b)
            self._graph_for(PAGED, 1)  # the decode step
            if self._captures != n0:
                info["capture_ms"] = (time.perf_counter() - t) * 1e3
        q = torch.tensor(q_ids, device=self.device)
        if graph is not None:
            logits = graph.replay(q, Lc, n_valid=Lq)[0]
            info["question_graph"] = True
        elif Lq_b is not None and Lq_b > Lq:  # the same padded block, eagerly: real rows exact
            pad = torch.cat([q, q[-1:].expand(Lq_b - Lq)])
            logits = forward_block(self.model, cache, pad, Lc, logits_to_keep=Lq_b)[0][:Lq]
            cache.length = Lc + Lq
        else:
            logits = forward_block(self.model, cache, q, Lc, logits_to_keep=Lq)[0]
        info["cache"] = cache
        info["length"] = cache.length
        return logits, info

    def _graph_for(self, bucket: int, n: int, sdpa: bool = False) -> GraphedStep | None:
        """The graph of an ``n``-token forward (1: the decode step; else a question padded to ``n``) over
        ``bucket``'s cache, captured on first use. ``sdpa``: the decode step's attention through SDPA over the
        whole bucket (see ``DECODE_SDPA_FILL``); None if cuDNN cannot run it (our kernel's graph serves)."""
        key = (bucket, n, "sdpa") if sdpa else (bucket, n)
        g = self._graphs.get(key)
        if g is None:
            cache = self._paged_cache() if bucket == PAGED else self._caches.get(bucket)
            if cache is None:
                cache, _ = self._cache_for(bucket, None)
            cache.decode_sdpa = sdpa
            try:
                if sdpa:  # (never compiled: a failure here must not switch compile_decode off for the others)
                    g = GraphedStep(self.model, cache, n=n)
                else:
                    g = self._graph(cache, n, "compile_decode" if n == 1 else "compile_question")
            except RuntimeError as ex:
                if not sdpa:
                    raise
                # no cuDNN attention for these shapes or this GPU: decode through our kernel only
                warnings.warn(f"decode through SDPA unavailable ({str(ex).splitlines()[0][:120]}); "
                              "decoding through our kernel")
                self._decode_sdpa_failed = True
                return None
            finally:
                cache.decode_sdpa = False
            self._graphs[key] = g
            self._captures += 1
        return g

    def _decode_sdpa_on(self) -> bool:
        return (DECODE_SDPA_FILL is not None and self.device.type == "cuda"
                and not self._decode_sdpa_failed)

    def _decode_graph(self, bucket, pos: int) -> GraphedStep | None:
        """The decode graph of ``bucket`` for a context of ``pos`` tokens: SDPA over the bucket when the
        context fills at least ``DECODE_SDPA_FILL`` of it, else our kernel over the valid keys."""
        cache = self._caches.get(bucket)
        if self._decode_sdpa_on() and cache is not None and pos >= DECODE_SDPA_FILL * cache.max_len:
            g = self._graphs.get((bucket, 1, "sdpa"))
            if g is not None:
                return g
        return self._graphs.get((bucket, 1))

    def _graph(self, cache, n: int, flag: str) -> GraphedStep:
        """A graph of an n-token forward, compiled first when the Generator's ``flag`` option is on; if
        compilation fails (an optimisation only) the option is switched off and the plain graph is used."""
        select = n > 1  # question graphs serve every length up to n
        if getattr(self, flag):
            try:
                return GraphedStep(self.model, cache, n=n, compile=True, select_row=select)
            except Exception as ex:  # noqa: BLE001
                warnings.warn(f"{flag}: torch.compile failed ({type(ex).__name__}: {ex}); using the plain graph")
                setattr(self, flag, False)
        return GraphedStep(self.model, cache, n=n, select_row=select)

    @torch.no_grad()
    def _step(self, mode: str, cache, token: int, pos: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        if mode == "full":
            return self.adapter.hf_forward(ids, cache, torch.tensor([pos], device=self.device))[0, -1]
        return forward_block(self.model, cache, ids[0], pos)[0, -1]

    def _run(self, question, chunks, mode, max_new_tokens, blend_ratio, check_layer, rules=((), 0)):
        t0 = time.perf_counter()
        logits, info = self.prefill(question, chunks, mode, blend_ratio, check_layer,
                                    cache_max_len=None, last_only=True, room=max_new_tokens + 1)
        cache = info["cache"]
        shared = mode != "full" and self._shared(cache)
        if shared:
            self._epoch += 1
        epoch = self._epoch
        tok = int(logits[-1].argmax())
        _sync(self.device)
        t_first = time.perf_counter()
        out_ids = [tok]
        text_so_far = ""
        stop, guard = rules
        decode = self.tokenizer.decode

        def visible(ids_):
            """(text that may be streamed now, the answer when a stop string ended it)."""
            text, hit = apply_stops(decode(ids_, skip_special_tokens=True), stop)
            if hit:
                return text, text
            if guard:  # the last `guard` tokens wait: a loop found later is dropped unseen
                text = decode(ids_[:max(0, len(ids_) - guard)], skip_special_tokens=True)
            return text[:len(text) - held_back(text, stop)], None

        stopped_by = "eos" if tok in self.eos_ids else None
        answer = None  # the answer text once a stop rule cut it
        if stopped_by is None:
            piece, answer = visible(out_ids)
            stopped_by = "stop" if answer is not None else None
            if piece and not piece.endswith("\ufffd"):
                yield piece
                text_so_far = piece
        pos = info["length"]
        graph = self._decode_graph(info["bucket"], pos) if shared else None
        limit = cache.max_len - 1 if graph is not None else (cache.max_len if mode != "full" else None)
        ahead = None  # graphed decoding: each step queued before the previous token is read (GraphedStep.run_ahead)
        if graph is not None and graph.advances and stopped_by is None:
            ahead = graph.run_ahead(tok, pos, max(0, min(max_new_tokens - 1, limit - pos)))
        while stopped_by is None and len(out_ids) < max_new_tokens:
            if limit is not None and pos >= limit:
                stopped_by = "buffer"
                break  # the buffer reserves 256 tokens beyond the prompt
            if shared and self._epoch != epoch:
                raise RuntimeError("another request reused this Generator's cache buffer while this stream was "
                                   "suspended: finish (or close) a stream before starting the next request")
            if ahead is not None:
                tok = next(ahead)
            elif graph is not None:
                tok = int(graph.replay(tok, pos)[1])
            else:
                tok = int(self._step(mode, cache, tok, pos).argmax())
            pos += 1
            out_ids.append(tok)
            if tok in self.eos_ids:
                stopped_by = "eos"
                break
            if guard and repeats(out_ids, guard):  # a loop: drop the repeated window and end
                answer, stopped_by = decode(out_ids[:-guard], skip_special_tokens=True), "repetition"
                break
            safe, answer = visible(out_ids)
            stopped_by = "stop" if answer is not None else None
            if len(safe) > len(text_so_far) and not safe.endswith("\ufffd"):
                yield safe[len(text_so_far):]
                text_so_far = safe
        if ahead is not None:
            ahead.close()
        ids = [t for t in out_ids if t not in self.eos_ids]
        if answer is None:
            answer = decode(ids, skip_special_tokens=True)
        _sync(self.device)
        t_end = time.perf_counter()
        if answer.startswith(text_so_far) and len(answer) > len(text_so_far):  # what was held back
            yield answer[len(text_so_far):]
        n_dec = len(out_ids) - 1
        yield GenerationResult(
            answer=answer.strip(), token_ids=ids, mode=mode,
            chunk_ids=[c.id for c in chunks], ttft_ms=(t_first - t0) * 1e3,
            decode_tokens_per_s=(n_dec / (t_end - t_first)) if n_dec and t_end > t_first else 0.0,
            n_context_tokens=info["n_context"], n_question_tokens=info["n_question"],
            n_recomputed=info["n_recomputed"],
            timings={"prefill_ms": (t_first - t0) * 1e3, "decode_ms": (t_end - t_first) * 1e3,
                     "decode_graph": graph is not None, "question_graph": info.get("question_graph", False),
                     "decode_sdpa": graph is not None and graph is self._graphs.get((info["bucket"], 1, "sdpa")),
                     "graph_capture_ms": info.get("capture_ms", 0.0), "cache_bucket": info.get("bucket"),
                     "stopped_by": stopped_by or "budget",
                     "question_bucket": info.get("question_bucket")})
