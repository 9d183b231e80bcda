"""RazorAttention — Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"
(ICLR 2025, 2407.15891).

Offline, each head is scored on sequences of random tokens repeated twice: for a query in the second copy,
its *echo* score is the attention it pays to the previous occurrence of its own token, its *induction* score
the attention to the token that followed that occurrence (averaged over the second copy's queries). The
heads with the top induction scores and the top echo scores are retrieval heads and keep their full cache.
Every other head keeps its first `n_sink` tokens and a recent window, and the dropped tokens are folded into
one *compensation token* (the mean of their keys and the mean of their values) stored as an extra row.

What we simplified:
- Scores are per KV head: the cache is per KV head, so a KV head is protected when any query head of its
  group is (max over the group).
- The compensation token is weighted by the number of tokens it replaces inside the softmax (the paper's
  equation 5): its row carries log(count) as `log_weight` side data, which attention adds to its logit (torch
  path and Triton kernel).
- Protection shares: `induction_frac=0.14` and `echo_frac=0.01` of all KV heads (at least one of each),
  about 15% of heads protected; `probe_len=256` random tokens per copy, `probe_samples=4` sequences.
- Non-retrieval heads are compressed once, after prefill; generated tokens are all kept.

Budget rule: as DuoAttention's — retrieval heads keep all n tokens, every other head keeps
s = ⌊(N·budget − R·n)/(N − R)⌋ rows *including* its compensation row (so stored rows average to the budget),
of which `n_sink` are sinks (fewer when s is tiny), 1 is the compensation token and the rest are the most
recent tokens. Where the protected heads would leave the others fewer than `min_stream_frac`·budget rows,
protected heads are demoted, lowest max(induction, echo) score first, until that floor holds
(`min_stream_frac=0`: never demote; s falls to 3 — sink, compensation, newest token — and the mean may exceed
the budget). Without a budget or ratio, non-retrieval
heads keep `n_sink + recent_size` tokens plus the compensation row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.method import LayerContext, Method, register_method

from . import _profiles

_RESOLVED: dict[str, dict] = {}


def echo_induction_scores(probs: torch.Tensor, query_pos: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs: (heads, rows, L) attention of queries at positions `query_pos` (rows,) of a sequence whose
    tokens repeat with `period` (token at p == token at p - period). Returns per-head (echo, induction):
    the mean attention to position p - period and to p - period + 1."""
    prev = query_pos - period
    rows = torch.arange(query_pos.numel(), device=probs.device)
    echo = probs[:, rows, prev].mean(dim=1)
    induction = probs[:, rows, prev + 1].mean(dim=1)
    return echo, induction


def probe_attention(scores: dict, period: int):
    """Attention function that computes the exact output (SDPA) and, for the queries in the second copy,
    the softmax probabilities → accumulates echo/induction scores per query head into `scores`."""
    def fn(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        _, n_q, q_len, d = query.shape
        n_kv, k_len = key.shape[1], key.shape[2]
        g = n_q // n_kv
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=g > 1)
        qpos = torch.arange(period, q_len, device=query.device)
        k = key[0].repeat_interleave(g, dim=0).float()                    # (n_q, L, d)
        logits = (query[0, :, period:].float() @ k.transpose(1, 2)) * scaling
        kpos = torch.arange(k_len, device=query.device)
        logits = logits.masked_fill(kpos.view(1, 1, -1) > qpos.view(1, -1, 1), float("-inf"))
        echo, ind = echo_induction_scores(torch.softmax(logits, dim=-1), qpos, period)
        acc = scores.setdefault(module.layer_idx, [torch.zeros(n_q), torch.zeros(n_q), 0])
        acc[0] += echo.cpu()
        acc[1] += ind.cpu()
        acc[2] += 1
        return out.transpose(1, 2).contiguous(), None
    return fn


def random_repeats(tokenizer, period: int, samples: int, seed: int) -> list[list[int]]:
    """`samples` sequences of `period` distinct random non-special tokens, each repeated twice."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        block = [vocab[i] for i in torch.randperm(len(vocab), generator=gen)[:period].tolist()]
        out.append(block + block)
    return out


def head_scores(model, sequences: list[list[int]], period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(echo, induction), each (n_layers, n_q), averaged over the sequences."""
    scores: dict = {}
    dev = next(model.parameters()).device
    with torch.no_grad(), _profiles.attention_override(model, probe_attention(scores, period)):
        for ids in sequences:
            model.get_decoder()(input_ids=torch.tensor([ids], device=dev), use_cache=False)
    layers = sorted(scores)
    echo = torch.stack([scores[i][0] / scores[i][2] for i in layers])
    ind = torch.stack([scores[i][1] / scores[i][2] for i in layers])
    return echo, ind


@register_method("razorattention")
@dataclass
class RazorAttention(Method):
    induction_frac: float = 0.14   # share of KV heads protected for their induction score
    echo_frac: float = 0.01        # share protected for their echo score
    min_stream_frac: float = 0.5  # with a budget: other heads keep at least this share of it (see docstring)
    n_sink: int = 4
    recent_size: int = 256         # no-budget setting: recent tokens of non-retrieval heads
    probe_len: int = 256           # random tokens per copy
    probe_samples: int = 4
    profile_seed: int = 0
    profile_dir: str = "results/profiles"

    paper = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (2407.15891)"
    family = "allocator: retrieval heads (echo/induction) full, others window + compensation token"

    def __post_init__(self):
        super().__post_init__()
        for k in ("induction_frac", "echo_frac", "min_stream_frac"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise ValueError(f"method.{k}={getattr(self, k)!r}; allowed: a share in [0, 1]")
        for k in ("n_sink", "recent_size", "probe_len", "probe_samples"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "n_sink" else 1):
                raise ValueError(f"method.{k}={v!r}; allowed: a positive integer")
        self._entry: dict | None = None

    # -- the profile --------------------------------------------------------------------------------
    def profile_knobs(self) -> dict:
        return {"probe_len": self.probe_len, "probe_samples": self.probe_samples, "profile_seed": self.profile_seed}

    def compute_profile(self, lm) -> tuple[dict, int]:
        seqs = random_repeats(lm.tokenizer, self.probe_len, self.probe_samples, self.profile_seed)
        echo, ind = head_scores(lm.model, seqs, self.probe_len)
        n_kv = getattr(lm.model.config, "num_key_value_heads", None) or lm.model.config.num_attention_heads
        return {"echo": echo.tolist(), "induction": ind.tolist(), "n_kv": int(n_kv)}, sum(len(s) for s in seqs)

    def prepare(self, lm, force: bool = False) -> tuple[dict, bool]:
        entry, cached, _ = _profiles.get_or_create(lm, self.name, self.profile_knobs(), self.compute_profile,
                                                   self.profile_dir, force)
        self._entry = entry
        return entry, cached

    def kv_scores(self, entry: dict, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (layer, KV head): the max over its query heads."""
        echo, ind = torch.tensor(entry["data"]["echo"]), torch.tensor(entry["data"]["induction"])
        L, n_q = echo.shape
        return (echo.view(L, n_kv, n_q // n_kv).amax(-1), ind.view(L, n_kv, n_q // n_kv).amax(-1))

    def retrieval_mask(self, entry: dict, n_kv: int) -> torch.Tensor:
        echo, ind = self.kv_scores(entry, n_kv)
        N = echo.numel()
        n_ind = math.ceil(self.induction_frac * N) if self.induction_frac > 0 else 0
        n_echo = math.ceil(self.echo_frac * N) if self.echo_frac > 0 else 0
        return _profiles.top_heads(ind, n_ind) | _profiles.top_heads(echo, n_echo)

    def summary(self, entry: dict) -> str:
        n_kv = int(entry["data"]["n_kv"])
        echo, ind = self.kv_scores(entry, n_kv)
        r = self.retrieval_mask(entry, n_kv)
        return (f"{echo.numel()} KV heads; induction max {ind.max():.3f} mean {ind.mean():.3f}, echo max "
                f"{echo.max():.3f} mean {echo.mean():.3f}; {int(r.sum())} protected heads")

    def _resolve(self, ctx: LayerContext) -> dict:
        if self._entry is None:
            if ctx.layer_idx != 0:
                raise ValueError("razorattention: profile not resolved before layer 0 (call method.prepare(lm))")
            fp = _profiles.fingerprint(ctx.module.config, ctx.module)
            key = _profiles.entry_key(self.name, self.profile_knobs(), fp)
            if key not in _RESOLVED:
                _RESOLVED[key] = _profiles.lookup_from_module(self.name, self.profile_knobs(), ctx.module,
                                                             self.profile_dir)
            self._entry = _RESOLVED[key]
        return self._entry

    # -- compression --------------------------------------------------------------------------------
    def plan(self, n: int, retrieval: torch.Tensor) -> tuple[int, int]:
        """(rows kept per non-retrieval head incl. the compensation row, of which sinks)."""
        if self.budget is None and self.compression_ratio is None:
            s = min(n, self.n_sink + self.recent_size) + 1
        else:
            s = _profiles.streaming_length(n, retrieval.numel(), int(retrieval.sum()), self.target(n), 3)
        sinks = min(self.n_sink, max(0, s - 2))
        return s, sinks

    def compress_layer(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        lens = layer.head_lengths
        n = max(lens)
        entry = self._resolve(ctx)
        retrieval = self.retrieval_mask(entry, layer.n_heads)
        if (self.budget is not None or self.compression_ratio is not None) and self.min_stream_frac > 0:
            t = self.target(n)
            echo, ind = self.kv_scores(entry, layer.n_heads)
            retrieval = _profiles.fit_retrieval(torch.maximum(echo, ind), retrieval, n, t,
                                                max(3, int(self.min_stream_frac * t)))
        s, sinks = self.plan(n, retrieval)
        retrieval = retrieval[ctx.layer_idx]
        dev = layer.keys.device
        keep, comp_k, comp_v, has_comp = [], [], [], []
        for h, L in enumerate(lens):
            k, v, _ = layer.head(h)
            recent = s - sinks - 1
            if bool(retrieval[h]) or sinks + recent >= L:  # nothing to drop
                keep.append(torch.arange(L, device=dev))
                comp_k.append(torch.zeros_like(k[0]))
                comp_v.append(torch.zeros_like(v[0]))
                has_comp.append(False)
                continue
            idx = _profiles.sink_recent_indices(L, sinks, recent, dev)
            dropped = torch.ones(L, dtype=torch.bool, device=dev)
            dropped[idx] = False
            keep.append(idx)
            comp_k.append(k[dropped].float().mean(0).to(k.dtype))
            comp_v.append(v[dropped].float().mean(0).to(v.dtype))
            has_comp.append(True)
        if not any(has_comp):
            return
        # keep → append one row to every head → drop it again where no compensation is needed → repack
        # tightly (keep() leaves no spare capacity, so the stored bytes are exactly the kept rows).
        layer.keep(keep)
        pos = torch.full((1,), -1, dtype=torch.long, device=dev)  # -1: not a real position
        layer.append(torch.stack(comp_k).unsqueeze(1), torch.stack(comp_v).unsqueeze(1), pos)
        layer.keep([torch.arange(L if c else L - 1, device=dev) for L, c in zip(layer.head_lengths, has_comp)])
        # the paper's equation 5: the compensation token enters the softmax with the weight of the tokens it
        # summarises, a log-count bias on its logit (row-aligned side data that attention adds)
        layer.set_side("log_weight", [
            F.pad(torch.zeros(L - 1, device=dev), (0, 1), value=math.log(n - (L - 1))) if c else torch.zeros(L, device=dev)
            for L, n, c in zip(layer.head_lengths, lens, has_comp)])
