"""Random eviction — the "no information" baseline used throughout the KV-cache literature.

Every cached token gets a seeded uniform random score and each head keeps the top `budget`; the draw depends
only on (seed, layer, head, length), so a run is reproducible and heads/layers keep different tokens.
"""
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, ScoredEviction, register_method


def random_scores(seed: int, layer_idx: int, n_heads: int, length: int) -> torch.Tensor:
    """(n_heads, length) uniform scores from a generator seeded by (seed, layer) — CPU, so every device agrees."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer_idx)
    return torch.rand(n_heads, length, generator=g)


@register_method("random")
@dataclass
class RandomEviction(ScoredEviction):
    seed: int = 0

    paper = "baseline: uniformly random tokens (seeded)"
    family = "baseline"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        n = max(ctx.layer.head_lengths)
        return random_scores(self.seed, ctx.layer_idx, ctx.n_kv, n).to(ctx.layer.keys.device)
