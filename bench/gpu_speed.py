"""Honest speed of KV-cache compression on one GPU: kvbench's engine (and optionally kvpress) side by side.

A synthetic model of a real shape (default llama-3.1-8b, bf16, random weights: speed and memory are real,
accuracy is meaningless) prefills random prompts (8K and 32K tokens by default) with each method at one
budget (kept tokens per KV head per layer, default 1024), then decodes greedily. Per (length, method):
  prefill ms    median TTFT: prefill + compression (the engine's `prefill(compress=True)`)
  overhead %    (TTFT(method) - TTFT(full)) / TTFT(full), same length
  decode ms/tok median step time after warm-up, host readback of the token included, of kvbench's fastest
                path: `compiled` = kvbench/fast_decode.py with torch.compile (Inductor) captured in a CUDA graph,
                `graph` = the same without compiling (also printed), `eager` = the engine's per-layer loop
                (also printed: what methods that score while decoding use); the compile itself (~1 min, once per process) is a warm-up, not timed
  roofline ms   (weight bytes read per step + mean KV bytes) / measured copy bandwidth, where the bandwidth is
                (bytes read + bytes written) / time of a large device-to-device copy, and the weight bytes count
                every parameter except the input embedding table (a step reads one row of it)
  KV MB         bytes of K+V the cache stores after compression; `alloc/kept` = memory the allocator holds
                for the cache (K, V and the int64 positions) / (kept tokens x bytes per token)
  peak GiB      max GPU memory allocated during prefill+decode, above the weights
With --with-kvpress the same model runs kvpress's presses (SnapKV, StreamingLLM, PyramidKV, AdaKV) through
transformers' DynamicCache and SDPA, decoding with the plain eager loop kvpress uses.

    python bench/gpu_speed.py [--lengths 8192 32768] [--budget 1024] [--steps 32] [--reps 3]
                              [--methods full snapkv streaming_llm pyramidkv adakv] [--with-kvpress]
                              [--deadline-s 500] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import kvbench  # noqa: F401
except ImportError:  # a plain checkout: run from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("full", "snapkv", "streaming_llm", "pyramidkv", "adakv")


# -- arithmetic (unit-tested on CPU) --------------------------------------------------------------------
def median(xs):
    s = sorted(xs)
    n = len(s)
    return float("nan") if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def kv_bytes_per_token(n_layers: int, n_kv: int, head_dim: int, elem: int) -> int:
    """K and V of one token in every KV head of every layer."""
    return 2 * n_layers * n_kv * head_dim * elem


def roofline_ms(weight_bytes: float, kv_bytes: float, bandwidth: float) -> float:
    """Time to stream the weights and the cache once at the given bytes/s."""
    return (weight_bytes + kv_bytes) / bandwidth * 1e3


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters one decode step reads: all, except embedding tables (one row each is read)."""
    total, seen = 0, set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, torch.nn.Embedding):
                total += p.shape[1] * p.element_size()
            else:
                total += p.numel() * p.element_size()
    return total


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """(bytes read + bytes written) / s of a device-to-device copy, median of `reps`."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / median(times)


# -- models --------------------------------------------------------------------------------------------
class NoTokenizer:
    """Prompts here are random token ids; the engine only reads these attributes of a tokenizer."""
    eos_token_id = None
    chat_template = None


def build_model(shape: str, device: str = "cuda", dtype: str = "bfloat16"):
    """`load_model("synthetic", shape=...)`; where the embedded tokenizer is not installed (a GPU box
    without the GGUF), the same model without a tokenizer."""
    import importlib.util
    from kvbench.models import EMBEDDED, LoadedModel, SYNTHETIC_SHAPES, load_model, pick_dtype
    if importlib.util.find_spec(EMBEDDED["smollm2-135m"]["package"]) is not None:
        return load_model("synthetic", shape=shape, device=device, dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM
    from kvbench.attention import register
    if shape not in SYNTHETIC_SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {', '.join(SYNTHETIC_SHAPES)}")
    dev, dt = torch.device(device), pick_dtype(dtype, torch.device(device))
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SYNTHETIC_SHAPES[shape]), dtype=dt)
    model.eval()
    register()
    model.set_attn_implementation("kvbench")
    return LoadedModel(model, NoTokenizer(), f"synthetic-{shape}", dev, dt,
                       int(model.config.max_position_embeddings))


# -- kvbench -------------------------------------------------------------------------------------------
def run_kvbench(lm, name: str, ids: list[int], budget: int, steps: int, reps: int, bw: float, wbytes: int,
                full_ttft: float | None, compile_decode: bool = True) -> dict:
    from kvbench.engine import Engine
    from kvbench.fast_decode import FastDecoder, supports
    from kvbench.method import build_method
    method = build_method(name, budget=None if name == "full" else budget)
    eng = Engine(lm, method, query_aware=True)
    eng.stop_ids = set()  # random weights: decode all `steps` tokens
    cfg = lm.model.config
    per_tok = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                 torch.tensor([], dtype=lm.dtype).element_size())
    ttfts, comps, cache, pre = [], [], None, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps + 1):  # the first is warm-up (Triton compilation, cuBLAS heuristics)
        cache = pre = None
        torch.cuda.empty_cache()
        cache, m = eng.new_cache(), method.fork()
        m.reset()
        pre = eng.prefill(cache, ids, m, compress=True)
        ttfts.append(pre.ms)
        comps.append(pre.compress_ms)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base  # the cache (+ one token's logits)
    kept = sum(sum(layer) for layer in cache.head_lengths())
    kv = cache.nbytes()
    row_bytes = per_tok // (cfg.num_hidden_layers * cfg.num_key_value_heads)  # K+V of one head, one token
    row = dict(method=name, n=len(ids), ttft_ms=median(ttfts[1:]), compress_ms=median(comps[1:]),
               kv_bytes=kv, kv_alloc_bytes=cache.allocated_bytes(), held_bytes=held, kept_rows=kept,
               alloc_over_kept=held / (kept * row_bytes))
    row["overhead_pct"] = None if full_ttft is None else 100.0 * (row["ttft_ms"] - full_ttft) / full_ttft
    first = int(pre.logits.argmax())
    # eager engine loop on a copy (every method); where it applies, the CUDA-graph path on a copy, then the
    # compiled CUDA-graph path (kvbench's fastest) on the original
    c_eager = cache.clone()
    eng.fast_decode = False  # the engine's own loop, per-layer hooks and all
    _, eager_ms, _ = eng.decode(c_eager, m, pre.logits, steps)
    del c_eager
    row["eager_ms"] = median(eager_ms[2:])
    row["path"] = "eager"
    row["decode_ms"] = row["eager_ms"]
    if supports(m):
        for path, comp in (("graph", False), ("compiled", True)):
            if path == "compiled" and not compile_decode:
                continue
            c = cache.clone() if path == "graph" and compile_decode else cache
            fd = FastDecoder(lm.model, c, steps, compile=comp, ring=m.decode_ring())
            t0 = time.perf_counter()
            _, g_ms = fd.decode(first, steps)
            row[f"{path}_first_s"] = time.perf_counter() - t0 - sum(g_ms[1:]) / 1e3  # warm-up (compile) + capture
            del c
            row[f"{path}_error"] = fd.graph_error
            if fd.graph_error is None:
                row[f"{path}_ms"] = median(g_ms[2:])
                row["path"], row["decode_ms"] = path, row[f"{path}_ms"]
    mean_kv = kv + per_tok * steps / 2  # every step adds one token to every head: the mean over the steps
    row["roofline_ms"] = roofline_ms(wbytes, mean_kv, bw)
    row["decode_over_roofline"] = row["decode_ms"] / row["roofline_ms"]
    torch.cuda.synchronize()
    row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return row


# -- kvpress -------------------------------------------------------------------------------------------
def kvpress_press(name: str, ratio: float):
    import kvpress
    if name == "full":
        return None
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7)
    if name == "pyramidkv":
        return kvpress.PyramidKVPress(compression_ratio=ratio, window_size=32, kernel_size=7)
    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7))
    raise ValueError(f"no kvpress press for method={name!r}; allowed: {', '.join(METHODS)}")


@torch.inference_mode()
def run_kvpress(lm, name: str, ids: list[int], budget: int, steps: int, reps: int, bw: float, wbytes: int,
                full_ttft: float | None, compile_decode: bool = True) -> dict:
    """kvpress's usage: `with press(model): model(context, past_key_values=DynamicCache())`, then a plain
    greedy loop with explicit positions (as its pipeline does)."""
    import contextlib
    from transformers import DynamicCache
    from kvbench.metrics import Timer
    model, dev = lm.model, lm.device
    model.set_attn_implementation("sdpa")
    n = len(ids)
    press = kvpress_press(name, max(0.0, 1.0 - budget / n))
    x = torch.tensor([ids], device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ttfts = []
    for _ in range(reps + 1):
        cache = out = None
        torch.cuda.empty_cache()
        cache = DynamicCache()
        with Timer(dev) as t, (press(model) if press is not None else contextlib.nullcontext()):
            # explicit cache_position: kvpress's hooks read it (recent transformers no longer pass it on)
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1,
                        position_ids=torch.arange(n, device=dev).view(1, -1), cache_position=torch.arange(n, device=dev))
        ttfts.append(t.ms)
    kv = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
             for l in cache.layers)
    nxt = out.logits[:, -1:].argmax(-1)
    step_ms = []
    for i in range(steps - 1):
        pos = torch.tensor([[n + i]], device=dev)
        with Timer(dev) as t:
            o = model(input_ids=nxt, past_key_values=cache, position_ids=pos, cache_position=pos[0], use_cache=True)
            nxt = o.logits[:, -1:].argmax(-1)
            int(nxt)
        step_ms.append(t.ms)
    ttft = median(ttfts[1:])
    row = dict(method=f"kvpress:{name}", n=n, ttft_ms=ttft, compress_ms=None, kv_bytes=kv,
               overhead_pct=None if full_ttft is None else 100.0 * (ttft - full_ttft) / full_ttft,
               decode_ms=median(step_ms[2:]), path="eager")
    row["roofline_ms"] = roofline_ms(wbytes, kv, bw)
    row["decode_over_roofline"] = row["decode_ms"] / row["roofline_ms"]
    row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    model.set_attn_implementation("kvbench")
    return row


# -- table ---------------------------------------------------------------------------------------------
def fmt(row: dict) -> str:
    def f(k, spec, none="-"):
        v = row.get(k)
        return none if v is None else format(v, spec)
    return (f"{row['n']:>7} {row['method']:<22} {f('ttft_ms', '9.1f')} {f('overhead_pct', '+8.2f')} "
            f"{f('decode_ms', '8.2f')} {row.get('path', '-'):>8} {f('eager_ms', '8.2f')} {f('graph_ms', '8.2f')} "
            f"{f('roofline_ms', '8.2f')} "
            f"{f('decode_over_roofline', '6.2f')} {row['kv_bytes'] / 2**20:9.1f} {f('alloc_over_kept', '6.3f')} "
            f"{f('peak_gib', '7.2f')}")


def ratio_table(rows: list[dict]) -> str:
    """kvpress / kvbench per (length, method) and metric: > 1 means kvbench is faster or smaller."""
    ours = {(r["n"], r["method"]): r for r in rows if not r["method"].startswith("kvpress:")}
    lines = ["kvpress / kvbench (same inputs, same process; > 1: kvbench faster / smaller)",
             f"{'n':>7} {'method':<14} {'prefill':>8} {'ovh pts':>8} {'decode':>8} {'x roof':>8} {'KV bytes':>9} "
             f"{'peak':>7}"]
    for r in rows:
        if not r["method"].startswith("kvpress:"):
            continue
        name = r["method"].split(":", 1)[1]
        o = ours.get((r["n"], name))
        if o is None:
            continue

        def ratio(k):
            a, b = r.get(k), o.get(k)
            return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"
        ovh = ("-" if r.get("overhead_pct") is None or o.get("overhead_pct") is None
               else f"{r['overhead_pct'] - o['overhead_pct']:+.2f}")
        lines.append(f"{r['n']:>7} {name:<14} {ratio('ttft_ms'):>8} {ovh:>8} {ratio('decode_ms'):>8} "
                     f"{ratio('decode_over_roofline'):>8} {ratio('kv_bytes'):>9} {ratio('peak_gib'):>7}")
    return "\n".join(lines)


HEADER = (f"{'n':>7} {'method':<22} {'prefill':>9} {'ovh %':>8} {'dec ms':>8} {'path':>8} {'eager':>8} "
          f"{'graph':>8} {'roof ms':>8} {'x roof':>6} {'KV MB':>9} {'alloc/kept':>6} {'peak GiB':>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32, help="decoded tokens per configuration")
    ap.add_argument("--reps", type=int, default=3, help="timed prefills per configuration (after one warm-up)")
    ap.add_argument("--with-kvpress", action="store_true", help="also run kvpress (pip install kvpress)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode path")
    ap.add_argument("--deadline-s", type=float, default=0, help="skip configurations started after this many s")
    ap.add_argument("--json", default="", help="also write every row to this file (JSON lines)")
    args = ap.parse_args()
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods {bad[0]!r}; allowed: {', '.join(METHODS)}")
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_speed.py needs a CUDA GPU")
    t_start = time.time()
    lm = build_model(args.shape)
    import transformers
    bw = copy_bandwidth()
    wbytes = decode_weight_bytes(lm.model)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}"
          f"  model synthetic-{args.shape} bf16  weights read/step {wbytes / 1e9:.2f} GB  copy bandwidth "
          f"{bw / 1e12:.2f} TB/s (read+write)  budget {args.budget}  steps {args.steps}  reps {args.reps}", flush=True)
    print(HEADER, flush=True)
    out = open(args.json, "w") if args.json else None
    rows: list[dict] = []
    # kvpress is imported only after every kvbench row: its import patches every registered attention
    # function (the "kvbench" one included) with a wrapper that breaks our signature
    runners = [("kvbench", run_kvbench)] + ([("kvpress", run_kvpress)] if args.with_kvpress else [])
    for tag, run in runners:
        if tag == "kvpress":
            try:
                import kvpress
                print(f"kvpress {getattr(kvpress, '__version__', '')} imported", flush=True)
            except Exception as e:  # noqa: BLE001 - report and stop: kvbench's rows are already printed
                print(f"kvpress unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      flush=True)
                break
        for n in args.lengths:
            g = torch.Generator().manual_seed(n)
            ids = torch.randint(10, min(lm.model.config.vocab_size, 49152), (n,), generator=g).tolist()
            full_ttft = None
            for name in args.methods:
                if args.deadline_s and time.time() - t_start > args.deadline_s:
                    print(f"{n:>7} {tag}:{name:<14} skipped: --deadline-s {args.deadline_s:.0f} reached", flush=True)
                    continue
                try:
                    row = run(lm, name, ids, args.budget, args.steps, args.reps, bw, wbytes, full_ttft,
                              not args.no_compile)
                except Exception as e:  # noqa: BLE001 - one failing configuration must not hide the others
                    torch.cuda.empty_cache()
                    print(f"{n:>7} {tag}:{name:<14} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          flush=True)
                    if tag == "kvpress":
                        lm.model.set_attn_implementation("kvbench")
                    continue
                if name == "full":
                    full_ttft = row["ttft_ms"]
                print(fmt(row), flush=True)
                rows.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                torch.cuda.empty_cache()
    if args.with_kvpress:
        print(ratio_table(rows), flush=True)
    print(f"total {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
