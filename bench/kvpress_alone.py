"""Cross-check of bench/gpu_speed.py's kvpress process: kvpress used alone, the way its README shows, nothing of
kvbench imported (not even its package). The model is the Llama-3.1-8B shape with random bf16 weights and SDPA, the
prompt `length` random token ids, as in gpu_speed.py. Per press: `with press(model): model.model(context,
past_key_values=DynamicCache())` (the prefill of kvpress's pipeline), then the greedy loop of its pipeline
(`KVPressTextGenerationPipeline.generate_answer`: one `model(...)` per token with position_ids, `.item()` of each
token). Each press runs twice (prefill + decode over the same key lengths); prints the median wall ms of a decode
step (after 2 warm-up steps) of both passes (`cold`: the first) and the second pass's prefill.
--no-cudnn-sdpa turns off PyTorch's cuDNN attention backend (torch.backends.cuda.enable_cudnn_sdp(False)), to
check whether the slower first pass is cuDNN planning each new key length.

    python bench/kvpress_alone.py [--length 32768] [--budget 1024] [--steps 32] [--methods full snapkv ...]
                                  [--no-cudnn-sdpa]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

# Llama-3.1-8B's config fields (transformers' AutoConfig.for_model), the shape of gpu_speed.py's default
LLAMA_3_1_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                    max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["full", "snapkv"],
                    help="full snapkv streaming_llm pyramidkv adakv")
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help="SDPA without its cuDNN backend")
    args = ap.parse_args()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    import kvpress
    from importlib.metadata import version
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, __version__ as tv
    ratio = max(0.0, 1.0 - args.budget / args.length)
    presses = {"full": None,
               "snapkv": kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7),
               "streaming_llm": kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
               "pyramidkv": kvpress.PyramidKVPress(compression_ratio=ratio, window_size=32, kernel_size=7),
               "adakv": kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7))}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA_3_1_8B), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    n = args.length
    ids = torch.randint(10, 49152, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
    print(f"kvpress alone: device {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {tv}  "
          f"kvpress {version('kvpress')}  llama-3.1-8b shape bf16 sdpa  n {n}  budget {args.budget}  steps {args.steps}"
          f"  cuDNN SDPA {torch.backends.cuda.cudnn_sdp_enabled()}  kvbench imported: {'kvbench' in sys.modules}",
          flush=True)
    for name in args.methods:
        press, medians = presses[name], []
        for rep in range(2):  # the first prefill and decode warm up
            cache = DynamicCache()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
                # explicit cache_position: kvpress 0.5.5's hooks read it, transformers >= 5.3 no longer passes it
                model.model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device="cuda"))
            torch.cuda.synchronize()
            prefill_ms = (time.perf_counter() - t0) * 1e3
            token, step_ms = torch.tensor(1, device="cuda"), []
            with torch.no_grad():
                for i in range(args.steps - 1):
                    t0 = time.perf_counter()
                    out = model(input_ids=token.view(1, 1), past_key_values=cache,
                                position_ids=torch.tensor([[n + i]], device="cuda"))
                    token = out.logits[0, -1].argmax()
                    token.item()
                    step_ms.append((time.perf_counter() - t0) * 1e3)
            medians.append(statistics.median(step_ms[2:]))
            kv = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers) / 2**20
            del cache, out
            torch.cuda.empty_cache()
        print(f"{n:>7} kvpress:{name:<14} prefill {prefill_ms:8.1f} ms  decode {medians[1]:7.2f} ms/token "
              f"(cold {medians[0]:7.2f})  KV {kv:7.1f} MB", flush=True)


if __name__ == "__main__":
    main()
