"""Offline profiles shared by the methods that need one (DuoAttention gates, RazorAttention head scores,
FastGen calibrated thresholds).

A profile lives in `<root>/<model-label>/<method>.json`, wherever kvbench runs from. `root`:
- `KVBENCH_PROFILES` (or `KVBENCH_PROFILE_DIR`) when set, else a `profile_dir` knob other than the default:
  that directory alone, read and written;
- by default (`profile_dir: results/profiles`) profiles are looked up in `./results/profiles` (relative to
  where kvbench runs: the old place), the checkout's `results/profiles` (those shipped with kvbench) and the
  user cache `$KVBENCH_CACHE/profiles` (`~/.cache/kvbench/profiles`), first hit wins; a new profile is
  written to `./results/profiles` when that directory exists, else to the user cache.
Tensors a profile returns under data["tensors"] (Eigen
Attention's calibrated bases) go to `<method>.<entry key>.pt` beside it. One file holds several entries keyed by a hash of
(method, profiling knobs, model fingerprint): changing a profiling knob or the weights makes a new entry,
never a stale hit. The model fingerprint hashes the architecture and a slice of layer 0's attention weights,
so it is the same whether computed from the loaded model or from the attention module the engine hands a
method (which is how a method finds its profile when nobody told it the model's label).

Also here: helpers the retrieval/streaming methods share (streaming window from a budget, sink+recent
indices) and a context manager that swaps a model's attention function for profiling.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

DEFAULT_ROOT = "results/profiles"
COMPUTED: Counter = Counter()  # profiles computed (not loaded) in this process, per method: tests and the CLI read it


# -- where profiles live ------------------------------------------------------------------------------
ENV_VARS = ("KVBENCH_PROFILES", "KVBENCH_PROFILE_DIR")


def _explicit(root: str | None) -> Path | None:
    env = next((os.environ[v] for v in ENV_VARS if os.environ.get(v)), None)
    if env:
        return Path(env).expanduser()
    if root is not None and Path(str(root)) != Path(DEFAULT_ROOT):
        return Path(str(root)).expanduser()
    return None


def user_cache_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE") or Path.home() / ".cache" / "kvbench").expanduser() / "profiles"


def checkout_root() -> Path:
    """`results/profiles` of the checkout kvbench runs from (an editable install; absent in a wheel)."""
    import kvbench
    return Path(kvbench.__file__).resolve().parent.parent / DEFAULT_ROOT


def search_roots(root: str | None = None) -> list[Path]:
    """Where profiles are looked for, in order (see the module docstring)."""
    explicit = _explicit(root)
    if explicit is not None:
        return [explicit]
    out: list[Path] = []
    for p in (Path.cwd() / DEFAULT_ROOT, checkout_root(), user_cache_root()):
        if not any(os.path.realpath(p) == os.path.realpath(q) for q in out):
            out.append(p)
    return out


def profile_root(root: str | None = None) -> Path:
    """Where a new profile is written: the explicit directory, else ./results/profiles when it exists, else
    the user cache."""
    explicit = _explicit(root)
    if explicit is not None:
        return explicit
    here = Path.cwd() / DEFAULT_ROOT
    return here if here.is_dir() else user_cache_root()


def where(root: str | None = None) -> str:
    """The directories profiles are looked for in, for messages."""
    return ", ".join(str(p) for p in search_roots(root))


def _say(msg: str) -> None:
    import sys
    print(f"[kvbench] {msg}", file=sys.stderr, flush=True)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules in layer order (transformers gives each a `layer_idx`)."""
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return sorted(mods, key=lambda m: m.layer_idx)


_ARCH_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
              "head_dim", "intermediate_size", "vocab_size")


def fingerprint(config, attn0: torch.nn.Module) -> str:
    """Architecture + the first rows of layer 0's first attention weight, rounded to bf16 (so the same
    checkpoint loaded in fp32 or bf16 gives the same fingerprint)."""
    arch = {k: getattr(config, k, None) for k in _ARCH_KEYS}
    w = next(attn0.parameters()).detach()
    sample = w.reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode() + sample)
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    return fingerprint(model.config, attention_modules(model)[0])


def entry_key(method: str, knobs: dict, fp: str) -> str:
    blob = json.dumps({"method": method, "knobs": knobs, "model": fp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def profile_path(root: Path, label: str, method: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return root / safe / f"{method}.json"


def read_entry(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text()).get("entries", {}).get(key)
    except (OSError, json.JSONDecodeError):
        return None
    name = (entry or {}).get("data", {}).get("tensors_file")
    if name is not None:  # calibrated projections (eigen_attention): tensors beside the JSON
        try:
            entry["data"]["tensors"] = torch.load(path.parent / name, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError):
            return None
    return entry


def find_entry(root: Path, method: str, key: str) -> dict | None:
    """Look for an entry under any model label (the key already pins the model)."""
    for path in sorted(root.glob(f"*/{method}.json")):
        e = read_entry(path, key)
        if e is not None:
            return e
    return None


def write_entry(path: Path, key: str, entry: dict, label: str, method: str) -> None:
    """Add/replace one entry; the file is rewritten atomically (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": label, "method": method, "entries": {}}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    doc.setdefault("entries", {})[key] = entry
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def get_or_create(lm, method: str, knobs: dict, compute: Callable, root: str | None = None,
                  force: bool = False) -> tuple[dict, bool, Path]:
    """Load the profile of (model, method, knobs) or compute and store it.

    compute(lm) -> (data: dict, tokens_processed: int). Returns (entry, cached, path); the entry records the
    cost of computing it (wall seconds, tokens processed)."""
    fp = model_fingerprint(lm.model)
    key = entry_key(method, knobs, fp)
    path = profile_path(profile_root(root), lm.name, method)
    if not force:
        for r in search_roots(root):
            found = profile_path(r, lm.name, method)
            e = read_entry(found, key)
            if e is not None:
                _say(f"{method}: using the profile of {lm.name} in {found}")
                return e, True, found
        _say(f"{method}: no profile of {lm.name} with these knobs in {where(root)}: profiling now, once "
             f"(`kvbench profile method={method}` does it ahead of a run) -> {path}")
    else:
        _say(f"{method}: profiling {lm.name} again (force=true) -> {path}")
    t0 = time.perf_counter()
    data, tokens = compute(lm)
    tensors = data.pop("tensors", None)
    if tensors is not None:  # a dict of tensors (a calibrated basis) goes to <method>.<key>.pt, not into JSON
        tfile = path.with_name(f"{path.stem}.{key}.pt")
        tfile.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, tfile.with_name(tfile.name + f".tmp{os.getpid()}"))
        os.replace(tfile.with_name(tfile.name + f".tmp{os.getpid()}"), tfile)
        data["tensors_file"] = tfile.name
    entry = {"key": key, "method": method, "model": lm.name, "model_fingerprint": fp, "knobs": knobs,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "cost": {"wall_s": round(time.perf_counter() - t0, 3), "tokens": int(tokens)}, "data": data}
    write_entry(path, key, entry, lm.name, method)
    if tensors is not None:
        entry["data"]["tensors"] = tensors
    COMPUTED[method] += 1
    _say(f"{method}: profile computed in {entry['cost']['wall_s']:.1f} s ({int(tokens)} tokens) -> {path}")
    return entry, False, path


def lookup_from_module(method: str, knobs: dict, module: torch.nn.Module, root: str | None = None) -> dict:
    """Find a stored profile from the attention module of layer 0 (what a method sees at compression time)."""
    fp = fingerprint(module.config, module)
    key = entry_key(method, knobs, fp)
    entry = next((e for e in (find_entry(r, method, key) for r in search_roots(root)) if e is not None), None)
    if entry is None:
        raise ValueError(f"no {method} profile for this model in {where(root)} (fingerprint {fp}); "
                         f"run `kvbench profile method={method} model=<your model>` with the same knobs first")
    return entry


# -- swapping the attention function during profiling ------------------------------------------------
_ids = itertools.count()


@contextlib.contextmanager
def attention_override(model: torch.nn.Module, fn: Callable):
    """Run the model with `fn` as its attention function (transformers' AttentionInterface), then restore."""
    from transformers import AttentionInterface
    name = f"kvbench_profile_{next(_ids)}"
    AttentionInterface.register(name, fn)
    prev = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """No parameter of the model requires grad inside (profiling optimizes only its own tensors)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


# -- retrieval / streaming heads -----------------------------------------------------------------------
def top_heads(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` highest scores (ties → lower flat index first)."""
    flat = scores.reshape(-1).float()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:count]] = True
    return mask.view(scores.shape)


def streaming_length(n: int, n_heads: int, n_retrieval: int, target: int, minimum: int) -> int:
    """Tokens each streaming head keeps so that the mean over all heads of all layers is `target`:
    (R·n + (N − R)·s) / N = target  ⇒  s = ⌊(N·target − R·n) / (N − R)⌋, clamped to [minimum, n].
    When retrieval heads alone exceed the budget the clamp wins and the mean is above `target`."""
    if n_heads == n_retrieval:
        return n
    s = math.floor((n_heads * target - n_retrieval * n) / (n_heads - n_retrieval))
    return max(min(minimum, n), min(n, s))


def fit_retrieval(scores: torch.Tensor, retrieval: torch.Tensor, n: int, target: int, floor: int) -> torch.Tensor:
    """Demote retrieval heads, lowest score first, until every streaming head can keep at least `floor`
    tokens with the mean over all heads at `target` (or no retrieval head is left)."""
    N = retrieval.numel()
    mask = retrieval.clone().reshape(-1)
    flat = scores.reshape(-1).float()

    def fits(R: int) -> bool:
        return n <= target if R == N else (N * target - R * n) / (N - R) >= floor
    order = sorted((i for i in range(N) if mask[i]), key=lambda i: (float(flat[i]), -i))
    for i in order:
        if fits(int(mask.sum())):
            break
        mask[i] = False
    return mask.view(retrieval.shape)


def sink_recent_indices(n: int, n_sink: int, n_recent: int, device=None) -> torch.Tensor:
    """Local indices of the first n_sink and last n_recent of n rows (a freshly prefilled head, rows in
    position order), sorted, without duplicates."""
    n_sink = min(n_sink, n)
    n_recent = min(n_recent, n - n_sink)
    return torch.cat([torch.arange(n_sink, device=device), torch.arange(n - n_recent, n, device=device)])
