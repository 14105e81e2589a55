"""Zero-copy stitching: chunk caches live in pages of one arena and a request is a page table.

* :class:`PageArena` — the device tier of the paged path: ``kv[layers, pages, PAGE, 2, Hkv, D]`` (K and V
  interleaved per token, as in the stitched buffer), chunk caches (and the shared prefix) in whole pages,
  LRU-evicted. A chunk's keys are stored rotated to their positions inside the chunk (0..n-1), once, when
  the chunk enters the arena, into consecutive pages when a free run is long enough (the kernel's affine runs
  then read the chunk as one block).
* :class:`PagedKVCache` — one request over the arena: the page table of ``prefix + chunks`` (each page with
  the position of its first token and the rotation ``delta`` still owed to its keys, applied to the query
  rows by ``kernels.paged_attention``) followed by a small tail of pages for the question's and the decoded
  tokens' own K/V. Nothing is copied per request; no second copy of any K/V exists. It has the interface
  :func:`~attention_kv.block_cache.forward_block` and :class:`~attention_kv.block_cache.GraphedStep` use
  (``begin``/``end``, ``begin_device``/``set_device_positions``, ``attend``), so the question forward and
  the decode step run eagerly or as CUDA graphs over it; positions, write rows and the page count are read
  on the device, so one graph per question length serves every request.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .kernels.paged_attention import attend_paged
from .model import ModelAdapter
from .rope import cos_sin, rotate

DEVICE_POSITIONS = 1024  # most tokens of one forward over the paged cache


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PagedEntry:
    """One block's cache in the arena: its pages (in order) and token count."""

    pages: np.ndarray  # int32 [n_pages]
    n_tokens: int


class PageArena:
    """``PageArena(n_layers, n_kv, head_dim, n_pages, page, dtype, device)``: fixed pages, LRU over entries.

    The memory is zero-filled once: rows no entry has written (a chunk's last page past its end, tail rows not
    yet written) hold finite values, so masked keys can never turn a softmax into NaN."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, n_pages: int, page: int, dtype, device):
        if page < 1 or page & (page - 1):
            raise ValueError(f"page size must be a power of two, got {page}")
        self.page, self.n_pages = int(page), int(n_pages)
        self.kv = torch.zeros(n_layers, self.n_pages, self.page, 2, n_kv, head_dim, dtype=dtype, device=device)
        self._free = list(range(self.n_pages - 1, -1, -1))  # popped from the end: low ids first
        self.entries: "OrderedDict[str, PagedEntry]" = OrderedDict()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def page_bytes(self) -> int:
        return self.nbytes // self.n_pages

    def get(self, key: str) -> PagedEntry | None:
        ent = self.entries.get(key)
        if ent is not None:
            self.entries.move_to_end(key)
        return ent

    def alloc(self, n: int, pinned: Sequence[str] = ()) -> np.ndarray:
        """``n`` free page ids, evicting least recently used entries not in ``pinned``; MemoryError when
        the pinned entries leave too few."""
        keep = set(pinned)
        victims = iter([k for k in self.entries if k not in keep])
        while len(self._free) < n:
            k = next(victims, None)
            if k is None:
                raise MemoryError(f"page arena: {n} pages needed, {len(self._free)} free of {self.n_pages}")
            self._free.extend(self.entries.pop(k).pages.tolist())
        return self._take(n)

    def _take(self, n: int) -> np.ndarray:
        """``n`` of the free pages: the lowest run of ``n`` consecutive ids when there is one (the paged
        kernel then reads the entry's pages as one run, computing their ids), else the lowest ids."""
        free = np.sort(np.asarray(self._free, dtype=np.int64))
        i0 = 0
        if n > 1:
            cut = np.flatnonzero(np.diff(free) != 1) + 1  # where a run of consecutive ids starts
            starts = np.concatenate([[0], cut])
            ends = np.concatenate([cut, [len(free)]])
            fit = np.flatnonzero(ends - starts >= n)
            i0 = int(starts[fit[0]]) if len(fit) else 0
        out = free[i0:i0 + n]
        self._free = np.concatenate([free[:i0], free[i0 + n:]])[::-1].tolist()  # popped from the end: low first
        return out.astype(np.int32)

    @torch.no_grad()
    def put(self, key: str, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pinned: Sequence[str] = ()) -> PagedEntry:
        """Store ``kv [layers, n, 2, Hkv, D]`` (K un-rotated, on the arena's device) under ``key``: K rotated to
        positions 0..n-1 with the fp32 tables ``cos``/``sin`` ``[>= n, D]``, written into whole pages."""
        ent = self.entries.get(key)
        if ent is not None:
            self.entries.move_to_end(key)
            return ent
        n = int(kv.shape[1])
        pages = self.alloc(_cdiv(n, self.page), pinned)
        k = rotate(kv[:, :, 0], cos[:n, None, :], sin[:n, None, :])
        src = torch.stack([k, kv[:, :, 1]], dim=2).to(self.kv.dtype)
        rows = (pages.astype(np.int64)[:, None] * self.page + np.arange(self.page)).reshape(-1)[:n]
        flat = self.kv.view(self.kv.shape[0], self.n_pages * self.page, *self.kv.shape[3:])
        flat.index_copy_(1, torch.from_numpy(rows).to(self.kv.device), src)
        ent = PagedEntry(pages, n)
        self.entries[key] = ent
        return ent


class PagedKVCache:
    """``PagedKVCache(model, arena, max_positions, tail_tokens=2304, backend="auto")``: a request over ``arena``.

    :meth:`set_request` lays out ``prefix + chunks`` (entries of the arena) at positions ``0..n_context-1`` and
    puts the tail after them; ``max_len`` is then ``n_context + tail capacity``. ``tail_tokens``: pages kept
    for the question (padded) and the decoded tokens (taken from the arena once, never evicted)."""

    def __init__(self, model, arena: PageArena, max_positions: int, tail_tokens: int = 2304,
                 backend: str = "auto"):
        ad = ModelAdapter.of(model)
        self.arena = arena
        self.device = arena.kv.device
        self.dtype = arena.kv.dtype
        self.n_layers, self.n_kv, self.head_dim, self.scale = ad.n_layers, ad.n_kv_heads, ad.head_dim, ad.scale
        self.page = arena.page
        self.backend = backend
        half = self.head_dim // 2
        c, s = cos_sin(torch.arange(max_positions + 1, device=self.device), ad.inv_freq.to(self.device))
        self.cos, self.sin = c, s  # fp32 [positions, D]: rotating chunks as they enter the arena
        self.cos_half, self.sin_half = c[:, :half].contiguous(), s[:, :half].contiguous()  # the kernel's deltas
        self.tail_pages = arena.alloc(_cdiv(tail_tokens, self.page))
        self.tail_cap = len(self.tail_pages) * self.page
        self.capacity = arena.n_pages  # the most pages a table can hold
        self.table = torch.zeros(4, self.capacity, dtype=torch.int32, device=self.device)
        # [page count, positions (n), write rows (n)] of the next forward; a graph of n tokens captured its views
        self.meta = torch.zeros(1 + 2 * DEVICE_POSITIONS, dtype=torch.int64, device=self.device)
        self._n = 0
        self._span = None
        self.n_ctx_pages = 0
        self.tail_start = 0
        self.length = 0
        self.set_request([], 0)

    @property
    def max_len(self) -> int:
        return self.tail_start + self.tail_cap

    @property
    def kv(self) -> torch.Tensor:
        return self.arena.kv

    # ------------------------------------------------------------------ the request's page table
    def set_request(self, parts: Sequence[PagedEntry], n_context: int) -> None:
        """Page table of ``parts`` (in order, at positions 0..n_context-1) followed by the tail."""
        if sum(p.n_tokens for p in parts) != n_context:
            raise ValueError("the parts' tokens do not add up to the context length")
        if n_context >= self.cos_half.shape[0]:  # the kernel reads the rotation tables at every delta
            raise ValueError(f"a context of {n_context} positions exceeds the rotation tables "
                             f"({self.cos_half.shape[0]} positions)")
        P = self.page
        npg = np.array([len(p.pages) for p in parts], dtype=np.int64)
        ntok = np.array([p.n_tokens for p in parts], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(ntok)[:-1]]) if len(parts) else np.zeros(0, np.int64)
        n_ctx = int(npg.sum())
        n_tail = len(self.tail_pages)
        if n_ctx + n_tail > self.capacity:
            raise ValueError(f"a table of {n_ctx + n_tail} pages exceeds the arena's {self.capacity}")
        tab = np.zeros((4, n_ctx + n_tail), dtype=np.int64)
        if n_ctx:
            first = np.concatenate([[0], np.cumsum(npg)[:-1]])
            k = np.arange(n_ctx) - np.repeat(first, npg)  # page index inside its part
            tab[0, :n_ctx] = np.concatenate([p.pages for p in parts])
            tab[1, :n_ctx] = np.minimum(P, np.repeat(ntok, npg) - k * P)
            tab[2, :n_ctx] = np.repeat(starts, npg) + k * P
            tab[3, :n_ctx] = np.repeat(starts, npg)  # stored at 0..n-1 within the part: delta = its start
        tab[0, n_ctx:] = self.tail_pages
        tab[1, n_ctx:] = P
        tab[2, n_ctx:] = n_context + np.arange(n_tail) * P
        self.table[:, :n_ctx + n_tail].copy_(torch.from_numpy(tab.astype(np.int32)))
        self.n_ctx_pages = n_ctx
        self.tail_start = n_context
        self.length = n_context

    # ------------------------------------------------------------------ positions of the next forward
    def device_positions(self, n: int) -> torch.Tensor:
        """The device tensor of the next ``n`` positions (a fixed view: graphs of ``n`` tokens capture it)."""
        if n > DEVICE_POSITIONS:
            raise ValueError(f"a forward over the paged cache holds at most {DEVICE_POSITIONS} tokens, got {n}")
        return self.meta[1:1 + n]

    def set_device_positions(self, start: int, n: int) -> None:
        """Positions ``start..start+n``, their tail rows and the visible page count (one small copy)."""
        rel = start - self.tail_start
        if rel < 0 or rel + n > self.tail_cap:
            raise ValueError(f"positions {start}..{start + n} are outside the tail "
                             f"({self.tail_start}..{self.max_len})")
        r = np.arange(rel, rel + n)
        rows = self.tail_pages[r // self.page].astype(np.int64) * self.page + r % self.page
        vals = np.concatenate([[self.n_ctx_pages + _cdiv(rel + n, self.page)], np.arange(start, start + n), rows])
        self.meta[:1 + 2 * n].copy_(torch.from_numpy(vals.astype(np.int64)), non_blocking=True)

    def begin(self, start: int | None = None, n: int = 1, **_) -> None:
        start = self.length if start is None else start
        self.set_device_positions(start, n)
        self._n = n
        self._span = (start, start + n)

    def end(self) -> None:
        if self._span is not None:
            self.length = max(self.length, self._span[1])
        self._span = None
        self._n = 0

    def begin_device(self, n: int) -> None:
        self._n = n
        self._span = None

    def end_device(self) -> None:
        self._n = 0

    # ------------------------------------------------------------------ attention
    @torch.compiler.disable  # runs eagerly inside a compiled forward (GraphedStep(compile=True))
    def attend(self, layer_idx: int, q, k, v):
        """Write the current tokens' (rotated) K/V into their tail rows, then attend over the page table."""
        n = self._n
        layer = self.arena.kv[layer_idx]
        flat = layer.view(-1, 2, self.n_kv, self.head_dim)
        new = torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)], dim=1).to(self.dtype)
        flat.index_copy_(0, self.meta[1 + n:1 + 2 * n], new)
        return attend_paged(q, layer, self.table, self.meta[:1], self.meta[1:1 + n], self.cos_half,
                            self.sin_half, scale=self.scale, max_pages=self.capacity, backend=self.backend)
