"""ThinK — Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (ICLR 2025, arXiv 2407.21018).

ThinK prunes *channels* of the key cache, not tokens. For each head it scores every key channel c by how much
the observation window's queries interact with it: the paper's Score[c] = ||Q_win[:, c] K[:, c]^T||_F
= ||Q_win[:, c]|| * ||K[:, c]|| (Section 3.2), and keeps the top (1 - ratio) of the channels; the scored keys
are the layer's kept tokens after any token eviction (ThinK composes with SnapKV / H2O / PyramidKV). As the
official code (github.com/SalesforceAIResearch/ThinK, ThinK_flash/src/kv_pruning_utils.py,
`key_pruner_query_driven`, and llama_model.py / cache_utils.py) does:
- the window is the last 32 queries of the prefill (post-RoPE; `q_states[..., -32:, :]`), the channel score is
  mean_w(q^2) * mean_n(k^2) per channel (the same ranking as the paper's norm product) over all the kept keys;
- int(head_dim * ratio) channels are pruned (the lowest scores), head_dim - int(head_dim * ratio) kept;
- the most recent `recent_size` = 32 rows of the compressed cache keep their full keys (`--recent_size 32`),
  and every token appended later (the question, decoded tokens) is stored with its full key;
- values are not pruned; attention concatenates q[kept] . K_pruned^T with q . K_full^T before one softmax.

Storage format `think` (`method.storage=think`; e.g. `method=pyramidkv method.storage=think`) and method `think`
(every token kept, keys channel-pruned). Pruned channels are not stored: per KV head the kept keys (n, dk), the
kept channel indices (dk,) int16, the values (n, d), and the full rows (keys and values, d each).
Bytes stored = pruned keys + channel indices + values + full rows (positions are the engine's metadata, not
counted, as for every format). Decode on CUDA: methods/kernels/lowrank_decode.py (pruned rows at dk, full
rows at d, one softmax); elsewhere the torch reference over `materialize()` (pruned channels as zeros, which
scores exactly q[kept] . k_pruned).

What we simplified: the official flash code repeats the KV heads to the query heads (GQA) before pruning, so
each query head prunes its own copy of the keys; our cache is per KV head, so a KV head's channels are scored
with the window queries of all g query heads of its group stacked (||Q_group_win[:, c]|| * ||K[:, c]||), one
mask per KV head. The official window (32) and recent size (32) are fixed here as there (no knob for the
window; `recent_size` is one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerKV, long_tensor
from kvbench.method import Method, register_method
from kvbench.store import EncodedLayer, Storage, register_storage, tensor_bytes

QUERY_WINDOW = 32  # official: the last 32 queries (`q_states[..., -32:, :]`)


def check_knobs(ratio, recent_size, prefix: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{prefix}ratio={ratio!r}; allowed: 0 <= ratio < 1 (share of key channels pruned)")
    if isinstance(recent_size, bool) or not isinstance(recent_size, int) or recent_size < 0:
        raise ValueError(f"{prefix}recent_size={recent_size!r}; allowed: an integer >= 0 (recent rows kept "
                         "with full keys)")


def kept_count(head_dim: int, ratio: float) -> int:
    """Channels kept: the official code prunes int(head_dim * ratio)."""
    return head_dim - int(head_dim * ratio)


def channel_scores(q_win: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(d,) channel scores of one KV head: mean over the window queries of q^2 times mean over the keys of k^2
    (official `key_pruner_query_driven`); q_win (m, d) the window queries of the head's query group, keys (n, d)."""
    qn = q_win.float().pow(2).mean(dim=0)
    kn = keys.float().pow(2).mean(dim=0) if keys.shape[0] else torch.zeros_like(qn)
    return qn * kn


def kept_channels(q_win: torch.Tensor, keys: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The n_keep highest-scoring channels, ascending (ties: the lower channel)."""
    s = channel_scores(q_win, keys)
    order = torch.sort(s, descending=True, stable=True).indices[:n_keep]
    return torch.sort(order).values


class ThinKLayer(EncodedLayer):
    """A layer in ThinK's format. Per KV head h: `np_[h]` pruned rows (oldest first) whose keys hold only the
    channels `ch[h]` — heads back to back in `kp` (Np, dk), their values in `vp` (Np, d), positions `pp` —
    then the full rows (the recent window and every appended token) in `full`, a plain LayerKV (n_f, d)."""

    def __init__(self, kp, vp, pp, np_, ch, full: LayerKV):
        self.kp, self.vp, self.pp, self.np_, self.ch, self.full = kp, vp, pp, list(np_), ch, full
        self.ch_long = ch.long()
        self.p_starts, self.p_lens = long_tensor([_cumsum(self.np_), self.np_], kp.device)
        self.row_bytes = full.row_bytes  # new tokens are full rows

    @classmethod
    def encode(cls, fmt: "ThinK", layer: LayerKV, query: torch.Tensor | None) -> "ThinKLayer":
        if query is None:
            raise ValueError("think needs the prefill's last queries at encoding (Storage.query_window); "
                             "none were kept for this layer")
        if layer.log_weight() is not None:
            raise ValueError("think stores plain token rows; a method that merges rows (log-weights) does not "
                             "compose with it")
        d = layer.keys.shape[1]
        n_kv = layer.n_heads
        g = query.shape[0] // n_kv
        dk = kept_count(d, fmt.ratio)
        kp, vp, pp, np_, chs, fk, fv, fp, nf = [], [], [], [], [], [], [], [], []
        for h in range(n_kv):
            k, v, p = layer.head(h)
            ch = kept_channels(query[h * g:(h + 1) * g].reshape(-1, d), k, dk)
            n_p = max(0, k.shape[0] - fmt.recent_size)
            kp.append(k[:n_p].index_select(1, ch))
            vp.append(v[:n_p])
            pp.append(p[:n_p])
            np_.append(n_p)
            chs.append(ch)
            fk.append(k[n_p:])
            fv.append(v[n_p:])
            fp.append(p[n_p:])
            nf.append(k.shape[0] - n_p)
        full = LayerKV._packed(torch.cat(fk), torch.cat(fv), torch.cat(fp), nf)
        return cls(torch.cat(kp), torch.cat(vp), torch.cat(pp), np_, torch.stack(chs).to(torch.int16), full)

    # -- what the engine asks ----------------------------------------------------------------------------
    @property
    def head_lengths(self) -> list[int]:
        return [a + b for a, b in zip(self.np_, self.full.head_lengths)]

    @property
    def dk(self) -> int:
        return self.kp.shape[1]

    def nbytes(self) -> int:
        return tensor_bytes(self.kp, self.vp, self.ch) + self.full.nbytes()

    def allocated_bytes(self) -> int:
        return tensor_bytes(self.kp, self.vp, self.ch) + self.full.allocated_bytes()

    def attention_flops(self, extra_tokens: int, group: int) -> int:
        """QK^T at the kept width dk over the pruned rows and at d over the full ones; PV at d over all rows."""
        d = self.vp.shape[1]
        n_p, n_f = sum(self.np_), self.full.n_rows + extra_tokens * self.n_heads
        return 2 * group * (self.dk * n_p + d * n_f) + 2 * group * d * (n_p + n_f)

    def materialize(self) -> LayerKV:
        """Plain rows: a pruned key holds zeros in its pruned channels (so q . k = q[kept] . k_pruned)."""
        ks, vs, ps, counts = [], [], [], []
        a = 0
        d = self.vp.shape[1]
        for h, n_p in enumerate(self.np_):
            kz = self.kp.new_zeros(n_p, d)
            kz[:, self.ch_long[h]] = self.kp[a:a + n_p]
            fk, fv, fpos = self.full.head(h)
            ks += [kz, fk]
            vs += [self.vp[a:a + n_p], fv]
            ps += [self.pp[a:a + n_p], fpos]
            counts.append(n_p + fk.shape[0])
            a += n_p
        return LayerKV._packed(torch.cat(ks), torch.cat(vs), torch.cat(ps), counts)

    def parts(self) -> list[tuple]:
        """The two row groups for methods/kernels/lowrank_decode.py: pruned rows at dk, full rows at d."""
        f = self.full
        return [(self.kp, self.vp, self.p_starts, self.p_lens, self.ch),
                (f.keys, f.values, f.starts, f.lengths, None)]

    def attend(self, query, scaling, need_probs=False, window=None, softcap=None):
        """On CUDA (kvbench.attention.DECODE_KERNEL "auto"; "triton" also on the CPU interpreter), a decode step
        runs the lowrank_decode kernel over both row groups; otherwise the torch reference over materialize()."""
        from kvbench.attention import _decode_kernel
        if query.shape[1] == 1 and not need_probs and window is None and softcap is None \
                and _decode_kernel(query) == "triton":
            from kvbench.methods.kernels.lowrank_decode import lowrank_decode_attention_triton
            return lowrank_decode_attention_triton(query[:, 0], self.parts(), scaling).unsqueeze(1), None
        return super().attend(query, scaling, need_probs, window, softcap)

    # -- mutation ------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        before = self.nbytes()
        self.full.append(k, v, positions)  # official: new tokens keep their full keys
        self._changed(before)

    def reserve(self, extra: int) -> None:
        self.full.reserve(extra)

    # -- the GPU fast path (kvbench/store.py): new tokens are full rows, appended on the device ----------
    device_decode = True

    def device_begin(self, extra: int) -> None:
        self.full.reserve(extra)

    def device_step(self, q, k, v, pos, scaling):
        from kvbench.attention import _decode_kernel
        from kvbench.methods.kernels import append, lowrank_decode as lr
        triton = _decode_kernel(q) == "triton"
        f = self.full
        (append.ragged_append_triton if triton else append.ragged_append_ref)(
            k, v, pos, f.keys, f.values, f.positions, f.starts, f.lengths)
        return (lr.lowrank_decode_attention_triton if triton else lr.lowrank_decode_attention_ref)(
            q, self.parts(), scaling)

    def device_end(self) -> None:
        self.full._lens = self.full.lengths.tolist()

    def clone(self) -> "ThinKLayer":
        return ThinKLayer(self.kp.clone(), self.vp.clone(), self.pp.clone(), self.np_, self.ch.clone(),
                          self.full.clone())


def _cumsum(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        out.append(acc)
        acc += x
    return out


@register_storage("think")
@dataclass
class ThinK(Storage):
    ratio: float = 0.5        # share of key channels pruned (official: int(head_dim * ratio) channels)
    recent_size: int = 32     # most recent rows kept with full keys (official default 32)

    paper = "ThinK: Thinner Key Cache by Query-Driven Pruning (2407.21018)"
    query_window = QUERY_WINDOW

    def __post_init__(self):
        check_knobs(self.ratio, self.recent_size, "method.storage.")

    def encode(self, layer: LayerKV, layer_idx: int, n_layers: int, query=None) -> ThinKLayer:
        return ThinKLayer.encode(self, layer, query)


@register_method("think")
@dataclass
class ThinKMethod(Method):
    """Every token kept, keys channel-pruned by ThinK: `method=think method.ratio=0.4` is `method=full
    method.storage=think method.storage.ratio=0.4`."""
    ratio: float = 0.5
    recent_size: int = 32

    paper = ThinK.paper
    family = "channel pruning: query-driven key channels per head, recent window full"
    uses_budget = False

    def __post_init__(self):
        super().__post_init__()
        check_knobs(self.ratio, self.recent_size, "method.")
        self.storage = ThinK(self.ratio, self.recent_size)
