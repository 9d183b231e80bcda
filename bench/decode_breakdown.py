"""Where does a decode step's time go? Kernel-time breakdown of kvbench's fast decode on one CUDA GPU.

Prefills a synthetic model of a real shape (random bf16 weights) with one method, builds the CUDA-graph
decoder (`--compile` for the torch.compile'd step), then profiles a few graph replays with torch.profiler and
prints GPU time per kernel family and per step, beside two floors measured in the same run:
  linears-only   every nn.Linear of the model applied to one token, captured in one CUDA graph (cuBLAS GEMVs,
                 then the decode step's Triton GEMV: kvbench.fast_decode.triton_linears)
  copy roofline  (weight bytes read per step + KV bytes) / device-to-device copy bandwidth

    python bench/decode_breakdown.py [--shape llama-3.1-8b] [--length 32768] [--method snapkv] [--budget 1024]
                                     [--compile] [--replays 10] [--kernels cublas/torch/torch fused/triton/triton]
Each --kernels setting (linears/norms/rope: the values of KVBENCH_DECODE_GEMV / _NORM / _ROPE; fused/triton/triton
is the default path; a fourth part "nofold" keeps the layers' norms out of the fused launches) decodes a clone of
the same prefilled cache; its step is timed over back-to-back graph replays (CUDA events), then profiled.
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
    for key, fam in (("gemv", "gemm/gemv (Triton or cuBLAS)"), ("gemm", "gemm/gemv (Triton or cuBLAS)"),
                     ("cutlass", "gemm/gemv (Triton or cuBLAS)"),
                     ("_decode_split", "attention split (Triton)"), ("_decode_reduce", "attention merge (Triton)"),
                     ("index", "index_copy / append"), ("triton_", "fused element-wise (Inductor)"),
                     ("elementwise", "element-wise (eager)"), ("reduce", "reductions (eager)")):
        if key in n:
            return fam
    return "other: " + name[:60]


def knobs(setting: str) -> dict:
    """"gemv/norm/rope[/nofold]" -> FastDecoder's knobs (missing ones: off, i.e. torch's own ops; nofold: the
    layers' norms keep their own launches beside fused linears)."""
    parts = setting.split("/")
    return dict(gemv=parts[0], norm=(parts[1:2] or ["torch"])[0], rope=(parts[2:3] or ["torch"])[0],
                fold_norms=parts[3:4] != ["nofold"])


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--kernels", nargs="+",
                    default=["cublas/torch/torch", "triton/triton/triton", "fused/triton/triton/nofold",
                             "fused/triton/triton"],
                    help="the decode step's linears/norms/rope (KVBENCH_DECODE_GEMV / _NORM / _ROPE values), each "
                         "measured in turn on a clone of the same cache")
    ap.add_argument("--top", type=int, default=12, help="kernel families printed per setting")
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

    # floor 1: every Linear on one token, one graph (torch's linear = cuBLAS; then the step's Triton GEMV)
    from kvbench.fast_decode import triton_linears
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {f: torch.randn(1, f, device="cuda", dtype=lm.dtype) for f in {m.in_features for m in lins}}
    lin_ms = {"cublas": graph_ms(lambda: [m(xs[m.in_features]) for m in lins])}
    with triton_linears(model):
        lin_ms["triton"] = graph_ms(lambda: [m(xs[m.in_features]) for m in lins])

    method = build_method(args.method, budget=None if args.method == "full" else args.budget)
    eng = Engine(lm, method, query_aware=True)
    ids = torch.randint(10, 32000, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids, method, compress=True)
    kv = cache.nbytes()
    roof = gpu_speed.roofline_ms(wbytes, kv, bw)
    print(f"{args.shape} {args.method} budget {args.budget} length {args.length} compile={args.compile}: "
          f"KV {kv / 2**20:.0f} MB, weights {wbytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s "
          f"({torch.cuda.get_device_name()})")
    print(f"  copy roofline {roof:.3f} ms   linears-only graph: cuBLAS {lin_ms['cublas']:.3f} ms "
          f"({lin_ms['cublas'] / roof:.3f}x), Triton GEMV {lin_ms['triton']:.3f} ms ({lin_ms['triton'] / roof:.3f}x)")
    steps = 3 + args.replays
    step_ms = {}
    for kern in (["cublas/torch/torch"] if args.compile else args.kernels):
        c = cache.clone()
        fd = FastDecoder(model, c, steps + 1 + args.replays, compile=args.compile, **knobs(kern))
        fd.ids.fill_(int(pre.logits.argmax()))
        for _ in range(3):  # warm-up, capture, one replay
            fd._run_one()
        torch.cuda.synchronize()
        if fd.graph is None:
            sys.exit(f"no CUDA graph: {fd.graph_error}")
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(args.replays):  # timed replays, back to back (no host read in between)
            fd.graph.replay()
        e1.record()
        torch.cuda.synchronize()
        step_ms[kern] = e0.elapsed_time(e1) / args.replays
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
        path = fd.path
        del fd, c
        total = sum(v[0] for v in per.values())
        print(f"  linears/norms/rope {kern}: path '{path}' step {step_ms[kern]:.3f} ms replayed "
              f"({step_ms[kern] / roof:.3f}x the roofline), profiled kernels {total:.3f} ms/step")
        for f, (ms, n) in sorted(per.items(), key=lambda kv_: -kv_[1][0])[:args.top]:
            print(f"    {ms:7.3f} ms  {n // args.replays:5d} kernels/step  {f}")
    if len(step_ms) > 1:
        first = next(iter(step_ms))
        print("  step time over " + first + "'s: " + "  ".join(f"{k} {step_ms[first] / v:.3f}x faster"
                                                                 for k, v in step_ms.items() if k != first))
        toks, logits = {}, {}
        for kern in step_ms:  # 24 greedy tokens from the same cache, and the last step's logits
            fd = FastDecoder(model, cache.clone(), 24, **knobs(kern))
            toks[kern], _ = fd.decode(int(pre.logits.argmax()), 24)
            logits[kern] = fd.logits.float().clone()
            del fd
        for kern in list(step_ms)[1:]:  # random weights: rounding alone can part the tokens (gemv_accuracy.py)
            err = (logits[first] - logits[kern]).abs().max().item()
            print(f"  {kern} vs {first}: 24 greedy tokens equal {toks[first] == toks[kern]}, last logits max |diff| "
                  f"{err:.3g} (max |logit| {logits[first].abs().max().item():.3g})")


if __name__ == "__main__":
    main()
