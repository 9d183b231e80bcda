"""Random eviction — the "no information" baseline used throughout the KV-cache literature.

Every cached token gets a seeded uniform random score and each head keeps the top `budget`; the draw depends
only on (seed, layer, head, length), so a run is reproducible and heads/layers keep different tokens.
`seed=null` (the default) draws each sample's seed from the run's `seed` (the runner seeds every sample from
the run seed and the sample id), so a `seed=1,2,3` sweep gives three different random baselines; an explicit
`method.seed` keeps the same tokens whatever the run seed.
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
    seed: int | None = None

    paper = "baseline: uniformly random tokens (seeded)"
    family = "baseline"

    def reset(self) -> None:
        # the per-sample seed: torch's CPU generator is seeded by the runner from (run seed, sample id)
        self.sample_seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))

    def score(self, ctx: LayerContext) -> torch.Tensor:
        n = max(ctx.layer.head_lengths)
        seed = getattr(self, "sample_seed", None)
        if seed is None:  # used without reset() (direct calls)
            self.reset()
            seed = self.sample_seed
        return random_scores(seed, ctx.layer_idx, ctx.n_kv, n).to(ctx.layer.keys.device)
