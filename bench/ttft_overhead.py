"""TTFT overhead of compression, measured in pairs: each method's prefill next to a full-cache prefill.

bench/gpu_speed.py times all full-cache prefills first, then each method's, and subtracts two medians taken
minutes apart; on an H200 the full cache's own median moved by ~2% between runs, as much as the overhead it
is compared with. Here every timed method prefill sits next to a full-cache prefill of the same prompt, the
order alternating from pair to pair (full, method / method, full / ...) so that slow drift cancels, and the
overhead is the median of the paired differences. Before each timed prefill the GPU idles --rest-ms (200):
back to back, the same 8K prefill of the 8B shape took 252-281 ms on an H200 (700 W, clocks at 1980 MHz
when read), one prefill in three or four 10-25 ms slow; after 50 or 200 ms of rest, 252-256 ms. A full
gc.collect() before each (host time during which the GPU idles) steadied it the same way, so it is the
idle time, not the collector; garbage left by a run was checked to be empty.

A synthetic model of a real shape (random weights: speed is real, accuracy meaningless, built as
bench/gpu_speed.py builds it) prefills random prompts with `prefill(compress=True)` (query-aware: the whole
prompt is compressed, as in the SnapKV/PyramidKV papers). Per (length, method):
  full ms      median TTFT of the full cache (prefill; it has no hooks)
  method ms    median TTFT of the method (prefill + compression)
  ovh %        median over the pairs of (method - full) / full of the same pair, in %
  min % max %  the smallest and largest of those paired %
  hook ms      median time of the method's hooks (CUDA events on the stream; wall time on CPU)
  hook %       hook ms / full ms (the hooks' own share: steadier than the difference of two TTFTs)

    python bench/ttft_overhead.py [--shape llama-3.1-8b] [--lengths 8192 32768] [--budget 1024] [--pairs 10]
                                  [--methods snapkv pyramidkv streaming_llm adakv] [--device cuda|cpu]
                                  [--dtype bfloat16|float32|float16] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_speed  # noqa: E402  (same directory: its model builder and median; it puts kvbench on sys.path)

METHODS = ("snapkv", "pyramidkv", "streaming_llm", "adakv")
DTYPES = ("bfloat16", "float32", "float16")
SEED = 0  # added to the length: the prompt of each length is the same in every run


# -- arithmetic (unit-tested on CPU) --------------------------------------------------------------------
def pair_order(i: int) -> tuple[str, str]:
    """Which prefill goes first in pair i: alternating, so a drift that slows the second of a pair (or the
    first) adds as much to the full cache as to the method over an even number of pairs."""
    return ("full", "method") if i % 2 == 0 else ("method", "full")


def paired_overhead(full_ms: list[float], method_ms: list[float], hook_ms: list[float]) -> dict:
    """Pair i is (full_ms[i], method_ms[i], hook_ms[i]), timed next to each other.
    overhead_pct: the median of 100 * (method - full) / full over the pairs; hook_pct: the median hook time
    as % of the median full TTFT."""
    if not full_ms or not len(full_ms) == len(method_ms) == len(hook_ms):
        raise ValueError(f"need as many full, method and hook times, at least one: got {len(full_ms)}, "
                         f"{len(method_ms)}, {len(hook_ms)}")
    pct = [100.0 * (m - f) / f for f, m in zip(full_ms, method_ms)]
    full, hook = gpu_speed.median(full_ms), gpu_speed.median(hook_ms)
    return dict(pairs=len(pct), full_ms=full, method_ms=gpu_speed.median(method_ms),
                overhead_pct=gpu_speed.median(pct), overhead_min_pct=min(pct), overhead_max_pct=max(pct),
                hook_ms=hook, hook_pct=100.0 * hook / full, paired_pct=pct)


# -- measuring -----------------------------------------------------------------------------------------
def prefill_ms(eng, method, ids: list[int], rest_s: float = 0.0) -> tuple[float, float]:
    """One prefill with compression on a fresh cache and a fresh copy of the method, as bench/gpu_speed.py
    times them: (TTFT ms, hooks ms). The cache is freed before returning, so the next prefill starts from
    the same allocator state whichever method ran before it. rest_s: the GPU idles this long first (see
    --rest-ms)."""
    cache, m = eng.new_cache(), method.fork()
    m.reset()
    gpu_speed.rest(rest_s)
    pre = eng.prefill(cache, ids, m, compress=True)
    ms, hook = pre.ms, pre.compress_ms
    del cache, m, pre
    if eng.device.type == "cuda":
        torch.cuda.empty_cache()
    return ms, hook


def measure(lm, full_eng, name: str, ids: list[int], budget: int, pairs: int, rest_s: float = 0.0) -> dict:
    from kvbench.engine import Engine
    from kvbench.method import build_method
    method = build_method(name, budget=budget)
    eng = Engine(lm, method, query_aware=True)
    run = {"full": (full_eng, full_eng.method), "method": (eng, method)}
    for who in ("full", "method"):  # warm-up: Triton compilation, cuBLAS heuristics, the allocator's pools
        prefill_ms(*run[who], ids)
    t = {"full": [], "method": [], "hook": []}
    for i in range(pairs):
        for who in pair_order(i):
            ms, hook = prefill_ms(*run[who], ids, rest_s)
            t[who].append(ms)
            if who == "method":
                t["hook"].append(hook)
    return dict(n=len(ids), method=name, **paired_overhead(t["full"], t["method"], t["hook"]),
                full_ms_all=t["full"], method_ms_all=t["method"], hook_ms_all=t["hook"])


# -- output --------------------------------------------------------------------------------------------
HEADER = (f"{'n':>7} {'method':<14} {'full ms':>9} {'method ms':>9} {'ovh %':>7} {'min %':>7} {'max %':>7} "
          f"{'hook ms':>8} {'hook %':>7}")


def fmt(r: dict) -> str:
    return (f"{r['n']:>7} {r['method']:<14} {r['full_ms']:9.2f} {r['method_ms']:9.2f} {r['overhead_pct']:+7.2f} "
            f"{r['overhead_min_pct']:+7.2f} {r['overhead_max_pct']:+7.2f} {r['hook_ms']:8.2f} {r['hook_pct']:7.2f}")


def fail(msg: str) -> NoReturn:
    """One line and exit code 2 (argparse's code for bad arguments), before any model is built."""
    print(f"ttft_overhead.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args) -> None:
    from kvbench.method import load_all_methods
    from kvbench.models import SYNTHETIC_SHAPES
    allowed = sorted(n for n in load_all_methods() if n != "full")  # full is the baseline of every pair
    for m in args.methods:
        if m not in allowed:
            fail(f"--methods {m!r}; allowed: {', '.join(allowed)}")
    for n in args.lengths:
        if n <= 0:
            fail(f"--lengths {n}; allowed: positive integers (prompt tokens)")
    if args.pairs <= 0:
        fail(f"--pairs {args.pairs}; allowed: a positive integer")
    if args.rest_ms < 0:
        fail(f"--rest-ms {args.rest_ms}; allowed: a number >= 0 (milliseconds)")
    if args.budget <= 0:
        fail(f"--budget {args.budget}; allowed: a positive integer (kept tokens per KV head per layer)")
    if args.shape not in SYNTHETIC_SHAPES:
        fail(f"--shape {args.shape!r}; allowed: {', '.join(SYNTHETIC_SHAPES)}")
    if args.dtype not in (None, *DTYPES):
        fail(f"--dtype {args.dtype!r}; allowed: {', '.join(DTYPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA GPU here; allowed: cpu")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="each compared with full")
    ap.add_argument("--budget", type=int, default=1024, help="kept tokens per KV head per layer")
    ap.add_argument("--pairs", type=int, default=10, help="timed (full, method) pairs, after one warm-up each")
    ap.add_argument("--rest-ms", type=float, default=200.0,
                    help="the GPU idles this long before every timed prefill (0: back to back)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--json", default="", help="also write every row to this file (JSON lines)")
    args = ap.parse_args(argv)
    args.methods = [m for m in dict.fromkeys(args.methods) if m != "full"]  # full is always there
    check_args(args)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    import transformers
    from kvbench.engine import Engine
    from kvbench.method import build_method
    from kvbench.results import atomic_write
    lm = gpu_speed.build_model(args.shape, device=args.device, dtype=dtype)
    dev = lm.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    meta = dict(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                model=f"synthetic-{args.shape}", dtype=str(lm.dtype).replace("torch.", ""), budget=args.budget,
                rest_ms=args.rest_ms)
    print(f"device {meta['device']}  torch {meta['torch']}  transformers {meta['transformers']}  model "
          f"{meta['model']} {meta['dtype']}  budget {args.budget}  pairs {args.pairs} (order alternating)  rest "
          f"{args.rest_ms:g} ms before each",
          flush=True)
    print(HEADER, flush=True)
    full_eng = Engine(lm, build_method("full"), query_aware=True)
    vocab = min(lm.model.config.vocab_size, 49152)
    rows = []
    for n in args.lengths:
        g = torch.Generator().manual_seed(SEED + n)  # the ids of bench/gpu_speed.py for this length
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        for name in args.methods:
            try:
                row = measure(lm, full_eng, name, ids, args.budget, args.pairs, args.rest_ms / 1e3)
            except Exception as e:  # noqa: BLE001 - one failing configuration (OOM at 32K) must not hide the others
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                why = (str(e).splitlines() or [""])[0][:200]
                print(f"{n:>7} {name:<14} FAILED {type(e).__name__}: {why}", flush=True)
                continue
            rows.append({**meta, **row})
            print(fmt(row), flush=True)
            if args.json:  # all rows so far, atomically: a run killed at 32K keeps the 8K rows
                atomic_write(Path(args.json), "".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
