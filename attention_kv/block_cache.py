"""The stitched static KV buffer of the cached modes and the forwards over it (through the model seam).

* :class:`BlockKVCache`: static per-layer buffers (token-major, K and V interleaved:
  ``kv[layers, 1, max_len, 2, Hkv, D]``) holding ``prefix + passages`` (loaded layer by layer, host->device
  copies on a side stream with one CUDA event per layer) followed by question / generated tokens. Its
  :meth:`~BlockKVCache.attend` is the seam's attention callback: it writes the current tokens' K/V at the
  declared positions and calls ``attention_kv.kernels.attend`` over the buffer.
* :class:`StagedLoad`: a side stream that stitches a request's context in layer groups, one event per group,
  so that a question forward (its CUDA graph waits on the events) overlaps the copy of the later layers.
* :func:`forward_block`: one seam forward of a contiguous block of tokens (question, or a decoded token).
* :class:`GraphedStep`: a CUDA graph of that forward with positions and cache length on the device
  (:func:`capture_graph` warms a forward up and captures it).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .masks import attend_reference, get_attend
from .model import ModelAdapter
from .rope import cos_sin, rope_rows_, stitch_rotated_


DEVICE_POSITIONS = 1024  # most tokens of one device-positioned (graphed) forward


def stage_groups(n_layers: int) -> list[tuple[int, int]]:
    """Layer groups of a staged load, doubling: 32 layers -> [0,1) [1,2) [2,4) [4,8) [8,16) [16,32). The copy
    of a group takes less time than the forward of the layers before it, so the forward seldom waits; few
    groups keep the host's launches few."""
    bounds = [0]
    while bounds[-1] < n_layers:
        bounds.append(min(n_layers, max(1, 2 * bounds[-1])))
    return list(zip(bounds[:-1], bounds[1:]))


class StagedLoad:
    """``StagedLoad(n_layers, device)``: the side stream and the per-group events of staged stitching.

    The events are *external* (``torch.cuda.Event(external=True)``): a question forward captured in a CUDA
    graph over a cache holding this object waits on them at each group's first layer (event-wait nodes), and
    each request's load records them again before the graph is replayed. Whoever reads the cache outside such
    a graph, frees a chunk the load reads, or drops the buffer calls :meth:`join` first."""

    def __init__(self, n_layers: int, device):
        self.device = torch.device(device)
        self.groups = stage_groups(n_layers)
        self.first = {l0: g for g, (l0, _) in enumerate(self.groups)}
        self.stream = torch.cuda.Stream(self.device)
        self.events = [torch.cuda.Event(external=True) for _ in self.groups]
        self.pending = False
        self.loads = 0  # staged loads queued so far

    def wait(self, layer: int) -> None:
        g = self.first.get(layer)
        if g is not None:
            torch.cuda.current_stream(self.device).wait_event(self.events[g])

    def join(self) -> None:
        """Order the current stream after every queued group."""
        if self.pending:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.pending = False


class BlockKVCache:
    """Static stitched cache: ``prefix + chunks`` (loaded) followed by question / generated tokens.

    ``BlockKVCache(model, max_len, device=None, dtype=None, backend="auto", rope="kernel")`` (``model``: an HF
    causal LM or its :class:`~attention_kv.model.ModelAdapter`). Before a forward, :meth:`begin` (or
    :meth:`begin_device`) declares where the forward's tokens go; :meth:`attend` is then the forward's
    attention callback. ``layer_ready``: optional hook ``f(layer)`` called before each layer's attention
    (a loader that copies layers while the forward runs waits there).
    """

    def __init__(self, model, max_len: int, device=None, dtype=None, backend: str = "auto", rope: str = "kernel",
                 kv: torch.Tensor | None = None, stages: StagedLoad | None = None):
        """``rope="kernel"``: context keys stay un-rotated and the attention kernel rotates them as it loads
        them (no stitching pass); ``rope="stitch"``: keys are rotated once while stitching (one extra pass).
        ``kv``: an existing buffer ``[layers, 1, >= max_len, 2, Hkv, D]`` whose first ``max_len`` positions
        this cache uses (caches of several sizes sharing one allocation). ``stages``: the buffer's
        :class:`StagedLoad` (shared by the caches over one allocation), for ``load_gathered(staged=True)``."""
        if rope not in ("kernel", "stitch"):
            raise ValueError("rope must be 'kernel' or 'stitch'")
        ad = ModelAdapter.of(model)
        ad.check_length(max_len)
        self.device = torch.device(device) if device is not None else ad.device
        self.dtype = dtype or ad.dtype
        self.n_layers, self.n_kv, self.head_dim = ad.n_layers, ad.n_kv_heads, ad.head_dim
        self.scale = ad.scale
        self.max_len = max_len
        self.rope = rope
        # K and V interleaved per token: a chunk's layer slice [n, 2, Hkv, D] is one contiguous copy
        if kv is None:
            kv = torch.empty(self.n_layers, 1, max_len, 2, self.n_kv, self.head_dim, dtype=self.dtype,
                             device=self.device)
        elif (kv.dim() != 6 or tuple(kv.shape[:2]) != (self.n_layers, 1) or kv.shape[2] < max_len
              or tuple(kv.shape[3:]) != (2, self.n_kv, self.head_dim)):
            raise ValueError(f"kv buffer of shape {tuple(kv.shape)} does not hold {max_len} positions of "
                             f"[{self.n_layers}, 1, n, 2, {self.n_kv}, {self.head_dim}]")
        self.kv = kv[:, :, :max_len]
        self.k = self.kv[:, :, :, 0]  # [layers, 1, max_len, Hkv, D] views
        self.v = self.kv[:, :, :, 1]
        self.inv_freq = ad.inv_freq.to(self.device)
        # Per layer, the position each stored key is rotated to in-kernel. Keys written by a forward
        # (question, decoded, recomputed tokens) arrive rotated: position 0 = identity rotation.
        self.kpos = torch.zeros(self.n_layers, max_len, dtype=torch.int32, device=self.device)
        self._arange = torch.arange(max_len, dtype=torch.int32, device=self.device)
        if rope == "stitch":
            c, s_ = cos_sin(self._arange, self.inv_freq)
            half = self.head_dim // 2
            self.cos_half, self.sin_half = c[:, :half].contiguous(), s_[:, :half].contiguous()
        self.length = 0  # valid positions
        self.backend = backend
        self._attend = get_attend()
        self.k_block = None  # optional int32 [max_len] block ids (question rows see all anyway)
        self.q_block = None
        self._events = None
        self.layer_ready: Callable[[int], None] | None = None  # opt-in hook before each layer's attention
        self.stages = stages if rope == "stitch" and self.device.type == "cuda" else None
        self._rows = None
        self._span = None
        self._dyn = 0  # > 0: the next forward's tokens sit at device positions dev_pos[:_dyn] (graph replays)
        self.dev_pos = None
        self.dev_len = None
        # a device-positioned decoded token through SDPA over the whole buffer, the keys past dev_len masked
        # (what a decode graph captured with it runs); else our kernel, which reads only the valid keys
        self.decode_sdpa = False
        self._decode_mask = None

    def loaded(self, start: int, end: int, layer: int | None = None) -> None:
        """Mark positions ``start..end`` as freshly loaded un-rotated context (all layers or one)."""
        if self.rope == "stitch":
            k = self.k if layer is None else self.k[layer:layer + 1]
            rope_rows_(k, self.cos_half, self.sin_half, start, end)
        elif layer is None:
            self.kpos[:, start:end] = self._arange[start:end]
        else:
            self.kpos[layer, start:end] = self._arange[start:end]

    # ------------------------------------------------------------------ loading context blocks
    def load(self, parts: Sequence, start: int = 0, stream: torch.cuda.Stream | None = None) -> int:
        """Copy ``parts`` (ChunkKV, host or device) into positions ``start..``, layer by layer.

        On CUDA with ``stream``, copies are issued on that stream and one event per layer is recorded;
        the attention of layer ``l`` then waits only for layer ``l``'s copies (copy/compute overlap).
        Returns the new length.
        """
        total = start + sum(p.n_tokens for p in parts)
        if total > self.max_len:
            raise ValueError(f"context of {total} tokens exceeds the cache's max_len {self.max_len}")
        use_stream = stream is not None and self.device.type == "cuda"
        if use_stream:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self._events = [torch.cuda.Event() for _ in range(self.n_layers)]
        ctx = torch.cuda.stream(stream) if use_stream else _nullcontext()
        with ctx:
            for l in range(self.n_layers):
                off = start
                for p in parts:
                    n = p.n_tokens
                    if p.scale is None:
                        self.kv[l, 0, off:off + n].copy_(p.kv[l], non_blocking=True)
                    else:  # int8: move the bytes, dequantise on the device
                        q = p.kv[l].to(self.device, non_blocking=True)
                        s = p.scale[l].to(self.device, non_blocking=True)
                        self.kv[l, 0, off:off + n] = (q.float() * s).to(self.dtype)
                    off += n
                self.loaded(start, total, l)
                if use_stream:
                    self._events[l].record(stream)
        self.length = total
        return total

    def load_gathered(self, parts_gpu: Sequence, start: int = 0, staged: bool = False) -> int:
        """Device-resident blocks, all layers at once: with ``rope="stitch"`` one pass copies them and rotates
        their keys (:func:`~attention_kv.rope.stitch_rotated_`), else one ``torch.cat``.

        ``staged`` (with :attr:`stages`): the copy is queued on the side stream in layer groups, each group
        recording its event; a question graph over this cache waits per group, anything else after
        ``stages.join()``."""
        n = sum(p.n_tokens for p in parts_gpu)
        st = self.stages if staged else None
        if st is not None:
            st.stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier readers of the buffer
            with torch.cuda.stream(st.stream):
                stitch_rotated_(self.kv, [p.kv for p in parts_gpu], start, self.cos_half, self.sin_half,
                                layer_groups=st.groups, after_group=lambda g: st.events[g].record(st.stream))
            st.pending = True
            st.loads += 1
        elif self.rope == "stitch":
            stitch_rotated_(self.kv, [p.kv for p in parts_gpu], start, self.cos_half, self.sin_half)
        else:
            torch.cat([p.kv for p in parts_gpu], dim=1, out=self.kv[:, 0, start:start + n])
            self.loaded(start, start + n)
        self.length = start + n
        return self.length

    def drop_events(self) -> None:
        self._events = None

    # ------------------------------------------------------------------ positions of the next forward
    def begin(self, start: int | None = None, n: int = 1, rows: torch.Tensor | None = None,
              kv_len: int | None = None, layers: tuple[int, int] | None = None) -> None:
        """Declare the positions of the next forward's tokens: ``start..start+n`` or explicit ``rows``
        (``layers``: the layer range whose keys at these positions will be rewritten; default all)."""
        l0, l1 = layers or (0, self.n_layers)
        if rows is None:
            start = self.length if start is None else start
            self._span = (start, start + n)
            self._rows = None
            self._kv_len = kv_len or start + n
            if self.rope == "kernel":
                self.kpos[l0:l1, start:start + n] = 0
        else:
            self._rows = rows.to(self.device)
            self._span = None
            self._kv_len = kv_len or int(rows.max().item()) + 1
            if self.rope == "kernel":
                self.kpos[l0:l1].index_fill_(1, self._rows, 0)

    def end(self) -> None:
        if self._span is not None:
            self.length = max(self.length, self._span[1])

    def begin_device(self, n: int) -> None:
        """Next forward: ``n`` tokens at the positions held in ``dev_pos[:n]``, keys valid up to ``dev_len``
        (both device tensors, set by :meth:`set_device_positions`): nothing in the forward depends on the
        position as a Python number, so one CUDA graph serves every step of a growing cache."""
        if self.rope != "stitch":
            raise NotImplementedError("device-positioned forwards need rope='stitch' (keys stored rotated)")
        self.device_positions(n)
        self._dyn = n
        self._rows = None
        self._span = None

    def device_positions(self, n: int) -> torch.Tensor:
        """The device tensor holding the next ``n`` positions (allocated once and never replaced: every graph
        of this cache captured it, so a reallocation would leave the earlier graphs reading stale positions)."""
        if self.dev_pos is None:
            self.dev_pos = torch.zeros(max(n, DEVICE_POSITIONS), dtype=torch.long, device=self.device)
            self.dev_len = torch.zeros(1, dtype=torch.int32, device=self.device)
        if n > self.dev_pos.numel():
            raise ValueError(f"a device-positioned forward holds at most {self.dev_pos.numel()} tokens, got {n}")
        return self.dev_pos[:n]

    def set_device_positions(self, start: int, n: int) -> None:
        """Put ``start..start+n`` into ``dev_pos`` / ``dev_len`` (a small host->device copy, stream-ordered)."""
        vals = torch.arange(start, start + n + 1, dtype=torch.long)
        self.dev_pos[:n].copy_(vals[:n], non_blocking=True)
        self.dev_len.copy_(vals[n:].to(torch.int32), non_blocking=True)

    def end_device(self) -> None:
        self._dyn = 0

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the current tokens' (rotated) K/V [1, Hkv, n, D] of ``layer``; return the layer's K/V views
        [1, Hkv, kv_len, D] that the attention reads."""
        if self._dyn:  # K and V scattered straight from the projection's views (no stacked copy)
            rows = self.dev_pos[:self._dyn]
            self.k[layer, 0].index_copy_(0, rows, k[0].transpose(0, 1).to(self.dtype))
            self.v[layer, 0].index_copy_(0, rows, v[0].transpose(0, 1).to(self.dtype))
            return self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2)
        if self._rows is None:
            s, e = self._span
            self.k[layer, :, s:e] = k.transpose(1, 2)
            self.v[layer, :, s:e] = v.transpose(1, 2)
        else:
            kv = torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)], dim=1)
            self.kv[layer, 0].index_copy_(0, self._rows, kv.to(self.dtype))
        L = self._kv_len
        return self.k[layer, :, :L].transpose(1, 2), self.v[layer, :, :L].transpose(1, 2)

    # ------------------------------------------------------------------ attention
    @torch.compiler.disable  # runs eagerly inside a compiled forward (GraphedStep(compile=True))
    def attend(self, layer_idx: int, q, k, v):
        """The seam's attention callback: write the current tokens' K/V (at the positions declared by
        :meth:`begin` / :meth:`begin_device`), then attend ``q`` over the layer's buffer up to ``kv_len``."""
        k, v = self._write(layer_idx, k, v)
        scaling = self.scale
        if self._events is not None:
            torch.cuda.current_stream(self.device).wait_event(self._events[layer_idx])
        if self.layer_ready is not None:
            self.layer_ready(layer_idx)
        if self.stages is not None and self._dyn > 1 and torch.cuda.is_current_stream_capturing():
            self.stages.wait(layer_idx)  # a question graph: event-wait nodes for a staged load's groups
        if self._dyn == 1 and self.decode_sdpa:
            if layer_idx == 0 or self._decode_mask is None:  # one mask per step, shared by the layers
                self._decode_mask = decode_mask(k.shape[2], self.dev_len, q.dtype)
            return masked_sdpa(q, k, v, self._decode_mask, scaling)
        if self._dyn:
            from .kernels.question_attention import attend_question

            # the output laid out [B, L, Hq, D] (returned as its [B, Hq, L, D] view): the o-projection then
            # reads it without a transposing copy
            B, Hq, L, D = q.shape
            out = torch.empty(B, L, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
            return attend_question(q, k, v, kv_len=self.dev_len, scale=scaling, out=out)
        L = k.shape[2]
        if self.rope == "kernel":
            rope = dict(inv_freq=self.inv_freq, k_positions=self.kpos[layer_idx, :L])
        else:
            rope = {}
        if self._rows is None and q.shape[2] == 1 and self.k_block is None and self.rope == "stitch":
            # one decoded token sees every key: plain SDPA, no mask, no per-length kernel plan
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling,
                                                                    enable_gqa=q.shape[1] != k.shape[1])
        if self._rows is None:
            kb = qb = None
            if self.k_block is not None:
                kb = self.k_block[:L]
                qb = self.q_block
            return self._attend(q, k, v, q_start=self._span[0], q_block=qb, k_block=kb, scale=scaling,
                                backend=self.backend, **rope)
        return attend_reference(q, k, v, q_rows=self._rows, scale=scaling, **rope)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def forward_block(model, cache: BlockKVCache, input_ids: torch.Tensor, start: int | None = None,
                  logits_to_keep: int = 1) -> torch.Tensor:
    """One seam forward of a contiguous block of tokens (question or one decoded token) at positions
    ``start..`` against ``cache`` (``model``: HF model or adapter). Returns logits [1, logits_to_keep, V]."""
    n = input_ids.shape[-1]
    start = cache.length if start is None else start
    cache.begin(start, n)
    pos = torch.arange(start, start + n, device=input_ids.device)
    out = ModelAdapter.of(model).forward(input_ids.view(1, -1), pos, cache.attend, logits_rows=logits_to_keep)
    cache.end()
    return out


def masked_sdpa(q, k, v, mask, scale):
    """SDPA with an additive mask; on CUDA through cuDNN only (the backend measured; another one that takes the
    mask could be far slower, so its absence raises instead and the caller keeps our kernel)."""
    gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def decode_mask(n_keys: int, kv_len: torch.Tensor, dtype) -> torch.Tensor:
    """[1, 1, 1, n_keys] additive mask: 0 for the first ``kv_len`` (device tensor) keys, -inf after."""
    pos = torch.arange(n_keys, device=kv_len.device)
    zero = torch.zeros((), dtype=dtype, device=kv_len.device)
    return torch.where(pos < kv_len, zero, torch.full_like(zero, float("-inf"))).view(1, 1, 1, n_keys)


def capture_graph(forward, dev, warmup: int, then: Callable[[torch.Tensor], None] | None = None):
    """Warm ``forward`` up on a side stream (first calls compile kernels, allocate), then capture it; returns
    (graph, last-position logits [1, V], argmax token) — the outputs live in the graph's memory. ``then(token)``
    is captured after the forward (device-side bookkeeping for the next replay)."""
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(warmup):
            forward()
    torch.cuda.current_stream(dev).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        logits = forward()[:, -1]
        token = logits.argmax(-1)
        if then is not None:
            then(token)
    return graph, logits, token


class GraphedStep:
    """CUDA graph of a forward of ``n`` tokens (decode: 1) at positions given on the device, over a
    :class:`BlockKVCache` with ``rope="stitch"``: captured once, replayed for every position of any context
    held in the same cache buffers. ``replay(ids, start)`` returns (logits[1, V], argmax token) device tensors.
    Warm-up and capture write to the last ``n`` slots of the buffer (never part of a context).

    ``select_row=True``: one graph serves every block of up to ``n`` tokens (a padded question):
    ``replay(ids, start, n_valid)`` pads ``ids`` to ``n`` and returns the logits of row ``n_valid - 1``. The
    padding sits after the real tokens, so causality keeps it out of their attention; its K/V land at
    positions the next tokens (decoded ones) overwrite before any later token can see them.

    A decode step (``n=1``) over a :class:`BlockKVCache` also advances itself on the device: each replay ends by
    making its argmax token the next input and moving the position and the key count on by one, so that
    :meth:`run_ahead` can queue step ``i + 1`` before the host has read step ``i``'s token."""

    def __init__(self, model, cache: BlockKVCache, n: int = 1, warmup: int = 2, compile: bool = False,
                 select_row: bool = False):
        if cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.cache, self.n = ModelAdapter.of(model), cache, n
        dev = cache.device
        self.ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.row = torch.zeros(1, dtype=torch.long, device=dev) if select_row else None
        self.pos = cache.device_positions(n)
        saved = cache.length
        cache.set_device_positions(cache.max_len - n, n)
        # compile: torch.compile (inductor) fuses the norms, RoPE and activations between our attention calls
        # before the capture; the first warm-up call compiles
        fwd = self._forward
        if compile:
            # the cache's attend runs eagerly between compiled pieces, one piece per decoder layer and
            # (layer_idx is a static int) one compilation per layer: allow that many
            n_layers = self.model.n_layers
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * n_layers + 8)
            fwd = torch.compile(self._forward, dynamic=False)
        # self-advancing decode steps need the position and key count as device tensors (the paged cache's
        # rows and page count do not move on by one)
        self.advances = n == 1 and getattr(cache, "dev_len", None) is not None and not select_row
        self.graph, self.logits, self.token = capture_graph(fwd, dev, warmup + (2 if compile else 0),
                                                            self._advance if self.advances else None)
        cache.length = saved
        self._host = self._done = None

    def _forward(self):
        c = self.cache
        c.begin_device(self.n)
        try:
            return self.model.forward(self.ids, self.pos, c.attend, logits_rows=1 if self.row is None else self.row)
        finally:
            c.end_device()

    def _advance(self, token: torch.Tensor) -> None:
        self.ids.copy_(token.view(1, 1))
        self.pos.add_(1)
        self.cache.dev_len.add_(1)

    def run_ahead(self, token: int, start: int, steps: int):
        """Token ids (ints) of ``steps`` decode steps from ``token`` at position ``start``, the next step always
        queued on the GPU before this one's token is read: the host's work per token (detokenising, stop
        rules, streaming) overlaps the GPU's next step. Stopping early (closing the iterator) leaves one step
        run ahead, whose K/V lies past the answer."""
        if not self.advances:
            raise ValueError("run_ahead needs a self-advancing decode graph (n=1 over a BlockKVCache)")
        if steps < 0 or start + steps > self.cache.max_len - self.n:
            raise ValueError("the cache buffer is full")
        if self._host is None:
            self._host = torch.zeros(2, dtype=torch.long, pin_memory=True)
            self._done = [torch.cuda.Event(), torch.cuda.Event()]
        host, done = self._host, self._done
        self.ids.fill_(int(token))
        self.cache.set_device_positions(start, 1)

        def launch(i):
            self.graph.replay()
            host[i % 2:i % 2 + 1].copy_(self.token, non_blocking=True)
            done[i % 2].record()

        if steps:
            launch(0)
        for i in range(steps):
            if i + 1 < steps:
                launch(i + 1)
            done[i % 2].synchronize()
            self.cache.length = start + i + 1
            yield int(host[i % 2])

    def replay(self, ids, start: int, n_valid: int | None = None):
        if start + self.n > self.cache.max_len - self.n:
            raise ValueError("the cache buffer is full")
        n_valid = self.n if n_valid is None else n_valid
        if n_valid != self.n and self.row is None:
            raise ValueError("a block shorter than the graph needs GraphedStep(select_row=True)")
        if not 0 < n_valid <= self.n:
            raise ValueError(f"{n_valid} tokens do not fit a graph of {self.n}")
        if isinstance(ids, torch.Tensor):
            ids = ids.view(1, -1)
            if ids.shape[1] != n_valid:
                raise ValueError(f"expected {n_valid} token ids, got {ids.shape[1]}")
            self.ids[:, :n_valid].copy_(ids, non_blocking=True)
            if n_valid < self.n:  # padding: the last real token repeated (its rows are never read)
                self.ids[:, n_valid:].copy_(ids[:, -1:].expand(1, self.n - n_valid), non_blocking=True)
        else:
            self.ids.fill_(int(ids))
        if self.row is not None:
            self.row.fill_(n_valid - 1)
        self.cache.set_device_positions(start, self.n)
        self.graph.replay()
        self.cache.length = start + n_valid
        return self.logits, self.token
