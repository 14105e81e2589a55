"""GPU pieces used only by the benchmarks (eval/bench_ttft.py): a prefetching loader, a GPU-resident chunk
pool and a fixed-length question-forward graph, built on the product's :class:`BlockKVCache` hooks.

* :class:`LayerPrefetcher` — host -> device loading of stitched contexts, overlapped with the question-block
  forward layer by layer (it waits through the cache's opt-in ``layer_ready`` hook).
* :class:`DeviceKVPool` — a GPU-resident arena of chunk caches; stitching is one fused gather(+RoPE) kernel.
* :class:`GraphedBlockForward` — a CUDA graph of :func:`forward_block` for one fixed (start, n).

Loading details (LayerPrefetcher):

The copies of a group of layers (every selected chunk, pinned host memory -> a staging buffer -> the
static stitched buffers) run on a side stream; after them one-word "layer ready" flags are set to the
current epoch. The forward (eager
or a replayed CUDA graph) waits for the flag of layer ``l`` right before that layer's attention with a
one-program spin kernel, so layer ``l``'s compute overlaps the copies of layers ``> l``. Flags are
compared against an epoch held on the device, so one captured graph serves every query.

8-bit option: a chunk's int8 K/V and its fp32 per-channel scales travel as one byte blob per layer
(one copy per layer and chunk, half the bytes of bf16) and a small Triton kernel dequantises the layer
into the bf16 stitched buffer on the copy stream before the flag is set.
"""
from __future__ import annotations

from typing import Sequence

import torch

from blockrag.attention_kv.block_cache import BlockKVCache, capture_graph, forward_block

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _spin_kernel(flags_ptr, epoch_ptr, err_ptr, layer, max_iter):
        e = tl.load(epoch_ptr)
        bad = tl.load(err_ptr, volatile=True)
        f = tl.load(flags_ptr + layer, volatile=True)
        i = 0
        while (f < e) & (i < max_iter) & (bad == 0):
            f = tl.load(flags_ptr + layer, volatile=True)
            i += 1
        if i >= max_iter:
            tl.store(err_ptr, 1)  # timed out: the host reads it through LayerPrefetcher.timed_out()

    @triton.jit
    def _dequant_kernel(blob_ptr, meta_ptr, k_ptr, v_ptr, k_tok_stride, start,
                        HD: tl.constexpr):
        t = tl.program_id(0)  # token index within the loaded span
        base = tl.load(meta_ptr + t * 3)       # byte offset of the chunk's blob in the staging buffer
        local = tl.load(meta_ptr + t * 3 + 1)  # token index within the chunk
        n = tl.load(meta_ptr + t * 3 + 2)      # chunk length
        offs = tl.arange(0, HD)
        row = blob_ptr + base + local * (2 * HD)
        qk = tl.load(row + offs).to(tl.int8, bitcast=True).to(tl.float32)
        qv = tl.load(row + HD + offs).to(tl.int8, bitcast=True).to(tl.float32)
        sp = (blob_ptr + base + n * (2 * HD)).to(tl.pointer_type(tl.float32), bitcast=True)
        sk = tl.load(sp + offs)
        sv = tl.load(sp + HD + offs)
        dst = (start + t) * k_tok_stride
        tl.store(k_ptr + dst + offs, (qk * sk).to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + dst + offs, (qv * sv).to(v_ptr.dtype.element_ty))

    @triton.jit
    def _unpack_kernel(buf_ptr, meta_ptr, dst_ptr, cos_ptr, sin_ptr, start, dst_layer_stride, dst_tok_stride,
                       HKV: tl.constexpr, HKV_P2: tl.constexpr, HALF: tl.constexpr, INT8: tl.constexpr,
                       ROPE: tl.constexpr):
        """Staging (one group of layers, chunk-major) -> stitched buffer; int8 dequant and RoPE fused."""
        t = tl.program_id(0)
        j = tl.program_id(1)  # layer within the group
        base = tl.load(meta_ptr + t * 3)
        local = tl.load(meta_ptr + t * 3 + 1)
        n = tl.load(meta_ptr + t * 3 + 2)
        ROW: tl.constexpr = HKV * 4 * HALF  # K and V of one token
        h = tl.arange(0, HKV_P2)[:, None]
        d = tl.arange(0, HALF)[None, :]
        m = (h < HKV) & (d < HALF)
        col = h * (2 * HALF) + d
        if INT8:
            lbytes = n * ROW + ROW * 4
            row = buf_ptr + base + j * lbytes + local * ROW
            sp = (buf_ptr + base + j * lbytes + n * ROW).to(tl.pointer_type(tl.float32), bitcast=True)
            k1 = tl.load(row + col, mask=m).to(tl.int8, bitcast=True).to(tl.float32) * tl.load(sp + col, mask=m)
            k2 = tl.load(row + col + HALF, mask=m).to(tl.int8, bitcast=True).to(tl.float32) * tl.load(sp + col + HALF, mask=m)
            VO: tl.constexpr = HKV * 2 * HALF
            v1 = tl.load(row + VO + col, mask=m).to(tl.int8, bitcast=True).to(tl.float32) * tl.load(sp + VO + col, mask=m)
            v2 = tl.load(row + VO + col + HALF, mask=m).to(tl.int8, bitcast=True).to(tl.float32) * tl.load(sp + VO + col + HALF, mask=m)
        else:
            row = buf_ptr + base + (j * n + local) * ROW
            VO2: tl.constexpr = HKV * 2 * HALF
            k1 = tl.load(row + col, mask=m).to(tl.float32)
            k2 = tl.load(row + col + HALF, mask=m).to(tl.float32)
            v1 = tl.load(row + VO2 + col, mask=m)
            v2 = tl.load(row + VO2 + col + HALF, mask=m)
        if ROPE:
            c = tl.load(cos_ptr + (start + t) * HALF + d)
            sn = tl.load(sin_ptr + (start + t) * HALF + d)
            a = k1
            k1 = a * c - k2 * sn
            k2 = k2 * c + a * sn
        ty = dst_ptr.dtype.element_ty
        dst = dst_ptr + j.to(tl.int64) * dst_layer_stride + (start + t).to(tl.int64) * dst_tok_stride + col
        tl.store(dst, k1.to(ty), mask=m)
        tl.store(dst + HALF, k2.to(ty), mask=m)
        VO3: tl.constexpr = HKV * 2 * HALF
        tl.store(dst + VO3, v1.to(ty), mask=m)
        tl.store(dst + VO3 + HALF, v2.to(ty), mask=m)

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False


def int8_blob(ckv) -> torch.Tensor:
    """uint8 ``[L, n*2*Hkv*D + 2*Hkv*D*4]``: per layer the int8 K/V rows then the fp32 scales."""
    assert ckv.scale is not None and ckv.kv.dtype == torch.int8
    L = ckv.kv.shape[0]
    data = ckv.kv.reshape(L, -1).view(torch.uint8)
    sc = ckv.scale.float().reshape(L, -1).contiguous().view(torch.uint8)
    return torch.cat([data, sc], dim=1).contiguous()


def _blob_meta(n_tok: Sequence[int], sizes: Sequence[int], device, absolute: bool = False) -> torch.Tensor:
    """int64 [ntot, 3]: (chunk blob offset, token index in chunk, chunk length) per token. ``sizes`` are
    the chunks' blob sizes, or (``absolute=True``) their offsets."""
    nt = torch.tensor(list(n_tok), dtype=torch.int64)
    if absolute:
        bases = torch.tensor(list(sizes), dtype=torch.int64)
    else:
        bases = torch.cumsum(torch.tensor([0] + list(sizes[:-1]), dtype=torch.int64), 0)
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), nt[:-1]]), 0)
    cidx = torch.repeat_interleave(torch.arange(len(nt)), nt)
    local = torch.arange(int(nt.sum())) - starts[cidx]
    meta = torch.stack([bases[cidx], local, nt[cidx]], dim=1).contiguous()
    if device.type == "cuda":
        meta = meta.pin_memory()
    return meta.to(device, non_blocking=True)


class LayerPrefetcher:
    """Copies ``parts`` into a :class:`BlockKVCache` layer by layer on a side stream (see module doc)."""

    def __init__(self, cache, max_iter: int = 1 << 22, group: int = 4):
        dev = cache.device
        self.cache = cache
        self.stream = torch.cuda.Stream(dev)
        self.flags = torch.zeros(cache.n_layers, dtype=torch.int32, device=dev)
        self.epoch_t = torch.zeros(1, dtype=torch.int32, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.epoch = 0
        self.max_iter = max_iter
        self.stage = None
        self._meta: dict = {}
        self._armed = None
        self.group = group
        cache.layer_ready = self.wait  # the forward waits for layer l's copies right before its attention

    def wait(self, layer: int) -> None:
        _spin_kernel[(1,)](self.flags, self.epoch_t, self.err, layer, self.max_iter, num_warps=1)

    def timed_out(self) -> bool:
        """True if a layer stopped waiting for its copies (results of that forward are invalid)."""
        return bool(self.err.item())

    def prepare(self, parts: Sequence, blobs: Sequence[torch.Tensor] | None = None) -> None:
        """Load once without overlap: compiles the kernels and makes the buffers. Do this before the first
        ``arm(); replay(); issue()``: a module load or pinned allocation while the compute stream is blocked
        in the spin-wait can stall until the wait times out."""
        self.start(parts, blobs=blobs)
        torch.cuda.synchronize(self.cache.device)

    def arm(self) -> torch.cuda.Event:
        """New epoch (on the compute stream); returns the event the copies must wait for. Call ``arm()``,
        then launch the forward (e.g. replay its graph), then ``issue(...)``: the CPU work of issuing the
        copies then overlaps the GPU work too."""
        main = torch.cuda.current_stream(self.cache.device)
        self.epoch += 1
        self.epoch_t.fill_(self.epoch)
        ev = torch.cuda.Event()
        ev.record(main)
        self._armed = ev
        return ev

    def start(self, parts: Sequence, start: int = 0, blobs: Sequence[torch.Tensor] | None = None) -> int:
        """``arm()`` + ``issue()``: load before the forward is launched (eager use)."""
        self.arm()
        return self.issue(parts, start, blobs)

    def issue(self, parts: Sequence, start: int = 0, blobs: Sequence[torch.Tensor] | None = None,
              group: int | None = None) -> int:
        """Copy ``parts`` ``group`` layers at a time; ``blobs`` (from :func:`int8_blob`) selects 8-bit.

        Per group: one host->device copy per chunk into a chunk-major staging buffer (double-buffered),
        then one kernel unpacks the group into the stitched buffer (int8 dequant, RoPE when the cache
        rotates at stitch time), then the group's layer flags are set.
        """
        cache = self.cache
        s = self.stream
        s.wait_event(self._armed)
        n_tok = [p.n_tokens for p in parts]
        total = start + sum(n_tok)
        ntot = total - start
        L = cache.n_layers
        G = group or self.group
        int8 = blobs is not None
        srcs = list(blobs) if int8 else [p.kv.reshape(L, -1) for p in parts]
        per_layer = [x.shape[1] for x in srcs]  # elements (bytes for int8) per layer and chunk
        gsize = G * sum(per_layer)
        dt = srcs[0].dtype
        rope = cache.rope == "stitch"
        with torch.cuda.stream(s):
            # everything the copy stream uses is made on the copy stream: the compute stream may already
            # be blocked in a replayed graph waiting for these very copies
            if self.stage is None or self.stage.dtype != dt or self.stage.numel() < 2 * gsize:
                self.stage = torch.empty(2 * gsize, dtype=dt, device=cache.device)
            mkey = (tuple(n_tok), tuple(per_layer), G)
            meta_t = self._meta.get(mkey)
            if meta_t is None:
                bases = [0]
                for x in per_layer[:-1]:
                    bases.append(bases[-1] + G * x)
                meta_t = self._meta[mkey] = _blob_meta(n_tok, bases, cache.device, absolute=True)
            tabs = (cache.cos_half, cache.sin_half) if rope else (meta_t, meta_t)
            for g, l0 in enumerate(range(0, L, G)):
                g_n = min(G, L - l0)
                buf = self.stage[(g % 2) * gsize:(g % 2 + 1) * gsize]
                base = 0
                for x, pl in zip(srcs, per_layer):
                    buf[base:base + g_n * pl].copy_(x[l0:l0 + g_n].reshape(-1), non_blocking=True)
                    base += G * pl
                _unpack_kernel[(ntot, g_n)](buf, meta_t, cache.kv[l0], tabs[0], tabs[1], start,
                                            cache.kv.stride(0), cache.kv.stride(2), HKV=cache.n_kv,
                                            HKV_P2=triton.next_power_of_2(cache.n_kv),
                                            HALF=cache.head_dim // 2, INT8=int8, ROPE=rope, num_warps=2)
                if not rope:
                    cache.kpos[l0:l0 + g_n, start:total] = cache._arange[start:total]
                self.flags[l0:l0 + g_n].fill_(self.epoch)
        cache.length = total
        return total


# ----------------------------------------------------------------------------- GPU-resident tier
if HAS_TRITON:
    @triton.jit
    def _gather_kernel(src_ptr, idx_ptr, dst_ptr, cos_ptr, sin_ptr, ntok, start,
                       src_layer_stride, src_tok_stride, dst_layer_stride, dst_tok_stride,
                       HKV: tl.constexpr, HKV_P2: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr,
                       ROPE: tl.constexpr):
        layer = tl.program_id(1)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        tm = t < ntok
        s = tl.load(idx_ptr + t, mask=tm, other=0)
        h = tl.arange(0, HKV_P2)
        d = tl.arange(0, HALF)
        m = tm[:, None, None] & (h < HKV)[None, :, None] & (d < HALF)[None, None, :]
        col = h[None, :, None] * (2 * HALF) + d[None, None, :]
        src = src_ptr + layer.to(tl.int64) * src_layer_stride + s[:, None, None] * src_tok_stride + col
        dst = dst_ptr + layer.to(tl.int64) * dst_layer_stride + (start + t)[:, None, None].to(tl.int64) * dst_tok_stride + col
        k1 = tl.load(src, mask=m)
        k2 = tl.load(src + HALF, mask=m)
        VOFF: tl.constexpr = HKV * 2 * HALF
        v1 = tl.load(src + VOFF, mask=m)
        v2 = tl.load(src + VOFF + HALF, mask=m)
        if ROPE:
            cs = (start + t)[:, None, None] * HALF + d[None, None, :]
            c = tl.load(cos_ptr + cs, mask=m, other=1.0)
            sn = tl.load(sin_ptr + cs, mask=m, other=0.0)
            a = k1.to(tl.float32)
            b = k2.to(tl.float32)
            k1 = (a * c - b * sn).to(dst_ptr.dtype.element_ty)
            k2 = (b * c + a * sn).to(dst_ptr.dtype.element_ty)
        tl.store(dst, k1, mask=m)
        tl.store(dst + HALF, k2, mask=m)
        tl.store(dst + VOFF, v1, mask=m)
        tl.store(dst + VOFF + HALF, v2, mask=m)


class DeviceKVPool:
    """GPU-resident tier: chunk caches in one arena ``kv[L, capacity, 2, Hkv, D]`` (bump allocation);
    stitching a context is one fused gather kernel over all layers, rotating K to its stitched position
    when the target cache uses ``rope="stitch"``."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, capacity: int, dtype=torch.bfloat16,
                 device="cuda"):
        self.kv = torch.empty(n_layers, capacity, 2, n_kv, head_dim, dtype=dtype, device=device)
        self.capacity, self.used = capacity, 0
        self.entries: dict = {}
        self._idx: dict = {}

    def put(self, key, ckv) -> tuple[int, int]:
        if key in self.entries:
            return self.entries[key]
        n = ckv.n_tokens
        if self.used + n > self.capacity:
            raise MemoryError("DeviceKVPool is full")
        self.kv[:, self.used:self.used + n].copy_(ckv.dequant(self.kv.dtype) if ckv.scale is not None else ckv.kv)
        self.entries[key] = (self.used, n)
        self.used += n
        return self.entries[key]

    def gather_into(self, cache, keys, start: int = 0) -> int:
        ents = tuple(self.entries[k] for k in keys)
        idx = self._idx.get(ents)
        if idx is None:
            idx = torch.cat([torch.arange(o, o + n, dtype=torch.int64) for o, n in ents])
            idx = idx.pin_memory().to(self.kv.device, non_blocking=True)
            if len(self._idx) > 64:
                self._idx.clear()
            self._idx[ents] = idx
        ntot = idx.numel()
        rope = cache.rope == "stitch"
        BT = 4
        _gather_kernel[(triton.cdiv(ntot, BT), cache.n_layers)](
            self.kv, idx, cache.kv, cache.cos_half if rope else idx, cache.sin_half if rope else idx,
            ntot, start, self.kv.stride(0), self.kv.stride(1), cache.kv.stride(0), cache.kv.stride(2),
            HKV=cache.n_kv, HKV_P2=triton.next_power_of_2(cache.n_kv), HALF=cache.head_dim // 2, BT=BT,
            ROPE=rope, num_warps=4)
        if not rope:
            cache.kpos[:, start:start + ntot] = cache._arange[start:start + ntot]
        cache.length = start + ntot
        return cache.length


# ----------------------------------------------------------------------------- fixed-length question graph
class GraphedBlockForward:
    """CUDA-graph capture of :func:`forward_block` for fixed (start, n): removes per-layer launch overhead.

    The context buffers are static, so any stitched context of the same length replays the same graph.
    ``replay(ids)`` returns (logits[1, V], argmax token) device tensors. (The product's ``GraphedStep``
    reads positions on the device instead, so one graph serves every context length.)
    """

    def __init__(self, model, cache: BlockKVCache, start: int, n: int, warmup: int = 2):
        self.model, self.cache, self.start, self.n = model, cache, start, n
        dev = cache.device
        self.ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        saved = cache.length
        self.graph, self.logits, self.token = capture_graph(
            lambda: forward_block(model, cache, self.ids, start), dev, warmup)
        cache.length = saved

    def replay(self, ids: torch.Tensor):
        self.ids.copy_(ids.view(1, -1), non_blocking=True)
        self.graph.replay()
        self.cache.length = self.start + self.n
        return self.logits, self.token
