"""The one-token GEMV (methods/kernels/gemv.py): the Triton kernel under TRITON_INTERPRET=1 against `gemv_ref` on
small shapes (N, K not multiples of the blocks, N = 1, K under one block, split K, bias, fp32 and bf16), the
reference against torch's linear, the config arithmetic, and bench/gemv_gpu.py's CPU-side logic (its config grid
run through the interpreter on a tiny shape).

Triton's mode is chosen at import (tests/triton_modes.py): where another test module already loaded triton
without the interpreter, the Triton tests here are skipped in-process and rerun in one fresh subprocess.
"""
from __future__ import annotations

import pytest
import torch

import triton_modes  # noqa: E402  (tests/: how this process runs Triton)


def _import():
    from kvbench.methods.kernels import HAS_TRITON, gemv, rmsnorm, rope  # all three: the decode tests use each
    return HAS_TRITON, gemv, rmsnorm, rope


HAS_TRITON, G, _RMSNORM, _ROPE = triton_modes.import_kernels(_import)
MODE, DEV, needs_triton = triton_modes.module_modes(HAS_TRITON, *(getattr(m, k, None) for m, k in (
    (G, "_gemv_kernel"), (_RMSNORM, "_rmsnorm_kernel"), (_ROPE, "_rope_kernel"))))
# bf16: one rounding of the fp32 sum, <= 1 ulp (2**-7 relative) from the reference's (the interpreter truncates)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.fixture
def bench(bench_module):
    return bench_module("gemv_gpu")


def test_ref_equals_linear_hand_case():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x, b = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0.5, -1.0])
    want = torch.tensor([[1 - 3 + 0.5, 4 - 6 - 1.0]])
    assert torch.equal(G.gemv_ref(x, w, b), want)
    assert torch.equal(torch.nn.functional.linear(x, w, b), want)
    assert torch.equal(G.gemv_ref(x, w), torch.nn.functional.linear(x, w))


def test_one_token_only():
    w = torch.randn(8, 16)
    for x in (torch.randn(2, 16), torch.randn(1, 2, 16)):
        with pytest.raises(ValueError, match="one token"):
            G.gemv_triton(x, w)
    with pytest.raises(ValueError, match="weight"):
        G.gemv_triton(torch.randn(1, 15), w)


def test_split_plan_and_default_config():
    assert G.split_plan(4096, 1024, 3) == (2, 2048)   # 4 blocks: 2 + 2, not 2 + 1 + 1 slices of uneven blocks
    assert G.split_plan(4096, 1024, 8) == (4, 1024)   # never more slices than blocks
    assert G.split_plan(300, 64, 3) == (3, 128)       # 5 blocks: 2 + 2 + 1
    assert G.split_plan(5, 16, 4) == (1, 16)
    assert G.gemv_config(1024, 4096, 264) == {"block_n": 1, "block_k": 1024, "split_k": 1, "num_warps": 4}
    assert G.gemv_config(192, 576, 264) == {"block_n": 1, "block_k": 1024, "split_k": 1, "num_warps": 4}
    assert G.gemv_config(100, 4096, 264) == {"block_n": 1, "block_k": 1024, "split_k": 2, "num_warps": 4}  # 3 asked: 2 of 2048
    assert G.gemv_config(1, 5, 16) == {"block_n": 1, "block_k": 16, "split_k": 1, "num_warps": 4}


CASES = [  # (n, k, dtype, bias, x is (1, 1, K) else (K,), config)
    (37, 300, torch.float32, True, True, {}),                                       # the default config
    (37, 300, torch.float32, False, False, dict(block_n=8, block_k=64, split_k=3)),
    (100, 257, torch.float32, True, False, dict(block_n=16, block_k=32, split_k=4)),
    (1, 5, torch.float32, True, True, dict(block_k=64)),                           # N = 1, K < block_k
    (64, 128, torch.float32, False, True, dict(block_n=16, block_k=128, split_k=1)),  # exact multiples
    (37, 300, torch.bfloat16, True, True, dict(block_n=4, block_k=128, split_k=1)),
    (37, 300, torch.bfloat16, False, False, dict(block_n=2, block_k=64, split_k=2)),
]


@needs_triton
@pytest.mark.parametrize("n,k,dtype,bias,three_d,cfg", CASES)
def test_triton_matches_ref(n, k, dtype, bias, three_d, cfg, interpret_env):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype).to(DEV)
    x = torch.randn((1, 1, k) if three_d else (k,), generator=g).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if bias else None
    y, ref = G.gemv_triton(x, w, b, **cfg), G.gemv_ref(x, w, b)
    assert y.shape == x.shape[:-1] + (n,) and y.dtype == dtype
    torch.testing.assert_close(y, ref, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype,split_k", [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 3)])
def test_triton_residual_is_added_in_the_store(dtype, split_k, interpret_env):
    """residual=r gives torch's `linear(x) + r` on the kernel's own output, bit for bit (the add after the
    rounding to the output dtype), with and without a split K."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(37, 300, generator=g) * 300 ** -0.5).to(dtype).to(DEV)
    x, b = torch.randn(1, 1, 300, generator=g).to(dtype).to(DEV), torch.randn(37, generator=g).to(dtype).to(DEV)
    r = (torch.randn(1, 1, 37, generator=g) * 4).to(dtype).to(DEV)
    cfg = dict(block_n=None if MODE == "cuda" else 8, block_k=64, split_k=split_k)
    y, want = G.gemv_triton(x, w, b, residual=r, **cfg), G.gemv_triton(x, w, b, **cfg) + r
    if dtype == torch.float32 or MODE == "cuda":
        assert torch.equal(y, want)
    else:  # the interpreter casts to bf16 by truncation, torch's add rounds to nearest: an ulp apart at most
        torch.testing.assert_close(y.float(), want.float(), rtol=2 ** -7, atol=0)
    torch.testing.assert_close(y, G.gemv_ref(x, w, b) + r, **TOL[dtype])
    with pytest.raises(ValueError, match="residual"):
        G.gemv_triton(x, w, b, residual=r[..., :5])


def test_bench_config_grid(bench):
    for n, k in ((1024, 4096), (4096, 4096), (14336, 4096)):
        grid = bench.config_grid(n, k, 132)
        assert grid and all(c not in grid[:i] for i, c in enumerate(grid))
        for c in grid:
            assert 8 <= c["block_n"] * c["block_k"] // (32 * c["num_warps"]) <= 64
            assert G.split_plan(k, c["block_k"], c["split_k"])[0] == c["split_k"]  # slices really made
            if c["split_k"] > 1:
                assert n <= 4096 and -(-n // c["block_n"]) < 4 * 132
    assert {c["split_k"] for c in bench.config_grid(1024, 4096, 132)} == {1, 2, 4, 8}
    assert {c["split_k"] for c in bench.config_grid(14336, 4096, 132)} == {1}


def test_bench_roofline_arithmetic(bench):
    shapes = bench.llama_shapes(**bench.LLAMA_8B)
    assert shapes["qkv"] == (6144, 4096) and shapes["down"] == (4096, 14336) and shapes["lm_head"] == (128256, 4096)
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
    want = 2 * (32 * per_layer + 128256 * 4096)  # 15.0 GB: Llama-3.1-8B less its embedding table
    assert bench.model_weight_bytes(shapes, 32) == bench.model_weight_bytes(shapes, 32, bench.FUSED) == want
    # bandwidth = bytes read + written per second of a copy (bench/gpu_speed.py): 4.12e12 reads 15.0 GB in 3.64 ms
    assert bench.roofline_ms(want, 4.12e12) == pytest.approx(want / 4.12e12 * 1e3)
    assert bench.tbps(4.12e12, 1000.0) == pytest.approx(4.12)


@needs_triton
def test_triton_bench_configs_run_and_match_ref(bench, interpret_env):
    """Every config the benchmark's grid makes for a tiny shape (splits included), and the default, launch and
    pass its check."""
    n, k = 20, 300
    w = (torch.randn(n, k) * k ** -0.5).to(torch.bfloat16).to(DEV)
    x = torch.randn(1, k).to(torch.bfloat16).to(DEV)
    ref = G.gemv_ref(x, w)
    grid = bench.config_grid(n, k, 8) + [G.gemv_config(n, k, 32)]
    assert any(c["split_k"] > 1 for c in grid)
    for cfg in grid:
        err, ok = bench.check_config(x, w, ref, cfg)
        assert ok, (cfg, err)
    _, ok = bench.check_config(x, w, ref + 1, grid[0])  # the check can fail
    assert not ok


@needs_triton
def test_triton_bench_flow_on_a_tiny_model(bench, interpret_env, monkeypatch, capsys):
    """bench_shape and bench_model end to end on the CPU (each graph replay: one plain call of its function)."""
    monkeypatch.setattr(bench, "DEVICE", DEV)
    monkeypatch.setattr(bench, "graph_ms", lambda fn, reps: (fn(), 1.0)[1])
    shapes = bench.llama_shapes(hidden=32, intermediate=48, n_q=2, n_kv=1, head_dim=16, vocab=40)
    best = {s: bench.bench_shape([nm], *s, 2, 1, 1, False) for nm, s in shapes.items()}
    assert all(best.values())
    bench.bench_model(shapes, 2, best, 1e12, 1)
    out = capsys.readouterr().out
    assert "INVALID" not in out and "FAILED" not in out
    assert out.count("triton best") == 2 and "whole model, fused qkv, gate_up" in out


@pytest.fixture(scope="module")
def tiny():
    from kvbench.models import load_model
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")


def _prefilled(lm, name="snapkv", n=97):
    from test_gpu_path import prefilled, _NoTokenizer
    lm.tokenizer = _NoTokenizer()
    return prefilled(lm, name, n=n)


@needs_triton
def test_decode_with_triton_linears_matches_cublas_linears(tiny, interpret_env, monkeypatch):
    """FastDecoder with gemv="triton" (every linear of the step through gemv_triton, here under the interpreter)
    decodes the same 10 tokens and leaves the same cache as with torch's linear; the kernel really ran for every
    linear of every step, and the model is untouched afterwards."""
    from test_gpu_path import decode_two_ways
    calls, real = [], G.gemv_triton

    def counting(x, w, b=None):  # the interpreter runs programs one by one: wide row blocks keep it quick
        calls.append(tuple(w.shape))
        return real(x, w, b, block_n=None if MODE == "cuda" else 256)
    monkeypatch.setattr(G, "gemv_triton", counting)
    ref, fd = decode_two_ways(tiny, 10, dict(gemv="cublas"), dict(gemv="triton"))
    assert not ref.gemv and ref.path == "graph"
    assert fd.gemv and fd.path == "graph (triton gemv)"
    lins = [m for m in tiny.model.modules() if isinstance(m, torch.nn.Linear)]
    # 9 forward steps after the prefill's token, every linear each, all in the Triton run (none in torch's)
    assert len(calls) == 9 * len(lins)
    assert all(m._compiled_call_impl is None for m in lins)


def test_triton_linears_leaves_hooked_and_subclassed_linears_alone(monkeypatch):
    from kvbench.fast_decode import triton_linears
    monkeypatch.setattr(G, "gemv_triton", lambda x, w, b=None: torch.full(x.shape[:-1] + (w.shape[0],), 7.0))

    class Sub(torch.nn.Linear):
        pass
    model = torch.nn.ModuleDict(dict(a=torch.nn.Linear(4, 3), b=torch.nn.Linear(4, 3), c=Sub(4, 3)))
    model["b"].register_forward_hook(lambda m, i, o: o)
    x = torch.randn(1, 4)
    with triton_linears(model):
        assert torch.equal(model["a"](x), torch.full((1, 3), 7.0))    # the GEMV
        assert not torch.equal(model["a"](torch.randn(2, 4))[0], torch.full((3,), 7.0))  # two tokens: torch
        assert torch.equal(model["b"](x), torch.nn.functional.linear(x, model["b"].weight, model["b"].bias))
        assert torch.equal(model["c"](x), torch.nn.functional.linear(x, model["c"].weight, model["c"].bias))
    assert torch.equal(model["a"](x), torch.nn.functional.linear(x, model["a"].weight, model["a"].bias))


MANY_CASES = [  # (rows of each weight, K, dtype, bias)
    ((24, 8, 8), 300, torch.float32, True),      # a q/k/v trio (GQA: k and v narrower), K not a block multiple
    ((24, 8, 8), 300, torch.float32, False),
    ((5, 3), 64, torch.bfloat16, False),         # two weights
    ((36, 12, 12), 40, torch.bfloat16, True),    # K under one block
]


@needs_triton
@pytest.mark.parametrize("rows,k,dtype,bias", MANY_CASES)
def test_triton_many_matches_ref_and_the_single_gemv(rows, k, dtype, bias, interpret_env):
    """One launch for 2-3 weights: each output is gemv_ref's, and the same bits as gemv_triton's default config
    (the same per-row sum), so fusing q/k/v changes no number."""
    g = torch.Generator().manual_seed(k + len(rows))
    ws = [(torch.randn(n, k, generator=g) * k ** -0.5).to(dtype).to(DEV) for n in rows]
    bs = [torch.randn(n, generator=g).to(dtype).to(DEV) for n in rows] if bias else None
    x = torch.randn(1, 1, k, generator=g).to(dtype).to(DEV)
    outs = G.gemv_many_triton(x, ws, bs)
    assert len(outs) == len(rows)
    for i, (y, w) in enumerate(zip(outs, ws)):
        b = bs[i] if bias else None
        assert y.shape == (1, 1, w.shape[0]) and y.dtype == dtype
        torch.testing.assert_close(y, G.gemv_ref(x, w, b), **TOL[dtype])
        assert torch.equal(y, G.gemv_triton(x, w, b, split_k=1))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_norm_folded_into_many_and_silu_mul(dtype, interpret_env):
    """norm=(weight, eps): the input goes through RMSNorm inside the launch; the same bits as the norm's own
    kernel followed by the plain launch (the sum of squares in the same block), and the references' values."""
    g = torch.Generator().manual_seed(11)
    k = 300
    x = (torch.randn(1, 1, k, generator=g) * 3).to(dtype).to(DEV)
    nw = torch.randn(k, generator=g).to(dtype).to(DEV)
    ws = [(torch.randn(n, k, generator=g) * k ** -0.5).to(dtype).to(DEV) for n in (24, 8, 8)]
    xn = _RMSNORM.rmsnorm_triton(x, nw, 1e-5)
    folded, plain = G.gemv_many_triton(x, ws, norm=(nw, 1e-5)), G.gemv_many_triton(xn, ws)
    ref_x = G.rmsnorm_rows_ref(x, (nw, 1e-5))
    for y, y0, w in zip(folded, plain, ws):
        assert torch.equal(y, y0)
        torch.testing.assert_close(y.float(), G.gemv_ref(ref_x, w).float(), **TOL[torch.bfloat16])
    y = G.gemv_silu_mul_triton(x, ws[1], ws[2], norm=(nw, 1e-5))
    assert torch.equal(y, G.gemv_silu_mul_triton(xn, ws[1], ws[2]))
    with pytest.raises(ValueError, match="norm weight"):
        G.gemv_many_triton(x, ws, norm=(nw[:5], 1e-5))


def test_norms_fold_only_into_narrow_launches():
    """A Llama RMSNorm folds into the fused launch after it up to FOLD_MAX_HIDDEN columns (wider: its own launch,
    measured faster on the 8B shape); another norm class, or a hooked one, never."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from kvbench.fast_decode import FOLD_MAX_HIDDEN, _rmsnorm_foldable
    for k, want in ((576, True), (FOLD_MAX_HIDDEN, True), (4096, False)):
        assert _rmsnorm_foldable(LlamaRMSNorm(k), torch.empty(8, k)) is want
    assert not _rmsnorm_foldable(LlamaRMSNorm(64), torch.empty(8, 64, dtype=torch.bfloat16))  # another dtype
    hooked = LlamaRMSNorm(64)
    hooked.register_forward_hook(lambda m, i, o: o)
    assert not _rmsnorm_foldable(hooked, torch.empty(8, 64))
    assert not _rmsnorm_foldable(torch.nn.LayerNorm(64), torch.empty(8, 64))


def test_many_and_silu_mul_bad_input():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="2 or 3 weights"):
        G.gemv_many_triton(torch.randn(8), [w])
    with pytest.raises(ValueError, match="2 or 3 weights"):
        G.gemv_many_triton(torch.randn(8), [w, torch.randn(4, 9)])
    with pytest.raises(ValueError, match="a bias"):
        G.gemv_many_triton(torch.randn(8), [w, w], [torch.randn(4), None])
    with pytest.raises(ValueError, match="one token"):
        G.gemv_many_triton(torch.randn(2, 8), [w, w])
    with pytest.raises(ValueError, match="gate and up"):
        G.gemv_silu_mul_triton(torch.randn(8), w, torch.randn(5, 8))
    with pytest.raises(ValueError, match="one token"):
        G.gemv_silu_mul_triton(torch.randn(1, 2, 8), w, w)


def test_silu_mul_ref_is_the_llama_mlp_hand_case():
    """silu_mul_ref is what LlamaMLP feeds its down projection, and SiLU by hand: x * sigmoid(x)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_act="silu"))
    x = torch.randn(1, 1, 8)
    got = G.silu_mul_ref(x, mlp.gate_proj.weight, mlp.up_proj.weight)
    torch.testing.assert_close(got, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), rtol=1e-6, atol=1e-6)
    w_g, w_u = torch.tensor([[1.0, 0.0], [0.0, -2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    x = torch.tensor([2.0, 1.0])  # gate (2, -2), up (6, 3)
    sig = lambda v: 1 / (1 + torch.exp(torch.tensor(-v)))  # noqa: E731
    torch.testing.assert_close(G.silu_mul_ref(x, w_g, w_u), torch.stack([2 * sig(2.0) * 6, -2 * sig(-2.0) * 3]))


@needs_triton
@pytest.mark.parametrize("n,k,dtype", [(12, 300, torch.float32), (40, 64, torch.bfloat16), (7, 1100, torch.bfloat16)])
def test_triton_silu_mul_matches_ref(n, k, dtype, interpret_env):
    g = torch.Generator().manual_seed(n + k)
    wg, wu = [(torch.randn(n, k, generator=g) * k ** -0.5 * 3).to(dtype).to(DEV) for _ in range(2)]
    x = torch.randn(1, 1, k, generator=g).to(dtype).to(DEV)
    y, ref = G.gemv_silu_mul_triton(x, wg, wu), G.silu_mul_ref(x, wg, wu)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    else:  # up to an ulp at each of its four roundings (gate, up, SiLU, product)
        torch.testing.assert_close(y.float(), ref.float(), rtol=4 * 2 ** -7, atol=2e-2)


@needs_triton
def test_decode_with_triton_fused_linears_matches_cublas_linears(tiny, interpret_env, monkeypatch):
    """FastDecoder with gemv="fused" decodes the engine's 6 tokens and cache; per step and layer, the q/k/v
    projections ran as one launch and the MLP's SiLU(gate) * up as another, every other linear through the GEMV,
    o_proj and down_proj adding the layer's residuals in theirs; the model is untouched afterwards."""
    from test_gpu_path import decode_two_ways
    calls = {"gemv": [], "many": [], "silu_mul": [], "residual": []}
    real = G.gemv_triton, G.gemv_many_triton, G.gemv_silu_mul_triton

    def counting(name, fn):
        return lambda x, *ws, **kw: calls[name].append(ws[0].shape if name != "many" else len(ws[0])) or fn(
            x, *ws, **kw)

    def gemv(x, w, b=None, residual=None):
        calls["residual"] += [] if residual is None else [w.shape]
        return real[0](x, w, b, residual=residual, block_n=None if MODE == "cuda" else 256)
    monkeypatch.setattr(G, "gemv_triton", counting("gemv", gemv))
    monkeypatch.setattr(G, "gemv_many_triton", counting("many", real[1]))
    monkeypatch.setattr(G, "gemv_silu_mul_triton", counting("silu_mul", real[2]))
    _, fd = decode_two_ways(tiny, 6, dict(gemv="cublas"), dict(gemv="fused"))
    assert fd.gemv == "fused" and fd.path == "graph (triton fused gemv)"
    n_layers = tiny.model.config.num_hidden_layers
    assert calls["many"] == [3] * 5 * n_layers and len(calls["silu_mul"]) == 5 * n_layers  # 5 forward steps
    assert len(calls["gemv"]) == 5 * (2 * n_layers + 1)  # o_proj and down_proj per layer, and the LM head
    h = tiny.model.config.hidden_size
    assert calls["residual"] == [(h, h), (h, tiny.model.config.intermediate_size)] * 5 * n_layers
    assert all(m._compiled_call_impl is None for m in tiny.model.modules())


def test_fused_qkv_hands_rows_only_to_its_own_input(monkeypatch):
    """k_proj/v_proj take the fused launch's rows only when called on q_proj's input tensor; on any other input
    (or with no launch before) they compute their own; a hooked projection keeps the trio unfused."""
    from kvbench.fast_decode import triton_linears
    monkeypatch.setattr(G, "gemv_triton", lambda x, w, b=None: torch.nn.functional.linear(x, w, b))
    monkeypatch.setattr(G, "gemv_many_triton", lambda x, ws, bs=None: [
        torch.full(x.shape[:-1] + (w.shape[0],), 7.0 + i) for i, w in enumerate(ws)])
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = (torch.nn.Linear(4, n, bias=False) for n in (4, 2, 2))
    x, other = torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    with triton_linears(attn, fused=True):
        assert torch.equal(attn.k_proj(x)[0, 0], torch.nn.functional.linear(x, attn.k_proj.weight)[0, 0])  # none yet
        assert torch.equal(attn.q_proj(x), torch.full((1, 1, 4), 7.0))
        assert torch.equal(attn.k_proj(x), torch.full((1, 1, 2), 8.0))          # handed over
        assert torch.equal(attn.v_proj(other), torch.nn.functional.linear(other, attn.v_proj.weight))  # not its input
        assert torch.equal(attn.k_proj(x), torch.nn.functional.linear(x, attn.k_proj.weight))  # handed once only
    attn.v_proj.register_forward_hook(lambda m, i, o: o)
    with triton_linears(attn, fused=True):
        assert torch.equal(attn.q_proj(x), torch.nn.functional.linear(x, attn.q_proj.weight))


@needs_triton
@pytest.mark.parametrize("model_type,mlp_fused", [("qwen2", True), ("qwen3", True), ("gemma", False)])
def test_every_triton_decode_kernel_on_model_families(model_type, mlp_fused, interpret_env, monkeypatch):
    """The fast-decode step with every Triton kernel on (fused GEMVs with the layers' norms folded in, norms,
    rope) gives transformers' eager logits on tiny models of other families: Qwen2 (q/k/v with bias, a sliding
    layer), Qwen3 (per-head q/k norms on the projections), Gemma (its (1 + w) norm, GELU MLP and layer are left
    to torch: q/k/v fused, the rest not)."""
    from test_attention_models import N, assert_close, eager_then_prefilled
    from kvbench.fast_decode import FastDecoder
    calls = {"many": 0, "silu_mul": 0, "residual": 0, "folded": 0, "norm": 0}
    for name, attr in (("many", "gemv_many_triton"), ("silu_mul", "gemv_silu_mul_triton"), ("residual", "gemv_triton")):
        def counted(*a, _n=name, _f=getattr(G, attr), **kw):
            calls[_n] += _n != "residual" or kw.get("residual") is not None
            calls["folded"] += kw.get("norm") is not None
            return _f(*a, **kw)
        monkeypatch.setattr(G, attr, counted)
    real_norm = _RMSNORM.rmsnorm_triton
    monkeypatch.setattr(_RMSNORM, "rmsnorm_triton", lambda *a: (calls.__setitem__("norm", calls["norm"] + 1),
                                                                real_norm(*a))[1])
    start = N - 2  # 2 steps: the interpreter runs one program per weight row
    lm, ids, ref, cache = eager_then_prefilled(model_type, start)
    fd = FastDecoder(lm.model, cache, 2, use_graph=False, gemv="fused", norm="triton", rope="triton")
    with torch.inference_mode():
        for i in range(start, N):
            fd.ids.fill_(ids[i])
            fd._run_one()
            assert_close(fd.logits, ref[i], f"{model_type} step at position {i}")
    fd.finish()
    n_layers = lm.model.config.num_hidden_layers
    fused = 2 * n_layers if mlp_fused else 0  # 2 steps; the residuals and folded norms: 2 per layer and step
    # norms left: the final one, and Qwen3's per-head q/k norms (Gemma's are its own class: never Triton)
    norms = 0 if model_type == "gemma" else 2 * (1 + 2 * n_layers * (model_type == "qwen3"))
    assert calls == {"many": 2 * n_layers, "silu_mul": fused, "residual": 2 * fused, "folded": 2 * fused,
                     "norm": norms}


KNOBS = [("gemv", "KVBENCH_DECODE_GEMV", ("auto", "fused", "triton", "cublas")),
         ("norm", "KVBENCH_DECODE_NORM", ("auto", "triton", "torch")),
         ("rope", "KVBENCH_DECODE_ROPE", ("auto", "triton", "torch"))]


@pytest.mark.parametrize("knob,var,modes", KNOBS)
def test_decode_kernel_switches(knob, var, modes, tiny, monkeypatch):
    """Each decode-kernel knob: auto by default, a bad value named with the allowed ones, auto off the CUDA graph
    path, every Triton mode forceable, and none of them with a compiled step (auto or the off switch only)."""
    from kvbench import fast_decode
    from kvbench.fast_decode import FastDecoder
    default = getattr(fast_decode, f"default_{knob}")
    assert default() == "auto"
    monkeypatch.setenv(var, "fast")
    with pytest.raises(ValueError, match=f"{var}='fast'; allowed: {', '.join(modes)}"):
        default()
    monkeypatch.delenv(var)
    _, cache, _, _ = _prefilled(tiny)
    assert getattr(FastDecoder(tiny.model, cache, 4, use_graph=False), knob) is None  # auto: the CUDA graph path
    for forced in modes[1:-1]:
        assert getattr(FastDecoder(tiny.model, cache, 4, use_graph=False, **{knob: forced}), knob) == forced
        with pytest.raises(ValueError, match=f"{knob}='{forced}' with a compiled step; allowed: {knob} auto or "
                                             f"{modes[-1]}"):
            FastDecoder(tiny.model, cache, 4, use_graph=False, compile="aot_eager", **{knob: forced})


def test_triton_suite_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module on a machine without CUDA: rerun here."""
    triton_modes.rerun_in_fresh_process(MODE, __file__, "triton", 300)
