"""The decode token's rotary embedding in one launch (methods/kernels/rope.py): the reference against
transformers' own apply_rotary_pos_emb, the Triton kernel under TRITON_INTERPRET=1 against it (bit for bit in
fp32), and a decode with the Triton rope against one with transformers' (tests/triton_modes.py decides how this
process runs Triton)."""
from __future__ import annotations

import pytest
import torch

import triton_modes  # noqa: E402  (tests/: how this process runs Triton)


def _import():
    from kvbench.methods.kernels import HAS_TRITON, rmsnorm, rope  # the graph prefill test runs both
    return HAS_TRITON, rope, rmsnorm


HAS_TRITON, R, _RMSNORM = triton_modes.import_kernels(_import)
MODE, DEV, needs_triton = triton_modes.module_modes(HAS_TRITON, getattr(R, "_rope_kernel", None),
                                                    getattr(_RMSNORM, "_rmsnorm_kernel", None))


def _qkcs(h, hk, d, dtype, seed=0, q_transposed=True, t=1):
    g = torch.Generator().manual_seed(seed)
    # as LlamaAttention makes them: (1, T, H, D) projections viewed as (1, H, T, D)
    q = torch.randn(1, t, h, d, generator=g).to(dtype).transpose(1, 2) if q_transposed \
        else torch.randn(1, h, t, d, generator=g).to(dtype)
    k = torch.randn(1, t, hk, d, generator=g).to(dtype).transpose(1, 2)
    ang = torch.randn(1, t, d // 2, generator=g) * 3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    return [t.to(DEV) for t in (q, k, cos, sin)]


def test_ref_is_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    for dtype in (torch.float32, torch.bfloat16):
        q, k, cos, sin = [t.cpu() for t in _qkcs(4, 2, 16, dtype)]
        for a, b in zip(R.rope_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
            assert torch.equal(a, b)


def test_ref_hand_case():
    # D = 2: a rotation of (x1, x2) by the angle: (x1 cos - x2 sin, x2 cos + x1 sin)
    x = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    c, s = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]])  # 90 degrees
    q, _ = R.rope_ref(x, x, c, s)
    assert torch.equal(q.view(2), torch.tensor([-4.0, 3.0]))


@needs_triton
@pytest.mark.parametrize("h,hk,d,dtype,transposed,t", [
    (4, 2, 16, torch.float32, True, 1), (3, 1, 64, torch.float32, False, 1), (9, 3, 64, torch.bfloat16, True, 1),
    (2, 2, 6, torch.float32, True, 1),
    (3, 1, 16, torch.float32, True, 37), (9, 3, 64, torch.bfloat16, True, 20), (2, 1, 8, torch.float32, False, 16)])
def test_triton_matches_ref(h, hk, d, dtype, transposed, t, interpret_env):
    """One decode token, or a prefill's tokens (tiles of 16, a partial last one)."""
    q, k, cos, sin = _qkcs(h, hk, d, dtype, seed=d + t, q_transposed=transposed, t=t)
    for y, ref in zip(R.rope_triton(q, k, cos, sin), R.rope_ref(q, k, cos, sin)):
        assert y.shape == ref.shape and y.dtype == ref.dtype
        if dtype == torch.float32 or MODE == "cuda":  # torch's roundings, bit for bit
            assert torch.equal(y, ref)
        else:  # the interpreter casts to bf16 by truncation: up to an ulp per rounding
            torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -6, atol=2e-2)


def test_fits_and_bad_input():
    q, k, cos, sin = _qkcs(4, 2, 16, torch.float32)
    assert R.fits(q, cos, sin) and R.fits(k, cos, sin)
    assert not R.fits(torch.randn(1, 4, 2, 16), cos, sin)         # two tokens, one position
    assert not R.fits(torch.randn(1, 4, 1, 15), cos[..., :15], sin[..., :15])  # odd D
    with pytest.raises(ValueError, match="rope_triton"):
        R.rope_triton(torch.randn(2, 4, 1, 16), k, cos, sin)


@pytest.fixture(scope="module")
def tiny():
    from kvbench.models import load_model
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")


@needs_triton
def test_decode_with_triton_rope_matches_torch_rope(tiny, interpret_env, monkeypatch):
    """FastDecoder with rope="triton" decodes the same 10 tokens and leaves the same cache (keys bit for bit) as
    with transformers' rope; the kernel ran for both tensors of every layer of every step; transformers'
    function is back afterwards."""
    from transformers.models.llama import modeling_llama
    from test_gpu_path import decode_two_ways
    calls, real = [], R.rope_triton

    def counting(q, k, cos, sin):
        calls.append(q.shape[1])
        return real(q, k, cos, sin)
    monkeypatch.setattr(R, "rope_triton", counting)
    orig = modeling_llama.apply_rotary_pos_emb
    ref, fd = decode_two_ways(tiny, 10, dict(rope="torch"), dict(rope="triton"))
    assert not ref.rope and ref.path == "graph"
    assert fd.rope and fd.path == "graph (triton rope)"
    for a, b in zip(ref.base.kv, fd.base.kv):  # fp32: every rotated key is torch's bits
        for h in range(a.n_heads):
            assert torch.equal(a.head(h)[0], b.head(h)[0])
    assert len(calls) == 9 * 2  # 9 forward steps x 2 layers
    assert modeling_llama.apply_rotary_pos_emb is orig


@needs_triton
def test_graph_prefill_with_triton_norms_and_rope_matches_the_engine(tiny, interpret_env, monkeypatch):
    """The small-model graph prefill (its static forward, eager here) with the Triton RMSNorm and RoPE over the
    context's and the question's tokens: the engine's eager prefill's logits and cache (keys within the norms'
    fp32 sum order), and its record says so; the kernels really ran."""
    from test_graph_prefill import random_ids, static_engine
    from kvbench.engine import Engine
    from kvbench.graph_prefill import GraphPrefill
    calls, real = [], R.rope_triton
    monkeypatch.setattr(R, "rope_triton", lambda q, k, c, s: calls.append(q.shape[2]) or real(q, k, c, s))
    monkeypatch.setenv("KVBENCH_DECODE_NORM", "triton")  # auto: only on CUDA
    monkeypatch.setenv("KVBENCH_DECODE_ROPE", "triton")
    gp = GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8)
    assert gp.path == "graph (triton rmsnorm, rope)"
    eager, eng = Engine(tiny, None, query_aware=False), static_engine(tiny, gp)
    c1, c2 = eager.new_cache(), eng.new_cache()
    ctx, q = random_ids(50), random_ids(5, seed=1)
    p1, p2 = eager.prefill(c1, ctx, None, compress=True, spare=16), eng.prefill(c2, ctx, None, compress=True, spare=16)
    assert p2.path == "graph (triton rmsnorm, rope)"
    torch.testing.assert_close(p2.logits, p1.logits, rtol=1e-4, atol=1e-4)
    q1, q2 = eager.prefill(c1, q, None, compress=False), eng.prefill(c2, q, None, compress=False)
    torch.testing.assert_close(q2.logits, q1.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(c1.kv, c2.kv):
        for h in range(a.n_heads):
            ka, _, pa = a.head(h)
            kb, _, pb = b.head(h)
            assert torch.equal(pa, pb)
            torch.testing.assert_close(kb, ka, rtol=1e-4, atol=1e-4)
    n_layers = tiny.model.config.num_hidden_layers
    assert calls == [64] * n_layers + [8] * n_layers  # the padded context bucket, then the question's


def test_a_nonstandard_rope_is_left_alone():
    from kvbench.fast_decode import _standard_rope
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    assert _standard_rope(apply_rotary_pos_emb)
    assert not _standard_rope(lambda q, k, cos, sin, unsqueeze_dim=1: (q * cos, k * cos))  # no rotate_half


def test_triton_suite_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module on a machine without CUDA: rerun here."""
    triton_modes.rerun_in_fresh_process(MODE, __file__, "triton", 300)
