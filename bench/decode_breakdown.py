"""Where does a decode step's time go? Kernel-time breakdown of kvbench's fast decode on one CUDA GPU.

Prefills a synthetic model of a real shape (random bf16 weights) with one method, builds the CUDA-graph
decoder (`--compile` for the torch.compile'd step), then profiles a few graph replays with torch.profiler and
prints GPU time per kernel family and per step, beside two floors measured in the same run:
  linears-only   every nn.Linear of the model applied to one token, captured in one CUDA graph (cuBLAS GEMVs)
  copy roofline  (weight bytes read per step + KV bytes) / device-to-device copy bandwidth

    python bench/decode_breakdown.py [--shape llama-3.1-8b] [--length 32768] [--method snapkv] [--budget 1024]
                                     [--compile] [--replays 10]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_speed  # noqa: E402  (same directory: its model builder and roofline arithmetic)


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of replaying `fn` captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps + 2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    return gpu_speed.median(times[2:])


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("gemv", "gemm/gemv (cuBLAS)"), ("gemm", "gemm/gemv (cuBLAS)"), ("cutlass", "gemm/gemv (cuBLAS)"),
                     ("_decode_split", "attention split (Triton)"), ("_decode_reduce", "attention merge (Triton)"),
                     ("index", "index_copy / append"), ("triton_", "fused element-wise (Inductor)"),
                     ("elementwise", "element-wise (eager)"), ("reduce", "reductions (eager)")):
        if key in n:
            return fam
    return "other: " + name[:60]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--replays", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_breakdown.py needs a CUDA GPU")
    from kvbench.engine import Engine
    from kvbench.fast_decode import FastDecoder
    from kvbench.method import build_method
    lm = gpu_speed.build_model(args.shape)
    model = lm.model
    bw = gpu_speed.copy_bandwidth()
    wbytes = gpu_speed.decode_weight_bytes(model)

    # floor 1: every Linear on one token, one graph
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {f: torch.randn(1, f, device="cuda", dtype=lm.dtype) for f in {m.in_features for m in lins}}
    lin_ms = graph_ms(lambda: [m(xs[m.in_features]) for m in lins])

    method = build_method(args.method, budget=None if args.method == "full" else args.budget)
    eng = Engine(lm, method, query_aware=True)
    ids = torch.randint(10, 32000, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids, method, compress=True)
    kv = cache.nbytes()
    steps = 3 + args.replays
    fd = FastDecoder(model, cache, steps + 1, compile=args.compile)
    fd.ids.fill_(int(pre.logits.argmax()))
    for _ in range(3):  # warm-up, capture, one replay
        fd._run_one()
    torch.cuda.synchronize()
    if fd.graph is None:
        sys.exit(f"no CUDA graph: {fd.graph_error}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            fd._run_one()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            f = family(ev.name)
            per[f][0] += ev.device_time / 1e3 / args.replays
            per[f][1] += 1
    fd.finish()
    roof = gpu_speed.roofline_ms(wbytes, kv, bw)
    total = sum(v[0] for v in per.values())
    print(f"{args.shape} {args.method} budget {args.budget} length {args.length} compile={args.compile}: "
          f"KV {kv / 2**20:.0f} MB, weights {wbytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"  copy roofline {roof:.2f} ms   linears-only graph {lin_ms:.2f} ms   profiled kernels {total:.2f} ms/step")
    for f, (ms, n) in sorted(per.items(), key=lambda kv_: -kv_[1][0]):
        print(f"  {ms:7.3f} ms  {n // args.replays:5d} kernels/step  {f}")


if __name__ == "__main__":
    main()
