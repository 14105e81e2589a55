"""The one-pass stitching copy (``rope.stitch_rotated_``: chunk caches copied into the request's buffer with
their keys rotated to their positions) against the copy bandwidth measured in the same run, for program sizes
(tokens per program x warps); each variant's output is checked against the default's.

    python -m blockrag.eval.bench_stitch --out stitch.json [--tokens 32768] [--chunk 300]

Llama-3-8B cache shape (32 layers, 8 KV heads, head_dim 128, bf16), chunks of ``--chunk`` tokens into a
buffer twice the context (a size bucket). Bytes moved: the chunks read once and written once.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="stitch.json")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=300)
    ap.add_argument("--variants", default="8x4,16x4,32x4,32x8,64x8", help="tokens x warps per program")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from blockrag.attention_kv.rope import STITCH_TOKENS, STITCH_WARPS, cos_sin, stitch_rotated_
    from blockrag.eval.bench_e2e import copy_bandwidth

    dev, L, H, D = torch.device("cuda"), 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    n_chunks = args.tokens // args.chunk
    parts = [torch.randn(L, args.chunk - (i % 7), 2, H, D, device=dev, generator=g).to(torch.bfloat16)
             for i in range(n_chunks)]
    n_tok = sum(p.shape[1] for p in parts)
    buf = torch.empty(L, 1, 2 * args.tokens, 2, H, D, device=dev, dtype=torch.bfloat16)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    cos, sin = cos_sin(torch.arange(2 * args.tokens, device=dev), inv)
    cos_half, sin_half = cos[:, :D // 2].contiguous(), sin[:, :D // 2].contiguous()
    moved = 2 * sum(p.numel() * p.element_size() for p in parts)
    bw = copy_bandwidth()
    stitch_rotated_(buf, parts, 5, cos_half, sin_half)
    ref = buf[:, :, 5:5 + n_tok].clone()
    rows = []
    for v in args.variants.split(","):
        bt, nw = (int(x) for x in v.split("x"))
        buf.zero_()
        stitch_rotated_(buf, parts, 5, cos_half, sin_half, block_tokens=bt, num_warps=nw)
        same = bool(torch.equal(buf[:, :, 5:5 + n_tok], ref))
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            stitch_rotated_(buf, parts, 5, cos_half, sin_half, block_tokens=bt, num_warps=nw)
        s.record()
        for _ in range(10):
            stitch_rotated_(buf, parts, 5, cos_half, sin_half, block_tokens=bt, num_warps=nw)
        e.record()
        e.synchronize()
        ms = s.elapsed_time(e) / 10
        rows.append(dict(tokens_per_program=bt, warps=nw, ms=ms, floor_ms=moved / bw * 1e3,
                         pct_copy_bw=100 * moved / (ms * 1e-3) / bw, same_as_default=same,
                         default=(bt, nw) == (STITCH_TOKENS, STITCH_WARPS)))
    res = dict(device=torch.cuda.get_device_name(), copy_GBps=bw / 1e9, context_tokens=n_tok, chunks=n_chunks,
               bytes_moved=moved, rows=rows)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"copy {bw / 1e9:.0f} GB/s; {n_tok} tokens in {n_chunks} chunks, {moved / 1e9:.2f} GB moved")
    print("| tokens x warps | ms | floor ms | % copy BW | same as default |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens_per_program']} x {r['warps']}{' (default)' if r['default'] else ''} | {r['ms']:.3f} | "
              f"{r['floor_ms']:.3f} | {r['pct_copy_bw']:.1f} | {r['same_as_default']} |")


if __name__ == "__main__":
    main()
