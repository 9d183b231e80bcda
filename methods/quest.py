"""Quest — Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML 2024,
arXiv 2406.10774; official code github.com/mit-han-lab/Quest).

The whole cache is kept; what attention *reads* at each decode step is chosen per query. Each KV head's rows are
cut into pages of `page_size` consecutive rows (paper: 16 tokens) in row order, and each page keeps the
per-channel minimum m and maximum M of its keys (the page metadata). At a decode step, query head j scores each
page of its KV head by the upper bound of q . k over the page's keys, sum_c max(q_c * m_c, q_c * M_c) (paper,
Alg. 1; official kernel `max_possible += max(q * max, q * min)`, kernels/include/decode/decode_attn.cuh), and
attends only over the rows of its top pages. Following the official implementation (quest/utils/controller.py,
quest/utils/__init__.py, quest/models/llama.py):
- the page budget is `token_budget // page_size` pages *including the last page*, the one holding the newest
  tokens (the current token among them): the last page is always attended, is not scored, and the top
  (budget - 1) of the other pages by their bound are added (`decode_topk` with `page_budget - 1` over
  `kv_indices_without_last`); a head with no more pages than the budget attends to all of them (`need_estimate`);
- the first `skip_layers` = 2 layers are never sparse (`_quest_skip_layer = 2`: an unbounded page budget);
- prefill (and any step feeding several tokens) is dense attention; appended tokens extend the last page or
  open a new one, its bounds updated as the token is stored (`append_kv` updates the metadata cache);
- bounds are stored in the model's dtype (the official metadata cache has the KV cache's dtype); scores are
  accumulated in float32, as q+ . M + q- . m with q+ = max(q, 0), q- = min(q, 0) (the same sum; a Triton
  kernel on CUDA, methods/kernels/quest_decode.py `quest_page_scores`).
Selection is per query head (GQA: each head of a group picks its own pages; the official code is MHA).

Selector `quest` (`method.selector=quest`; composes with any method that compresses at prefill, e.g.
`method=snapkv method.selector=quest`: pages are then over each head's kept rows in row order) and method
`quest` (every token kept, Quest selection at decode).
Bytes stored = the plain rows + the bounds (2 * d values in the model's dtype per page per KV head). Bytes read
per decoded token (`read_bytes`), as the decode kernel reads them: in a layer with a sparse head, each query head
reads the K/V rows of its selected pages (a page two heads of a group both select counts twice; a head with no
more pages than the budget: all its rows, per query head) + the scoring reads the bounds of the scored pages
(all but the last, once per KV head); a dense layer (skipped, or short enough) reads each row once.
What we simplified: the official code keeps the KV cache and the bounds in a preallocated paged pool
(FlashInfer layout) and tops-k with a RAFT radix kernel; we keep the ragged per-head rows of kvbench.cache,
pages implicit in row order, the bounds in a padded (n_kv, pages, d) tensor, and top-k with torch.topk on the
device (no host sync). token_budget must be a multiple of page_size (the official code floors the division).
The official *evaluation* path (evaluation/quest_attention.py, a masked-attention simulation) differs in two
details we do not follow: at least 3 pages, and the newest page not forced; we follow the kernel path above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerKV, long_tensor
from kvbench.method import Method, register_method
from kvbench.store import EncodedLayer, Storage, register_storage, tensor_bytes


def n_pages(n_rows: int, page_size: int) -> int:
    return -(-n_rows // page_size)


def page_bounds(keys: torch.Tensor, page_size: int, n_cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) of each page of `page_size` consecutive rows of one head's keys (n, d):
    two (n_cap, d) tensors in the keys' dtype; pages past the last (up to n_cap) hold +inf / -inf (empty)."""
    n, d = keys.shape
    P = n_pages(n, page_size)
    n_cap = P if n_cap is None else n_cap
    lo = keys.new_full((n_cap * page_size, d), float("inf"))
    hi = keys.new_full((n_cap * page_size, d), float("-inf"))
    lo[:n], hi[:n] = keys, keys
    return lo.view(n_cap, page_size, d).amin(1), hi.view(n_cap, page_size, d).amax(1)


class QuestLayer(EncodedLayer):
    """A plain layer (every row kept, `self.layer`) plus per-page key bounds of each KV head: `kmin`/`kmax`
    (n_kv, cap, d), page p of head h covering its local rows p * page_size ... (p + 1) * page_size - 1; unused
    pages hold +inf / -inf. `active`: Quest applies at this layer (else its decode attention stays dense);
    `n_q`: the model's query heads (each selects its own pages)."""

    def __init__(self, fmt: "Quest", layer: LayerKV, kmin: torch.Tensor, kmax: torch.Tensor, active: bool, n_q: int):
        self.fmt, self.layer, self.kmin, self.kmax, self.active, self.n_q = fmt, layer, kmin, kmax, active, n_q
        self.layer.meter = None  # this store reports the bytes held (rows + bounds)
        self.row_bytes = layer.row_bytes

    @classmethod
    def encode(cls, fmt: "Quest", layer: LayerKV, active: bool, n_q: int) -> "QuestLayer":
        P = fmt.page_size
        cap = max(n_pages(n, P) for n in layer.head_lengths)
        bounds = [page_bounds(layer.head(h)[0], P, cap) for h in range(layer.n_heads)]
        return cls(fmt, layer, torch.stack([b[0] for b in bounds]), torch.stack([b[1] for b in bounds]), active,
                   n_q)

    # -- what the engine asks ----------------------------------------------------------------------------
    @property
    def head_lengths(self) -> list[int]:
        return self.layer.head_lengths

    def pages_per_head(self, extra: int = 0) -> list[int]:
        return [n_pages(n + extra, self.fmt.page_size) for n in self.layer.head_lengths]

    @property
    def bound_bytes(self) -> int:
        """Bytes of one page's bounds (min and max of each channel, the model's dtype)."""
        return 2 * self.kmin.shape[2] * self.kmin.element_size()

    def nbytes(self) -> int:
        return self.layer.nbytes() + sum(self.pages_per_head()) * self.bound_bytes

    def allocated_bytes(self) -> int:
        return self.layer.allocated_bytes() + tensor_bytes(self.kmin, self.kmax)

    def sparse_heads(self, extra: int = 0) -> list[bool]:
        """Which heads select pages at a decode step (more pages than the budget, at an active layer)."""
        B = self.fmt.page_budget
        return [self.active and p > B for p in self.pages_per_head(extra)]

    def read_bytes(self, extra_tokens: int = 0) -> int:
        """A decode step's reads with `extra_tokens` new rows per head (module docstring): a dense layer reads
        every row once; otherwise each query head reads its selected rows ((budget - 1) full pages + the last
        page); the scoring reads the bounds of every head's pages but the last (of the longest head, the
        bounds tensor's padded width); a dense head of a sparse layer goes through the page kernel too (all its
        pages, per query head)."""
        lens = [n + extra_tokens for n in self.layer.head_lengths]
        sparse = self.sparse_heads(extra_tokens)
        if not any(sparse):
            return sum(lens) * self.row_bytes
        P, B = self.fmt.page_size, self.fmt.page_budget
        g = self.n_q // self.n_heads
        total = self.n_heads * (max(n_pages(n, P) for n in lens) - 1) * self.bound_bytes
        for n, s in zip(lens, sparse):
            if s:
                last = n - (n_pages(n, P) - 1) * P
                total += g * ((B - 1) * P + last) * self.row_bytes
            else:
                total += g * n * self.row_bytes
        return total

    def attention_flops(self, extra_tokens: int, group: int) -> int:
        """Per query head: QK^T and PV over its selected rows (4 d per row), plus the page scoring (q*min and
        q*max per channel of every scored page: 4 d per page) on sparse heads; dense heads: every row."""
        d = self.layer.keys.shape[1]
        P, B = self.fmt.page_size, self.fmt.page_budget
        total = 0
        for n, s in zip([n + extra_tokens for n in self.layer.head_lengths], self.sparse_heads(extra_tokens)):
            if s:
                last = n - (n_pages(n, P) - 1) * P
                total += group * 4 * d * ((B - 1) * P + last + (n_pages(n, P) - 1))
            else:
                total += group * 4 * d * n
        return total

    def materialize(self) -> LayerKV:
        """The plain rows themselves (Quest stores them unchanged): read them, never change them."""
        return self.layer

    # -- selection and attention -------------------------------------------------------------------------
    def select(self, query: torch.Tensor) -> torch.Tensor:
        """Pages each query head attends to at this decode step: (n_q, budget) int32 local page indices,
        -1 for none, sorted. The last page of each head is always in; the rest are the top (budget - 1)
        by the upper bound among the head's other pages (all of them when there are no more than that)."""
        from kvbench.methods.kernels.quest_decode import quest_page_scores, quest_select_topk
        P, B = self.fmt.page_size, self.fmt.page_budget
        npg = [n_pages(n, P) for n in self.layer.head_lengths]
        n_kv, dev = len(npg), query.device
        top = max(npg) - 1                       # scored pages: all but each head's last
        k = min(B - 1, top)
        if len(set(npg)) == 1:
            last = torch.full((n_kv,), npg[0] - 1, device=dev, dtype=torch.long)
        else:
            last = long_tensor([p - 1 for p in npg], dev)
        # pages a head does not score (its last, past its end) come back -inf
        s = quest_page_scores(query, self.kmin[:, :top], self.kmax[:, :top], last) if k > 0 \
            else query.new_empty(query.shape[0], 0, dtype=torch.float32)
        return torch.sort(quest_select_topk(s, self.layer.lengths, P, k), dim=1).values

    def attend(self, query, scaling, need_probs=False, window=None, softcap=None):
        from kvbench.attention import attend
        if query.shape[1] != 1 or not any(self.sparse_heads()):
            return attend(query, self.layer, scaling, need_probs, window, softcap)  # prefill, dense layers
        if need_probs:
            raise ValueError("quest selects pages at decode; a method that needs the decode step's attention "
                             "probabilities does not compose with it")
        from kvbench.methods.kernels.quest_decode import quest_decode_attention
        L = self.layer
        q_pos = None
        if window is not None:  # the new token is every head's last row
            q_pos = L.positions.index_select(0, L.starts[:1] + L.lengths[:1] - 1)
        out = quest_decode_attention(query[:, 0], L.keys, L.values, L.starts, L.lengths, self.select(query[:, 0]),
                                     self.fmt.page_size, scaling, softcap=softcap, window=window,
                                     positions=L.positions, q_pos=q_pos, log_weight=L.log_weight())
        return out.unsqueeze(1), None

    # -- mutation ------------------------------------------------------------------------------------
    def _grow(self, pages: int) -> None:
        """Room for `pages` pages per head in the bounds (new pages empty: +inf / -inf)."""
        n_kv, cap, d = self.kmin.shape
        if pages > cap:
            extra = max(pages, cap + cap // 4) - cap
            self.kmin = torch.cat([self.kmin, self.kmin.new_full((n_kv, extra, d), float("inf"))], 1)
            self.kmax = torch.cat([self.kmax, self.kmax.new_full((n_kv, extra, d), float("-inf"))], 1)

    def reserve(self, extra: int) -> None:
        self.layer.reserve(extra)
        self._grow(max(self.pages_per_head(extra)))

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v (n_kv, q, d): row i of head h lands at local row n_h + i, i.e. page (n_h + i) // page_size,
        whose bounds take it in (a new page starts empty, so its first row sets them)."""
        from kvbench.methods.kernels.quest_decode import take_into_bounds
        before = self.nbytes()
        q = k.shape[1]
        rows = long_tensor([[n + i for i in range(q)] for n in self.layer.head_lengths], self.kmin.device)
        self._grow(max(self.pages_per_head(q)))
        self.layer.append(k, v, positions)
        take_into_bounds(self.kmin, self.kmax, rows, k, self.fmt.page_size)
        self._changed(before)

    # -- the GPU fast path (kvbench/store.py): bounds, append and selection on the device ---------------
    device_decode = True

    def device_begin(self, extra: int) -> None:
        self.reserve(extra)
        # which attention each step takes, fixed for the whole decode (a graph replays one): dense while no
        # head can outgrow the budget during these steps, else the page kernel, which reads every page of a
        # head under budget, as `select` does
        self._device_sparse = any(self.sparse_heads(extra))

    def device_step(self, q, k, v, pos, scaling):
        """`append` then `attend` on the device: the row and its page's bounds in one launch, the scores of every
        page but each head's last over the reserved pages (those past a head's last score -inf and come back -1,
        as pages past `top` do in `select`), the top (budget - 1) of them and the last page in one launch, then
        the page kernel (Triton on CUDA; the torch references elsewhere)."""
        from kvbench.methods.kernels import quest_decode as qd
        from kvbench.methods.kernels.ragged_decode import ragged_decode_attention
        L, P = self.layer, self.fmt.page_size
        cap = self.kmin.shape[1]
        triton = qd.use_triton(L.keys)
        (qd.quest_append_triton if triton else qd.quest_append_ref)(k, v, pos, L, self.kmin, self.kmax, P)
        if not self._device_sparse:
            return ragged_decode_attention(q, L.keys, L.values, L.starts, L.lengths, scaling,
                                           log_weight=L.log_weight())
        top = min(self.fmt.page_budget - 1, cap - 1)
        if triton:
            scores = qd.quest_page_scores_triton(q, self.kmin[:, :cap - 1], self.kmax[:, :cap - 1], L.lengths,
                                                 page_size=P)
            pages = qd.quest_select_triton(scores, L.lengths, P, top)
        else:
            last = torch.div(L.lengths - 1, P, rounding_mode="floor")
            scores = qd.quest_page_scores_ref(q, self.kmin[:, :cap - 1], self.kmax[:, :cap - 1], last)
            pages = qd.quest_select_ref(scores, L.lengths, P, top)
        return qd.quest_decode_attention(q, L.keys, L.values, L.starts, L.lengths, pages, P, scaling,
                                         log_weight=L.log_weight())

    def device_end(self) -> None:
        self.layer._lens = self.layer.lengths.tolist()

    def nbytes_after(self, t: int) -> int:
        pages = sum(n_pages(n + t, self.fmt.page_size) for n in self.layer.head_lengths)
        return self.layer.nbytes() + t * self.n_heads * self.row_bytes + pages * self.bound_bytes

    def clone(self) -> "QuestLayer":
        return QuestLayer(self.fmt, self.layer.clone(), self.kmin.clone(), self.kmax.clone(), self.active, self.n_q)


def check_knobs(page_size, token_budget, skip_layers, prefix: str) -> None:
    def pos_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0
    if not pos_int(page_size):
        raise ValueError(f"{prefix}page_size={page_size!r}; allowed: a positive integer (paper: 16)")
    if not pos_int(token_budget) or token_budget % page_size:
        raise ValueError(f"{prefix}token_budget={token_budget!r}; allowed: a positive multiple of page_size "
                         f"({page_size}), e.g. 256, 1024")
    if not isinstance(skip_layers, int) or isinstance(skip_layers, bool) or skip_layers < 0:
        raise ValueError(f"{prefix}skip_layers={skip_layers!r}; allowed: an integer >= 0 (paper: 2)")


@register_storage("quest")
@dataclass
class Quest(Storage):
    page_size: int = 16        # tokens per page (paper: 16)
    token_budget: int = 1024   # tokens attended per query head at a decode step, the newest page included
    skip_layers: int = 2       # the first layers keep dense decode attention (official code: 2)

    kind = "selector"
    query_window = 1           # encode() learns the model's query heads from the prefill's last query
    paper = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (2406.10774)"

    def __post_init__(self):
        check_knobs(self.page_size, self.token_budget, self.skip_layers, "method.selector.")

    @property
    def page_budget(self) -> int:
        return self.token_budget // self.page_size

    def encode(self, layer: LayerKV, layer_idx: int, n_layers: int, query=None) -> QuestLayer:
        if query is None:
            raise ValueError("quest encodes a layer with its prefill's last query (the query heads' count)")
        return QuestLayer.encode(self, layer, layer_idx >= self.skip_layers, query.shape[0])


@register_method("quest")
@dataclass
class QuestMethod(Method):
    """Every token kept, Quest page selection at decode: `method=quest method.token_budget=256` is `method=full
    method.selector=quest method.selector.token_budget=256`."""
    page_size: int = 16
    token_budget: int = 1024
    skip_layers: int = 2

    paper = Quest.paper
    family = "dynamic selection: query-aware top-k pages by per-channel key bounds"
    uses_budget = False

    def __post_init__(self):
        super().__post_init__()
        check_knobs(self.page_size, self.token_budget, self.skip_layers, "method.")
        self.selector = Quest(self.page_size, self.token_budget, self.skip_layers)
