"""The decode step's RMSNorm in one launch (methods/kernels/rmsnorm.py): the reference against transformers' own
LlamaRMSNorm, the Triton kernel under TRITON_INTERPRET=1 against the reference, and a decode with Triton norms
against one with transformers' (tests/triton_modes.py decides how this process runs Triton)."""
from __future__ import annotations

import pytest
import torch

import triton_modes  # noqa: E402  (tests/: how this process runs Triton)


def _import():
    from kvbench.methods.kernels import HAS_TRITON, rmsnorm
    return HAS_TRITON, rmsnorm


HAS_TRITON, R = triton_modes.import_kernels(_import)
MODE, DEV, needs_triton = triton_modes.module_modes(HAS_TRITON, getattr(R, "_rmsnorm_kernel", None))


def test_ref_is_transformers_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(96, generator=g))
        x = torch.randn(1, 3, 96, generator=g).to(dtype)
        assert torch.equal(R.rmsnorm_ref(x, norm.weight, norm.variance_epsilon), norm(x))


def test_ref_hand_case():
    x, w = torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0])
    # mean of squares 12.5: y = w * x / sqrt(12.5)
    torch.testing.assert_close(R.rmsnorm_ref(x, w, 0.0), torch.tensor([[3.0, 8.0]]) / 12.5 ** 0.5)


CASES = [  # (x shape, x dtype, weight dtype)
    ((1, 1, 96), torch.float32, torch.float32),
    ((3, 100), torch.float32, torch.float32),       # N not a power of two, several rows
    ((1, 1, 576), torch.bfloat16, torch.bfloat16),  # smollm2's hidden size
    ((1, 4, 1, 16), torch.bfloat16, torch.bfloat16),  # per-head norms (Qwen3's q/k norm)
    ((1, 1, 64), torch.bfloat16, torch.float32),    # an fp32 weight on bf16 rows: an fp32 result, as torch's
]


@needs_triton
@pytest.mark.parametrize("shape,dtype,wdtype", CASES)
def test_triton_matches_ref(shape, dtype, wdtype, interpret_env):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)
    w = torch.randn(shape[-1], generator=g).to(wdtype).to(DEV)
    y, ref = R.rmsnorm_triton(x, w, 1e-6), R.rmsnorm_ref(x, w, 1e-6)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if ref.dtype == torch.float32 and dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    else:  # the fp32 sum's order and the reciprocal root can move each bf16 rounding by one ulp (and the
        # interpreter casts to bf16 by truncation, so there about half the values sit one ulp off)
        torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -6, atol=1e-2)  # two roundings: h, y
        if MODE == "cuda":
            assert (y != ref).float().mean() < 0.05


def test_bad_input_raises():
    with pytest.raises(ValueError, match="contiguous"):
        R.rmsnorm_triton(torch.randn(4, 8).t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        R.rmsnorm_triton(torch.randn(1, 8), torch.ones(7), 1e-6)


@pytest.fixture(scope="module")
def tiny():
    from kvbench.models import load_model
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")


@needs_triton
def test_decode_with_triton_norms_matches_torch_norms(tiny, interpret_env, monkeypatch):
    """FastDecoder with norm="triton" decodes the same 10 tokens and leaves the same cache as with
    transformers' norms; the kernel ran for every norm of every step; the model is untouched afterwards."""
    from kvbench.fast_decode import LLAMA_RMSNORMS
    from test_gpu_path import decode_two_ways
    calls, real = [], R.rmsnorm_triton

    def counting(x, w, eps):
        calls.append(x.shape[-1])
        return real(x, w, eps)
    monkeypatch.setattr(R, "rmsnorm_triton", counting)
    ref, fd = decode_two_ways(tiny, 10, dict(norm="torch"), dict(norm="triton"))
    assert not ref.norm and ref.path == "graph"
    assert fd.norm and fd.path == "graph (triton rmsnorm)"
    norms = [m for m in tiny.model.modules() if type(m).__name__ in LLAMA_RMSNORMS]
    assert len(norms) == 5 and len(calls) == 9 * len(norms)  # 2 layers x 2 + the final norm, 9 steps
    assert all(m._compiled_call_impl is None for m in norms)


def test_triton_suite_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module on a machine without CUDA: rerun here."""
    triton_modes.rerun_in_fresh_process(MODE, __file__, "triton", 300)
