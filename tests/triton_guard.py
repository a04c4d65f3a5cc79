"""Run Triton kernels in tests: compiled on CUDA, in the Triton interpreter on CPU. Import before `specpeft`.

The interpreter needs TRITON_INTERPRET=1 before triton is first imported (triton's own library functions are
created in that mode); `specpeft` imports triton through peft. conftest.py sets it for pytest runs on machines
without a GPU; this module sets it for a test file collected on its own. When triton was already imported in
compiled mode anyway, `RUNNABLE` is False: the guarded tests skip in this process and a module's
`interpreter_child_test` re-runs them in a fresh interpreter-mode process, so nothing is silently left untested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CHILD_FLAG = "SPECPEFT_TRITON_TESTS_CHILD"
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` (compiled kernels need a GPU)

import specpeft.kernels as kernels  # noqa: E402


def _kernels_runnable_here() -> bool:
    """Compiled kernels on CUDA, or an interpreter whose triton library was imported in interpreter mode."""
    if not kernels.HAS_TRITON or CUDA:
        return kernels.HAS_TRITON
    import triton.language.standard as triton_standard

    return type(triton_standard.sum).__name__ == "InterpretedFunction" and \
        type(kernels.lowrank._main_kernel).__name__ == "InterpretedFunction"


RUNNABLE = _kernels_runnable_here()
if not RUNNABLE and not CUDA:  # too late for this process: leave the environment as other test modules found it
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

needs_triton = pytest.mark.skipif(
    not RUNNABLE, reason="needs triton" if not kernels.HAS_TRITON else
    "triton was imported before TRITON_INTERPRET=1 in this process: re-run by the module's interpreter child test")
needs_cuda = pytest.mark.skipif(not (CUDA and kernels.HAS_TRITON), reason="needs CUDA")


def interpreter_child_test(test_file: str, select: Optional[str] = None) -> Callable[[], None]:
    """A test that re-runs `test_file` (only tests matching `-k select`, if given) in an interpreter-mode child.

    It runs only when this process cannot run the kernels; the child's failures and unexpected skips fail it.
    """

    @pytest.mark.skipif(RUNNABLE or not kernels.HAS_TRITON, reason="the Triton tests run in this process")
    def test_triton_tests_in_interpreter_child() -> None:
        assert not os.environ.get(CHILD_FLAG), "the child process could not use the Triton interpreter either"
        env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_FLAG: "1"}
        command = [sys.executable, "-m", "pytest", test_file, "-q", "-rs", "-p", "no:cacheprovider"]
        if select:
            command += ["-k", select]
        proc = subprocess.run(command, env=env, cwd=Path(test_file).resolve().parents[1], capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        other_skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")
                       and "needs CUDA" not in line and "run in this process" not in line]
        assert " passed" in proc.stdout and not other_skips, proc.stdout[-3000:]

    return test_triton_tests_in_interpreter_child
