"""One-time cost of compiling the decode step: the whole step against regional compilation (issue 16).

`KVBENCH_COMPILE_DECODE=1` traces the whole step (every layer) through torch.compile; `=regional` compiles each
decoder layer's modules but attention, one graph per module kind for all layers (kvbench.fast_decode.regional).
Per mode, in a fresh process each (nothing cached in memory; Inductor's on-disk cache is pointed at a fresh
directory): the first decode's setup seconds (compile, warm-up, capture: `FastDecoder.decode` minus the later
steps), the graphs compiled, and the median ms of the later steps. On CPU the step runs eagerly (no CUDA graph)
and Inductor generates C++; on CUDA the step is captured in a CUDA graph and Inductor generates Triton.

    python bench/compile_time.py [--shape smollm2-135m] [--context 256] [--steps 16] [--modes 0 1 regional]
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
if importlib.util.find_spec("kvbench") is None:
    sys.path.insert(0, str(ROOT))


def one(shape: str, mode: str, context: int, steps: int, device: str) -> dict:
    import torch._dynamo
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_speed import build_model
    from kvbench.engine import Engine
    from kvbench.fast_decode import FastDecoder
    lm = build_model(shape, device=device, dtype="bfloat16" if device == "cuda" else "float32")
    eng = Engine(lm, None)
    cache = eng.new_cache()
    g = torch.Generator().manual_seed(0)
    pre = eng.prefill(cache, torch.randint(10, 20000, (context,), generator=g).tolist(), None, compress=False)
    compile = {"0": False, "1": True, "regional": "regional"}[mode]
    torch._dynamo.utils.counters.clear()
    fd = FastDecoder(lm.model, cache, steps, compile=compile)
    t0 = time.perf_counter()
    _, ms = fd.decode(int(pre.logits.argmax()), steps)
    total = time.perf_counter() - t0
    later = sorted(ms[2:])
    return dict(mode=mode, setup_s=total - sum(ms[fd.setup_steps:]) / 1e3, setup_steps=fd.setup_steps,
                graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                step_ms=later[len(later) // 2], device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                threads=torch.get_num_threads(), shape=shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["0", "1", "regional"], choices=["0", "1", "regional"])
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # the child process: one mode, JSON out
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(one(args.shape, args.one, args.context, args.steps, device)))
        return
    print(f"{'mode':<10}{'setup s':>9}{'graphs':>8}{'step ms':>9}   (fresh process each; {args.shape}, "
          f"context {args.context}, {args.steps} steps)")
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as cache_dir:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--shape", args.shape, "--context",
                                  str(args.context), "--steps", str(args.steps)], env=env, capture_output=True,
                                 text=True)
        if out.returncode:
            print(f"{mode:<10} FAILED: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:<10}{r['setup_s']:>9.1f}{r['graphs']:>8}{r['step_ms']:>9.2f}   ({r['device']}, "
              f"{r['threads']} threads)", flush=True)


if __name__ == "__main__":
    main()
