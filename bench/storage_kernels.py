"""GPU timings of the storage-format / selector decode kernels (issue 13), not part of CI.

Shape: Llama-3.1-8B (32 query heads, 8 KV heads, head_dim 128), bf16, one layer at a 32K context, batch 1
(multiply by 32 layers for a token). Each `bench_<name>(device)` times its decode kernel beside the plain
`ragged_decode_attention_triton` over the same full-precision cache and returns a dict per kernel: ms (median
of >= 50 CUDA-event-timed replays of a CUDA graph of one call, after a warm-up), bytes read, and ms / roofline,
roofline = bytes read / the copy bandwidth measured here (a device-to-device copy of 1 GiB: 2 GiB moved).

    python bench/storage_kernels.py quest      # one line per kernel, with the card's name
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_Q, N_KV, D, CTX, LAYERS, DTYPE = 32, 8, 128, 32768, 32, torch.bfloat16


def median_ms(fn, runs: int = 100, graph: bool = True) -> float:
    """Median over `runs` of one call of `fn` (CUDA events), after a warm-up; `graph`: replay one captured
    CUDA graph of the call (GPU time without the host's launch overhead)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
    times = []
    for _ in range(max(50, runs)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), runs=50, graph=False)
    return 2 * nbytes / (ms * 1e-3)


def plain_layer(device, ctx: int = CTX, n_kv: int = N_KV, d: int = D, seed: int = 0):
    """One layer's plain ragged cache (kvbench.cache.LayerKV) of n_kv heads x ctx rows, random bf16."""
    from kvbench.cache import LayerKV
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(n_kv, ctx, d, generator=g, device=device, dtype=torch.float32).to(DTYPE)
    v = torch.randn(n_kv, ctx, d, generator=g, device=device, dtype=torch.float32).to(DTYPE)
    return LayerKV.from_dense(k, v, torch.arange(ctx, device=device))


def _line(card: str, name: str, r: dict) -> str:
    return (f"{card} | {name:<28} {r['ms']:8.4f} ms/layer  {r['ms'] * LAYERS:7.3f} ms/token(x{LAYERS})  "
            f"read {r['bytes_read'] / 2**20:8.2f} MiB/layer  roofline {r['roofline_ms']:8.4f} ms  "
            f"x{r['ms_over_roofline']:.2f} of roofline")


def _result(ms: float, nbytes: int, bw: float, **extra) -> dict:
    roof = nbytes / bw * 1e3
    return {"ms": ms, "bytes_read": nbytes, "roofline_ms": roof, "ms_over_roofline": ms / roof, **extra}


# -- Quest (methods/quest.py, methods/kernels/quest_decode.py) ---------------------------------------------
def bench_quest(device, budgets=(256, 1024), ctx: int = CTX, runs: int = 100) -> dict:
    """Quest at token budgets `budgets` (pages of 16) vs full attention, one decode step of one layer.
    quest-<B>: page scoring + top-k (torch ops) and the page-list kernel; quest-<B>-kernel: the attention
    kernel alone (pages chosen beforehand). Bytes read: QuestLayer.read_bytes (selected K/V rows per query head
    + the scored pages' bounds); full: every K/V row once."""
    from kvbench.methods.kernels import ragged_decode_attention_triton
    from kvbench.methods.kernels.quest_decode import quest_decode_attention_ref, quest_decode_attention_triton
    from kvbench.methods.quest import Quest, QuestLayer
    device = torch.device(device)
    layer = plain_layer(device, ctx, N_KV, D)
    q = torch.randn(N_Q, D, device=device, dtype=DTYPE)
    scaling = D ** -0.5
    bw = copy_bandwidth(device)
    out = {"copy_bandwidth_GBps": bw / 1e9}
    full_ms = median_ms(lambda: ragged_decode_attention_triton(q, layer.keys, layer.values, layer.starts,
                                                               layer.lengths, scaling), runs)
    out["full"] = _result(full_ms, layer.read_bytes(0), bw)
    for budget in budgets:
        st = QuestLayer.encode(Quest(page_size=16, token_budget=budget, skip_layers=0), layer, True, N_Q)
        pages = st.select(q)

        def step():
            return quest_decode_attention_triton(q, layer.keys, layer.values, layer.starts, layer.lengths,
                                                 st.select(q), 16, scaling)

        def kernel():
            return quest_decode_attention_triton(q, layer.keys, layer.values, layer.starts, layer.lengths, pages,
                                                 16, scaling)
        ref = quest_decode_attention_ref(q, layer.keys, layer.values, layer.starts, layer.lengths, pages, 16, scaling)
        err = (kernel().float() - ref.float()).abs().max().item()
        rb = st.read_bytes(0)
        bounds = st.n_heads * (st.pages_per_head()[0] - 1) * st.bound_bytes  # read by the scoring only
        out[f"quest-{budget}"] = _result(median_ms(step, runs), rb, bw, max_abs_err_vs_ref=err)
        out[f"quest-{budget}-kernel"] = _result(median_ms(kernel, runs), rb - bounds, bw, max_abs_err_vs_ref=err)
    return out


BENCHES = {"quest": bench_quest}


# -- ThinK and Eigen Attention (methods/think.py, methods/eigen_attention.py, methods/kernels/lowrank_decode.py) --
def bench_think(device, ratios=(0.5, 0.4), ctx: int = CTX, runs: int = 100) -> dict:
    """ThinK at key-channel pruning `ratios` vs full attention, one decode step of one layer: the lowrank_decode
    kernel over the pruned rows (kept channels, the query gathered in the kernel) and the 32 full recent rows,
    one softmax. Bytes read: ThinKLayer.read_bytes (pruned keys + channel indices + values + full rows)."""
    from kvbench.methods.kernels import ragged_decode_attention_triton
    from kvbench.methods.kernels.lowrank_decode import lowrank_decode_attention_ref, lowrank_decode_attention_triton
    from kvbench.methods.think import ThinK, ThinKLayer
    device = torch.device(device)
    layer = plain_layer(device, ctx, N_KV, D)
    q = torch.randn(N_Q, D, device=device, dtype=DTYPE)
    window = torch.randn(N_Q, 32, D, device=device, dtype=DTYPE)  # the prefill's last 32 queries
    scaling = D ** -0.5
    bw = copy_bandwidth(device)
    out = {"copy_bandwidth_GBps": bw / 1e9}
    full_ms = median_ms(lambda: ragged_decode_attention_triton(q, layer.keys, layer.values, layer.starts,
                                                               layer.lengths, scaling), runs)
    out["full"] = _result(full_ms, layer.read_bytes(0), bw)
    for ratio in ratios:
        st = ThinKLayer.encode(ThinK(ratio=ratio), layer, window)
        parts = st.parts()
        ref = lowrank_decode_attention_ref(q, parts, scaling)
        err = (lowrank_decode_attention_triton(q, parts, scaling).float() - ref.float()).abs().max().item()
        ms = median_ms(lambda: lowrank_decode_attention_triton(q, parts, scaling), runs)
        out[f"think-{ratio}"] = _result(ms, st.read_bytes(0), bw, max_abs_err_vs_ref=err)
        del st, parts
    return out


def bench_eigen_attention(device, ranks=(64, 96), ctx: int = CTX, runs: int = 100) -> dict:
    """Eigen Attention at `ranks` (of head_dim 128) vs full attention, one decode step of one layer, random
    orthonormal bases. eigen-<r>-kernel: the lowrank_decode kernel on the projected query (keys and values at
    rank r); eigen-<r>: the whole EigenLayer.attend step (q P_k, the kernel, the output lifted by P_v^T).
    Bytes read: EigenLayer.read_bytes (rank-r keys and values); the step adds the float32 bases it reads."""
    from kvbench.methods.eigen_attention import EigenAttention
    from kvbench.methods.kernels import ragged_decode_attention_triton
    from kvbench.methods.kernels.lowrank_decode import lowrank_decode_attention_ref, lowrank_decode_attention_triton
    device = torch.device(device)
    layer = plain_layer(device, ctx, N_KV, D)
    q = torch.randn(N_Q, D, device=device, dtype=DTYPE)
    scaling = D ** -0.5
    bw = copy_bandwidth(device)
    out = {"copy_bandwidth_GBps": bw / 1e9}
    full_ms = median_ms(lambda: ragged_decode_attention_triton(q, layer.keys, layer.values, layer.starts,
                                                               layer.lengths, scaling), runs)
    out["full"] = _result(full_ms, layer.read_bytes(0), bw)
    g = torch.Generator().manual_seed(0)
    bases = {"key_basis": torch.linalg.qr(torch.randn(1, D, D, generator=g))[0],
             "value_basis": torch.linalg.qr(torch.randn(1, N_KV, D, D, generator=g))[0]}
    for r in ranks:
        fmt = EigenAttention(rank=r)
        fmt.use_bases(bases)
        st = fmt.encode(layer, 0, 1)
        rows = st.rows
        qp = (q.float() @ st.pk).to(DTYPE)
        parts = [(rows.keys, rows.values, rows.starts, rows.lengths, None)]
        ref = lowrank_decode_attention_ref(qp, parts, scaling)
        err = (lowrank_decode_attention_triton(qp, parts, scaling).float() - ref.float()).abs().max().item()
        rb = st.read_bytes(0)
        ms = median_ms(lambda: lowrank_decode_attention_triton(qp, parts, scaling), runs)
        out[f"eigen-{r}-kernel"] = _result(ms, rb, bw, max_abs_err_vs_ref=err)
        q3 = q.unsqueeze(1)
        ms = median_ms(lambda: st.attend(q3, scaling), runs)
        out[f"eigen-{r}"] = _result(ms, rb + (st.pk.numel() + st.pv.numel()) * 4, bw, max_abs_err_vs_ref=err)
        del st, rows, parts
    return out


BENCHES.update({"think": bench_think, "eigen_attention": bench_eigen_attention})


# -- KIVI (methods/kivi.py, methods/kernels/kivi_decode.py) ------------------------------------------------
def bench_kivi(device, bits=(2, 4), ctx: int = CTX, runs: int = 100) -> dict:
    """KIVI at `bits` (group 32, residual 128) vs full attention, one decode step of one layer: the kivi_decode
    kernel dequantizes codes inside the tile. Bytes read: KIVILayer.read_bytes (packed codes + scales/minima +
    full-precision residual rows) = its stored bytes."""
    from kvbench.methods.kernels import ragged_decode_attention_triton
    from kvbench.methods.kernels.kivi_decode import kivi_decode_attention_ref, kivi_decode_attention_triton
    from kvbench.methods.kivi import KIVI, KIVILayer
    device = torch.device(device)
    layer = plain_layer(device, ctx, N_KV, D)
    q = torch.randn(N_Q, D, device=device, dtype=DTYPE)
    scaling = D ** -0.5
    bw = copy_bandwidth(device)
    out = {"copy_bandwidth_GBps": bw / 1e9}
    full_ms = median_ms(lambda: ragged_decode_attention_triton(q, layer.keys, layer.values, layer.starts,
                                                               layer.lengths, scaling), runs)
    out["full"] = _result(full_ms, layer.read_bytes(0), bw)
    for b in bits:
        st = KIVILayer.encode(KIVI(bits=b, group_size=32, residual_length=128), layer)
        flat = st.flat()
        ref = kivi_decode_attention_ref(q, flat, scaling)
        err = (kivi_decode_attention_triton(q, flat, scaling).float() - ref.float()).abs().max().item()
        for bn in (16, 32):
            ms = median_ms(lambda: kivi_decode_attention_triton(q, flat, scaling, block_n=bn), runs)
            out[f"kivi-{b}bit-block{bn}"] = _result(ms, st.read_bytes(0), bw, max_abs_err_vs_ref=err)
        del st, flat
    return out


BENCHES["kivi"] = bench_kivi


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(BENCHES)
    bad = [n for n in names if n not in BENCHES]
    if bad:
        raise SystemExit(f"unknown kernel {bad[0]!r}; allowed: {', '.join(sorted(BENCHES))}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/storage_kernels.py needs a CUDA device")
    card = torch.cuda.get_device_name()
    for name in names:
        res = BENCHES[name]("cuda")
        for kernel, r in res.items():
            if isinstance(r, dict):
                print(_line(card, kernel, r))
        extra = {k: v for k, v in res.items() if not isinstance(v, dict)}
        if extra:
            print(f"{card} | {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in extra.items()))


if __name__ == "__main__":
    main()
