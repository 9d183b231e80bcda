"""FastGen — Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs"
(ICLR 2024, 2310.01801).

At prefill every KV head profiles the prompt's own attention and picks the cheapest of the nested hybrid
policies  special → special+punct → special+punct+frequent → special+punct+frequent+local → full
whose kept set recovers at least T (`recovery`, default 0.95) of the head's attention mass.
special = the tokenizer's special tokens, punct = punctuation tokens, frequent = the tokens with the largest
accumulated attention (heavy hitters), local = the most recent tokens.

What we simplified:
- Recovery is measured on the last `window` prompt queries (all query heads of the KV head): the mean over
  those queries of the attention mass that falls on the kept set. The paper profiles the whole prompt.
  Heavy hitters use the attention accumulated over all prompt queries, as H2O (over every chunk of a
  chunked prefill, `prefill_chunk>0`).
- Sizes: with a budget (or ratio) the local window and the heavy-hitter count are each budget/2, so the
  second-most-expensive policy costs about the budget; without one they are `local_ratio`/`frequent_ratio`
  of the prompt (0.3 each, our choice). FastGen's memory is adaptive, so the mean kept tokens follow T, not
  the budget: `recovery=auto` uses the T that `kvbench profile method=fastgen budget=B` calibrated (the
  largest T of a sweep whose mean kept tokens on calibration prompts stay within B).
- Compression happens once, after prefill; generated tokens are all kept.
- The policy needs the prompt's token ids, which the attention function does not see: `prepare(lm)` hooks
  the model's forward to record them (the engine must call it, as for the profiled methods).
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, Method, register_method, window_attention

from . import _profiles
from .h2o import PrefillAttention
from .snapkv import WindowQueries

POLICIES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")
PUNCT = set(string.punctuation) | set("。，、；：？！…—–“”‘’（）《》「」")
T_GRID = [round(0.5 + 0.01 * i, 3) for i in range(50)] + [0.995, 0.999, 1.0]


_CLASSES: dict[tuple, tuple[frozenset, frozenset]] = {}


def token_classes(tokenizer) -> tuple[frozenset, frozenset]:
    """(special token ids, punctuation token ids: decoded text is only punctuation, spaces aside)."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _CLASSES:
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                    if getattr(t, "special", False)}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        punct = {i for i, t in enumerate(texts) if t.strip() and all(c in PUNCT for c in t.strip())}
        _CLASSES[key] = (frozenset(special), frozenset(punct - special))
    return _CLASSES[key]


class TokenLog:
    """The token id at each position of the current sample, recorded from the model's forward kwargs."""

    def __init__(self):
        self.ids = torch.zeros(0, dtype=torch.long)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        ids = ids[0].detach().cpu()
        pos = kwargs.get("position_ids")
        pos = pos[0].detach().cpu() if pos is not None else torch.arange(ids.numel())
        if int(pos[0]) == 0:
            self.ids = torch.zeros(0, dtype=torch.long)
        need = int(pos.max()) + 1
        if need > self.ids.numel():
            self.ids = torch.cat([self.ids, torch.full((need - self.ids.numel(),), -1, dtype=torch.long)])
        self.ids[pos] = ids


def policy_masks(ids: torch.Tensor, special: frozenset, punct: frozenset, acc: torch.Tensor, n_frequent: int,
                 n_local: int) -> torch.Tensor:
    """(5, L) cumulative kept masks of the hybrid policies for one head. ids (L,), acc (L,) accumulated attention."""
    L = ids.numel()
    sp = torch.tensor([int(i) in special for i in ids.tolist()], dtype=torch.bool)
    pu = torch.tensor([int(i) in punct for i in ids.tolist()], dtype=torch.bool)
    fr = torch.zeros(L, dtype=torch.bool)
    fr[torch.topk(acc.float().cpu(), min(n_frequent, L)).indices] = True
    lo = torch.zeros(L, dtype=torch.bool)
    lo[max(0, L - n_local):] = True
    m1 = sp
    m2 = m1 | pu
    m3 = m2 | fr
    m4 = m3 | lo
    return torch.stack([m1, m2, m3, m4, torch.ones(L, dtype=torch.bool)])


def recoveries(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """probs (rows, L) attention rows; masks (P, L). Mean over rows of the attention mass on each kept set."""
    return (probs.float().cpu() @ masks.float().T).mean(dim=0)


def choose(recov: torch.Tensor, threshold: float) -> int:
    """Index of the cheapest policy recovering ≥ threshold (the last one, full, always qualifies)."""
    for i, r in enumerate(recov.tolist()):
        if r >= threshold - 1e-6:
            return i
    return len(recov) - 1


@register_method("fastgen")
@dataclass
class FastGen(WindowQueries, Method):
    recovery: float | str = 0.95   # T; "auto" = the threshold calibrated for this budget by `kvbench profile`
    window: int = 32               # prompt queries whose attention is profiled
    local_ratio: float = 0.3       # no-budget sizes (fractions of the prompt)
    frequent_ratio: float = 0.3
    calib_samples: int = 4         # calibration (`recovery=auto`)
    calib_len: int = 1024
    profile_seed: int = 0
    profile_dir: str = "results/profiles"

    paper = "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs (2310.01801)"
    family = "per-head hybrid policy from prompt profiling (special/punct/frequent/local/full)"
    window_knob = "window"

    def __post_init__(self):
        super().__post_init__()
        if self.recovery != "auto" and (isinstance(self.recovery, bool) or not isinstance(self.recovery, (int, float))
                                        or not 0.0 < float(self.recovery) <= 1.0):
            raise ValueError(f"method.recovery={self.recovery!r}; allowed: a share in (0, 1] or auto")
        if self.recovery == "auto" and self.budget is None:
            raise ValueError("method.recovery=auto needs a budget (the threshold is calibrated per budget)")
        for k in ("window", "calib_samples", "calib_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"method.{k}={v!r}; allowed: a positive integer")
        for k in ("local_ratio", "frequent_ratio"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise ValueError(f"method.{k}={getattr(self, k)!r}; allowed: a share in [0, 1]")
        self._log: TokenLog | None = None
        self._classes: tuple[frozenset, frozenset] | None = None
        self._threshold: float | None = None if self.recovery == "auto" else float(self.recovery)
        self._record: list | None = None   # calibration: per head (recoveries, kept counts)
        self.chosen: dict[int, list[int]] = {}  # layer -> policy index per head (last sample)
        self._prefill = PrefillAttention()     # accumulated attention over the prefill's chunks

    def reset(self) -> None:
        super().reset()
        self._prefill.reset()

    def observe_prefill(self, ctx: LayerContext) -> None:
        super().observe_prefill(ctx)
        self._prefill.observe(ctx)

    def fork(self) -> "FastGen":
        import copy
        return copy.deepcopy(self, {id(self._log): self._log})  # forks share the one token log

    # -- wiring ---------------------------------------------------------------------------------------
    def attach(self, lm) -> None:
        """Record the prompt's token ids from every forward of the model (idempotent per model)."""
        if getattr(lm.model, "_kvbench_token_log", None) is None:
            log = TokenLog()
            lm.model.register_forward_pre_hook(log.hook, with_kwargs=True)
            lm.model._kvbench_token_log = log
        self._log = lm.model._kvbench_token_log
        self._classes = token_classes(lm.tokenizer)

    def prepare(self, lm, force: bool = False) -> tuple[dict | None, bool]:
        self.attach(lm)
        if self.recovery != "auto":
            return None, True
        entry, cached, _ = _profiles.get_or_create(lm, self.name, self.profile_knobs(), self.compute_profile,
                                                   self.profile_dir, force)
        self._threshold = float(entry["data"]["threshold"])
        return entry, cached

    def profile_knobs(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "window", "calib_samples", "calib_len", "profile_seed")}

    def compute_profile(self, lm) -> tuple[dict, int]:
        """Sweep T on calibration prompts: one prefill per prompt records every head's policy recoveries and
        costs, then each T of the grid is evaluated without another forward."""
        from kvbench.engine import Engine
        from kvbench.profile import calibration_prompts
        prompts = calibration_prompts(lm.tokenizer, self.calib_samples, self.calib_len, self.profile_seed)
        rec = self.fork()
        rec._record = []
        rec._threshold = 1.0
        engine = Engine(lm, rec)
        for ids in prompts:
            engine.prefill(engine.new_cache(), ids, rec, compress=True)
        sweep = []
        for t in T_GRID:
            kept = [float(c[choose(r, t)]) for r, c in rec._record]
            sweep.append({"threshold": t, "mean_kept": sum(kept) / len(kept)})
        ok = [s for s in sweep if s["mean_kept"] <= self.budget]
        best = max(ok, key=lambda s: s["threshold"]) if ok else sweep[0]
        return {"threshold": best["threshold"], "mean_kept": best["mean_kept"], "within_budget": bool(ok), "sweep": sweep,
                "calib_tokens": [len(p) for p in prompts]}, sum(len(p) for p in prompts)

    def summary(self, entry: dict) -> str:
        d = entry["data"]
        note = "" if d["within_budget"] else " (no T in the sweep fits the budget: lowest T taken)"
        return (f"budget {self.budget}: threshold T={d['threshold']} keeps {d['mean_kept']:.1f} tokens per head{note} "
                f"on average over {len(d['calib_tokens'])} calibration prompts of ~{max(d['calib_tokens'])} tokens")

    # -- compression --------------------------------------------------------------------------------
    def sizes(self, n: int) -> tuple[int, int]:
        """(heavy hitters, local window) of the hybrid policies for an n-token prompt."""
        if self.budget is None and self.compression_ratio is None:
            return int(round(self.frequent_ratio * n)), int(round(self.local_ratio * n))
        half = max(1, self.target(n) // 2)
        return half, half

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        if self._log is None or self._classes is None:
            raise ValueError("fastgen needs the prompt's token ids: call method.prepare(lm) before running")
        if self._threshold is None:
            raise ValueError("fastgen recovery=auto: call method.prepare(lm) to load the calibrated threshold")
        layer = ctx.layer
        keys, _, pos = layer.dense()
        L = keys.shape[1]
        ids = self._log.ids[pos[0].cpu()]
        w = min(self.window, L, ctx.query.shape[1])
        probs = window_attention(ctx.query, keys, w, ctx.scaling)          # (h, g, w, L)
        acc = self._prefill.take(ctx)[0]                                    # (h, L), every chunk
        n_freq, n_local = self.sizes(L)
        special, punct = self._classes
        keep, chosen = [], []
        for h in range(layer.n_heads):
            masks = policy_masks(ids, special, punct, acc[h], n_freq, n_local)
            rec = recoveries(probs[h].reshape(-1, L), masks)
            i = choose(rec, self._threshold)
            if self._record is not None:
                self._record.append((rec, masks.sum(dim=1)))
            chosen.append(i)
            keep.append(masks[i].nonzero().view(-1).to(keys.device))
        self.chosen[ctx.layer_idx] = chosen
        if any(k.numel() < L for k in keep):
            layer.keep(keep)
