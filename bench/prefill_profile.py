"""Where a small model's prefill time goes on a GPU: kvbench's engine against transformers alone.

On the embedded 135M model an 8K prefill is a few ms of GPU work, so host work (Python, launches, syncs)
decides the TTFT. Per method this prints the median of `--reps` runs of
  ctx ms     `Engine.prefill(context, compress=True)` (the record's prefill_ms: prefill + compression)
  q ms       `Engine.prefill(question, compress=False)` on top (the record's question_ms); TTFT = ctx + q
and, for reference, transformers' own forward of the same model and prompt with SDPA and a DynamicCache
(`hf ctx` / `hf q`). `--profile` adds torch.profiler tables of one full-cache context prefill and one question
prefill: the ops with the most host time, the host-device syncs and the GPU's busy time.

    python bench/prefill_profile.py [--length 8192] [--question 48] [--methods full snapkv ...] [--reps 5]
                                    [--profile] [--model smollm2-135m | --shape llama-3.1-8b]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("kvbench") is None:
    sys.path.insert(0, str(ROOT))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, out


NEW_TOKENS = 64  # answer rows the full cache reserves after the question, as run_sample does (Engine._spare)


def engine_times(eng, method, ctx: list[int], q: list[int], reps: int) -> tuple[float, float, str]:
    """Median ms of the context's and the question's prefill, and how they ran (the last rep's paths; the
    first rep is a warm-up, which also captures kvbench.graph_prefill's graphs: its setup ms are printed)."""
    ctx_ms, q_ms, setup = [], [], 0.0
    spare = eng._spare(method, len(q) + NEW_TOKENS)
    for _ in range(reps + 1):  # the first is a warm-up
        m = method.fork() if method is not None else None
        if m is not None:
            m.reset()
        cache = eng.new_cache()
        a, pa = timed(lambda: eng.prefill(cache, ctx, m, compress=True, spare=spare))
        b, pb = timed(lambda: eng.prefill(cache, q, m, compress=False))
        ctx_ms.append(a)
        q_ms.append(b)
        setup += pa.setup_ms + pb.setup_ms
        del cache
    paths = f"ctx {pa.path}, q {pb.path}" + (f", capture {setup:.0f} ms" if setup else "")
    return statistics.median(ctx_ms[-reps:]), statistics.median(q_ms[-reps:]), paths


def hf_times(model, ctx: list[int], q: list[int], reps: int) -> tuple[float, float]:
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    a_ids = torch.tensor([ctx], device=dev)
    b_ids = torch.tensor([q], device=dev)
    ctx_ms, q_ms = [], []
    with torch.inference_mode():
        for _ in range(reps + 1):
            cache = DynamicCache()
            a, _ = timed(lambda: model(input_ids=a_ids, past_key_values=cache, use_cache=True, logits_to_keep=1))
            b, _ = timed(lambda: model(input_ids=b_ids, past_key_values=cache, use_cache=True, logits_to_keep=1))
            ctx_ms.append(a)
            q_ms.append(b)
    return statistics.median(ctx_ms[-reps:]), statistics.median(q_ms[-reps:])


def profile(label: str, fn, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as prof
    fn()  # warm
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=acts) as p:
        fn()
        sync()
    ev = p.key_averages()
    print(f"\n== {label}: top ops by host (self CPU) time")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if torch.cuda.is_available():
        print(f"== {label}: top kernels by GPU time")
        print(ev.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    copies = ("cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item")
    syncs = {e.key: e.count for e in ev if e.key in copies}
    print(f"syncs and copies: {syncs}")
    gpu_us = sum(e.self_device_time_total for e in ev)
    print(f"GPU busy (sum of kernel self time): {gpu_us / 1e3:.2f} ms; host ops: {sum(e.count for e in ev)}")


def find_syncs(label: str, fn) -> None:
    """Every host-device sync inside fn (torch.cuda.set_sync_debug_mode), grouped by the kvbench/methods line
    that caused it."""
    import traceback
    import warnings
    fn()  # warm: first-call syncs (allocations, Triton compiles) are not the method's
    sync()
    seen: dict[str, int] = {}

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "kvbench" in f.filename or "methods" in f.filename]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:])) or str(message)
        seen[key] = seen.get(key, 0) + 1
    old = warnings.showwarning
    warnings.showwarning = hook
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = hook
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    print(f"== {label}: {sum(seen.values())} syncs")
    for k, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  x{n}: {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--question", type=int, default=48)
    ap.add_argument("--methods", nargs="+", default=["full", "full-eager", "snapkv", "pyramidkv", "adakv",
                                                     "streaming_llm"],
                    help="full-eager: the full cache without kvbench.graph_prefill (the path of every method)")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", default=None, help="a synthetic shape instead of --model (random weights)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--find-syncs", action="store_true", help="list every host-device sync of --profile-methods")
    ap.add_argument("--profile-methods", nargs="+", default=["full", "snapkv", "adakv"])
    ap.add_argument("--regional", action="store_true",
                    help="also time kvbench with each layer's modules but attention compiled (fast_decode.regional;"
                         " the compile happens in the warm-up prefill and is printed apart)")
    args = ap.parse_args()
    from kvbench.engine import Engine
    from kvbench.method import build_method
    from kvbench.models import load_model
    if args.shape:  # random weights of a real shape (speed only); no tokenizer needed on a GPU box
        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_speed import build_model
        lm = build_model(args.shape)
    else:
        lm = load_model(args.model)
    g = torch.Generator().manual_seed(args.length)
    ctx = torch.randint(10, 40000, (args.length,), generator=g).tolist()
    q = torch.randint(10, 40000, (args.question,), generator=g).tolist()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {dev}  torch {torch.__version__}  model {lm.name}  dtype {lm.dtype}  "
          f"context {args.length}  question {args.question}  budget {args.budget}  reps {args.reps}", flush=True)
    print(f"{'method':<16}{'ctx ms':>9}{'q ms':>9}{'TTFT ms':>10}{'ovh %':>8}")
    base = None
    graph_env = os.environ.get("KVBENCH_GRAPH_PREFILL", "auto")
    from kvbench.fast_decode import regional
    for region in [False] + ([True] if args.regional else []):  # regional: after every plain row
        for name in args.methods:
            method = None if name.startswith("full") else build_method(name, budget=args.budget)
            os.environ["KVBENCH_GRAPH_PREFILL"] = "0" if name == "full-eager" else graph_env
            eng = Engine(lm, method, query_aware=False)
            with regional(lm.model) if region else contextlib.nullcontext():
                t0 = time.perf_counter()
                if region:  # a first prefill compiles the context's and the question's shapes: timed apart
                    engine_times(eng, method, ctx, q, 0)
                setup = time.perf_counter() - t0
                a, b, paths = engine_times(eng, method, ctx, q, args.reps)
            # each mode against its own full cache on the path every method takes (eager)
            base = a + b if name == "full-eager" or (name == "full" and "full-eager" not in args.methods) else base
            ovh = "" if base is None or name.startswith("full") else f"{100 * (a + b - base) / base:+8.1f}"
            note = f"  (first prefill with compile {setup:.1f} s)" if region else ""
            label = name + " regional" if region else name
            print(f"{label:<16}{a:>9.2f}{b:>9.2f}{a + b:>10.2f}{ovh:>8}  [{paths}]{note}", flush=True)
    # transformers alone on the same weights: swap the attention implementation to SDPA
    from kvbench.models import _set_attn
    _set_attn(lm.model, "sdpa")
    a, b = hf_times(lm.model, ctx, q, args.reps)
    print(f"{'hf sdpa':<16}{a:>9.2f}{b:>9.2f}{a + b:>10.2f}", flush=True)
    if args.profile or args.find_syncs:
        if args.profile:
            profile("transformers sdpa, context + question", lambda: hf_times(lm.model, ctx, q, 1))
        _set_attn(lm.model, "kvbench")
        look = profile if args.profile else find_syncs
        for name in args.profile_methods:
            method = None if name == "full" else build_method(name, budget=args.budget)
            eng = Engine(lm, method, query_aware=False)
            state = {}

            def context(eng=eng, method=method):
                m = method.fork() if method is not None else None
                state["cache"], state["m"] = eng.new_cache(), m
                eng.prefill(state["cache"], ctx, m, compress=True)
            look(f"kvbench {name}, context prefill", context)

            def question(eng=eng):
                c = state["cache"].clone()
                eng.prefill(c, q, state["m"], compress=False)
            look(f"kvbench {name}, question on top", question)

if __name__ == "__main__":
    main()
