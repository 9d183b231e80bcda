"""How a test module runs its Triton kernels (shared by tests/test_kernels.py and tests/test_adakv_device.py).

Triton picks its interpreter when it is first imported (TRITON_INTERPRET=1 must be set before that). A kernel
module imported through `import_kernels` gets the interpreter where no GPU can run Triton and triton is not
loaded yet; if another test module already loaded triton without it, the module's Triton tests are skipped
in-process and `rerun_in_fresh_process` runs them again in one subprocess with the interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def import_kernels(importer):
    """importer() with TRITON_INTERPRET=1 set where it decides the mode, and not left set afterwards."""
    set_it = not torch.cuda.is_available() and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
    if set_it:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importer()
    finally:
        if set_it:  # the choice is made at import; don't leak the variable into other tests
            del os.environ["TRITON_INTERPRET"]


def triton_mode(has_triton: bool, *kernels) -> str:
    """"cuda", "interpret" (this process interprets every one of `kernels`), "subprocess" (compiled mode without
    a GPU) or "none" (no Triton)."""
    if not has_triton:
        return "none"
    if torch.cuda.is_available():
        return "cuda"
    return "interpret" if all(type(k).__name__ == "InterpretedFunction" for k in kernels) else "subprocess"


def module_modes(has_triton: bool, *kernels) -> tuple[str, str, object]:
    """A kernel test module's (MODE, DEV, needs_triton mark): how this process runs `kernels`, the device its
    tensors go to, and the skip mark of its Triton tests. The module's MODE also drives the `interpret_env`
    fixture (tests/conftest.py)."""
    mode = triton_mode(has_triton, *kernels)
    return mode, "cuda" if mode == "cuda" else "cpu", needs_triton(mode)


def needs_triton(mode: str):
    return pytest.mark.skipif(mode not in ("cuda", "interpret"),
                              reason=f"Triton kernels not runnable in this process (mode={mode})")


def interpret_env(mode: str, monkeypatch) -> None:
    """Keep TRITON_INTERPRET=1 visible while interpreted kernels run (checked by the launch wrappers)."""
    if mode == "interpret":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rerun_in_fresh_process(mode: str, path: str, select: str, timeout: int) -> None:
    """The Triton tests of `path` (pytest -k `select`) in a subprocess with the interpreter, where this process
    could not run them (mode "subprocess"); skipped otherwise."""
    if mode != "subprocess":
        pytest.skip(f"Triton tests ran in-process (mode={mode})")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", select],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
