"""Honest speed of KV-cache compression on one GPU: kvbench's engine (and optionally kvpress) side by side.

A synthetic model of a real shape (default llama-3.1-8b, bf16, random weights: speed and memory are real,
accuracy is meaningless) prefills random prompts (8K and 32K tokens by default) with each method at one
budget (kept tokens per KV head per layer, default 1024), then decodes greedily. Per (length, method):
  prefill ms    median TTFT: prefill + compression (the engine's `prefill(compress=True)`)
  overhead %    (TTFT(method) - TTFT(full)) / TTFT(full), same length
  decode ms/tok median step time after warm-up, host readback of the token included, of kvbench's fastest
                path: `compiled` = kvbench/fast_decode.py with torch.compile (Inductor) captured in a CUDA graph,
                `graph` = the same without compiling (also printed), `eager` = the engine's per-layer loop
                (also printed: what a method without a device plan would use); the compile itself (~1 min, once per process) is a warm-up, not timed;
                every path decodes as the engine's `Engine.decode` does: `fast_decode.plan(method, cache)` picks
                plain appends, a ring (streaming_llm) or the method's device eviction (h2o, tova, cake, d2o, lacache)
  x full        decode ms/tok / the full cache's decode ms/tok on its fast path, same length (the issue's
                target for decode-time methods: <= 1.3)
  roofline ms   (weight bytes read per step + mean KV bytes) / measured copy bandwidth, where the bandwidth is
                (bytes read + bytes written) / time of a large device-to-device copy, and the weight bytes count
                every parameter except the input embedding table (a step reads one row of it)
  KV MB         bytes of K+V the cache stores after compression; `alloc/kept` = memory the allocator holds
                for the cache (K, V and the int64 positions) / (kept tokens x bytes per token)
  peak GiB      max GPU memory allocated during prefill+decode, above the weights
With --with-kvpress the same model (same seed, same random weights) runs kvpress's presses (SnapKV,
StreamingLLM, PyramidKV, AdaKV) through transformers' DynamicCache and SDPA, decoding with the greedy loop of
kvpress's own pipeline.

Each framework runs in its own fresh Python process (`--framework kvbench|kvpress`, spawned by this script, each
writing JSON rows that this process turns into the tables): the kvpress process never imports kvbench's attention,
kernels or torch.compile, and the kvbench process never imports kvpress. kvpress's decode is timed on a second
pass over the same key lengths (`decode_cold_ms`: the first pass; see `run_kvpress`). bench/kvpress_alone.py
cross-checks the kvpress process against kvpress used alone.

    python bench/gpu_speed.py [--lengths 8192 32768] [--budget 1024] [--steps 32] [--reps 3]
                              [--methods full snapkv streaming_llm pyramidkv adakv h2o tova cake d2o lacache]
                              [--with-kvpress]
                              [--deadline-s 500] [--json out.json] [--framework kvbench|kvpress]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("kvbench") is None:  # a plain checkout (find_spec imports nothing of kvbench)
    sys.path.insert(0, str(ROOT))

# the decode-time methods (h2o ... lacache) evict on the device; duoattention needs a trained profile (not here)
METHODS = ("full", "snapkv", "streaming_llm", "pyramidkv", "adakv", "h2o", "tova", "cake", "d2o", "lacache")
# storage formats and selectors that decode on the device (kvbench/store.py `device_decode`); alone or composed
FORMATS = ("kivi", "flexgen", "quest", "think", "eigen_attention", "minicache")
KVPRESS_METHODS = ("full", "snapkv", "streaming_llm", "pyramidkv", "adakv")  # those with a kvpress press here


# -- arithmetic (unit-tested on CPU) --------------------------------------------------------------------
REST_S = 0.2  # --rest-ms: the GPU idles this long before every timed prefill


def rest(seconds: float | None = None) -> None:
    """Idle the GPU before a timed prefill (default: --rest-ms). Back to back, the same 8K prefill of the 8B shape
    took 252-281 ms on an H200; after 50-200 ms of idle, 252-256 ms (reports/examples/ttft_overhead_h200.md).
    Every framework and method gets the same rest."""
    seconds = REST_S if seconds is None else seconds
    if seconds > 0:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        time.sleep(seconds)


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


def x_full(row: dict, full_row: dict | None) -> float | None:
    """Decode ms/token of `row` over the full cache's on its fast path (graph or compiled), same length;
    None when the full cache has no fast-path time."""
    if full_row is None or full_row.get("path") in (None, "eager") or not full_row.get("decode_ms"):
        return None
    return row["decode_ms"] / full_row["decode_ms"]


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
def fork_sharing_cache(method, cache):
    """A copy of the method's per-sample state for one decode pass (decode-time hooks may move it on: LaCache's
    cursor, D2O's thresholds), sharing the cache's layers it refers to (CAKE keeps them) instead of copying
    the KV cache into GPU memory the peak would count."""
    import copy
    return copy.deepcopy(method, memo={id(layer): layer for layer in cache.kv})


def run_kvbench(lm, name: str, ids: list[int], budget: int, steps: int, reps: int, bw: float, wbytes: int,
                full_ttft: float | None, compile_decode: bool | str = True) -> dict:
    """compile_decode: also the compiled path, True (the whole step) or "regional" (fast_decode.regional)."""
    from kvbench.engine import Engine
    from kvbench import fast_decode
    from kvbench.method import build_method
    method = build_spec(name, budget)
    random_eigen_bases(method, lm)
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
        rest()
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
    # compiled CUDA-graph path (kvbench's fastest) on the original. Each decode gets its own fork of the
    # method: decode-time hooks may change its state (the next decode must start where this one did)
    c_eager = cache.clone()
    eng.fast_decode = False  # the engine's own loop, per-layer hooks and all
    _, eager_ms, _ = eng.decode(c_eager, fork_sharing_cache(m, cache), pre.logits, steps)
    eager_read = list(eng.last_read_bytes)  # per step: the K/V bytes the stored format's attention reads
    del c_eager
    row["eager_ms"] = median(eager_ms[2:])
    row["path"] = "eager"
    row["decode_ms"] = row["eager_ms"]
    plan = fast_decode.plan(fork_sharing_cache(m, cache), cache, lm.model)  # as Engine.decode: None: the loop
    row["fast_plan"] = None if plan is None else "ring" if plan.ring else "evict" if plan.evict else "append"
    if plan is not None:
        compiled = "regional" if compile_decode == "regional" else "compiled"
        for path, comp in (("graph", False), (compiled, compile_decode)):
            if path == compiled and not compile_decode:
                continue
            c = cache.clone() if path == "graph" and compile_decode else cache
            p = fast_decode.plan(fork_sharing_cache(m, cache), c, lm.model)  # an eviction may carry method state
            fd = fast_decode.FastDecoder(lm.model, c, steps, compile=comp, ring=p.ring, evict=p.evict)
            t0 = time.perf_counter()
            _, g_ms = fd.decode(first, steps)
            row[f"{path}_first_s"] = time.perf_counter() - t0 - sum(g_ms[1:]) / 1e3  # warm-up (compile) + capture
            del c
            row[f"{path}_error"] = fd.graph_error
            if fd.graph_error is None:
                row[f"{path}_ms"] = median(g_ms[2:])
                row["path"], row["decode_ms"] = path, row[f"{path}_ms"]
    mean_kv = kv + per_tok * steps / 2  # every step adds one token to every head: the mean over the steps
    if method.formats():  # a storage format or selector: the bytes its attention reads
        mean_kv = sum(eager_read) / len(eager_read)
    row["roofline_ms"] = roofline_ms(wbytes, mean_kv, bw)
    row["decode_over_roofline"] = row["decode_ms"] / row["roofline_ms"]
    torch.cuda.synchronize()
    row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return row


def build_spec(name: str, budget: int):
    """A method, or "method+format" (`snapkv+kivi`: the method's kept rows stored as KIVI; `snapkv+quest`: read
    through Quest's selector); a method that takes no budget (full, kivi, quest, think, ...) gets none."""
    from kvbench.method import build_method, load_all_methods, uses_budget
    from kvbench.store import STORAGES
    base, _, fmt = name.partition("+")
    knobs = {}
    if fmt:
        load_all_methods()  # (the formats live beside the methods)
        if fmt not in STORAGES:
            raise ValueError(f"format {fmt!r} in {name!r}; allowed: {', '.join(sorted(STORAGES))}")
        knobs[STORAGES[fmt].kind] = fmt
    return build_method(base, budget=budget if uses_budget(base) and base != "full" else None, **knobs)


def random_eigen_bases(method, lm) -> None:
    """EigenAttention calibrates its bases on text; a model without a tokenizer (random weights: speed only) gets
    random orthonormal bases of the same shapes instead."""
    fmt = next((f for f in method.formats() if f.name == "eigen_attention"), None)
    if fmt is None or not isinstance(lm.tokenizer, NoTokenizer):
        return
    cfg = lm.model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    L, h = cfg.num_hidden_layers, cfg.num_key_value_heads
    g = torch.Generator().manual_seed(0)
    fmt.use_bases({"key_basis": torch.linalg.qr(torch.randn(L, d, d, generator=g))[0],
                   "value_basis": torch.linalg.qr(torch.randn(L, h, d, d, generator=g))[0]}, model=lm.model)


# -- kvpress (its own process: nothing of kvbench's attention, kernels or compiler is imported here) ------
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
    raise ValueError(f"no kvpress press for method={name!r}; allowed: {', '.join(KVPRESS_METHODS)}")


def build_plain_model(shape: str, device: str = "cuda"):
    """The synthetic model as transformers builds it (same config, seed and init order as kvbench's
    `load_model("synthetic")`, so the same weights), with transformers' SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from kvbench.models import SYNTHETIC_SHAPES  # a dict of config fields: registers and compiles nothing
    if shape not in SYNTHETIC_SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {', '.join(SYNTHETIC_SHAPES)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SYNTHETIC_SHAPES[shape]), dtype=torch.bfloat16)
    model.eval()
    model.set_attn_implementation("sdpa")
    return model


def _ms_since(t0: float) -> float:
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def kvpress_decode(model, cache, token: torch.Tensor, n: int, steps: int) -> list[float]:
    """The greedy loop of kvpress's pipeline (`generate_answer`): one forward per token with position_ids,
    `.item()` of each. Returns the wall ms of each of the steps - 1 forwards."""
    step_ms = []
    for i in range(steps - 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pos = torch.tensor([[n + i]], device=model.device)
        o = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=pos)
        token = o.logits[0, -1].argmax()
        token.item()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    return step_ms


@torch.no_grad()
def run_kvpress(model, name: str, ids: list[int], budget: int, steps: int, reps: int, bw: float, wbytes: int,
                full_ttft: float | None, compile_decode: bool = True) -> dict:
    """kvpress's usage: `with press(model): model(context, past_key_values=DynamicCache())`, then the greedy
    loop of its pipeline (`kvpress_decode`). The decode is timed twice over the same key lengths: after the
    warm-up prefill (`decode_cold_ms`) and after the last one (`decode_ms`: kvpress at its best). Measured on
    an H200 (torch 2.11, transformers 5.17, 8B shape): the first pass over new key lengths cost 2.8x the second
    in a fresh process without kvbench (8K full: 68.6 then 24.6 ms/token), and PyramidKV, whose 32 layers
    each hold a different length, 1.6 s/token at 32K on a first pass (41.7 ms on a second, kvpress_alone.py).
    Most likely PyTorch's cuDNN attention, which SDPA prefers on sm90, planning each new shape once per process
    (not yet confirmed: bench/kvpress_alone.py --no-cudnn-sdpa). In one process with kvbench, kvpress's decode over
    lengths it had already seen also went from ~25 to ~50 ms/token after a kvbench prefill (cause not found;
    gc.collect/gc.disable did not change it): hence one fresh process per framework."""
    import contextlib
    from transformers import DynamicCache
    dev = model.device
    n = len(ids)
    press = kvpress_press(name, max(0.0, 1.0 - budget / n))
    x = torch.tensor([ids], device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ttfts = []
    for _ in range(reps + 1):  # the first is warm-up
        cache = out = None
        torch.cuda.empty_cache()
        cache = DynamicCache()
        rest()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            # explicit cache_position: kvpress's hooks read it (transformers >= 5.3 no longer passes it on)
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1,
                        position_ids=torch.arange(n, device=dev).view(1, -1), cache_position=torch.arange(n, device=dev))
        ttfts.append(_ms_since(t0))
        if len(ttfts) == 1:  # decode the warm-up prefill's cache too: the first pass over these key lengths
            cold = median(kvpress_decode(model, cache, out.logits[0, -1].argmax(), n, steps)[2:])
    kv = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
             for l in cache.layers)
    warm = median(kvpress_decode(model, cache, out.logits[0, -1].argmax(), n, steps)[2:])
    ttft = median(ttfts[1:])
    row = dict(method=f"kvpress:{name}", n=n, ttft_ms=ttft, compress_ms=None, kv_bytes=kv,
               overhead_pct=None if full_ttft is None else 100.0 * (ttft - full_ttft) / full_ttft,
               decode_ms=warm, decode_cold_ms=cold, path="eager")
    row["roofline_ms"] = roofline_ms(wbytes, kv, bw)
    row["decode_over_roofline"] = row["decode_ms"] / row["roofline_ms"]
    row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return row


# -- table ---------------------------------------------------------------------------------------------
def fmt(row: dict) -> str:
    def f(k, spec, none="-"):
        v = row.get(k)
        return none if v is None else format(v, spec)
    return (f"{row['n']:>7} {row['method']:<22} {f('ttft_ms', '9.1f')} {f('overhead_pct', '+8.2f')} "
            f"{f('decode_ms', '8.2f')} {f('x_full', '6.2f')} {row.get('path', '-'):>8} {f('eager_ms', '8.2f')} "
            f"{f('graph_ms', '8.2f')} "
            f"{f('roofline_ms', '8.2f')} "
            f"{f('decode_over_roofline', '6.2f')} {row['kv_bytes'] / 2**20:9.1f} {f('alloc_over_kept', '6.3f')} "
            f"{f('peak_gib', '7.2f')}" + (f"  (cold {row['decode_cold_ms']:.2f})" if row.get('decode_cold_ms') else ""))


def ratio_table(rows: list[dict], device: str = "") -> str:
    """kvpress / kvbench per (length, method) and metric: > 1 means kvbench is faster or smaller."""
    ours = {(r["n"], r["method"]): r for r in rows if not r["method"].startswith("kvpress:")}
    lines = [f"kvpress / kvbench{' on ' + device if device else ''} (same inputs, each framework in its own "
             "process; > 1: kvbench faster / smaller)",
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


HEADER = (f"{'n':>7} {'method':<22} {'prefill':>9} {'ovh %':>8} {'dec ms':>8} {'x full':>6} {'path':>8} {'eager':>8} "
          f"{'graph':>8} {'roof ms':>8} {'x roof':>6} {'KV MB':>9} {'alloc/kept':>6} {'peak GiB':>7}")


def header(meta: dict) -> str:
    return (f"[{meta['framework']} process] device {meta['device']}  torch {meta['torch']}  transformers "
            f"{meta['transformers']}{'  kvpress ' + meta['kvpress'] if meta.get('kvpress') else ''}  model "
            f"{meta['model']} bf16  weights read/step {meta['weight_bytes'] / 1e9:.2f} GB  copy bandwidth "
            f"{meta['bandwidth'] / 1e12:.2f} TB/s (read+write)  budget {meta['budget']}  steps {meta['steps']}  "
            f"reps {meta['reps']}  rest {meta.get('rest_ms', 0):g} ms")


# -- one framework in this process ---------------------------------------------------------------------
def run_framework(args) -> None:
    """`--framework kvbench|kvpress`: every (length, method) of one framework, rows printed and written to --json."""
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_speed.py needs a CUDA GPU")
    global REST_S
    REST_S = args.rest_ms / 1e3
    t_start = time.time()
    out = open(args.json, "w") if args.json else None
    import transformers
    meta = dict(framework=args.framework, device=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, model=f"synthetic-{args.shape}", budget=args.budget,
                steps=args.steps, reps=args.reps, rest_ms=args.rest_ms)
    if args.framework == "kvpress":
        try:
            import kvpress  # noqa: F401 - imported first, as its users do (it wraps transformers' attention functions)
            from importlib.metadata import version
            meta["kvpress"] = version("kvpress")
        except Exception as e:  # noqa: BLE001 - report and stop
            print(f"kvpress unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            return
        model = build_plain_model(args.shape)
        run = lambda *a: run_kvpress(model, *a)  # noqa: E731
    else:
        lm = build_model(args.shape)
        model, run = lm.model, (lambda *a: run_kvbench(lm, *a))
    meta["bandwidth"], meta["weight_bytes"] = copy_bandwidth(), decode_weight_bytes(model)
    print(header(meta), flush=True)
    print(HEADER, flush=True)
    if out:
        out.write(json.dumps(dict(meta=meta)) + "\n")
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(10, min(model.config.vocab_size, 49152), (n,), generator=g).tolist()
        full_ttft, full_row = None, None
        for name in args.methods:
            tag = f"{'kvpress:' if args.framework == 'kvpress' else ''}{name}"
            if args.framework == "kvpress" and name not in KVPRESS_METHODS:
                print(f"{n:>7} {tag:<22} skipped: no kvpress press here", flush=True)
                continue
            if args.deadline_s and time.time() - t_start > args.deadline_s:
                print(f"{n:>7} {tag:<22} skipped: --deadline-s {args.deadline_s:.0f} reached", flush=True)
                continue
            try:
                row = run(name, ids, args.budget, args.steps, args.reps, meta["bandwidth"], meta["weight_bytes"],
                          full_ttft, "regional" if args.regional else not args.no_compile)
            except Exception as e:  # noqa: BLE001 - one failing configuration must not hide the others
                torch.cuda.empty_cache()
                print(f"{n:>7} {tag:<22} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            if name == "full":
                full_ttft, full_row = row["ttft_ms"], row
            row["x_full"] = x_full(row, full_row)
            print(fmt(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            torch.cuda.empty_cache()
    other = "kvbench." if args.framework == "kvpress" else "kvpress"
    leaked = sorted(m for m in sys.modules if m.startswith(other) and m != "kvbench.models")
    if leaked:  # the point of one process per framework
        raise RuntimeError(f"the {args.framework} process imported {', '.join(leaked[:5])}")


# -- the parent: one fresh process per framework, then the tables --------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32, help="decoded tokens per configuration")
    ap.add_argument("--reps", type=int, default=3, help="timed prefills per configuration (after one warm-up)")
    ap.add_argument("--rest-ms", type=float, default=200.0,
                    help="the GPU idles this long before every timed prefill (0: back to back)")
    ap.add_argument("--with-kvpress", action="store_true", help="also run kvpress (pip install kvpress)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode path")
    ap.add_argument("--regional", action="store_true",
                    help="the compiled path compiles each layer's modules but attention (KVBENCH_COMPILE_DECODE="
                         "regional), not the whole step")
    ap.add_argument("--deadline-s", type=float, default=0, help="skip configurations started after this many s")
    ap.add_argument("--json", default="", help="also write every row to this file (JSON lines)")
    ap.add_argument("--framework", choices=("kvbench", "kvpress"), default=None,
                    help="run only this framework, in this process (the parent spawns one process per framework)")
    args = ap.parse_args()
    for m in args.methods:  # a method, or method+format (FORMATS, storage formats decoding on the device)
        base, _, fmt_name = m.partition("+")
        if base not in METHODS + FORMATS or (fmt_name and fmt_name not in FORMATS):
            ap.error(f"--methods {m!r}; allowed: {', '.join(METHODS + FORMATS)}, or one of them +"
                     f"{'|'.join(FORMATS)} (e.g. snapkv+kivi)")
    if args.rest_ms < 0:
        ap.error(f"--rest-ms {args.rest_ms}; allowed: a number >= 0 (milliseconds)")
    if args.framework:
        return run_framework(args)
    t_start = time.time()
    metas, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for fw in ["kvbench"] + (["kvpress"] if args.with_kvpress else []):
            left = args.deadline_s - (time.time() - t_start) if args.deadline_s else 0
            if args.deadline_s and left <= 0:
                print(f"{fw}: skipped, --deadline-s {args.deadline_s:.0f} reached", flush=True)
                continue
            path = os.path.join(tmp, f"{fw}.jsonl")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--framework", fw, "--json", path,
                   "--shape", args.shape, "--lengths", *map(str, args.lengths), "--methods", *args.methods,
                   "--budget", str(args.budget), "--steps", str(args.steps), "--reps", str(args.reps),
                   "--rest-ms", str(args.rest_ms), "--deadline-s", str(left)] + (["--no-compile"] if args.no_compile else []) \
                + (["--regional"] if args.regional else [])
            rc = subprocess.run(cmd).returncode
            if rc:
                print(f"{fw} process exited with status {rc}", flush=True)
            if os.path.exists(path):
                for line in open(path):
                    d = json.loads(line)
                    (metas.append(d["meta"]) if "meta" in d else rows.append(d))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    devices = sorted({m["device"] for m in metas})
    print(f"\n== all rows, each framework in its own process, on {' / '.join(devices) or '?'} ==")
    for m in metas:
        print(header(m))
    print(HEADER)
    for r in rows:
        print(fmt(r))
    if args.with_kvpress:
        print(ratio_table(rows, ' / '.join(devices)))
    print(f"total {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
