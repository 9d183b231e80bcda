"""What one layer's compression costs on the GPU's timeline, piece by piece (issue 16: TTFT overhead).

A layer of a real shape (default Llama-3.1-8B: 8 KV heads, 32 query heads, d 128, bf16), random keys, values
and queries of `--length` tokens; each method's `compress_layer` runs on a fresh copy of the layer (the copy
is not timed), its kernels' GPU time by CUDA events while the host runs ahead of the GPU (`gpu_us`), as in a
real prefill, where launches are hidden and kernels are not (host time is printed too), and the sum of its
kernels' durations from the CUDA profiler (`kernel_us`, which holds for a hook that waits for the GPU: AdaKV).
Also the pieces every ScoredEviction cut shares (`topk_indices` against two stable sorts, the one-program top-k
kernel's tile sizes, the split top-k's programs per row, SnapKV's window scoring with its rows tiled per query
head or stacked per KV head and its grid, `LayerKV.keep`), and with --profile a kernel table of one method's hook. GPU us per layer x layers = the hook's share of the TTFT.

    python bench/compress_breakdown.py [--length 8192 32768] [--budget 1024] [--methods snapkv ...] [--profile snapkv]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("kvbench") is None:
    sys.path.insert(0, str(ROOT))

SHAPES = {"llama-3.1-8b": (32, 8, 32, 128), "smollm2-135m": (30, 3, 9, 64)}  # layers, n_kv, n_q, d


def gpu_us(fn, setup, reps: int) -> tuple[float, float]:
    """(GPU us, host us) of one fn(setup()), averaged over reps after one warm-up; setup (a fresh layer) is
    made for every rep up front, untimed. GPU: CUDA events around each call, recorded while the GPU is
    still busy with a long sleep kernel queued first, so the host has queued every call before the GPU
    reaches it and the events time the kernels alone, back to back, as in a prefill whose host runs ahead
    (a sync before each call would time the launches instead). Host: wall time of the launches."""
    fn(setup())
    args = [setup() for _ in range(reps)]
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    done = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    t0 = time.perf_counter()
    for a, (e0, e1) in zip(args, events):
        e0.record()
        fn(a)
        e1.record()
    host = (time.perf_counter() - t0) / reps * 1e6
    done.record()
    if done.query():
        print(f"  (warning: the GPU caught up with the host; raise SLEEP_CYCLES)")
    torch.cuda.synchronize()
    return sum(e0.elapsed_time(e1) for e0, e1 in events) / reps * 1e3, host


def kernel_us(fn, setup, reps: int) -> float:
    """GPU us of one fn(setup()) as the sum of its kernels' durations (CUDA profiler), averaged over reps after
    one warm-up. Unlike `gpu_us` it holds when fn waits for the GPU (AdaKV's deferred cut reads its per-head
    counts: the GPU then catches up with the host and the events would time launches, not kernels)."""
    from torch.profiler import ProfilerActivity, profile
    fn(setup())
    args = [setup() for _ in range(reps)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for a in args:
            fn(a)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / reps


SLEEP_CYCLES = int(1e9)  # ~0.5 s of a GPU kernel doing nothing, queued before the timed calls


def topk_by_sorts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The former `topk_indices`: a stable descending sort of the scores, then a sort of the kept indices."""
    idx = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(idx, dim=-1).values


def main() -> None:
    from kvbench.cache import LayerKV
    from kvbench.method import LayerContext, build_method, topk_indices
    from kvbench.methods.kernels.topk_select import topk_select_split_triton, topk_select_triton
    from kvbench.methods.kernels.window_scores import window_scores_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--length", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["streaming_llm", "snapkv", "pyramidkv", "adakv", "tova"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", default="", help="a method whose hook gets a kernel table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compress_breakdown.py times GPU kernels: it needs CUDA (none found)")
    n_layers, n_kv, n_q, d = SHAPES[args.shape]
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  shape {args.shape}  budget {args.budget}"
          f"  reps {args.reps}")
    for L in args.length:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(n_kv, L, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(n_kv, L, d, device=dev, dtype=dt, generator=g)
        q = torch.randn(n_q, L, d, device=dev, dtype=dt, generator=g)
        pos = torch.arange(L, device=dev)

        def fresh():
            return LayerKV.from_dense(k, v, pos)

        scores = torch.rand(n_kv, L, device=dev, generator=g)
        ks = torch.full((n_kv,), args.budget, dtype=torch.long, device=dev)
        rows = {"topk_indices (n_kv, L) -> budget": gpu_us(lambda s: topk_indices(s, args.budget), lambda: scores,
                                                            args.reps),
                "  two stable sorts (the torch path)": gpu_us(lambda s: topk_by_sorts(s, args.budget), lambda: scores,
                                                     args.reps),
                **{f"  topk_select_triton block {b} warps {w}": gpu_us(
                    lambda s, b=b, w=w: topk_select_triton(s, ks, args.budget, block=b, num_warps=w),
                    lambda: scores, args.reps) for b, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))},
                **{f"  topk_select_split_triton P {p}": gpu_us(
                    lambda s, p=p: topk_select_split_triton(s, ks, args.budget, programs_per_row=p),
                    lambda: scores, args.reps) for p in (None, 8, 16, 32)},
                **{f"window_scores_triton {'stacked' if st else 'per q head'} n {bn} w {w} splits {sp} progs {pr}":
                   gpu_us(lambda lay, st=st, bn=bn, w=w, sp=sp, pr=pr: window_scores_triton(
                       q[:, -32:], lay.keys, lay.starts, lay.lengths, d ** -0.5, 7, "max", block_n=bn,
                       num_warps=w, host_lengths=lay.head_lengths, stack=st, num_splits=sp, colsum_programs=pr),
                       fresh, args.reps)
                   for st, bn, w, sp, pr in ((False, 64, 4, None, None), (True, 64, 4, None, None),
                                             (True, 64, 4, None, 33), (True, 64, 4, None, 66),
                                             (True, 64, 4, None, 16), (True, 64, 4, 8, 33), (True, 64, 4, 16, 33),
                                             (True, 64, 8, 16, 33), (True, 128, 8, 16, 33))},
                "LayerKV.keep (sorted (n_kv, budget) index)": gpu_us(
                    lambda lay: lay.keep(topk_indices(scores, args.budget), ascending=True), fresh, args.reps)}
        for name in args.methods:
            method = build_method(name, budget=args.budget)

            def hook(lay, method=method):
                # no reset between calls: AdaKV's deferred cut of one call is made by the next call's hook,
                # as the next layer's hook makes it in a prefill (a flush here would wait for the GPU)
                ctx = LayerContext(n_layers // 2, n_layers, q, lay, d ** -0.5, None)
                method.observe_prefill(ctx)
                method.compress_layer(ctx)
            rows[f"{name}.compress_layer"] = (*gpu_us(hook, fresh, args.reps), kernel_us(hook, fresh, args.reps))
            if hasattr(method, "flush"):
                method.flush()
        print(f"\nlength {L}                                             GPU us/layer  x{n_layers} ms   host us/layer"
              f"   kernels us/layer")
        for name, (gpu, host, *kern) in rows.items():
            k_col = f"   {kern[0]:9.1f}" if kern else ""
            print(f"  {name:50s} {gpu:9.1f}   {gpu * n_layers / 1e3:7.2f}   {host:9.1f}{k_col}")
        if args.profile:
            method = build_method(args.profile, budget=args.budget)
            lay = fresh()
            torch.cuda.synchronize()
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    lay = fresh()
                    ctx = LayerContext(n_layers // 2, n_layers, q, lay, d ** -0.5, None)
                    method.reset()
                    method.observe_prefill(ctx)
                    method.compress_layer(ctx)
                torch.cuda.synchronize()
            print(f"\n{args.profile}.compress_layer x5 (+ 5 fresh layers: copies), kernels by GPU time")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
