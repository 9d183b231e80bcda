"""`kvbench profile method=<name> model=<model> [key=value ...]`: offline profiling for the methods that need it
(duoattention: head gates; razorattention: echo/induction head scores; fastgen: the recovery threshold
calibrated for a budget; eigen_attention: key/value bases, in a .pt beside the JSON). The profile is stored
as `<model>/<method>.json` under ./results/profiles when that directory exists, else ~/.cache/kvbench/profiles
(env KVBENCH_PROFILES or the method knob `profile_dir` choose another), and found from anywhere by later calls
and by `kvbench run` (methods/_profiles.py: where it looks); `force=true` recomputes it. Also here: the profiling data (passkey samples, calibration prompts).

Keys: method (required), model (default smollm2-135m), model.path, model.shape (synthetic shapes),
device, dtype, budget, force, and any knob of the method (`steps`-like knobs, with or without `method.`).
"""
from __future__ import annotations

import random
import sys
import time

PROFILED = ("duoattention", "eigen_attention", "fastgen", "razorattention")
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def haystack_text() -> str:
    """Natural filler text: RULER's Paul Graham essays when installed, else the classic passkey filler."""
    try:
        from kvbench.tasks._text import essay_text
        return essay_text()
    except Exception:
        return _FILLER * 2000


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def passkey_samples(tok, n: int, length: int, num_passkeys: int, seed: int) -> list[tuple[list[int], slice]]:
    """DuoAttention-style synthetic passkey retrieval: `num_passkeys` passkey sentences at random depths
    (5%–95%) of a haystack, then the question and the answer. Each sample is about `length` tokens; the
    slice marks the positions whose hidden states predict the answer tokens."""
    rng = random.Random(seed)
    text = haystack_text()
    out = []
    for _ in range(n):
        keys = [str(rng.randint(10000, 99999)) for _ in range(num_passkeys)]
        needles = [_encode(tok, f" The pass key number {j + 1} is {k}. Remember it. {k} is pass key number {j + 1}.")
                   for j, k in enumerate(keys)]
        question = _encode(tok, " What are the pass keys, in order? The pass keys are")
        answer = _encode(tok, "".join(f" {k}" for k in keys))
        hay_len = max(1, length - len(question) - len(answer) - sum(map(len, needles)))
        start = rng.randrange(0, max(1, len(text) - 16 * hay_len))
        hay = _encode(tok, text[start:start + 16 * hay_len])[:hay_len]
        depths = sorted(int(rng.uniform(0.05, 0.95) * len(hay)) for _ in needles)
        ids, prev = [], 0
        for d, nd in zip(depths, needles):
            ids += hay[prev:d] + nd
            prev = d
        ids += hay[prev:] + question + answer
        out.append((ids, slice(len(ids) - len(answer) - 1, len(ids) - 1)))
    return out


def calibration_prompts(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` stretches of `length` tokens of the haystack text (FastGen threshold calibration)."""
    rng = random.Random(seed)
    text = haystack_text()
    out = []
    for _ in range(n):
        start = rng.randrange(0, max(1, len(text) - 16 * length))
        out.append(_encode(tok, text[start:start + 16 * length])[:length])
    return out


# -- CLI ----------------------------------------------------------------------------------------------
def _value(v: str):
    import yaml
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def parse_args(argv: list[str]) -> dict:
    args = {}
    for a in argv:
        if "=" not in a or a.startswith("-"):
            raise ValueError(f"argument {a!r} is not key=value; e.g. kvbench profile method=duoattention model=smollm2-135m")
        k, v = a.split("=", 1)
        args[k.strip().lstrip("+")] = _value(v)
    return args


def run_profile(args: dict, out=None) -> dict:
    """Build the method and model from parsed args, load or compute the profile, print its cost and summary."""
    from kvbench.method import build_method
    from kvbench.models import load_model
    out = out or sys.stdout
    args = dict(args)
    name = args.pop("method", None)
    if name not in PROFILED:
        raise ValueError(f"method={name!r}; allowed: {', '.join(PROFILED)}")
    model = args.pop("model", "smollm2-135m")
    path = args.pop("model.path", None)
    shape = args.pop("model.shape", args.pop("shape", None))
    device = args.pop("device", "auto")
    dtype = args.pop("dtype", "auto")
    seed = args.pop("seed", 0)
    force = args.pop("force", False)
    budget = args.pop("budget", None)
    if not isinstance(force, bool):
        raise ValueError(f"force={force!r}; allowed: true, false")
    knobs = {k.removeprefix("method."): v for k, v in args.items()}
    if name == "fastgen":
        knobs.setdefault("recovery", "auto")
        if budget is None:
            raise ValueError("fastgen profiling calibrates a threshold per budget: pass budget=<tokens>")
    method = build_method(name, budget=budget, **knobs)
    print(f"[kvbench] profile {name}: loading {model}", file=sys.stderr, flush=True)
    lm = load_model(name=str(model), path=path, shape=shape, device=device, dtype=dtype, seed=int(seed))
    t0 = time.perf_counter()
    entry, cached = method.prepare(lm, force=force)
    wall = time.perf_counter() - t0
    cost = entry["cost"]
    from kvbench.methods import _profiles
    where = next((p for p in (_profiles.profile_path(r, lm.name, name) for r in _profiles.search_roots(method.profile_dir))
                  if _profiles.read_entry(p, entry.get("key", "")) is not None),
                 _profiles.profile_path(_profiles.profile_root(method.profile_dir), lm.name, name))
    if cached:
        print(f"[kvbench] profile {name} for {lm.name}: loaded from {where} in {wall:.2f} s "
              f"(computed earlier in {cost['wall_s']:.1f} s over {cost['tokens']} tokens)", file=out)
    else:
        print(f"[kvbench] profile {name} for {lm.name}: computed in {cost['wall_s']:.1f} s, "
              f"{cost['tokens']} tokens processed -> {where}", file=out)
    print(f"[kvbench] {name}: {method.summary(entry)}", file=out)
    return {"entry": entry, "cached": cached, "wall_s": wall}


def profile_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] if argv else "usage: kvbench profile method=NAME model=MODEL [key=value ...]",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run_profile(parse_args(argv))
    except (ValueError, TypeError) as e:
        print(f"kvbench: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
