"""Which implementation a kernel op runs: the Triton kernel or the torch path.

Resolution, first match wins:

1. the op's `backend=` argument;
2. the process-wide setting of `set_kernel_backend` / `use_kernel_backend` (what a config flag sets);
3. the environment variable `SPECPEFT_KERNELS` ∈ {auto, triton, torch};
4. "auto": Triton for CUDA tensors when `triton` imports, the torch path otherwise (the op's `*_reference`, except
   `kronecker_linear`, which runs a batched-GEMM op on CUDA and a 2-D-GEMM op on CPU).

Forcing "triton" on CPU tensors is allowed only under the Triton interpreter (`TRITON_INTERPRET=1` set before
`triton` is first imported), which is how the kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Literal, Optional, TypeVar

import torch
from torch import Tensor

try:  # Triton is optional: every op has a torch reference
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

Backend = Literal["triton", "torch"]
BackendChoice = Literal["auto", "triton", "torch"]
ENV_VAR = "SPECPEFT_KERNELS"
_CHOICES = ("auto", "triton", "torch")
_process_choice: Optional[str] = None
# where a forced backend comes from, first match wins (module docstring)
_FORCED_BY = (f"the op's backend=, the adapter config's kernel_backend, set_kernel_backend / use_kernel_backend, or "
              f"the {ENV_VAR} environment variable")


def interpreting() -> bool:
    """True when Triton kernels run in the Triton interpreter (CPU, numpy) instead of being compiled."""
    if not HAS_TRITON:
        return False
    return bool(triton.knobs.runtime.interpret)


def _check_choice(choice: str, source: str) -> str:
    if choice not in _CHOICES:
        raise ValueError(f"{source}={choice!r}: expected one of {', '.join(_CHOICES)}.")
    return choice


def set_kernel_backend(choice: Optional[BackendChoice]) -> None:
    """Force every kernel op to "triton" or "torch" ("auto" or None: back to the env var / automatic choice)."""
    global _process_choice
    if choice is not None:
        _check_choice(choice, "set_kernel_backend(choice)")
    _process_choice = None if choice in (None, "auto") else choice


@contextmanager
def use_kernel_backend(choice: Optional[BackendChoice]) -> Iterator[None]:
    """Context manager form of `set_kernel_backend`; restores the previous setting on exit."""
    global _process_choice
    previous = _process_choice
    set_kernel_backend(choice)
    try:
        yield
    finally:
        _process_choice = previous


def requested_backend(backend: Optional[BackendChoice] = None) -> str:
    """The choice in force (argument, process setting, env var, "auto"), validated."""
    if backend is not None:
        return _check_choice(backend, "backend")
    if _process_choice is not None:
        return _process_choice
    return _check_choice(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def kernel_backend(*tensors: Optional[Tensor], backend: Optional[BackendChoice] = None) -> Backend:
    """The implementation an op runs for these input tensors.

    Args:
        tensors: the op's inputs (None entries are ignored); their device decides "auto".
        backend: per-call override.

    Raises:
        RuntimeError: "triton" is forced but Triton cannot run on these tensors (not installed, or CPU tensors
            outside the interpreter); the message names the fix.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return "torch"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if choice == "auto":
        return "triton" if HAS_TRITON and on_cuda and not interpreting() else "torch"
    if not HAS_TRITON:
        raise RuntimeError(
            f"specpeft kernels: backend 'triton' was forced but triton does not import. Install it (`pip install "
            f"specpeft[triton]`) or choose 'torch' where 'triton' was set: {_FORCED_BY}."
        )
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in present})
        raise RuntimeError(
            f"specpeft kernels: backend 'triton' was forced for tensors on {devices}; compiled Triton kernels need "
            "CUDA tensors. Move the tensors to a GPU, set TRITON_INTERPRET=1 before triton is imported (testing), "
            f"or choose 'torch' where 'triton' was set: {_FORCED_BY}."
        )
    return "triton"


def next_power_of_2(value: int) -> int:
    """Smallest power of two ≥ value (≥ 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


def as_rows(x: Tensor, features: int, name: str) -> Tensor:
    """View x (..., features) as a (T, features) matrix with unit stride along features (copies only if needed)."""
    if x.shape[-1] != features:
        raise ValueError(f"{name}: the input's last dim is {x.shape[-1]}, expected {features} features.")
    rows = x.reshape(-1, features)  # (..., features) -> (T, features)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def as_base_rows(base_out: Optional[Tensor], rows: Tensor, features: int, name: str) -> Optional[Tensor]:
    """base_out (..., features) as `as_rows` lays it out, in the input rows' dtype, one row per input row (None stays
    None): a kernel reads it by the input's row index."""
    if base_out is None:
        return None
    out = as_rows(base_out.to(rows.dtype), features, name)
    if out.shape[0] != rows.shape[0]:
        raise ValueError(f"{name}: {out.shape[0]} rows for the input's {rows.shape[0]}; give one per input row "
                         "(the input's leading axes).")
    return out


def check_bias(bias: Optional[Tensor], features: int, name: str) -> None:
    """A bias must be a (features,) vector: a kernel reads `features` values from it."""
    if bias is not None and tuple(bias.shape) != (features,):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} must be ({features},).")


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 data (torch's matmul default), native for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def matmul_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result: cuBLAS with 16-bit inputs and fp32 output on CUDA, fp32 copies elsewhere.

    Used for weight-shaped gradients (dΔ = dYᵀ x) that are reduced further: rounding them to bf16 first costs
    ~1-2 % relative accuracy in gradients where the reduction cancels (SNELLA's ∂s = ⟨dΔ, K_eff⟩).
    """
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


MaybeTensor = TypeVar("MaybeTensor", Tensor, None)


def as_dtype(tensor: MaybeTensor, dtype: torch.dtype) -> MaybeTensor:
    """`tensor.to(dtype)` without the dispatch when it is a no-op, None passed through: the adapters' per-layer ops
    run every step, and their cost there is host time."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def widened(tensor: Tensor) -> Tensor:
    """The tensor in the working precision of merges and small networks: fp32 for 16-bit and fp32 tensors, fp64 stays
    fp64 (`as_dtype`: no op when already there)."""
    return as_dtype(tensor, torch.promote_types(tensor.dtype, torch.float32))


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a GEMM on x in: autocast's for x's device when it is on (fp64 stays fp64, which
    autocast leaves alone), else x's. For ops that cast once and then run with autocast off (`autocast_off`)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def backward_without_autocast(backward: Callable[..., Any]) -> Callable[..., Any]:
    """A custom Function's `backward(ctx, grad, ...)` run with autocast off on the gradient's device: a backward
    called inside autocast keeps the forward's dtypes."""

    @functools.wraps(backward)
    def run(ctx: Any, grad: Tensor, *rest: Any) -> Any:
        with autocast_off(grad.device.type):
            return backward(ctx, grad, *rest)

    return run


def autocast_off(device_type: str) -> AbstractContextManager:
    """`torch.autocast(device_type, enabled=False)` when autocast is on for that device or torch.compile is tracing,
    else a no-op context: entering autocast costs ~8 µs of host time, paid per layer and step by the ops that pin
    their dtypes. While tracing, the check would run once, and a backward traced later under the caller's autocast
    would lose the region."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()
