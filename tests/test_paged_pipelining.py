"""The paged kernel's software pipelining, read from its compiled IR (no GPU: Triton compiles for sm_90 here).

Why it matters: a K/V address that depends on a page-table load of the same loop iteration costs the pipeliner
stages of its own, so the table-fed loop gets shallower K/V buffers and waits on every copy in flight; the
affine runs compute their page ids and keep the contiguous kernel's three-deep stream (README, "Paged
(zero-copy) kernel"). The compile runs in a subprocess: the CPU tests import the kernels under
``TRITON_INTERPRET=1``, where ``triton.jit`` gives interpreted functions that cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blockrag.attention_kv.kernels import paged_attention as pa

fn = pa._paged_fwd
names = fn.arg_names
ptr = dict(Q="*bf16", KV="*bf16", KD="*bf16", VD="*bf16", TAB="*i32", NP="*i32", QPOS="*i64", COS="*fp32",
           SIN="*fp32", O="*bf16", PO="*fp32", PL="*fp32", CNT="*i32")
aligned = set(ptr) | {"sqh", "sqm", "soh", "som", "tab_stride"} | {n for n in names if n.startswith("s_")}
out = {}
for name, extra in json.loads(sys.argv[1]).items():
    const = dict(BM=64, BMT=16, BMT2=0, PAGE=64, HALF=64, DIRECT=False, DOT_PREC="tf32", UPCAST=False,
                 ROT_ONCE=True, USE_TMA=False, PAIR=False, FULL=False, SEG=True, AFFINE=False, STEP=1, SPLIT=False)
    const.update(extra)
    sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned})
    ir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ttgir"]
    depths = [int(d) for d in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x64x128xbf16", ir)]
    waits = [int(w) for w in re.findall(r"ttg\.async_wait %[^{]*\{num = (\d+)", ir)]
    out[name] = dict(depths=depths, waits=waits)
print(json.dumps(out))
"""


def _compiled(variants: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(variants)], capture_output=True, text=True,
                       env=env, timeout=300)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"Triton cannot compile for sm_90 here: {last[:200]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_affine_runs_keep_a_three_deep_kv_stream():
    got = _compiled({"table": {}, "affine": {"AFFINE": True}})
    if not got["table"]["depths"] or not got["affine"]["depths"]:
        pytest.skip("this Triton's IR names its shared buffers differently")
    # 64-row groups with 3 stages: the table-fed loop's K/V buffers two deep, the affine loop's three
    assert max(got["table"]["depths"]) == 2
    assert max(got["affine"]["depths"]) == 3
    # the affine loop waits with copies still in flight; the table-fed one waits for all of them
    assert max(got["affine"]["waits"]) >= 2
    assert max(got["table"]["waits"]) == 0
