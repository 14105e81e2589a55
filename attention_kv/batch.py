"""Batched generation in the cached modes: several questions, each over its own passages, share forward passes.

    results = generate_batch(gen, [BatchRequest(q, chunks, max_new_tokens=32, stop=("\\n",)), ...])

(also ``Generator.generate_batch(requests)``). The engine (:class:`BatchEngine`) keeps one K/V buffer
``[layers, rows, cap, 2, Hkv, D]``: each running request owns one row, holding its stitched context (prefix +
passages, copied from the chunk caches and rotated to contiguous positions, as ``turbo`` does) followed by its
question and generated tokens. A step is either

* one batched question prefill of the requests that just joined (questions padded to the longest; a padded
  token's K/V lands past its row's last real position, where that row's next decoded token overwrites it
  before anything can see it), or
* one batched decode step of every running request (one token each, each at its own position).

Continuous batching: a request leaves as soon as a stopping rule ends it (the rows are kept packed: the last
row moves into the freed one), and a waiting one joins at the next step. The stopping rules are
``Generator.generate``'s (end-of-turn token, ``max_new_tokens``, ``stop`` strings, ``repetition_guard``),
per request. On CUDA the host reads a step's tokens only after it has launched the next step, so Python
work overlaps the GPU; a request that has just stopped therefore computes one extra token, which is dropped.

Attention over rows of different lengths (a padded batch with per-row positions): key ``j`` of row ``b`` is
visible to that row's query ``i`` iff ``j <= pos[b, i]``. Backends: ``"reference"`` (the CPU default: each
row through ``attention_kv.kernels.attend`` with the PyTorch reference, the computation ``generate`` does),
``"sdpa"`` (the CUDA default: one ``scaled_dot_product_attention`` call with an additive mask, the query
heads of each KV head folded into the query rows so no K/V is repeated), ``"matmul"`` (two batched matmuls
and an fp32 softmax), ``"flash"`` (CUDA, fp16/bf16: PyTorch's flash-attention varlen forward reading the
padded rows in place, each row's valid keys given by ``seqused_k``; causal alignment at each row's last
key). The Triton kernels take one length per call, so they are not used here. ``eval/bench_batch.py``
measures the three on the GPU (H200, 8B heads, 16 rows of 4-8K keys, one token each: sdpa 0.28 ms, flash
0.36 ms, matmul 1.58 ms). On CUDA the decode step replays a CUDA graph per padded row count (see
:class:`BatchEngine`); the prefill of joining requests runs eagerly.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .model import ModelAdapter
from .rope import cos_sin, rope_rows_

BACKENDS = ("auto", "reference", "sdpa", "matmul", "flash")
BATCH_MODES = ("turbo", "block")
_CAP_ROUND = 64  # row capacity rounded up to this many positions


@dataclass
class BatchRequest:
    """One question over its passages; ``None`` fields take the values given to :func:`generate_batch`."""

    question: str
    chunks: Sequence
    max_new_tokens: int | None = None
    stop: Sequence[str] | None = None
    repetition_guard: int | None = None
    mode: str | None = None  # "turbo" or "block" (the same computation; recorded in the result)


def as_request(r) -> BatchRequest:
    """A :class:`BatchRequest` from itself, a dict of its fields, or a ``(question, chunks)`` pair."""
    if isinstance(r, BatchRequest):
        return r
    if isinstance(r, dict):
        return BatchRequest(**r)
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return BatchRequest(r[0], r[1])
    raise TypeError(f"a batch request is a BatchRequest, a dict or a (question, chunks) pair, got {type(r).__name__}")


def context_parts(gen, chunks) -> list:
    """The request's context as ChunkKV blocks (shared prefix first, un-rotated K): from the Generator's device
    tier when it has one, else from the store (host). The one place the engine learns how a context is made."""
    if gen.device_cache_bytes:
        return gen._device_parts(list(chunks))
    return [gen.store.prefix_kv()] + gen.store.get_many(list(chunks))


class Handle:
    """A submitted request's state; ``result`` is its :class:`GenerationResult` once ``done``. ``on_piece``:
    optional ``f(text)`` called with each new piece of the answer as ``generate(stream=True)`` would yield it
    (text that could begin a stop string is held back until it cannot)."""

    def __init__(self, index: int, req: BatchRequest, q_ids: list[int], rules: tuple, max_new: int):
        self.index, self.req, self.q_ids = index, req, q_ids
        self.stop, self.guard = rules
        self.max_new = max(1, int(max_new))
        self.out_ids: list[int] = []
        self.stopped_by: str | None = None
        self.answer: str | None = None
        self.n_context = 0
        self.pos = 0  # next position to write (host mirror of the device positions)
        self.launched = 0  # tokens whose computation has been launched
        self.done = False
        self.result = None
        self.t_submit = time.perf_counter()
        self.t_join = self.t_first = self.t_end = None
        self.on_piece: Callable[[str], None] | None = None
        self.shown = ""  # text streamed so far

    def feed(self, tok: int, eos: set, decode: Callable) -> None:
        """One generated token through ``Generator.generate``'s stopping rules (same order, same outcome)."""
        if self.stopped_by is not None:
            return  # computed after the request stopped: dropped
        self.out_ids.append(tok)
        first = len(self.out_ids) == 1
        if first:
            self.t_first = time.perf_counter()
        if tok in eos:
            self.stopped_by = "eos"
        elif not first and self.guard and _repeats(self.out_ids, self.guard):
            self.answer, self.stopped_by = decode(self.out_ids[:-self.guard], skip_special_tokens=True), "repetition"
        elif self.stop:
            text, hit = _apply_stops(decode(self.out_ids, skip_special_tokens=True), self.stop)
            if hit:
                self.answer, self.stopped_by = text, "stop"
        if self.on_piece is not None and self.stopped_by not in ("eos", "repetition"):
            self._stream(decode)
        if self.stopped_by is None and len(self.out_ids) >= self.max_new:
            self.stopped_by = "budget"

    def _stream(self, decode) -> None:
        """generate()'s streaming rule: the text decided so far (cut at a stop string; minus a possible stop
        string's beginning and, with a repetition guard, the last ``guard`` tokens), once it is not a
        partial character."""
        from .decoding import held_back

        if self.answer is not None:
            safe = self.answer
        else:
            ids = self.out_ids[:max(0, len(self.out_ids) - self.guard)] if self.guard else self.out_ids
            text = decode(ids, skip_special_tokens=True)
            safe = text[:len(text) - held_back(text, self.stop)]
        if len(safe) > len(self.shown) and not safe.endswith("\ufffd"):
            self.on_piece(safe[len(self.shown):])
            self.shown = safe

    @property
    def needs_step(self) -> bool:
        return self.stopped_by is None and self.launched < self.max_new


def _apply_stops(text, stop):
    from .decoding import apply_stops
    return apply_stops(text, stop)


def _repeats(ids, n):
    from .decoding import repeats
    return repeats(ids, n)


class BatchEngine:
    """Continuous batching over one Generator's model and chunk caches.

    ``BatchEngine(gen, max_batch=16, mode="turbo", backend="auto", defaults=None, cuda_graphs=None)``;
    :meth:`submit` queues a request (returns a :class:`Handle`), :meth:`step` runs one batched forward
    (admitting waiting requests first) and returns the handles that finished, :meth:`run` steps until nothing
    is left. Not thread-safe: one thread drives an engine (and no other generation may use the Generator's
    model meanwhile).

    ``cuda_graphs`` (default on for CUDA): the decode step is a CUDA graph per padded row count (powers of two
    up to ``max_batch``), attending over each row's whole capacity with the mask computed on the device from
    the positions (rows past the running ones decode into a spare last slot and are ignored); without it an
    eager step costs ~35 ms of Python for an 8B model (measured on an H200), whatever the batch. The
    question prefill of joining requests stays eager (once per admission)."""

    def __init__(self, gen, max_batch: int = 16, mode: str = "turbo", backend: str = "auto",
                 defaults: dict | None = None, cuda_graphs: bool | None = None):
        if mode not in BATCH_MODES:
            raise ValueError(f"batched generation serves the cached modes {BATCH_MODES}, got {mode!r} "
                             f"(run 'full' and 'blend' through Generator.generate)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.gen, self.mode, self.max_batch = gen, mode, int(max_batch)
        self.ad = ModelAdapter.of(gen.model)
        self.device = gen.device
        self.dtype = next(gen.model.parameters()).dtype
        if backend == "auto":
            backend = "sdpa" if self.device.type == "cuda" else "reference"
        self.backend = backend
        d = dict(defaults or {})
        self.default_max_new = int(d.get("max_new_tokens", 64))
        self.default_stop = tuple(gen.stop if d.get("stop") is None else d["stop"])
        self.default_guard = int(gen.repetition_guard if d.get("repetition_guard") is None else d["repetition_guard"])
        self.waiting: deque[Handle] = deque()
        self.active: list[Handle] = []  # row i holds active[i]
        self._pending: deque = deque()  # (host tokens, event, handles) of launched steps not yet read
        self._n = 0
        self.kv: torch.Tensor | None = None
        self.tok: torch.Tensor | None = None
        self._cos = self._sin = None
        self.stats = {"prefill_steps": 0, "decode_steps": 0, "decode_rows": 0, "moves": 0, "prefill_s": 0.0,
                      "graphs": 0}
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and getattr(gen, "cuda_graphs", True)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # decode over padded row counts, full row capacity, positions on the device (what a graph replays);
        # tests switch it on for the CPU to run the captured computation eagerly
        self.pad_rows = self.cuda_graphs and backend != "reference"
        self._graphs: dict = {}
        self._pool = None
        self._gpos: torch.Tensor | None = None
        self.keep_logits, self.last_logits = False, None

    # ------------------------------------------------------------------ queueing
    def submit(self, request) -> Handle:
        req = as_request(request)
        if req.mode is not None and req.mode not in BATCH_MODES:
            raise ValueError(f"batched generation serves the cached modes {BATCH_MODES}, got {req.mode!r}")
        q_ids = self.gen.store.question_ids(req.question)
        rules = (tuple(self.default_stop if req.stop is None else req.stop),
                 int(self.default_guard if req.repetition_guard is None else req.repetition_guard))
        h = Handle(self._n, req, q_ids, rules, self.default_max_new if req.max_new_tokens is None
                   else req.max_new_tokens)
        self._n += 1
        self.waiting.append(h)
        return h

    def cancel(self, h: Handle) -> bool:
        """Stop ``h`` now (its row is freed at once; ``result.timings["stopped_by"]`` is "cancelled").
        Returns True when ``h`` is finished by this call (else a launched step still holds it: :meth:`step`
        returns it once that step is read)."""
        if h.done:
            return False
        if h.stopped_by is None:
            h.stopped_by = "cancelled"
        if h in self.waiting:
            self.waiting.remove(h)
            h.t_join = h.t_first = time.perf_counter()
        for i, a in enumerate(self.active):
            if a is h:
                self._leave(i)
                break
        if any(h in r[2] for r in self._pending):
            return False
        if h.t_first is None:
            h.t_first = time.perf_counter()
        self._finish(h)
        return True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active or self._pending)

    def run(self) -> None:
        while self.busy:
            self.step()

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def step(self) -> list[Handle]:
        """Admit waiting requests (one batched prefill), else one batched decode step; then read the tokens of
        the previous launch (the newest one too when nothing more will be launched). Returns finished handles."""
        launched = False
        if self.waiting and len(self.active) < self.max_batch:
            self._admit()
            launched = True
        elif self.active:
            self._decode()
            launched = True
        finished = []
        while self._pending and (len(self._pending) > 1 or not launched or not self.active
                                 or self.device.type != "cuda"):
            finished += self._read(self._pending.popleft())
        return finished

    def _read(self, rec) -> list[Handle]:
        host, event, handles = rec
        if event is not None:
            event.synchronize()
        decode, eos = self.gen.tokenizer.decode, self.gen.eos_ids
        for h, t in zip(handles, host.tolist()):
            h.feed(int(t), eos, decode)
        # requests that stopped leave their rows (highest row first, so the moves keep the others valid)
        gone = sorted((i for i, h in enumerate(self.active) if not h.needs_step), reverse=True)
        for i in gone:
            self._leave(i)
        out = []
        for h in handles:
            if not h.done and h.stopped_by is not None and not any(h in r[2] for r in self._pending):
                self._finish(h)
                out.append(h)
        return out

    def _leave(self, i: int) -> None:
        last = len(self.active) - 1
        if i != last:  # keep rows packed: the last row moves into row i (K/V up to its written positions)
            h = self.active[last]
            self.kv[:, i, :h.pos].copy_(self.kv[:, last, :h.pos])
            self.tok[i] = self.tok[last]
            self.active[i] = h
            self.stats["moves"] += 1
        self.active.pop()

    def _finish(self, h: Handle) -> None:
        from .decoding import GenerationResult

        h.t_end = time.perf_counter()  # its last token has been read: its computation is over
        ids = [t for t in h.out_ids if t not in self.gen.eos_ids]
        answer = h.answer if h.answer is not None else self.gen.tokenizer.decode(ids, skip_special_tokens=True)
        if h.on_piece is not None and answer.startswith(h.shown) and len(answer) > len(h.shown):
            h.on_piece(answer[len(h.shown):])  # what was held back
            h.shown = answer
        n_dec = len(h.out_ids) - 1
        dt = h.t_end - h.t_first
        h.result = GenerationResult(
            answer=answer.strip(), token_ids=ids, mode=h.req.mode or self.mode, chunk_ids=[c.id for c in h.req.chunks],
            ttft_ms=(h.t_first - h.t_submit) * 1e3, decode_tokens_per_s=n_dec / dt if n_dec and dt > 0 else 0.0,
            n_context_tokens=h.n_context, n_question_tokens=len(h.q_ids),
            timings={"queue_ms": (h.t_join - h.t_submit) * 1e3, "decode_ms": dt * 1e3, "stopped_by": h.stopped_by,
                     "batched": True, "attention": self.backend})
        h.done = True

    # ------------------------------------------------------------------ buffer
    def _reserve(self, rows: int, cap: int) -> None:
        """Make the buffer hold ``rows`` rows of ``cap`` positions; growing copies the running rows over."""
        if self.kv is not None and self.kv.shape[1] >= rows and self.kv.shape[2] >= cap:
            return
        ad = self.ad
        if self.kv is not None:
            rows, cap = max(rows, self.kv.shape[1]), max(cap, self.kv.shape[2])
        cap = -(-(cap + 1) // _CAP_ROUND) * _CAP_ROUND  # + a spare last slot (padding rows of a graphed step)
        # zeros, not empty: keys past a row's length are read (then masked), and must not hold NaN bit patterns
        kv = torch.zeros(ad.n_layers, rows, cap, 2, ad.n_kv_heads, ad.head_dim, dtype=self.dtype, device=self.device)
        tok = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self.kv is not None:
            for i, h in enumerate(self.active):
                kv[:, i, :h.pos].copy_(self.kv[:, i, :h.pos])
            tok[:self.tok.numel()].copy_(self.tok)
        self.kv, self.tok = kv, tok
        self._graphs.clear()  # they captured the old buffers
        self._gpos = torch.full((rows, 1), cap - 1, dtype=torch.long, device=self.device)
        c, s = cos_sin(torch.arange(cap, device=self.device), ad.inv_freq.to(self.device))
        half = ad.head_dim // 2
        self._cos, self._sin = c[:, :half].contiguous(), s[:, :half].contiguous()

    def reserve_for(self, handles: Sequence[Handle]) -> None:
        """Size the buffer for these requests at once (``max_batch`` rows, the longest one's positions)."""
        Lq = max(len(h.q_ids) for h in handles)
        self._reserve(self.max_batch, max(self._context_len(h) + Lq + h.max_new + 1 for h in handles))

    def _load(self, row: int, h: Handle) -> None:
        """Copy the request's context into ``row`` and rotate its keys to positions 0.. (as ``turbo`` stitches)."""
        off = 0
        for p in context_parts(self.gen, h.req.chunks):
            n = p.n_tokens
            src = p.kv if p.scale is None else p.to(self.device).dequant(self.dtype)
            self.kv[:, row, off:off + n].copy_(src, non_blocking=True)
            off += n
        rope_rows_(self.kv[:, row:row + 1, :, 0], self._cos, self._sin, 0, off)
        h.n_context = off

    # ------------------------------------------------------------------ forwards
    def _admit(self) -> None:
        t = time.perf_counter()
        n_free = self.max_batch - len(self.active)
        new = [self.waiting.popleft() for _ in range(min(n_free, len(self.waiting)))]
        for h in new:  # context lengths are known from the chunks without loading anything
            h.t_join = time.perf_counter()
        Lq = max(len(h.q_ids) for h in new)
        parts_len = [self._context_len(h) for h in new]
        need = max(n + Lq + h.max_new + 1 for n, h in zip(parts_len, new))
        ad = self.ad
        limit = self.gen.max_cache_len
        if need > limit:
            raise ValueError(f"a batched request needs {need} positions, more than max_cache_len={limit}")
        ad.check_length(need)
        self._reserve(max(self.max_batch if self.kv is None else 0, len(self.active) + len(new)), need)
        r0 = len(self.active)
        for j, h in enumerate(new):
            self._load(r0 + j, h)
        ids = torch.tensor([h.q_ids + [h.q_ids[-1]] * (Lq - len(h.q_ids)) for h in new])
        starts = [h.n_context for h in new]
        pos = torch.tensor(starts)[:, None] + torch.arange(Lq)[None]
        last = torch.tensor([len(h.q_ids) - 1 for h in new])
        self._forward(r0, new, ids, pos, starts, last)
        for h in new:
            h.pos = h.n_context + len(h.q_ids)
            h.launched = 1
        self.active += new
        self.stats["prefill_steps"] += 1
        self.stats["prefill_s"] += time.perf_counter() - t

    def _context_len(self, h: Handle) -> int:
        store = self.gen.store
        sep = len(store.sep_ids)
        return len(store.prefix_ids) + sum(len(c.token_ids) + sep if getattr(c, "token_ids", None)
                                           else len(store.chunk_token_ids(c)) for c in h.req.chunks)

    def _decode(self) -> None:
        rows = self.active
        starts = [h.pos for h in rows]
        pos = torch.tensor(starts)[:, None]
        if self.pad_rows and self.backend != "reference":
            self._padded_decode(list(rows), pos)
        else:
            self._forward(0, list(rows), None, pos, starts, torch.zeros(len(rows), dtype=torch.long))
        for h in rows:
            h.pos += 1
            h.launched += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        # a request whose last token is now launched needs no more steps: its row is freed at once
        for i in sorted((i for i, h in enumerate(self.active) if not h.needs_step), reverse=True):
            self._leave(i)

    def _forward(self, r0: int, handles: list, ids, pos_host, starts: list, last) -> None:
        """One forward of rows ``r0..r0+B`` (``ids`` [B, L] host, or None: the rows' current tokens) at
        positions ``pos_host`` [B, L]; the argmax of row ``last[b]`` becomes row b's next token."""
        dev, B = self.device, len(handles)
        pos = _to_device(pos_host, dev)
        if ids is None:
            ids_d = self.tok[r0:r0 + B].view(B, 1)
        else:
            ids_d = _to_device(ids, dev)
        L = pos_host.shape[1]
        Lk = int(pos_host.max()) + 1
        if self.backend != "reference":
            Lk = min(-(-Lk // 16) * 16, self.kv.shape[2])  # aligned rows for the fused kernels' mask loads
        vis = torch.arange(Lk, device=dev)[None, None, :] <= pos[:, :, None]  # [B, L, Lk]
        ctx = _Step(self, r0, B, pos, vis, starts, Lk, L)
        h = self.ad.hidden_states(ids_d, pos, ctx.attend)
        rows = _to_device(last, dev)
        h = h[torch.arange(B, device=dev), rows][:, None]
        logits = self.ad.logits(h)[:, 0]
        if self.keep_logits:  # for comparisons (benchmarks): the rows' last logits of this forward
            self.last_logits = logits
        tok = logits.argmax(-1)
        self.tok[r0:r0 + B] = tok
        self._record(tok, handles)


    # ------------------------------------------------------------------ graphed decode
    def _padded_decode(self, handles: list, pos: torch.Tensor) -> None:
        n = len(handles)
        Bg = min(1 << (n - 1).bit_length(), self.kv.shape[1])
        full = torch.full((Bg, 1), self.kv.shape[2] - 1, dtype=torch.long)
        full[:n] = pos
        self._gpos[:Bg].copy_(full.pin_memory() if self.device.type == "cuda" else full, non_blocking=True)
        g = self._graph(Bg) if self.cuda_graphs else None
        if g is not None:
            g.replay()
        else:
            self._padded_forward(Bg)
        self._record(self.tok[:n], handles)

    def _padded_forward(self, Bg: int) -> None:
        """Decode rows ``0..Bg`` at positions ``_gpos[:Bg]`` over the whole row capacity (static shapes: the
        computation a graph captures)."""
        cap, dev = self.kv.shape[2], self.device
        pos = self._gpos[:Bg]
        vis = torch.arange(cap, device=dev)[None, None, :] <= pos[:, :, None]
        ctx = _Step(self, 0, Bg, pos, vis, None, cap, 1)
        h = self.ad.hidden_states(self.tok[:Bg].view(Bg, 1), pos, ctx.attend)
        self.tok[:Bg].copy_(self.ad.logits(h[:, -1:])[:, 0].argmax(-1))

    def _graph(self, Bg: int):
        """The decode graph of ``Bg`` rows, captured on first use (warm-up runs write only the spare slot and
        the tokens, which are restored); None, with graphs off, when capture fails."""
        g = self._graphs.get(Bg)
        if g is not None:
            return g
        dev = self.device
        cap = self.kv.shape[2]
        saved_tok, saved_pos = self.tok[:Bg].clone(), self._gpos[:Bg].clone()
        self._gpos[:Bg].fill_(cap - 1)
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._padded_forward(Bg)
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._padded_forward(Bg)
            self._pool = g.pool()
            self._graphs[Bg] = g
            self.stats["graphs"] += 1
        except Exception as ex:  # noqa: BLE001 - an optimisation only: decode eagerly instead
            import warnings

            warnings.warn(f"batched decode graph capture failed ({type(ex).__name__}: {ex}); decoding eagerly")
            self.cuda_graphs = False
            g = None
        self.tok[:Bg].copy_(saved_tok)
        self._gpos[:Bg].copy_(saved_pos)
        return g

    def _record(self, tok: torch.Tensor, handles: list) -> None:
        """Queue the host copy of a launched step's tokens (read later, after the next launch)."""
        if self.device.type == "cuda":
            host = torch.empty(tok.numel(), dtype=torch.long, pin_memory=True)
            host.copy_(tok, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        else:
            host, ev = tok.clone(), None
        self._pending.append((host, ev, list(handles)))


def _to_device(t: torch.Tensor, dev) -> torch.Tensor:
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)  # no wait on the queued GPU work
    return t.to(dev)


class _Step:
    """The attention callback of one batched forward: writes the tokens' K/V at their rows' positions, then
    attends each row over its own valid keys."""

    def __init__(self, eng: BatchEngine, r0: int, B: int, pos, vis, starts, Lk: int, L: int):
        self.eng, self.r0, self.B, self.pos, self.vis, self.starts, self.Lk, self.L = eng, r0, B, pos, vis, starts, Lk, L
        self.bidx = torch.arange(B, device=pos.device)[:, None]
        self.bias = None

    def attend(self, layer: int, q, k, v):
        eng = self.eng
        buf = eng.kv[layer, self.r0:self.r0 + self.B]  # [B, cap, 2, Hkv, D]
        new = torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=2).to(buf.dtype)  # [B, L, 2, Hkv, D]
        buf[self.bidx, self.pos] = new
        K = buf[:, :self.Lk, 0].transpose(1, 2)  # [B, Hkv, Lk, D] views
        V = buf[:, :self.Lk, 1].transpose(1, 2)
        return attend_rows(q, K, V, self.vis, eng.ad.scale, eng.backend, starts=self.starts, step=self, rows=buf)


def attend_rows(q, k, v, vis, scale: float, backend: str, starts=None, step=None, rows=None):
    """Attention of ``q [B, Hq, L, D]`` over ``k, v [B, Hkv, Lk, D]`` where row b's query i sees key j iff
    ``vis[b, i, j]`` (``vis [B, L, Lk]`` bool). ``starts``: the global index of each row's first query (the
    reference backend runs each row with ``q_start``, keys cut at its last visible one; ``vis`` must then be
    causal from there). ``rows``: the rows' whole buffer ``[B, cap, 2, Hkv, D]`` (the flash backend reads it in
    place; ``k``/``v`` are its views)."""
    B, Hq, L, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if backend == "reference":
        from .kernels import attend

        outs = []
        for b in range(B):
            s = int(starts[b])
            n = s + L
            outs.append(attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], q_start=s, scale=scale,
                               backend="torch"))
        return torch.cat(outs)
    if backend == "flash":
        return _flash_rows(q, rows, vis, scale)
    bias = None if step is None else step.bias
    if bias is None:  # built once per forward (every layer shares it); rows (g, i) of a KV head see vis[b, i]
        fold = vis[:, None].expand(B, G, L, Lk).reshape(B, 1, G * L, Lk)
        dt = q.dtype if backend == "sdpa" else torch.float32
        bias = torch.zeros(fold.shape, dtype=dt, device=q.device).masked_fill_(~fold, float("-inf"))
        if step is not None:
            step.bias = bias
    qf = q.reshape(B, Hkv, G * L, D)
    if backend == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=bias, scale=scale)
    elif backend == "matmul":
        s = torch.matmul(qf, k.transpose(-1, -2)).float() * scale + bias
        out = torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return out.reshape(B, Hq, L, D)


def _flash_rows(q, rows, vis, scale: float):
    """Flash-attention varlen over padded rows: sequence b's keys start at ``b * cap`` and its first
    ``seqused_k[b]`` are valid (the rows' last visible key + 1); queries aligned causally at the end."""
    B, Hq, L, D = q.shape
    cap = rows.shape[1]
    used = (vis[:, -1].sum(-1)).to(torch.int32)  # row b's last query sees keys 0..used-1
    dev = q.device
    kp, vp = rows[:, :, 0].flatten(0, 1), rows[:, :, 1].flatten(0, 1)  # [B * cap, Hkv, D] views
    cu_k = torch.arange(B + 1, dtype=torch.int32, device=dev) * cap
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev) * L
    qp = q.transpose(1, 2).reshape(B * L, Hq, D)
    out = torch.ops.aten._flash_attention_forward(qp, kp, vp, cu_q, cu_k, L, vis.shape[-1], 0.0, True, False,
                                                  scale=scale, seqused_k=used)[0]
    return out.view(B, L, Hq, D).transpose(1, 2)


def generate_batch(gen, requests: Sequence, mode: str = "turbo", max_batch: int = 16, max_new_tokens: int = 64,
                   stop: Sequence[str] | None = None, repetition_guard: int | None = None,
                   backend: str = "auto") -> list:
    """Generate answers for ``requests`` (BatchRequest / dict / (question, chunks)) sharing forward passes, at
    most ``max_batch`` at once (continuous batching); returns their GenerationResults in request order.
    ``max_new_tokens`` / ``stop`` / ``repetition_guard``: defaults for requests that do not set their own
    (``stop``/``repetition_guard`` default to the Generator's, as in ``generate``)."""
    reqs = [as_request(r) for r in requests]
    if not reqs:
        return []
    eng = BatchEngine(gen, max_batch=min(max_batch, len(reqs)), mode=mode, backend=backend,
                      defaults={"max_new_tokens": max_new_tokens, "stop": stop, "repetition_guard": repetition_guard})
    handles = [eng.submit(r) for r in reqs]
    eng.reserve_for(handles)  # one allocation for the whole run (no growth copies)
    eng.run()
    return [h.result for h in handles]
