"""KIVI — Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024, 2402.02750).

Keys are quantized per channel (each channel of each group of `group_size` consecutive tokens shares a scale and
a minimum), values per token (each group of `group_size` channels of a token shares them): asymmetric min-max
quantization to `bits` bits, codes packed 8 // bits per byte. The most recent tokens stay in full precision,
as in the official code (github.com/jy-yuan/KIVI, models/llama_kivi.py):
- keys: a prefill of T tokens quantizes the first T - T mod R and keeps T mod R in full precision; while
  decoding, the full-precision keys grow until they reach R = `residual_length`, then all R are quantized;
- values: the most recent R stay in full precision; each older one is quantized as a new token arrives.
So up to R - 1 keys and R values of each head are full precision. R must be a multiple of `group_size`.

Storage format `kivi` (`method.storage=kivi`, composes with any method that compresses at prefill, e.g.
`method=snapkv method.storage=kivi`), and method `kivi` (every token kept, stored by KIVI).
Bytes stored = packed codes + scales and minima (the model's dtype) + full-precision rows; what we left out:
the official code fuses dequantization into its matmul kernels (ours: methods/kernels/kivi_decode.py on the
GPU, a dequantize-then-attend torch reference on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import LayerKV, exclusive_cumsum
from kvbench.method import Method, register_method
from kvbench.store import EncodedLayer, Storage, register_storage, tensor_bytes

BITS = (2, 4, 8)


# -- quantization (the format's definition; the tests check it against a reference written from the paper) --
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, d) integer codes < 2**bits -> (n, d * bits / 8) uint8, code j of a byte in bits [j*bits, (j+1)*bits)."""
    per = 8 // bits
    c = codes.to(torch.uint8).view(codes.shape[0], -1, per)
    out = torch.zeros(c.shape[:2], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (n, d * bits / 8) uint8 -> (n, d) uint8 codes."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).view(packed.shape[0], packed.shape[1] * per)


def quantize_groups(x: torch.Tensor, bits: int, group: int, dim: int, param_dtype: torch.dtype):
    """Asymmetric min-max quantization of (n, d) `x` in groups of `group` consecutive entries along `dim`
    (0: tokens, per channel — keys; 1: channels, per token — values). Returns (codes (n, d) uint8, scale,
    minimum), the parameters of shape (n / group, d) for dim 0 and (n, d / group) for dim 1."""
    n, d = x.shape
    xf = x.float()
    g = xf.view(n // group, group, d) if dim == 0 else xf.view(n, d // group, group)
    red = 1 if dim == 0 else 2
    mn = g.amin(dim=red, keepdim=True)
    mx = g.amax(dim=red, keepdim=True)
    # a tensor divisor: IEEE division on every device (torch's CUDA kernel multiplies by the reciprocal of a
    # Python scalar, which can differ in the last bit; the device step's kernel divides exactly)
    scale = ((mx - mn) / torch.full_like(mx, 2 ** bits - 1)).to(param_dtype)
    mn = mn.to(param_dtype)
    # codes from the parameters as stored, so dequantization is exact up to rounding of x itself
    s = scale.float()
    codes = torch.where(s > 0, torch.round((g - mn.float()) / torch.where(s > 0, s, 1.0)), 0.0)
    codes = codes.clamp_(0, 2 ** bits - 1).to(torch.uint8).view(n, d)
    return codes, scale.squeeze(red), mn.squeeze(red)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, group: int, dim: int,
                      dtype: torch.dtype) -> torch.Tensor:
    n, d = codes.shape
    c = codes.float()
    if dim == 0:
        x = c.view(n // group, group, d) * scale.float().unsqueeze(1) + mn.float().unsqueeze(1)
    else:
        x = c.view(n, d // group, group) * scale.float().unsqueeze(2) + mn.float().unsqueeze(2)
    return x.view(n, d).to(dtype)


def _pieces(ts: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Copies of the tensors, made by one concatenation and split into views of it."""
    return list(torch.cat(ts).split(counts)) if ts else []


@dataclass
class _Quantized:
    """One head's quantized rows of keys or values: packed codes and per-group scale / minimum."""
    codes: torch.Tensor   # (n, d * bits / 8) uint8
    scale: torch.Tensor   # keys: (n / group, d); values: (n, d / group)
    mn: torch.Tensor

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def cat(self, other: "_Quantized") -> "_Quantized":
        return _Quantized(torch.cat([self.codes, other.codes]), torch.cat([self.scale, other.scale]),
                          torch.cat([self.mn, other.mn]))

    def clone(self) -> "_Quantized":
        return _Quantized(self.codes.clone(), self.scale.clone(), self.mn.clone())


class KIVILayer(EncodedLayer):
    """One layer in KIVI's format. Per KV head h: quantized keys kq[h] (a multiple of group_size rows), then
    full-precision keys kr[h]; quantized values vq[h], then full-precision values vr[h]; pos[h] the original
    positions of all its rows in order (row i's key is kq[h] row i if i < kq[h].n, else kr[h] row i - kq[h].n;
    values alike). The key and value splits differ (see the module docstring)."""

    def __init__(self, fmt: "KIVI", kq, kr, vq, vr, pos, dtype: torch.dtype, head_dim: int):
        self.fmt, self.kq, self.kr, self.vq, self.vr, self.pos = fmt, kq, kr, vq, vr, pos
        self.dtype, self.head_dim = dtype, head_dim
        self.row_bytes = 2 * head_dim * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def encode(cls, fmt: "KIVI", layer: LayerKV) -> "KIVILayer":
        d = layer.keys.shape[1]
        fmt.check_model(0, layer.n_heads, d)
        if layer.log_weight() is not None:
            raise ValueError("kivi stores plain token rows; a method that merges rows (log-weights) does not "
                             "compose with it")
        n = layer.n_heads
        self = cls(fmt, [cls._empty_q(fmt, d, layer.keys) for _ in range(n)], [],
                   [cls._empty_q(fmt, d, layer.keys, values=True) for _ in range(n)], [], [], layer.keys.dtype, d)
        heads = [layer.head(h) for h in range(n)]
        self.kr, self.vr, self.pos = ([x[i] for x in heads] for i in range(3))
        self._flush()
        self.pos = _pieces(self.pos, [p.shape[0] for p in self.pos])  # own copies, one gather
        return self

    @staticmethod
    def _empty_q(fmt, d, like, values=False) -> _Quantized:
        codes = torch.zeros(0, d * fmt.bits // 8, dtype=torch.uint8, device=like.device)
        shape = (0, d // fmt.group_size) if values or not fmt.key_per_channel else (0, d)
        return _Quantized(codes, like.new_zeros(shape), like.new_zeros(shape))

    @property
    def key_dim(self) -> int:
        """The axis key groups run along: 0 (tokens: per-channel keys, KIVI) or 1 (channels: per token)."""
        return 0 if self.fmt.key_per_channel else 1

    def _quantize(self, x: torch.Tensor, dim: int) -> _Quantized:
        codes, scale, mn = quantize_groups(x, self.fmt.bits, self.fmt.group_size, dim, self.dtype)
        return _Quantized(pack(codes, self.fmt.bits), scale, mn)

    def _split(self, n: int, per_channel: bool) -> tuple[int, int]:
        """A full-precision run of n rows -> (rows KIVI quantizes, rows left in full precision): keys per channel
        in whole blocks of R; values (and per-token keys) beyond the R most recent."""
        R = self.fmt.residual_length
        return (R * (n // R), n % R) if per_channel else (max(0, n - R), min(n, R))

    def _flush(self) -> None:
        """Quantize what KIVI quantizes: keys in whole blocks of R, values beyond the R most recent. Every head's
        rows to quantize go through one `quantize_groups` call (groups never cross heads: a head's key rows are
        a multiple of the group size, and value groups lie within a row), and the full-precision rest is
        gathered once: a few launches per layer instead of a few per head."""
        nk = [self._split(t.shape[0], self.fmt.key_per_channel)[0] for t in self.kr]
        nv = [self._split(t.shape[0], False)[0] for t in self.vr]
        self.kq = self._quantized(self.kq, self.kr, nk, self.key_dim)
        self.vq = self._quantized(self.vq, self.vr, nv, 1)
        self.kr = _pieces([t[n:] for t, n in zip(self.kr, nk)], [t.shape[0] - n for t, n in zip(self.kr, nk)])
        self.vr = _pieces([t[n:] for t, n in zip(self.vr, nv)], [t.shape[0] - n for t, n in zip(self.vr, nv)])

    def _quantized(self, done: list, rows: list, counts: list[int], dim: int) -> list:
        """Each head's quantized rows with its first counts[h] rows of `rows` quantized and appended."""
        if not any(counts):
            return done
        q = self._quantize(torch.cat([t[:n] for t, n in zip(rows, counts)]), dim)
        per = self.fmt.group_size if dim == 0 else 1  # parameter rows per quantized row
        parts = zip(q.codes.split(counts), q.scale.split([n // per for n in counts]),
                    q.mn.split([n // per for n in counts]))
        return [d.cat(_Quantized(*p)) if n else d for d, p, n in zip(done, parts, counts)]

    # -- what the engine asks ----------------------------------------------------------------------------
    @property
    def head_lengths(self) -> list[int]:
        return [p.numel() for p in self.pos]

    def nbytes(self) -> int:
        return sum(tensor_bytes(q.codes, q.scale, q.mn) for q in self.kq + self.vq) + tensor_bytes(*self.kr, *self.vr)

    def head_kv(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head h's dequantized keys and values (n_h, d), rows in order."""
        g = self.fmt.group_size
        kq, vq = self.kq[h], self.vq[h]
        k = dequantize_groups(unpack(kq.codes, self.fmt.bits), kq.scale, kq.mn, g, self.key_dim, self.dtype)
        v = dequantize_groups(unpack(vq.codes, self.fmt.bits), vq.scale, vq.mn, g, 1, self.dtype)
        return torch.cat([k, self.kr[h]]), torch.cat([v, self.vr[h]])

    def flat(self) -> dict:
        """Every head's tensors back to back, as methods/kernels/kivi_decode.py reads them (`_layout(0)`, built
        once after each change)."""
        if getattr(self, "_flat", None) is None:
            self._flat = self._layout(0)
        return self._flat

    def _layout(self, extra: int) -> dict:
        """The kernels' layout (methods/kernels/kivi_decode.py), each head with room for `extra` more tokens: the
        quantized keys' rows for every flush to come, R full-precision key rows (extra = 0: just its own), the
        quantized values' rows, and the full-precision values' rows, whose start (meta column 6) moves forward by
        one per quantized value. Keys per token (FlexGen) are laid out as values, their run's start (meta column
        3) moving alike. One concatenation per tensor; one spare row each, so no kernel argument is ever empty."""
        R, G, b, d = self.fmt.residual_length, self.fmt.group_size, self.fmt.bits, self.head_dim
        dev = self.pos[0].device
        nkq, nkr = [q.n for q in self.kq], [t.shape[0] for t in self.kr]
        nvq, nvr = [q.n for q in self.vq], [t.shape[0] for t in self.vr]
        lens = self.head_lengths
        pc = self.fmt.key_per_channel
        cap_kq = [a + self._split(c + extra, pc)[0] for a, c in zip(nkq, nkr)]
        cap_kr = [R if extra and pc else c + extra for c in nkr]  # per channel: R - 1 at most, then a flush
        cap_vq = [a + self._split(c + extra, False)[0] for a, c in zip(nvq, nvr)]
        cap_vr = [c + extra for c in nvr]
        cap_pos = [n + extra for n in lens]
        per = G if self.key_dim == 0 else 1  # quantized key rows per row of key parameters

        def packed(parts, caps, width, dtype=self.dtype):
            pieces = [x for t, c in zip(parts, caps) for x in (t, t.new_zeros(c - t.shape[0], *t.shape[1:]))]
            return torch.cat(pieces + [torch.zeros(1, *width, dtype=dtype, device=dev)])

        kw = (d if self.key_dim == 0 else d // G,)
        starts = [exclusive_cumsum(c) for c in (cap_kq, cap_kr, cap_vq, cap_vr)]
        meta = [list(m) for m in zip(lens, starts[0], nkq, starts[1], starts[2], nvq, starts[3])]
        layout = {"bits": b, "group_size": G, "residual": R, "rows": sum(cap_pos),
                  "key_per_channel": self.fmt.key_per_channel,
                  "meta": torch.tensor(meta, dtype=torch.long, device=dev),
                  "kq_codes": packed([q.codes for q in self.kq], cap_kq, (d * b // 8,), torch.uint8),
                  "kq_scale": packed([q.scale for q in self.kq], [c // per for c in cap_kq], kw),
                  "kq_min": packed([q.mn for q in self.kq], [c // per for c in cap_kq], kw),
                  "kr": packed(self.kr, cap_kr, (d,)),
                  "vq_codes": packed([q.codes for q in self.vq], cap_vq, (d * b // 8,), torch.uint8),
                  "vq_scale": packed([q.scale for q in self.vq], cap_vq, (d // G,)),
                  "vq_min": packed([q.mn for q in self.vq], cap_vq, (d // G,)),
                  "vr": packed(self.vr, cap_vr, (d,))}
        if extra:  # the device step stores each token's position (between steps: the per-head lists)
            layout["positions"] = packed(self.pos, cap_pos, (), torch.long)
            layout["pos_start"] = torch.tensor(exclusive_cumsum(cap_pos), dtype=torch.long, device=dev)
        return layout

    def materialize(self) -> LayerKV:
        kv = [self.head_kv(h) for h in range(self.n_heads)]
        return LayerKV._packed(torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv]), torch.cat(self.pos),
                               self.head_lengths)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        before = self.nbytes()
        self._flat = None
        for h in range(self.n_heads):
            self.kr[h] = torch.cat([self.kr[h], k[h].to(self.dtype)])
            self.vr[h] = torch.cat([self.vr[h], v[h].to(self.dtype)])
            self.pos[h] = torch.cat([self.pos[h], positions.to(self.pos[h].device, torch.long)])
        self._flush()
        self._changed(before)

    def clone(self) -> "KIVILayer":
        return KIVILayer(self.fmt, [q.clone() for q in self.kq], [t.clone() for t in self.kr],
                         [q.clone() for q in self.vq], [t.clone() for t in self.vr], [p.clone() for p in self.pos],
                         self.dtype, self.head_dim)

    @property
    def kernel_ok(self) -> bool:
        """The decode kernel's tile shapes (else: the torch reference)."""
        d, g = self.head_dim, self.fmt.group_size
        return d >= 16 and d & (d - 1) == 0 and g >= 16

    def attend(self, query, scaling, need_probs=False, window=None, softcap=None):
        if query.shape[1] == 1 and not need_probs and window is None and softcap is None:
            from kvbench.attention import _decode_kernel
            if self.kernel_ok and _decode_kernel(query) == "triton":  # dequantize inside the tile (GPU, or interpreted)
                from kvbench.methods.kernels.kivi_decode import kivi_decode_attention_triton
                return kivi_decode_attention_triton(query[:, 0], self.flat(), scaling).unsqueeze(1), None
        return super().attend(query, scaling, need_probs, window, softcap)


    # -- the GPU fast path (kvbench/store.py) -----------------------------------------------------------
    @property
    def device_decode(self) -> bool:
        """The decode kernel's shapes, and per-channel keys quantized R at a time in one tile: R a power of two."""
        R = self.fmt.residual_length
        return self.kernel_ok and (R & (R - 1) == 0 or not self.fmt.key_per_channel)

    def device_begin(self, extra: int) -> None:
        """`_layout(extra)`: every offset fixed for the whole decode. The per-head tensors are released; the layout
        holds the layer until `device_end`."""
        self._dev, self._flat = self._layout(extra), None
        self.kq = self.kr = self.vq = self.vr = None

    def device_step(self, q, k, v, pos, scaling):
        from kvbench.attention import _decode_kernel
        from kvbench.methods.kernels import kivi_decode as kd
        if _decode_kernel(q) == "triton":
            kd.kivi_append_triton(k, v, pos, self._dev)
            return kd.kivi_decode_attention_triton(q, self._dev, scaling)
        kd.kivi_append_ref(k, v, pos, self._dev)
        return kd.kivi_decode_attention_ref(q, self._dev, scaling)

    def device_end(self) -> None:
        """Per-head tensors again, copied out of the layout (which is then released): one host read of meta."""
        L = self._dev
        per = self.fmt.group_size if self.key_dim == 0 else 1  # quantized key rows per row of key parameters
        self.kq, self.kr, self.vq, self.vr, self.pos = [], [], [], [], []
        for (n, kqs, nkq, krs, vqs, nvq, vrs), ps in zip(L["meta"].tolist(), L["pos_start"].tolist()):
            p0, p1 = kqs // per, (kqs + nkq) // per
            self.kq.append(_Quantized(L["kq_codes"][kqs:kqs + nkq].clone(), L["kq_scale"][p0:p1].clone(),
                                      L["kq_min"][p0:p1].clone()))
            self.kr.append(L["kr"][krs:krs + n - nkq].clone())
            self.vq.append(_Quantized(L["vq_codes"][vqs:vqs + nvq].clone(), L["vq_scale"][vqs:vqs + nvq].clone(),
                                      L["vq_min"][vqs:vqs + nvq].clone()))
            self.vr.append(L["vr"][vrs:vrs + n - nvq].clone())
            self.pos.append(L["positions"][ps:ps + n].clone())
        self._dev = None

    def _counts_after(self, t: int) -> list[tuple[int, int, int, int]]:
        """Per head (quantized keys, full keys, quantized values, full values) after t more appended tokens."""
        out = []
        for kq, kr, vq, vr in zip(self.kq, self.kr, self.vq, self.vr):
            ak, nkr = self._split(kr.shape[0] + t, self.fmt.key_per_channel)
            av, nvr = self._split(vr.shape[0] + t, False)
            out.append((kq.n + ak, nkr, vq.n + av, nvr))
        return out

    def nbytes_after(self, t: int) -> int:
        """`nbytes()` after t appends, from the counts: codes d*bits/8 bytes a row, a key group's scale and minimum
        d values each (per token: d / G each, as a quantized value's), a full row d values."""
        d, G, b = self.head_dim, self.fmt.group_size, self.fmt.bits
        e = self.row_bytes // (2 * d)
        kp = (lambda nkq: (nkq // G) * d) if self.fmt.key_per_channel else (lambda nkq: nkq * (d // G))
        return sum((nkq + nvq) * d * b // 8 + 2 * kp(nkq) * e + 2 * nvq * (d // G) * e + (nkr + nvr) * d * e
                   for nkq, nkr, nvq, nvr in self._counts_after(t))

    def read_bytes_at(self, t: int) -> int:
        return self.nbytes_after(t) + self.n_heads * self.row_bytes


@register_storage("kivi")
@dataclass
class KIVI(Storage):
    bits: int = 2                 # 2 or 4 (8 also allowed)
    group_size: int = 32          # tokens per key group (per channel), channels per value group (per token)
    residual_length: int = 128    # R: recent tokens kept in full precision (a multiple of group_size)

    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (2402.02750)"
    key_per_channel: ClassVar[bool] = True  # False: keys quantized per token, like values (other formats)

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"method.storage.bits={self.bits!r}; allowed: {', '.join(map(str, BITS))}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"method.storage.group_size={self.group_size!r}; allowed: a positive integer")
        if not isinstance(self.residual_length, int) or self.residual_length <= 0 \
                or self.residual_length % self.group_size:
            raise ValueError(f"method.storage.residual_length={self.residual_length!r}; allowed: a positive "
                             f"multiple of group_size ({self.group_size})")

    def check_model(self, n_layers: int, n_kv: int, head_dim: int) -> None:
        if head_dim % self.group_size or (head_dim * self.bits) % 8:
            raise ValueError(f"method.storage.group_size={self.group_size} must divide the model's head dim "
                             f"{head_dim}; allowed: a divisor of {head_dim}")

    def encode(self, layer: LayerKV, layer_idx: int, n_layers: int, query=None) -> KIVILayer:
        return KIVILayer.encode(self, layer)


@register_method("kivi")
@dataclass
class KIVIMethod(Method):
    """Every token kept, stored in KIVI's format: `method=kivi method.bits=4` is `method=full
    method.storage=kivi method.storage.bits=4`."""
    bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    paper = KIVI.paper
    family = "quantization: per-channel keys, per-token values, full-precision residual"
    uses_budget = False

    def __post_init__(self):
        super().__post_init__()
        self.storage = KIVI(self.bits, self.group_size, self.residual_length)
