"""Host -> device loading of stitched contexts, overlapped with the question-block forward layer by layer.

The copies of layer ``l`` (every selected chunk, pinned host memory -> the static stitched buffers) run on
a side stream; after them a one-word "layer ready" flag is set to the current epoch. The forward (eager
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

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _spin_kernel(flags_ptr, epoch_ptr, layer, max_iter):
        e = tl.load(epoch_ptr)
        f = tl.load(flags_ptr + layer, volatile=True)
        i = 0
        while (f < e) & (i < max_iter):
            f = tl.load(flags_ptr + layer, volatile=True)
            i += 1

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


def _blob_meta(n_tok: Sequence[int], sizes: Sequence[int], device) -> torch.Tensor:
    """int64 [ntot, 3]: (chunk blob byte offset, token index in chunk, chunk length) per token."""
    nt = torch.tensor(list(n_tok), dtype=torch.int64)
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

    def __init__(self, cache, max_iter: int = 1 << 26):
        dev = cache.device
        self.cache = cache
        self.stream = torch.cuda.Stream(dev)
        self.flags = torch.zeros(cache.n_layers, dtype=torch.int32, device=dev)
        self.epoch_t = torch.zeros(1, dtype=torch.int32, device=dev)
        self.epoch = 0
        self.max_iter = max_iter
        self.stage = None
        self._meta: dict = {}
        self._armed = None
        cache.prefetcher = self

    def wait(self, layer: int) -> None:
        _spin_kernel[(1,)](self.flags, self.epoch_t, layer, self.max_iter, num_warps=1)

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

    def issue(self, parts: Sequence, start: int = 0, blobs: Sequence[torch.Tensor] | None = None) -> int:
        """Copy ``parts`` layer by layer; ``blobs`` (from :func:`int8_blob`) selects the 8-bit path."""
        cache = self.cache
        s = self.stream
        s.wait_event(self._armed)
        n_tok = [p.n_tokens for p in parts]
        total = start + sum(n_tok)
        HD = cache.n_kv * cache.head_dim
        with torch.cuda.stream(s):
            if blobs is None:
                for l in range(cache.n_layers):
                    off = start
                    for p, n in zip(parts, n_tok):
                        cache.kv[l, 0, off:off + n].copy_(p.kv[l], non_blocking=True)
                        off += n
                    cache.loaded(start, total, l)
                    self.flags[l:l + 1].fill_(self.epoch)
            else:
                sizes = [b.shape[1] for b in blobs]
                nbytes = sum(sizes)
                if self.stage is None or self.stage.numel() < 2 * nbytes:
                    self.stage = torch.empty(2 * nbytes, dtype=torch.uint8, device=cache.device)
                key = (tuple(n_tok), tuple(sizes))
                meta_t = self._meta.get(key)
                if meta_t is None:
                    meta_t = self._meta[key] = _blob_meta(n_tok, sizes, cache.device)
                ntot = total - start
                for l in range(cache.n_layers):
                    st = self.stage[(l % 2) * nbytes:(l % 2 + 1) * nbytes]  # double buffer
                    base = 0
                    for b, sz in zip(blobs, sizes):
                        st[base:base + sz].copy_(b[l], non_blocking=True)
                        base += sz
                    _dequant_kernel[(ntot,)](st, meta_t, cache.k[l], cache.v[l], cache.kv.stride(2), start,
                                             HD=HD, num_warps=4)
                    cache.loaded(start, total, l)
                    self.flags[l:l + 1].fill_(self.epoch)
        cache.length = total
        return total
