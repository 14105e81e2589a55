"""The model seam's fused forward (ModelAdapter.fuse + attention_kv.layer_ops) equals the plain one; the
one-pass stitching kernel (rope.stitch_rotated_) equals concatenation + RoPE.

On tiny random Llama (GQA), Qwen2 (q/k/v biases) and Mistral models, fp32 on the CPU: logits of the fused
forward (no autograd) within 1e-4 of the plain forward's and of HF's own; parameters keep their values and
HF's forward still runs over the fused views; with autograd on, the plain path runs (gradients reach the
weights). The Triton kernels of layer_ops run under TRITON_INTERPRET=1 in a subprocess (the interpreter
must be switched on before Triton is imported) against their PyTorch paths, in fp32 (1e-5) and bf16
(one bf16 rounding step, 1e-2 relative).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import MODELS

from blockrag.attention_kv.model import ModelAdapter

TOL = 1e-4


@pytest.mark.parametrize("family", sorted(MODELS))
def test_fused_forward_equals_plain(family):
    model = MODELS[family](seed=5)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(30, 47)
    with torch.no_grad():
        ref = ModelAdapter.of(plain).forward(ids, pos)
        hf_ref = model(input_ids=ids, position_ids=pos[None].expand(2, -1)).logits
        ad = ModelAdapter.of(model)
        assert ad.fuse() and ad._fast()
        got = ad.forward(ids, pos)
        assert (got - ref).abs().max().item() < TOL
        assert (got - hf_ref).abs().max().item() < TOL
        # HF's forward over the fused views: unchanged
        assert (model(input_ids=ids, position_ids=pos[None].expand(2, -1)).logits - hf_ref).abs().max() < TOL
        # un-rotated keys (rotate_keys=False) reach the callback as k_proj's output, q rotated
        seen = {}

        def grab(layer, q, k, v):
            seen.setdefault(layer, (q.clone(), k.clone()))
            return torch.zeros_like(q)

        ad.forward(ids[:1, :5], torch.arange(5), grab, rotate_keys=False)
        plain_seen = {}

        def grab_plain(layer, q, k, v):
            plain_seen.setdefault(layer, (q.clone(), k.clone()))
            return torch.zeros_like(q)

        ModelAdapter.of(plain).forward(ids[:1, :5], torch.arange(5), grab_plain, rotate_keys=False)
        for l in seen:
            assert (seen[l][0] - plain_seen[l][0]).abs().max() < 1e-5
            assert (seen[l][1] - plain_seen[l][1]).abs().max() < 1e-5
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), plain.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_fused_views_share_memory_and_autograd_uses_plain_path():
    model = MODELS["qwen2"](seed=2)
    ad = ModelAdapter.of(model)
    assert ad.fuse()
    attn = model.model.layers[0].self_attn
    w_qkv, b_qkv = ad._fused[0][0], ad._fused[0][1]
    assert attn.k_proj.weight.data_ptr() == w_qkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert b_qkv is not None and attn.q_proj.bias.data_ptr() == b_qkv.data_ptr()
    with torch.no_grad():  # a write through the module's parameter is seen by the fused tensor
        attn.v_proj.weight.add_(1.0)
    assert torch.equal(w_qkv[-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
    assert not ad._fast()  # autograd on: the plain layers
    ids = torch.randint(0, 300, (1, 6))
    ad.forward(ids, torch.arange(6)).sum().backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0


def test_fused_model_saves_and_reloads(tmp_path):
    """Fused parameters share storage (views of one tensor): ``save_pretrained`` still writes every weight and the
    reloaded model gives the same logits; the residual stream is not left changed by the in-place adds."""
    from transformers import AutoModelForCausalLM

    model = MODELS["qwen2"](seed=3)
    ad = ModelAdapter.of(model)
    assert ad.fuse()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
        h0 = ad.embed(ids)
        ad.hidden_states(ids, torch.arange(9))
        assert torch.equal(h0, ad.embed(ids))  # the embeddings the stream started from are untouched
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (again(ids).logits - ref).abs().max().item() < TOL  # (the reload may pick another attention)


def test_replaced_parameter_data_is_fused_again():
    """A parameter whose ``.data`` is replaced after fusing (what a LoRA merge or a cast does) is not served
    from the stale fused tensor: the forward re-fuses and matches the plain path."""
    model = MODELS["qwen2"](seed=7)
    ad = ModelAdapter.of(model)
    assert ad.fuse()
    up = model.model.layers[2].mlp.up_proj
    with torch.no_grad():
        up.weight.data = up.weight.data + 0.5  # a new tensor, not a write into the view
        model.model.layers[1].self_attn.k_proj.bias.data = torch.randn_like(model.model.layers[1].self_attn.k_proj.bias)
        plain = copy.deepcopy(model)
        ModelAdapter.of(plain)._fused = None  # (the copy carries the adapter: run it unfused)
        ids = torch.randint(0, 300, (1, 11))
        ref = ModelAdapter.of(plain).forward(ids, torch.arange(11))
        assert (ad.forward(ids, torch.arange(11)) - ref).abs().max().item() < TOL
        assert up.weight.data_ptr() == ad._fused[2][2][up.weight.shape[0]:].data_ptr()  # a view again


def test_fuse_refuses_replaced_modules():
    """A projection that is not a plain Linear (a peft wrapper, a quantised layer): not fused; replaced after
    fusing: the plain path runs again."""
    model = MODELS["llama"](seed=1)
    ad = ModelAdapter.of(model)
    assert ad.fuse()
    blk = model.model.layers[0]

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2.0

    blk.self_attn.q_proj = Wrapped(blk.self_attn.q_proj)
    with torch.no_grad():
        assert not ad._fast()
    other = MODELS["llama"](seed=1)
    other.model.layers[1].mlp.up_proj = Wrapped(other.model.layers[1].mlp.up_proj)
    assert not ModelAdapter.of(other).fuse()


KERNEL_CHECK = textwrap.dedent("""
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from blockrag.attention_kv import layer_ops as ops
    torch.manual_seed(0)

    def both(fn, *a):
        with torch.no_grad():
            fast = fn(*a)
        with torch.enable_grad():  # the PyTorch path (autograd on)
            ref = fn(*a)
        return fast, ref

    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(3, 5, 72).to(dt)
        w = (1 + 0.1 * torch.randn(72)).to(dt)
        a, b = both(ops.rms_norm, x, w, 1e-6)
        assert a.dtype == b.dtype == dt and ((a.float() - b.float()).norm() / b.float().norm()) < tol
        gu = torch.randn(2, 3, 2 * 40).to(dt)
        a, b = both(ops.silu_mul, gu)
        assert a.shape == (2, 3, 40) and ((a.float() - b.float()).norm() / b.float().norm()) < tol
        # rope over 3 query + 2 key heads of a fused [B, L, (3 + 2 * 2) * 16] row, batch tables and shared ones
        for B, cb in ((2, 2), (2, 1)):
            x = torch.randn(B, 7, 7 * 16).to(dt)
            f = (torch.arange(7 * cb).view(cb, 1, 7, 1).float() + 3) * (1e4 ** (-torch.arange(8) / 8.0))
            emb = torch.cat([f, f], -1)
            y1, y2 = x.clone(), x.clone()
            with torch.no_grad():
                ops.rope_(y1, emb.cos(), emb.sin(), 5, 16)
            with torch.enable_grad():
                ops.rope_(y2, emb.cos(), emb.sin(), 5, 16)
            assert torch.equal(y1[..., 5 * 16:], x[..., 5 * 16:])  # the value heads untouched
            assert ((y1.float() - y2.float()).norm() / y2.float().norm()) < tol, (dt, B, cb)
    # stitching: blocks of different lengths copied into a strided buffer with K rotated, in one pass
    from blockrag.attention_kv.rope import cos_sin, rope_rows_, stitch_rotated_
    for dt in (torch.float32, torch.bfloat16):
        parts = [torch.randn(3, n, 2, 2, 16).to(dt) for n in (5, 17, 1, 9)]
        c, s = cos_sin(torch.arange(64), 1e4 ** (-torch.arange(8) / 8.0))
        ch, sh = c[:, :8].contiguous(), s[:, :8].contiguous()
        got = torch.zeros(3, 1, 64, 2, 2, 16, dtype=dt)
        ref = torch.zeros_like(got)
        assert stitch_rotated_(got, parts, 7, ch, sh) == 39
        torch.cat(parts, dim=1, out=ref[:, 0, 7:39])
        import os as _os
        _os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch rotation for the reference
        rope_rows_(ref[:, :, :, 0], ch, sh, 7, 39)
        _os.environ["TRITON_INTERPRET"] = "1"
        assert torch.equal(got[:, :, :7], ref[:, :, :7]) and torch.equal(got[:, :, 39:], ref[:, :, 39:])
        err = (got.float() - ref.float()).abs().max().item()
        assert err < (1e-5 if dt == torch.float32 else 2e-2), (dt, err)
        assert torch.equal(got[:, :, 7:39, 1], ref[:, :, 7:39, 1])  # V copied exactly
        for bt, nw in ((16, 4), (32, 8)):  # other program sizes (eval/bench_stitch.py): the same bytes
            other = torch.zeros_like(got)
            stitch_rotated_(other, parts, 7, ch, sh, block_tokens=bt, num_warps=nw)
            assert torch.equal(other, got), (dt, bt)
        # a staged load's layer groups, one launch each: the same bytes, a callback after each group
        other, seen = torch.zeros_like(got), []
        stitch_rotated_(other, parts, 7, ch, sh, layer_groups=[(0, 1), (1, 3)], after_group=seen.append)
        assert torch.equal(other, got) and seen == [0, 1]
    print("KERNELS OK")
""")


def test_layer_ops_triton_kernels_match_torch_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "KERNELS OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_forward_gpu_bf16():
    """GPU, bf16: the fused forward's logits against the plain forward's (relative 2e-2: bf16 rounding of
    fused products and residuals taken in a different order)."""
    model = MODELS["qwen2"](seed=4).to("cuda", torch.bfloat16)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 300, (1, 33), device="cuda")
    pos = torch.arange(33, device="cuda")
    with torch.no_grad():
        ref = ModelAdapter.of(plain).forward(ids, pos).float()
        ad = ModelAdapter.of(model)
        assert ad.fuse()
        got = ad.forward(ids, pos).float()
    assert (got - ref).norm() / ref.norm() < 2e-2
