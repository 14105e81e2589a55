"""What the three Triton attention modules share (``triton_attention``, ``question_attention``,
``paged_attention``): the optional Triton import, the jitted online-softmax step and split-KV merge, the
host helpers of a launch (SM count, int32 tile-offset check, split-KV scratch, arrival counters, the copy
engine's descriptor class) and the opt-in record of the last launch. The kernel modules import from here
only, never from each other's internals, so none of them needs a back import.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the torch reference works everywhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

TensorDescriptor = None
if HAS_TRITON:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:  # pragma: no cover - Triton < 3.4: plain loads only
        TensorDescriptor = None

LOG2E = 1.4426950408889634


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the Triton interpreter (3.9) computes bf16 x bf16 dots wrongly; do them in fp32 there.
        if UPCAST:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            r = tl.dot(a, b, input_precision=DOT_PREC)
        return r

    @triton.jit
    def _softmax_step(acc, l_i, m_i, s, v, MASKED: tl.constexpr, LAZY: tl.constexpr, DOT_PREC: tl.constexpr,
                      UPCAST: tl.constexpr):
        """One online-softmax update with the scaled (log2 units) scores ``s`` of a key tile; MASKED: ``s``
        holds -inf for hidden keys and a row may have seen no key yet."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        elif LAZY:
            # lazy rescaling: keep the running max unless some row's max grew by more than 2^8; the
            # probabilities stay <= 256 (exact in fp32 sums, fine in bf16) and the rescale of acc is skipped
            if tl.max(m_new - m_i, 0) > 8.0:
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
            else:
                m_new = m_i
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = acc + _dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        else:
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        return acc, l_i, m_new

    @triton.jit
    def _merge_partials(PO, PL, rows0, step, n, ok, BM: tl.constexpr, D: tl.constexpr):
        """Merge ``n`` partial results of a block of rows: slice ``c``'s rows sit at ``rows0 + c * step`` in
        the partial outputs ``PO`` [rows, D] and log-sum-exps ``PL``. Returns (acc, l, m); out = acc / l.
        Loads bypass L1 (``.cg``): partials may have just been written by other programs."""
        # Several slices per step (about 16K values in flight): a loop of one slice at a time waits one L2
        # round trip per slice, which cost a decoded token over 32 slices ~10 us (measured, H200)
        if BM * D <= 8192:
            r = _merge_grouped(PO, PL, rows0, step, n, ok, BM, D, 16384 // (BM * D))
        else:
            r = _merge_grouped(PO, PL, rows0, step, n, ok, BM, D, 1)
        return r

    @triton.jit
    def _merge_grouped(PO, PL, rows0, step, n, ok, BM: tl.constexpr, D: tl.constexpr, CB: tl.constexpr):
        offs_d = tl.arange(0, D)
        m = tl.full([BM], float("-inf"), tl.float32)
        l = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for c0 in range(0, n, CB):
            cc = c0 + tl.arange(0, CB)
            okc = (cc < n)[:, None] & ok[None, :]  # [CB, BM]
            # (int64: every offset below may pass 2^31 elements)
            row = rows0.to(tl.int64)[None, :] + cc.to(tl.int64)[:, None] * step
            lse = tl.load(PL + row, mask=okc, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(PO + row[:, :, None] * D + offs_d[None, None, :], mask=okc[:, :, None], other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            w = tl.exp2(lse - m_use[None, :])  # [CB, BM]; 0 for masked slices
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
            l = l * alpha + tl.sum(w, 0)
            m = m_new
        return acc, l, m


def tile_offsets_fit(t: torch.Tensor, block_n: int) -> bool:
    """Whether the kernels' int32 offsets fit for K or V ``t`` [..., keys, D] read in tiles of ``block_n`` keys.

    The kernels compute the batch, head and first-key offset of every tile in int64 (a cache past 2^31
    elements, a strided view of a larger buffer); only the offsets inside one tile, (block_n - 1) * key
    stride + (D - 1) * dim stride, are int32."""
    return (block_n - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1)) < 2 ** 31


def check_tile_offsets(block_n: int, *tensors) -> None:
    """Clear error for a layout whose per-tile offsets would overflow int32 (a key stride of > 16M elements)."""
    for t in tensors:
        if not tile_offsets_fit(t, block_n):
            raise ValueError(f"key stride {t.stride(-2)} too large for {block_n}-key tiles (int32 offsets)")


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


class _LaunchRecord(dict):
    """Opt-in (benchmarks set ``LAST_LAUNCH.enabled = True``): the compiled kernels of the last call, for their
    registers / spills. Off by default: product calls keep no global state."""

    enabled = False

    def __setitem__(self, key, value):
        if self.enabled:
            super().__setitem__(key, value)


LAST_LAUNCH = _LaunchRecord()


_COUNTERS: dict = {}


def _counters(dev, n: int) -> torch.Tensor:
    """Per-device arrival counters for the folded reduction (each left at zero by the program that merges).
    Calls on one device are assumed to be ordered (one stream), as in a model's forward pass."""
    key = str(dev)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:  # CUDA graphs captured with it still count in it: never free it
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=dev)
        _COUNTERS[key] = buf
    return buf


_RETIRED: list = []  # counter buffers replaced by larger ones (kept alive for the graphs that captured them)


def _tma_ok(t: torch.Tensor) -> bool:
    """The copy engine needs a 16-byte aligned base, 16-byte multiple strides and a unit last stride."""
    if TensorDescriptor is None or t.stride(-1) != 1:
        return False
    es = t.element_size()
    return all((st * es) % 16 == 0 for st in t.stride()[:-1])


def partial_buffers(spec: dict, n_rows: int, D: int, dev, capturing: bool, out):
    """The split-KV scratch of one launch: partial outputs [n_rows, D] and log-sum-exps [n_rows] (fp32), or
    ``out`` itself when the plan writes directly. Owned by the graph while capturing; else one pair per plan,
    reused (calls on one device are stream-ordered, as the arrival counters already assume)."""
    if spec["const"]["DIRECT"]:
        return out, out
    if capturing or spec["po"] is None:
        po = torch.empty(n_rows * D, dtype=torch.float32, device=dev)
        pl = torch.empty(n_rows, dtype=torch.float32, device=dev)
        if not capturing:
            spec["po"], spec["pl"] = po, pl
        return po, pl
    return spec["po"], spec["pl"]
