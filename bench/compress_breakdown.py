"""What one layer's compression costs on the GPU's timeline, piece by piece (issue 16: TTFT overhead).

A layer of a real shape (default Llama-3.1-8B: 8 KV heads, 32 query heads, d 128, bf16), random keys, values
and queries of `--length` tokens; each method's `compress_layer` runs on a fresh copy of the layer (the copy
is not timed), timed with CUDA events on the stream after a sync, so it measures the hook's kernels alone
(in a real prefill the host is far ahead of the GPU there: launches are hidden, kernels are not). Also the
pieces every ScoredEviction cut shares (`topk_indices`, `LayerKV.keep`), and with --profile a kernel table of
one method's hook. Per-layer ms x layers = the hook's share of the TTFT overhead.

    python bench/compress_breakdown.py [--length 8192 32768] [--budget 1024] [--methods snapkv ...] [--profile snapkv]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("kvbench") is None:
    sys.path.insert(0, str(ROOT))

SHAPES = {"llama-3.1-8b": (32, 8, 32, 128), "smollm2-135m": (30, 3, 9, 64)}  # layers, n_kv, n_q, d


def event_ms(fn, setup, reps: int) -> float:
    """Median GPU-timeline ms of fn(setup()) over reps (one warm-up), setup untimed."""
    out = []
    for _ in range(reps + 1):
        arg = setup()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(arg)
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out[1:])


def main() -> None:
    from kvbench.cache import LayerKV
    from kvbench.method import LayerContext, build_method, topk_indices

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--length", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["streaming_llm", "snapkv", "pyramidkv", "adakv", "tova"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", default="", help="a method whose hook gets a kernel table")
    args = ap.parse_args()
    n_layers, n_kv, n_q, d = SHAPES[args.shape]
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  shape {args.shape}  budget {args.budget}"
          f"  reps {args.reps}  (ms per layer on the GPU timeline; x{n_layers} layers = per prefill)")
    for L in args.length:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(n_kv, L, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(n_kv, L, d, device=dev, dtype=dt, generator=g)
        q = torch.randn(n_q, L, d, device=dev, dtype=dt, generator=g)
        pos = torch.arange(L, device=dev)

        def fresh():
            return LayerKV.from_dense(k, v, pos)

        scores = torch.rand(n_kv, L, device=dev, generator=g)
        rows = {"topk_indices (n_kv, L) -> budget": event_ms(lambda s: topk_indices(s, args.budget), lambda: scores,
                                                              args.reps),
                "LayerKV.keep (a (n_kv, budget) index)": event_ms(
                    lambda lay: lay.keep(topk_indices(scores, args.budget)), fresh, args.reps)
                - event_ms(lambda s: topk_indices(s, args.budget), lambda: scores, args.reps)}
        for name in args.methods:
            method = build_method(name, budget=args.budget)

            def hook(lay, method=method):
                method.reset()
                for i in range(n_layers):  # the layer index matters to per-layer budgets (pyramidkv)
                    if i == n_layers // 2:
                        ctx = LayerContext(i, n_layers, q, lay, d ** -0.5, None)
                        method.observe_prefill(ctx)
                        method.compress_layer(ctx)
                        if hasattr(method, "flush"):
                            method.flush()
            rows[f"{name}.compress_layer"] = event_ms(hook, fresh, args.reps)
        print(f"\nlength {L}")
        for name, ms in rows.items():
            print(f"  {name:42s} {ms * 1e3:9.1f} us   x{n_layers} = {ms * n_layers:7.2f} ms")
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
