"""Triton helpers shared by the kernel families (imported only when triton imports).

`mma` is `tl.dot` with fp32 accumulation. Under the Triton interpreter it first casts both operands to fp32:
the interpreter stores bf16 as raw uint16 and multiplies those integers (triton 3.9,
`runtime/interpreter.py: create_dot`), and a bf16×bf16 product is exact in fp32, so the upcast reproduces what
the tensor cores compute. Compiled kernels keep the native 16-bit `tl.dot`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._dispatch import interpreting


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order (GROUP_M row blocks share their column blocks in L2): pid -> (pid_m, pid_n)."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


def gemm_configs() -> list[triton.Config]:
    """A small autotuning space for Hopper-class GPUs (BM×BN×BK, warps, pipeline stages); every entry compiles for
    sm_90 without register spills in bf16 (`benchmarks/kernel_speed.py --compile-check`)."""
    shapes = [(128, 128, 64, 8), (128, 256, 64, 8), (64, 128, 64, 4), (128, 64, 64, 4), (64, 64, 64, 4)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps in shapes for stages in (3, 4)]


def upcast() -> bool:
    """The `UPCAST` constexpr every kernel takes (see the module docstring)."""
    return interpreting()


INTERPRET_BLOCK = 16  # the smallest tile `tl.dot` accepts; tiny shapes keep the interpreter fast
