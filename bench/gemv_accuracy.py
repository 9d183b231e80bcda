"""Is the decode step's Triton GEMV as accurate as cuBLAS? One decode step's logits three ways, same cache.

Synthetic Llama-3.1-8B shape (bf16, random weights), SnapKV at budget 1024 over an 8K random prompt, then the
first decode step of kvbench/fast_decode.py with its linears through
  cublas   torch's linear (cuBLAS), CUDA graph
  triton   methods/kernels/gemv.py's gemv_triton, CUDA graph
  triton+norm  the same and methods/kernels/rmsnorm.py's norms, CUDA graph
  fused+norm   and q/k/v in one launch, SiLU(gate) * up in one (gemv_many_triton, gemv_silu_mul_triton)
  fused+norm+rope  and methods/kernels/rope.py's rotary embedding (the default path), CUDA graph
  fp32ref  gemv_ref: the same bf16 weights and inputs, products summed in fp32 by torch (eager)
and prints each one's distance to fp32ref. Random weights amplify rounding over 32 layers (a 4% logit change is
normal here), so greedy tokens of the two fast paths part after a few steps; what matters is which path is
closer to the fp32-accumulated reference.
    python bench/gemv_accuracy.py [--shape llama-3.1-8b] [--length 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_speed  # noqa: E402  (same directory: its model builder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--length", type=int, default=8192)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemv_accuracy.py needs a CUDA GPU")
    import kvbench.methods.kernels.gemv as G
    from kvbench.engine import Engine
    from kvbench.fast_decode import FastDecoder
    from kvbench.method import build_method
    lm = gpu_speed.build_model(args.shape)
    m = build_method("snapkv", budget=1024)
    eng = Engine(lm, m, query_aware=True)
    ids = torch.randint(10, 32000, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids, m, compress=True)
    real, logits = G.gemv_triton, {}
    try:
        with torch.inference_mode():
            for name, gemv, norm, rope, graph in (("cublas", "cublas", "torch", "torch", True),
                                                  ("triton", "triton", "torch", "torch", True),
                                                  ("triton+norm", "triton", "triton", "torch", True),
                                                  ("fused+norm", "fused", "triton", "torch", True),
                                                  ("fused+norm+rope", "fused", "triton", "triton", True),
                                                  ("fp32ref", "triton", "torch", "torch", False)):
                G.gemv_triton = G.gemv_ref if name == "fp32ref" else real  # triton_linears looks it up per call
                fd = FastDecoder(lm.model, cache.clone(), 8, gemv=gemv, norm=norm, rope=rope, use_graph=graph)
                fd.ids.fill_(int(pre.logits.argmax()))
                fd._run_one()  # the first step (on the graph path: its warm-up, same kernels as the replays)
                logits[name] = fd.logits.float().clone()
                fd.finish()
                del fd
    finally:
        G.gemv_triton = real
    ref = logits["fp32ref"]
    print(f"{torch.cuda.get_device_name()}  {args.shape}  snapkv 1024 over {args.length} tokens, first decode step; "
          f"max |logit| {ref.abs().max().item():.2f}")
    for name in ("cublas", "triton", "triton+norm", "fused+norm", "fused+norm+rope"):
        d = logits[name] - ref
        print(f"  {name:16s} vs fp32ref: max |d| {d.abs().max().item():.4f}  rms {d.pow(2).mean().sqrt().item():.4f}  "
              f"argmax equal {int(logits[name].argmax()) == int(ref.argmax())}")
    d = logits["cublas"] - logits["triton"]
    print(f"  cublas vs triton: max |d| {d.abs().max().item():.4f}  rms {d.pow(2).mean().sqrt().item():.4f}")


if __name__ == "__main__":
    main()
