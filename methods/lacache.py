"""LaCache — Shi et al., "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large
Language Models" (ICML 2025, 2507.14204).

Training-free and attention-free: beyond `n_sink` initial tokens, old tokens are compacted in a *ladder*:
the region is cut into groups of `before` consecutive tokens and layer i keeps only `after` of them, at an
offset that shifts with depth (i mod (before − after + 1)), so different layers remember different tokens
and the stack of layers together still covers the whole context. With `span` layers sharing a token and
`overlap` between spans: before = 1 + ceil((n_layers − span) / (span − overlap)),
after = min(ceil(span / (span − overlap)), before) (the official code's geometry).
Iterative compaction: a cursor walks over the old region; when it reaches the `recent` newest tokens it starts
over after the sinks and compacts the already-compacted tokens again, so older context becomes sparser. The
same rule runs during generation, one token per step, so a layer never holds more than its budget.
`decode_eviction` declares that rule for the GPU decode path (kvbench/fast_decode.py): the ladder depends
only on how many rows a layer holds, never on the data, so the ranks (in position order) of every step's
removals are scheduled on the host before decoding and the device removes the row of each rank inside its
CUDA graph; the cursor moves on once the decoder knows how many steps it took.
Simplification: the official code compacts whole ladders at once and may undershoot the budget; we stop at
exactly the budget (a partly compacted group resumes at the next step).
"""
import math
from dataclasses import dataclass, field

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, Method, register_method


def ladder_geometry(n_layers: int, span: int, overlap: int, layer_idx: int) -> tuple[int, int, list[int]]:
    """(before, after, droppable offsets inside a group) for one layer."""
    before = 1 + max(0, math.ceil((n_layers - span) / (span - overlap)))
    after = min(math.ceil(span / (span - overlap)), before)
    off = layer_idx % (before - after + 1)
    return before, after, [o for o in range(before) if not off <= o < off + after]


@register_method("lacache")
@dataclass
class LaCache(Method):
    span: int = 16
    overlap: int = 0
    n_sink: int = 4
    recent: int = 32
    state: dict = field(default_factory=dict, repr=False)  # layer -> [cursor rank, dropped in current group, cap]

    paper = "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling (2507.14204)"
    family = "eviction: ladder pattern across layers, decode-time compaction"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.overlap < self.span:
            raise ValueError(f"method.overlap={self.overlap!r}, method.span={self.span!r}; allowed: 0 <= overlap < span")

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "compression_ratio", "span", "overlap", "n_sink", "recent")}

    def reset(self) -> None:
        self.state = {}

    def _plan(self, layer_idx: int, n_layers: int, n_rows: int, excess: int) -> list[int]:
        """Ranks (in position order, before any of them is removed) of the next `excess` tokens to drop."""
        before, after, drop = ladder_geometry(n_layers, self.span, self.overlap, layer_idx)
        if not drop:
            raise ValueError(f"lacache: method.span={self.span} covers all {n_layers} layers, nothing to compact; "
                             f"allowed: span < n_layers")
        st = self.state.setdefault(layer_idx, [self.n_sink, 0, None])
        rows = list(range(n_rows))
        out: list[int] = []
        while excess > 0:
            cur, done = st[0], st[1]
            end = len(rows) - self.recent
            if cur + before - done > end:  # the cursor reached the recent tokens: start over after the sinks
                cur, done = self.n_sink, 0
                if cur + before > end:
                    raise ValueError(f"lacache: budget too small for n_sink={self.n_sink} + recent={self.recent} "
                                     f"+ one ladder group of {before}")
            if done:  # finish a partly compacted group one token at a time
                r = cur + drop[done] - done
                out.append(rows.pop(r))
                excess -= 1
                done += 1
                if done == len(drop):
                    cur, done = cur + after, 0
                st[0], st[1] = cur, done
                continue
            groups = min((end - cur) // before, math.ceil(excess / len(drop)))
            ranks = [cur + j * before + o for j in range(groups) for o in drop][:excess]
            gone = set(ranks)
            out.extend(rows[r] for r in ranks)
            rows = [x for i, x in enumerate(rows) if i not in gone]
            excess -= len(ranks)
            part = len(ranks) - (groups - 1) * len(drop)
            if part == len(drop):
                st[0], st[1] = cur + groups * after, 0
            else:
                st[0], st[1] = cur + (groups - 1) * after, part
        return out

    def compress_layer(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        L = layer.head_lengths[0]
        cap = self.target(L)
        self.state[ctx.layer_idx] = [self.n_sink, 0, cap]
        if cap >= L:
            return
        gone = set(self._plan(ctx.layer_idx, ctx.n_layers, L, L - cap))
        keep = torch.tensor([i for i in range(L) if i not in gone], dtype=torch.long, device=layer.keys.device)
        layer.keep(keep.expand(layer.n_heads, -1))  # positions are 0..L-1 in row order right after prefill

    def decode_eviction(self, cache) -> DecodeEviction:
        """`on_decode` for the device: every step removes the rows of the ranks `_plan` gives (a rank
        schedule: see kvbench.fast_decode.DecodeEviction)."""
        n_layers = len(cache.kv)
        caps = tuple(self.state[i][2] if i in self.state else None for i in range(n_layers))

        def schedule(layer_idx: int, rows: list[int], commit: bool) -> list[list[int]]:
            saved = list(self.state[layer_idx])
            cap = saved[2]
            out = [self._plan(layer_idx, n_layers, n, n - cap) if n > cap else [] for n in rows]
            if not commit:
                self.state[layer_idx] = saved  # _plan moved the cursor: put it back
            return out

        return DecodeEviction(caps=caps, rank="scheduled", schedule=schedule)

    def on_decode(self, ctx: LayerContext) -> None:
        st = self.state.get(ctx.layer_idx)
        if st is None or st[2] is None:
            return
        layer = ctx.layer
        n = layer.head_lengths[0]
        if n <= st[2]:
            return
        pos_sorted = torch.sort(layer.head(0)[2]).values.tolist()  # every head holds the same positions
        for r in self._plan(ctx.layer_idx, ctx.n_layers, n, n - st[2]):
            p = pos_sorted[r]  # _plan speaks in ranks of the position order before any removal
            for h in range(layer.n_heads):
                layer.remove(h, int((layer.head(h)[2] == p).nonzero()[0, 0]))
