"""Time each Triton KV-cache kernel against its torch reference on CUDA (not part of CI).

Shapes of Llama-3.1-8B (n_kv=8 KV heads, g=4 query heads per KV head, head_dim 128), bf16, one layer,
batch 1, at context lengths 1K / 8K / 32K. Prints the median time of each, the speed-up (ref / triton)
and the max abs error against the reference (which computes in float32 from the same bf16 inputs).

    python bench/kernels_gpu.py [--lengths 1024 8192 32768] [--reps 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    from kvbench.methods import kernels as K
except ImportError:  # a plain checkout: import the kernels package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from methods import kernels as K

N_KV, G, D, DTYPE = 8, 4, 128, torch.bfloat16


def median_ms(fn, reps: int) -> float:
    for _ in range(3):  # warm-up (and Triton compilation)
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def err(x, y) -> float:
    if isinstance(x, tuple):
        return max(err(a, b) for a, b in zip(x, y))
    return (x.float() - y.float()).abs().max().item()


def graph_ms(fn, reps: int) -> float:
    """GPU time alone: replay of a CUDA graph of one call (the Triton paths never sync with the host)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, reps)


def report(name: str, length: int, ref, tri, reps: int) -> None:
    a, b = tri(), ref()
    e = "(checked above)" if a is None else f"{err(a, b):.2e}"  # in-place kernels return nothing
    t_ref, t_tri = median_ms(ref, reps), median_ms(tri, reps)
    print(f"{name:<28} L={length:>6}  ref {t_ref:9.3f} ms  triton {t_tri:9.3f} ms  "
          f"ref/triton {t_ref / t_tri:7.1f}x  max_abs_err {e}", flush=True)


def packed_cache(lengths, gen):
    lengths = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    keys = torch.randn(total, D, generator=gen, device="cuda").to(DTYPE)
    values = torch.randn(total, D, generator=gen, device="cuda").to(DTYPE)
    return keys, values, starts.cuda(), lengths.cuda()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not K.HAS_TRITON:
        sys.exit("bench/kernels_gpu.py needs CUDA and triton")
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  n_kv={N_KV} g={G} d={D} {DTYPE}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in args.lengths:
        # decode: every head holds n tokens, then a ragged cache (heads between n/4 and n, AdaKV-like)
        keys, values, starts, lengths = packed_cache([n] * N_KV, gen)
        q = torch.randn(N_KV * G, D, generator=gen, device="cuda").to(DTYPE)
        cache = (q, keys, values, starts, lengths)
        report("decode", n, lambda: K.ragged_decode_attention_ref(*cache),
               lambda: K.ragged_decode_attention_triton(*cache), args.reps)
        report("decode+probs", n, lambda: K.ragged_decode_attention_ref(*cache, return_probs=True),
               lambda: K.ragged_decode_attention_triton(*cache, return_probs=True), args.reps)
        for probs in (False, True):
            t = graph_ms(lambda: K.ragged_decode_attention_triton(*cache, return_probs=probs), args.reps)
            print(f"{'  GPU time, CUDA graph':<28} L={n:>6}  triton {t:9.3f} ms  (return_probs={probs}; "
                  f"K+V read once: {2 * keys.numel() * keys.element_size() / (t * 1e-3) / 1e9:.0f} GB/s)", flush=True)
        ragged = [max(1, n * (k + 1) // N_KV) for k in range(N_KV)]
        r_cache = (q, *packed_cache(ragged, gen))
        report("decode ragged", n, lambda: K.ragged_decode_attention_ref(*r_cache),
               lambda: K.ragged_decode_attention_triton(*r_cache), args.reps)

        # SnapKV window scores, window 32, max-pool kernel 7 (SnapKV's defaults)
        q_win = torch.randn(N_KV * G, args.window, D, generator=gen, device="cuda").to(DTYPE)
        win = (q_win, keys, starts, lengths)
        report("window_scores", n, lambda: K.window_scores_ref(*win, kernel_size=7),
               lambda: K.window_scores_triton(*win, kernel_size=7), args.reps)

        # H2O accumulated attention over a whole prefill of n tokens
        q_all = torch.randn(N_KV * G, n, D, generator=gen, device="cuda").to(DTYPE)
        dense = keys.view(N_KV, n, D)
        report("attention_colsum", n, lambda: K.attention_colsum_ref(q_all, dense),
               lambda: K.attention_colsum_triton(q_all, dense), max(3, args.reps // 4))

        # decode-time append: plain (into spare rows) and as a rolling window over full heads (ring of n
        # rows, 4 sinks, as StreamingLLM's fast decode), on copies; timed in ring mode (lengths stay put)
        cap = torch.arange(N_KV, device="cuda") * (n + 8)
        big_k = torch.zeros(N_KV * (n + 8), D, device="cuda", dtype=DTYPE)
        big_k[(cap.view(-1, 1) + torch.arange(n, device="cuda")).view(-1)] = keys
        big_v, pos = big_k.clone(), torch.zeros(big_k.shape[0], dtype=torch.int64, device="cuda")
        k_new = torch.randn(N_KV, D, generator=gen, device="cuda").to(DTYPE)
        p_new = torch.tensor([n], device="cuda")
        for ring in (0, n):
            def run(fn, ring=ring):
                t = [x.clone() for x in (big_k, big_v, pos, lengths, torch.full((N_KV,), 4, device="cuda"))]
                fn(k_new, -k_new, p_new, t[0], t[1], t[2], cap, t[3], ring_next=t[4], ring_rows=ring, n_sink=4)
                return tuple(x.float() for x in t)
            e = err(run(K.ragged_append_triton), run(K.ragged_append_ref))
            print(f"{'append' + (' ring' if ring else ''):<28} L={n:>6}  max_abs_err {e:.2e} (K, V, positions, "
                  "lengths, ring pointers)", flush=True)
        st = [x.clone() for x in (big_k, big_v, pos, lengths, torch.full((N_KV,), 4, device="cuda"))]
        ring_args = (k_new, k_new, p_new, st[0], st[1], st[2], cap, st[3])
        report("append ring (in place)", n,
               lambda: K.ragged_append_ref(*ring_args, ring_next=st[4], ring_rows=n, n_sink=4),
               lambda: K.ragged_append_triton(*ring_args, ring_next=st[4], ring_rows=n, n_sink=4), args.reps)

        # compaction keeping every other token of each head
        keep = torch.arange(0, n, 2, device="cuda").repeat(N_KV)
        counts = torch.full((N_KV,), (n + 1) // 2, dtype=torch.int64, device="cuda")
        comp = (keys, values, starts, lengths, keep, counts)
        report("compact", n, lambda: K.compact_ref(*comp), lambda: K.compact_triton(*comp), args.reps)


if __name__ == "__main__":
    main()
