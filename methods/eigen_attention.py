"""Eigen Attention — Saxena et al., "Eigen Attention: Attention in Low-Rank Space for KV Cache Compression"
(EMNLP Findings 2024, arXiv 2408.05646).

Offline, on calibration text, the keys and values each layer produces are collected into representation
matrices; their principal directions (SVD, no mean-centering: the left singular vectors of R^T, i.e. the
eigenvectors of R^T R) form orthonormal bases, and the top r of them project keys and values to rank r. Keys and
values are cached at rank r (K P_k, V P_v) and attention runs in that space: scores (q P_k) . (K P_k)^T, output
(p @ V P_v) P_v^T (the paper folds P_v^T into the output projection). As the official code
(github.com/UtkarshSaxena1/EigenAttn, decompose/eigen_attn_utils.py, models/decompose_modules.py) does for Llama:
- one key basis per layer, shared by all KV heads (`generate_basis_vectors_per_layer`: every head's keys stacked
  into one matrix), one value basis per KV head (`generate_basis_vectors_per_head`);
- the bases come from the unmodified model's activations, layer by layer;
- calibration: 128 samples of 2048 tokens (wikitext2) in the paper's runs.

Storage format `eigen_attention` (`method.storage=eigen_attention`, composes with any method that compresses at
prefill) and method `eigen_attention` (every token kept, stored at rank `rank`). New tokens (the question,
decoded tokens) are projected as they are appended. The bases are computed once per model and cached like the
head profiles (`kvbench profile method=eigen_attention`, or on first use; methods/_profiles.py stores them in a
.pt file beside the profile JSON); a rank reuses the full sorted basis, so changing `rank` never recomputes.
Bytes stored = the rank-r keys and values (N * r * 2 * dtype bytes per layer); the bases are per-model
constants, like weights (the paper folds them into W_k, W_v, W_o), and are not counted.
Decode on CUDA: methods/kernels/lowrank_decode.py at DK = DV = r; elsewhere the exact torch attention over the
projected rows (kvbench.attention.attend), then lifted by P_v^T.

What we simplified / changed:
- RoPE: the official Llama path caches *pre-RoPE* keys at rank r and, at every step, lifts them back to the head
  dim and rotates them (scores at full dimension). kvbench's cache holds post-RoPE keys and this format attends
  at the reduced dimension, so our key basis is calibrated on post-RoPE keys (the paper's non-RoPE formulation
  applied to the rotated keys) and scores are computed at rank r.
- Rank: one `rank` for keys and values in every layer, instead of the paper's per-layer rank found by lowering an
  SVD energy threshold until the layer's output error reaches a budget.
- Calibration text: the haystack essays kvbench ships offline (`kvbench.profile.calibration_prompts`), every
  token of every sample stacked (the official code averages activations over groups of `avg_dim` samples first);
  `calib_samples` = 16 by default (the paper: 128) to keep a CPU calibration short.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.cache import LayerKV
from kvbench.method import Method, register_method
from kvbench.store import EncodedLayer, Storage, register_storage

from . import _profiles

BASIS_VERSION = "post-rope keys, uncentered; keys per layer, values per KV head"


def check_knobs(k: dict, prefix: str) -> None:
    for name in ("rank", "calib_samples", "calib_len"):
        v = k[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{prefix}{name}={v!r}; allowed: a positive integer")


def principal_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of a (..., d, d) Gram matrix R^T R, columns sorted by decreasing eigenvalue (= the left
    singular vectors of R^T, as the paper's SVD), and the eigenvalues (= squared singular values)."""
    evals, evecs = torch.linalg.eigh(gram.double())
    return evecs.flip(-1), evals.flip(-1).clamp_min(0)


def calibrate(model, prompts: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Run the unmodified model over the calibration prompts, accumulating per layer the Gram matrix of every
    KV head's post-RoPE keys stacked (shared key basis) and per KV head that of its values; returns the bases
    and eigenvalues: key_basis (L, d, d), key_eigvals (L, d), value_basis (L, n_kv, d, d), value_eigvals."""
    gk: dict[int, torch.Tensor] = {}
    gv: dict[int, torch.Tensor] = {}

    def fn(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        g = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=g > 1)
        k, v = key[0].double(), value[0].double()  # (n_kv, L, d), keys post-RoPE as the cache holds them
        i = module.layer_idx
        gk[i] = gk.get(i, 0) + torch.einsum("hld,hle->de", k, k)
        gv[i] = gv.get(i, 0) + torch.einsum("hld,hle->hde", v, v)
        return out.transpose(1, 2).contiguous(), None

    with _profiles.attention_override(model, fn), torch.inference_mode():
        for ids in prompts:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    layers = sorted(gk)
    kb, ke = principal_basis(torch.stack([gk[i].cpu() for i in layers]))
    vb, ve = principal_basis(torch.stack([gv[i].cpu() for i in layers]))
    return {"key_basis": kb.float(), "key_eigvals": ke.float(), "value_basis": vb.float(), "value_eigvals": ve.float()}


class EigenLayer(EncodedLayer):
    """A layer at rank r: `rows` a plain LayerKV of projected keys K P_k (n, r) and values V_h P_v[h] (n, r);
    pk (d, r) the layer's key basis, pv (n_kv, d, r) its value bases (float32, on the cache's device)."""

    def __init__(self, rows: LayerKV, pk: torch.Tensor, pv: torch.Tensor):
        self.rows, self.pk, self.pv = rows, pk, pv
        self.row_bytes = rows.row_bytes  # new tokens are projected on append

    def _project(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (n_kv, q, d) -> (n_kv, q, r) each, in the cache's dtype (the device step's products:
        methods/kernels/lowrank_decode.py `matvec_ref`)."""
        from kvbench.methods.kernels.lowrank_decode import matvec_ref
        n_kv, q, d = k.shape
        dt = self.rows.keys.dtype
        return (matvec_ref(k.reshape(-1, d), self.pk.unsqueeze(0), False, dt).view(n_kv, q, -1),
                matvec_ref(v.reshape(-1, d), self.pv, False, dt).view(n_kv, q, -1))

    @classmethod
    def encode(cls, layer: LayerKV, pk: torch.Tensor, pv: torch.Tensor) -> "EigenLayer":
        if layer.log_weight() is not None:
            raise ValueError("eigen_attention stores plain token rows; a method that merges rows (log-weights) "
                             "does not compose with it")
        dt = layer.keys.dtype
        ks, vs, ps = [], [], []
        for h in range(layer.n_heads):
            k, v, p = layer.head(h)
            ks.append((k.float() @ pk).to(dt))
            vs.append((v.float() @ pv[h]).to(dt))
            ps.append(p)
        rows = LayerKV._packed(torch.cat(ks), torch.cat(vs), torch.cat(ps), layer.head_lengths)
        return cls(rows, pk, pv)

    # -- what the engine asks ----------------------------------------------------------------------------
    @property
    def head_lengths(self) -> list[int]:
        return self.rows.head_lengths

    @property
    def rank(self) -> int:
        return self.pk.shape[1]

    def nbytes(self) -> int:
        return self.rows.nbytes()

    def allocated_bytes(self) -> int:
        return self.rows.allocated_bytes()

    def attention_flops(self, extra_tokens: int, group: int) -> int:
        """Attention at rank r over every row (4 r per row per query head), plus projecting each query head's
        query (q P_k: 2 d r) and lifting its output ((p V P_v) P_v^T: 2 r d)."""
        d, r = self.pk.shape
        n_q = group * self.n_heads
        return 4 * r * group * (self.rows.n_rows + extra_tokens * self.n_heads) + n_q * 4 * d * r

    def materialize(self) -> LayerKV:
        """Reconstructed plain rows: K P_k P_k^T and V P_v P_v^T (attention over them equals attention in the
        low-rank space: q . K P P^T = (q P) . (K P)^T)."""
        ks, vs, ps = [], [], []
        dt = self.rows.keys.dtype
        for h in range(self.rows.n_heads):
            k, v, p = self.rows.head(h)
            ks.append((k.float() @ self.pk.T).to(dt))
            vs.append((v.float() @ self.pv[h].T).to(dt))
            ps.append(p)
        return LayerKV._packed(torch.cat(ks), torch.cat(vs), torch.cat(ps), self.head_lengths)

    def attend(self, query, scaling, need_probs=False, window=None, softcap=None):
        """Attention in the rank-r space: scores (q P_k) . (K P_k)^T, output (p @ V P_v) P_v^T."""
        from kvbench.attention import _decode_kernel, attend
        from kvbench.methods.kernels.lowrank_decode import lowrank_decode_attention_triton, matvec_ref
        n_q, q_len, d = query.shape
        qp = matvec_ref(query.reshape(-1, d), self.pk.unsqueeze(0), False, self.rows.keys.dtype).view(n_q, q_len, -1)
        if q_len == 1 and not need_probs and window is None and softcap is None and _decode_kernel(query) == "triton":
            # CUDA (DECODE_KERNEL "auto"; "triton" also on the CPU interpreter): the lowrank_decode kernel at rank r
            r = self.rows
            out_r = lowrank_decode_attention_triton(qp[:, 0], [(r.keys, r.values, r.starts, r.lengths, None)],
                                                    scaling).unsqueeze(1)
            return self._lift(out_r).to(query.dtype), None
        out_r, probs = attend(qp, self.rows, scaling, need_probs, window, softcap)
        return self._lift(out_r).to(query.dtype), probs

    def _lift(self, out_r: torch.Tensor) -> torch.Tensor:
        """(n_q, q, r) -> (n_q, q, d) float32: each query head's output times its KV head's P_v^T."""
        from kvbench.methods.kernels.lowrank_decode import matvec_ref
        n_q, q_len, r = out_r.shape
        return matvec_ref(out_r.reshape(-1, r), self.pv, True, torch.float32).view(n_q, q_len, -1)

    # -- mutation ------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        before = self.nbytes()
        kp, vp = self._project(k, v)
        self.rows.append(kp, vp, positions)
        self._changed(before)

    def reserve(self, extra: int) -> None:
        self.rows.reserve(extra)

    # -- the GPU fast path (kvbench/store.py): the token projected, appended and attended at rank r -------
    device_decode = True

    def device_begin(self, extra: int) -> None:
        self.rows.reserve(extra)

    def device_step(self, q, k, v, pos, scaling):
        from kvbench.attention import _decode_kernel
        from kvbench.methods.kernels import lowrank_decode as lr
        triton = _decode_kernel(q) == "triton"
        r = self.rows
        (lr.project_append_triton if triton else lr.project_append_ref)(k, v, pos, self.pk, self.pv, r)
        matvec = lr.matvec_triton if triton else lr.matvec_ref  # q P_k, then the lift out P_v^T: a launch each
        qp = matvec(q, self.pk.unsqueeze(0), False, r.keys.dtype)
        attend = lr.lowrank_decode_attention_triton if triton else lr.lowrank_decode_attention_ref
        out_r = attend(qp, [(r.keys, r.values, r.starts, r.lengths, None)], scaling)
        return matvec(out_r, self.pv, True, q.dtype)

    def device_end(self) -> None:
        self.rows._lens = self.rows.lengths.tolist()

    def clone(self) -> "EigenLayer":
        return EigenLayer(self.rows.clone(), self.pk, self.pv)  # the bases are per-model constants: shared


@register_storage("eigen_attention")
@dataclass
class EigenAttention(Storage):
    rank: int = 48                       # dimensions kept of keys and of values (<= head_dim)
    calib_samples: int = 16              # calibration stretches of text (paper: 128)
    calib_len: int = 2048                # tokens each (paper: 2048; capped at the model's context)
    calib_seed: int = 0
    profile_dir: str = "results/profiles"

    paper = "Eigen Attention: Attention in Low-Rank Space for KV Cache Compression (2408.05646)"

    def __post_init__(self):
        check_knobs(vars(self), "method.storage.")
        self._bases: dict[str, torch.Tensor] | None = None
        self._fp: str | None = None
        self._dev: dict = {}

    def __deepcopy__(self, memo):
        return self  # knobs and per-model bases, never per-sample state: forks of a method share them

    # -- calibration (computed once per model, cached as a profile) --------------------------------
    def profile_knobs(self, max_context: int | None = None) -> dict:
        n = self.calib_len if max_context is None else min(self.calib_len, int(max_context))
        return {"calib_samples": self.calib_samples, "calib_len": n, "calib_seed": self.calib_seed,
                "basis": BASIS_VERSION}

    def prepare(self, lm, force: bool = False) -> tuple[dict, bool]:
        """Load this model's bases from the profile cache, or compute and store them."""
        fp = _profiles.model_fingerprint(lm.model)
        if self._bases is not None and self._fp == fp and not force:
            return self._entry, True
        knobs = self.profile_knobs(lm.max_context)

        def compute(lm_):
            from kvbench.profile import calibration_prompts
            prompts = calibration_prompts(lm_.tokenizer, self.calib_samples, knobs["calib_len"], self.calib_seed)
            t = calibrate(lm_.model, prompts, lm_.device)
            n_layers, n_kv, d = t["value_basis"].shape[:3]
            return {"n_layers": n_layers, "n_kv": n_kv, "head_dim": d, "tensors": t}, sum(len(p) for p in prompts)

        entry, cached, _ = _profiles.get_or_create(lm, self.name, knobs, compute, self.profile_dir, force)
        self.use_bases(entry["data"]["tensors"])
        self._entry, self._fp = entry, fp
        return entry, cached

    def use_bases(self, tensors: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> None:
        """Set the bases directly: key_basis (L, d, d) and value_basis (L, n_kv, d, d), columns by decreasing
        eigenvalue (`prepare` does this from the profile; tests and speed benchmarks pass their own, and with
        `model` a later `prepare` of that model keeps them instead of calibrating)."""
        self._bases = {k: t.float() for k, t in tensors.items()}
        self._dev = {}
        if model is not None:
            self._fp = _profiles.model_fingerprint(model)
            self._entry = {"given": True}

    def check_model(self, n_layers: int, n_kv: int, head_dim: int) -> None:
        if self.rank > head_dim:
            raise ValueError(f"method.storage.rank={self.rank} exceeds the model's head dim {head_dim}; "
                             f"allowed: 1..{head_dim}")
        if self._bases is not None and tuple(self._bases["value_basis"].shape[:3]) != (n_layers, n_kv, head_dim):
            raise ValueError(f"eigen_attention bases of shape {tuple(self._bases['value_basis'].shape[:3])} "
                             f"(layers, KV heads, head dim) do not fit this model ({n_layers}, {n_kv}, {head_dim})")

    def projections(self, layer_idx: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k (d, r), P_v (n_kv, d, r)) of a layer, float32 on `device` (cached)."""
        if self._bases is None:
            raise ValueError("eigen_attention: no calibrated bases; call prepare(lm) first (the engine does, "
                             "or `kvbench profile method=eigen_attention model=<model>`)")
        key = (layer_idx, str(device))
        if key not in self._dev:
            r = self.rank
            self._dev[key] = (self._bases["key_basis"][layer_idx, :, :r].to(device).contiguous(),
                              self._bases["value_basis"][layer_idx, :, :, :r].to(device).contiguous())
        return self._dev[key]

    def encode(self, layer: LayerKV, layer_idx: int, n_layers: int, query=None) -> EigenLayer:
        self.check_model(n_layers, layer.n_heads, layer.keys.shape[1])
        pk, pv = self.projections(layer_idx, layer.keys.device)
        return EigenLayer.encode(layer, pk, pv)

    def summary(self, entry: dict) -> str:
        t = entry["data"]["tensors"]
        r = self.rank

        def kept(ev):
            return float((ev[..., :r].sum(-1) / ev.sum(-1).clamp_min(1e-30)).mean())
        return (f"{entry['data']['n_layers']} layers, head dim {entry['data']['head_dim']}: rank {r} keeps "
                f"{100 * kept(t['key_eigvals']):.1f}% of the key energy (basis per layer) and "
                f"{100 * kept(t['value_eigvals']):.1f}% of the value energy (basis per KV head), mean over layers")


@register_method("eigen_attention")
@dataclass
class EigenAttentionMethod(Method):
    """Every token kept, stored at rank `rank` by Eigen Attention: `method=eigen_attention method.rank=32` is
    `method=full method.storage=eigen_attention method.storage.rank=32`."""
    rank: int = 48
    calib_samples: int = 16
    calib_len: int = 2048
    calib_seed: int = 0
    profile_dir: str = "results/profiles"

    paper = EigenAttention.paper
    family = "low rank: keys/values projected on calibrated principal bases, attention at rank r"
    uses_budget = False

    def __post_init__(self):
        super().__post_init__()
        check_knobs(vars(self), "method.")
        self.storage = EigenAttention(self.rank, self.calib_samples, self.calib_len, self.calib_seed,
                                      self.profile_dir)

    def prepare(self, lm, force: bool = False) -> tuple[dict, bool]:
        return self.storage.prepare(lm, force)

    def summary(self, entry: dict) -> str:
        return self.storage.summary(entry)
