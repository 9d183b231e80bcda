"""Batch-1 GEMV on one CUDA GPU: cuBLAS (torch.nn.functional.linear) against the Triton GEMV of
methods/kernels/gemv.py, on the linears of Llama-3.1-8B (bf16, random weights), one token (not part of CI).

Per weight shape (N, K): 32 distinct weights (one per layer, so L2 never holds them; lm_head: one), one token x
each, all applied in one CUDA graph; ms per replay (median of --reps after a warm-up) and TB/s = weight bytes /
time, for cuBLAS, the Triton default (`gemv_config`) and the configs of `config_grid`. Every Triton config's
output on layer 0 is checked against `gemv_ref` (bf16 tolerance; max abs error printed): one off it is marked
invalid and never picked as the shape's best. Then the whole model's linears for one token in one graph (32 layers
x q, k, v, o, gate, up, down + lm_head; then with fused qkv and gate_up): cuBLAS, Triton default, Triton best
per shape.

Copy roofline, as bench/decode_breakdown.py and bench/gpu_speed.py compute it (their functions): copy bandwidth =
(bytes read + bytes written) / time of a 2 GiB device-to-device copy; roofline ms = weight bytes / that bandwidth.

    python bench/gemv_gpu.py [--reps 20] [--layers 32] [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_speed  # noqa: E402  (same directory: copy bandwidth and roofline arithmetic)
from decode_breakdown import graph_ms  # noqa: E402  (median ms of CUDA-graph replays)

try:
    from kvbench.methods.kernels import HAS_TRITON, next_pow2
    from kvbench.methods.kernels.gemv import gemv_config, gemv_ref, gemv_triton, split_plan
except ImportError:  # a plain checkout: import the kernels package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from methods.kernels import HAS_TRITON, next_pow2
    from methods.kernels.gemv import gemv_config, gemv_ref, gemv_triton, split_plan

LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "n_q": 32, "n_kv": 8, "head_dim": 128, "vocab": 128256,
            "layers": 32}
UNFUSED = ("q", "k", "v", "o", "gate", "up", "down")  # per layer; lm_head once
FUSED = ("qkv", "o", "gate_up", "down")
DEVICE = "cuda"  # tests/test_gemv.py runs bench_shape and bench_model on the CPU under the Triton interpreter
RTOL, ATOL = 1.6e-2, 1e-2  # bf16 output (one rounding: <= 1 ulp = 2**-7 relative apart) of values ~N(0, 1)


# -- arithmetic (tested on CPU: tests/test_gemv.py) -----------------------------------------------------------
def llama_shapes(hidden, intermediate, n_q, n_kv, head_dim, vocab, **_) -> dict[str, tuple[int, int]]:
    """(N, K) of every linear's weight (nn.Linear layout), the fused qkv and gate_up included."""
    q, kv = n_q * head_dim, n_kv * head_dim
    return {"q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, q),
            "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate),
            "lm_head": (vocab, hidden), "qkv": (q + 2 * kv, hidden), "gate_up": (2 * intermediate, hidden)}


def model_weight_bytes(shapes: dict, layers: int, names=UNFUSED, elem: int = 2) -> int:
    """Bytes of `names` in every layer plus lm_head once."""
    return elem * (layers * sum(math.prod(shapes[n]) for n in names) + math.prod(shapes["lm_head"]))


def tbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def roofline_ms(nbytes: float, copy_bw: float) -> float:
    """Time to read `nbytes` at the copy bandwidth (read + written bytes / s), as bench/gpu_speed.py."""
    return gpu_speed.roofline_ms(nbytes, 0, copy_bw)


def config_grid(n: int, k: int, n_sm: int, block_ns=(1, 2, 4, 8, 16), block_ks=(256, 512, 1024),
                splits=(1, 2, 4, 8), warps=(4, 8)) -> list[dict]:
    """The Triton configs worth timing for a (n, k) weight, deduplicated:
    - each thread loads 8 to 64 weights per step (block_n x block_k / threads): fewer than 8 bf16 give 2- to
      8-byte loads instead of 16 (sm_90 PTX), more than 64 take 160+ registers;
    - block_n, block_k no larger than n, k rounded up to a power of two;
    - K split only when n <= 4096 and the row blocks alone are fewer than 4 programs per SM; a split counted as
      the slices `split_plan` really makes (K = 4096 in 1024-blocks: 8 gives 4)."""
    out = []
    for bn, bk, nw, s in itertools.product(block_ns, block_ks, warps, splits):
        if bn > next_pow2(n) or bk > max(16, next_pow2(k)) or not 8 <= bn * bk // (32 * nw) <= 64:
            continue
        if s > 1 and (n > 4096 or math.ceil(n / bn) >= 4 * n_sm):
            continue
        cfg = {"block_n": bn, "block_k": bk, "split_k": split_plan(k, bk, s)[0], "num_warps": nw}
        if cfg not in out:
            out.append(cfg)
    return out


def check_config(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, cfg: dict) -> tuple[float, bool]:
    """(max abs error, within the bf16 tolerance) of `gemv_triton(x, w, **cfg)` against `ref` = gemv_ref(x, w)."""
    y = gemv_triton(x, w, **cfg).float()
    ok = y.shape == ref.shape and bool(torch.isclose(y, ref.float(), rtol=RTOL, atol=ATOL).all())
    return float((y - ref.float()).abs().max()), ok


def fmt_cfg(cfg: dict) -> str:
    return f"bn {cfg['block_n']:2d} bk {cfg['block_k']:4d} split {cfg['split_k']} warps {cfg['num_warps']}"


# -- GPU ------------------------------------------------------------------------------------------------------
def rand_weights(count: int, n: int, k: int) -> torch.Tensor:
    """(count, n, k) bf16 ~ N(0, 1/k): y = W x stays ~N(0, 1) for x ~ N(0, 1)."""
    return torch.randn(count, n, k, device=DEVICE, dtype=torch.bfloat16).mul_(k ** -0.5)


def bench_shape(names: list[str], n: int, k: int, layers: int, n_sm: int, reps: int, quick: bool) -> dict | None:
    """Time and check cuBLAS, the Triton default and `config_grid` on `layers` (n, k) weights; the best valid
    Triton config (None if none is valid)."""
    t0 = time.time()
    ws, xs = rand_weights(layers, n, k), torch.randn(layers, 1, k, device=DEVICE, dtype=torch.bfloat16)
    nbytes = ws.numel() * ws.element_size()
    ref = gemv_ref(xs[0], ws[0])
    print(f"\n{'/'.join(names)} {n}x{k}: {layers} weight(s), {nbytes / 1e9:.2f} GB per replay", flush=True)
    e = float((F.linear(xs[0], ws[0]).float() - ref.float()).abs().max())
    cublas_ms = graph_ms(lambda: [F.linear(xs[i], ws[i]) for i in range(layers)], reps)
    print(f"  {'cuBLAS (F.linear)':<44} {cublas_ms:8.4f} ms {tbps(nbytes, cublas_ms):6.2f} TB/s  max err {e:.1e}",
          flush=True)
    default = gemv_config(n, k, 2 * n_sm)  # what gemv_triton picks (num_programs_hint: 2 per SM)
    grid = config_grid(n, k, n_sm, **(dict(block_ns=(2, 4, 8), block_ks=(512, 1024), warps=(4,)) if quick else {}))
    best = None
    for label, cfg in [("default", default)] + [("", c) for c in grid if c != default]:
        try:  # compiles the config (before any graph capture): a config that cannot run is reported, not fatal
            err, ok = check_config(xs[0], ws[0], ref, cfg)
        except Exception as exc:  # noqa: BLE001
            print(f"  triton {label:<8} {fmt_cfg(cfg):<28} FAILED: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        ms = graph_ms(lambda: [gemv_triton(xs[i], ws[i], **cfg) for i in range(layers)], reps)
        print(f"  triton {label:<8} {fmt_cfg(cfg):<28} {ms:8.4f} ms {tbps(nbytes, ms):6.2f} TB/s  max err {err:.1e}"
              f"{'' if ok else '  INVALID'}", flush=True)
        if ok and (best is None or ms < best[0]):
            best = (ms, cfg)
    if best is not None:
        print(f"  best: {fmt_cfg(best[1])}  {best[0]:.4f} ms  {tbps(nbytes, best[0]):.2f} TB/s, "
              f"{cublas_ms / best[0]:.2f}x cuBLAS's speed ({len(grid)} grid configs, {time.time() - t0:.0f} s)",
              flush=True)
    return None if best is None else best[1]  # its buffers are freed on return (the caller empties the cache)


def bench_model(shapes: dict, layers: int, best: dict, bw: float, reps: int) -> None:
    """All linears of the model for one token in one graph: unfused, then fused qkv / gate_up (15 GB at a time)."""
    w = {nm: rand_weights(layers, *shapes[nm]) for nm in UNFUSED}
    w["lm_head"] = rand_weights(1, *shapes["lm_head"])
    xs = {k: torch.randn(layers, 1, k, device=DEVICE, dtype=torch.bfloat16) for k in {s[1] for s in shapes.values()}}

    def run(names, how):
        """One token through layer 0..layers-1's `names`, then lm_head: cuBLAS, or Triton with each shape's
        best config ("triton best") or the default."""
        calls = [(nm, i) for i in range(layers) for nm in names] + [("lm_head", 0)]

        def step():
            for nm, i in calls:
                wt = w[nm][i]
                x = xs[wt.shape[1]][i]
                if how == "cuBLAS":
                    F.linear(x, wt)
                elif how == "triton best" and best.get(tuple(wt.shape)):
                    gemv_triton(x, wt, **best[tuple(wt.shape)])
                else:
                    gemv_triton(x, wt)
        return step

    for label, names in (("unfused", UNFUSED), ("fused qkv, gate_up", FUSED)):
        if names is FUSED:  # swap q/k/v and gate/up for their fused weights, keep o, down, lm_head
            for nm in ("q", "k", "v", "gate", "up"):
                del w[nm]
            torch.cuda.empty_cache()
            w.update({nm: rand_weights(layers, *shapes[nm]) for nm in ("qkv", "gate_up")})
        nbytes = model_weight_bytes(shapes, layers, names)
        roof = roofline_ms(nbytes, bw)
        print(f"\nwhole model, {label}: {layers} layers x {', '.join(names)} + lm_head, {nbytes / 1e9:.2f} GB, "
              f"copy roofline {roof:.3f} ms", flush=True)
        for how in ("cuBLAS", "triton default", "triton best"):
            ms = graph_ms(run(names, how), reps)
            print(f"  {how:<16} {ms:8.3f} ms  {tbps(nbytes, ms):5.2f} TB/s  {ms / roof:5.3f} x roofline", flush=True)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per measurement (after warm-up)")
    ap.add_argument("--layers", type=int, default=LLAMA_8B["layers"])
    ap.add_argument("--quick", action="store_true", help="a smaller config grid")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemv_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not HAS_TRITON:
        sys.exit("bench/gemv_gpu.py needs triton (not importable)")
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False  # gemv_ref's fp32 matmul must be fp32
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    n_sm = props.multi_processor_count
    print(f"{props.name}, {n_sm} SMs, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}", flush=True)
    bw = gpu_speed.copy_bandwidth(2 << 30)
    print(f"device-to-device copy of 2 GiB: {bw / 1e9:.0f} GB/s counting bytes read + written, "
          f"{bw / 2e9:.0f} GB/s of bytes copied; the roofline below uses the first: weight bytes / {bw / 1e9:.0f} GB/s",
          flush=True)
    shapes = llama_shapes(**LLAMA_8B)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for nm in ("k", "v", "q", "o", "qkv", "gate", "up", "down", "gate_up", "lm_head"):
        by_shape.setdefault(shapes[nm], []).append(nm)
    best = {}
    for (n, k), names in by_shape.items():
        best[(n, k)] = bench_shape(names, n, k, 1 if names == ["lm_head"] else args.layers, n_sm, args.reps,
                                   args.quick)
        torch.cuda.empty_cache()  # this shape's weights, back to the device before the next shape's
    print("\nbest config per shape:", flush=True)
    for (n, k), names in by_shape.items():
        print(f"  {'/'.join(names):<10} {n:6d}x{k:<5d} {fmt_cfg(best[(n, k)]) if best[(n, k)] else 'none valid'}",
              flush=True)
    bench_model(shapes, args.layers, best, bw, args.reps)
    print(f"\ntotal {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
