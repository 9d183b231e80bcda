"""A decode step's cache write in MiniCache's device layout (methods/minicache.py `MiniCacheLayer.device_begin`):
the token appended to the layer's plain rows and, in the pair's upper layer, the pending tokens merged first.

The layout of one pair of layers (l: role 0, l+1: role 1), H KV heads, head dim d, the model's dtype; a dict:
- `kdir` (Sk, d), `kmag` (2, Sk): merged key directions (shared) and each layer's magnitudes;
  `krow` (2, Skr, d): each layer's plain key rows; `vdir` (Sv, d), `vmag` (2, Sv), `vrow` (2, Svr, d) the same
  for values.
- parts p = 0..4 of head h: rows r < lens[role, p, h], the key at row kst[p, h] + r of the part's key buffer, the
  value at vst[p, h] + r of its value buffer. Parts 0-3 are the merged tokens of group p = 2 * (key retained) +
  (value retained) — keys from kdir/kmag in groups 0, 1, from krow in 2, 3; values from vdir/vmag in 0, 2, from
  vrow in 1, 3 — and hold the same tokens in both layers. Part 4 is the layer's plain rows in krow / vrow: context
  rows the other layer did not keep, then the appended tokens not merged yet (pending). `kst`, `vst` (5, H) and
  `lens` (2, 5, H) int64; `ppos` (2, Skr) int64: the plain rows' positions, at their key rows.
- `tau` (H, 2) float32: the retention threshold of keys and of values, fixed at encoding; `t`: SLERP's parameter.
- the merge log, for the host view afterwards: `rlog` (H, 2, M) int8, whether the m-th merged token's key and
  value were retained; `plog` (M,) int64 its position; `mcount` (H,) int64 merges so far (each head's own
  counter: programs of different heads never wait on each other).

The step of role 0 appends its token (k, v) at the end of its part 4. The step of role 1 first merges the P
tokens it holds pending with role 0's same P tokens (role 0 holds one more, this step's token, which moves down
to the first pending row): per token and KV head, keys and values apart (MiniCache's Eq. 2-3, as `merge_pair`),
unit directions and norms, the angle Omega = 2 atan2(|ua - ub|, |ua + ub|), retained when Omega / pi > tau,
else the SLERP direction and both norms stored; the token goes to the end of its group's part in both layers.
Then it appends its token. P is the host's count (the question's tokens at the first step, one after).

`minicache_update_ref` (torch; reads counts on the host) uses the format's own functions, so the CPU path is the
engine loop's arithmetic exactly; `minicache_update_triton` (one launch, one program per KV head, no host read:
a CUDA graph replays it) computes atan2 with a polynomial (Cephes' atanf, ~1e-7 relative), float32 rounding
apart from the reference.
"""
from __future__ import annotations

import math

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _atan01(z):
        # atan(z) for z in [0, 1]: z > tan(pi/8) reduced by atan(z) = pi/4 + atan((z - 1) / (z + 1)); Cephes atanf
        big = z > 0.4142135623730950
        x = tl.where(big, (z - 1.0) / (z + 1.0), z)
        x2 = x * x
        p = ((8.05374449538e-2 * x2 - 1.38776856032e-1) * x2 + 1.99777106478e-1) * x2 - 3.33329491539e-1
        r = x + x * x2 * p
        return tl.where(big, 0.7853981633974483 + r, r)

    @triton.jit
    def _merge_rows(a, b, t, tau, ok):
        # a, b: float32 (D_PAD,) rows of the two layers. Returns (retained, merged unit direction, |a|, |b|)
        na = tl.sqrt(tl.sum(a * a, 0))
        nb = tl.sqrt(tl.sum(b * b, 0))
        ua = a / tl.where(na > 0, na, 1.0)
        ub = b / tl.where(nb > 0, nb, 1.0)
        y = tl.sqrt(tl.sum((ua - ub) * (ua - ub), 0))  # 2 sin(Omega / 2)
        x = tl.sqrt(tl.sum((ua + ub) * (ua + ub), 0))  # 2 cos(Omega / 2)
        lo = tl.minimum(y, x)
        hi = tl.maximum(y, x)
        a1 = _atan01(lo / tl.where(hi > 0, hi, 1.0))
        half = tl.where(y > x, 1.5707963267948966 - a1, a1)
        w = 2.0 * half
        retained = w / 3.141592653589793 > tau
        s = tl.sin(w)
        sin_ok = s > 1e-6
        sd = tl.where(sin_ok, s, 1.0)
        e = tl.where(sin_ok, tl.sin((1.0 - t) * w) / sd * ua + tl.sin(t * w) / sd * ub, (1.0 - t) * ua + t * ub)
        ne = tl.sqrt(tl.sum(tl.where(ok, e * e, 0.0), 0))
        e = tl.where(ne > 1e-6, e / tl.where(ne > 1e-6, ne, 1.0), ub)
        return retained, e, na, nb

    @triton.jit
    def _update_kernel(kn_ptr, vn_ptr, pos_ptr, kdir_ptr, kmag_ptr, krow_ptr, vdir_ptr, vmag_ptr, vrow_ptr,
                       kst_ptr, vst_ptr, lens_ptr, ppos_ptr, tau_ptr, rlog_ptr, plog_ptr, mcount_ptr,
                       H, D, Sk, Skr, Sv, Svr, M, P, t, ROLE: tl.constexpr, D_PAD: tl.constexpr):
        # grid: (H,)
        h = tl.program_id(0)
        offs = tl.arange(0, D_PAD)
        ok = offs < D
        kst4 = tl.load(kst_ptr + 4 * H + h)
        vst4 = tl.load(vst_ptr + 4 * H + h)
        own = tl.load(lens_ptr + ROLE * 5 * H + 4 * H + h)  # this layer's plain rows before the append
        if ROLE == 1:
            if P > 0:
                L0 = tl.load(lens_ptr + 4 * H + h)
                a0 = L0 - P - 1  # role 0's first pending row (it holds P + 1: this step's token last)
                a1 = own - P     # role 1's
                m0 = tl.load(mcount_ptr + h)
                tau_k = tl.load(tau_ptr + 2 * h)
                tau_v = tl.load(tau_ptr + 2 * h + 1)
                for i in range(P):
                    ka = tl.load(krow_ptr + (kst4 + a0 + i) * D + offs, mask=ok, other=0.0)
                    kb = tl.load(krow_ptr + (Skr + kst4 + a1 + i) * D + offs, mask=ok, other=0.0)
                    va = tl.load(vrow_ptr + (vst4 + a0 + i) * D + offs, mask=ok, other=0.0)
                    vb = tl.load(vrow_ptr + (Svr + vst4 + a1 + i) * D + offs, mask=ok, other=0.0)
                    kret, ke, kna, knb = _merge_rows(ka.to(tl.float32), kb.to(tl.float32), t, tau_k, ok)
                    vret, ve, vna, vnb = _merge_rows(va.to(tl.float32), vb.to(tl.float32), t, tau_v, ok)
                    kr = kret.to(tl.int32)
                    vr = vret.to(tl.int32)
                    g = 2 * kr.to(tl.int64) + vr.to(tl.int64)
                    c = tl.load(lens_ptr + g * H + h)
                    kd = tl.load(kst_ptr + g * H + h) + c
                    vd = tl.load(vst_ptr + g * H + h) + c
                    km = ok & (offs * 0 + kr == 0)  # (the scalar broadcast first: the interpreter's masks)
                    kk = ok & (offs * 0 + kr != 0)
                    tl.store(kdir_ptr + kd * D + offs, ke.to(kdir_ptr.dtype.element_ty), mask=km)
                    if kr == 0:
                        tl.store(kmag_ptr + kd, kna.to(kmag_ptr.dtype.element_ty))
                        tl.store(kmag_ptr + Sk + kd, knb.to(kmag_ptr.dtype.element_ty))
                    tl.store(krow_ptr + kd * D + offs, ka, mask=kk)
                    tl.store(krow_ptr + (Skr + kd) * D + offs, kb, mask=kk)
                    vm = ok & (offs * 0 + vr == 0)
                    vk = ok & (offs * 0 + vr != 0)
                    tl.store(vdir_ptr + vd * D + offs, ve.to(vdir_ptr.dtype.element_ty), mask=vm)
                    if vr == 0:
                        tl.store(vmag_ptr + vd, vna.to(vmag_ptr.dtype.element_ty))
                        tl.store(vmag_ptr + Sv + vd, vnb.to(vmag_ptr.dtype.element_ty))
                    tl.store(vrow_ptr + vd * D + offs, va, mask=vk)
                    tl.store(vrow_ptr + (Svr + vd) * D + offs, vb, mask=vk)
                    tl.store(lens_ptr + g * H + h, c + 1)
                    tl.store(lens_ptr + 5 * H + g * H + h, c + 1)
                    tl.store(rlog_ptr + (h * 2) * M + m0 + i, kr.to(tl.int8))
                    tl.store(rlog_ptr + (h * 2 + 1) * M + m0 + i, vr.to(tl.int8))
                    if h == 0:
                        tl.store(plog_ptr + m0 + i, tl.load(ppos_ptr + kst4 + a0 + i))
                tl.store(mcount_ptr + h, m0 + P)
                # role 0's newest row (this step's token) down to its first pending row
                k0 = tl.load(krow_ptr + (kst4 + L0 - 1) * D + offs, mask=ok)
                v0 = tl.load(vrow_ptr + (vst4 + L0 - 1) * D + offs, mask=ok)
                p0 = tl.load(ppos_ptr + kst4 + L0 - 1)
                tl.store(krow_ptr + (kst4 + a0) * D + offs, k0, mask=ok)
                tl.store(vrow_ptr + (vst4 + a0) * D + offs, v0, mask=ok)
                tl.store(ppos_ptr + kst4 + a0, p0)
                tl.store(lens_ptr + 4 * H + h, a0 + 1)
                own = a1
        # the token, at the end of this layer's plain rows
        k = tl.load(kn_ptr + h * D + offs, mask=ok)
        v = tl.load(vn_ptr + h * D + offs, mask=ok)
        base = ROLE * Skr
        tl.store(krow_ptr + (base + kst4 + own) * D + offs, k.to(krow_ptr.dtype.element_ty), mask=ok)
        tl.store(vrow_ptr + (ROLE * Svr + vst4 + own) * D + offs, v.to(vrow_ptr.dtype.element_ty), mask=ok)
        tl.store(ppos_ptr + base + kst4 + own, tl.load(pos_ptr))
        tl.store(lens_ptr + ROLE * 5 * H + 4 * H + h, own + 1)


def _check(k, v, pos, L: dict, role: int, P: int) -> None:
    H, d = L["kst"].shape[1], L["krow"].shape[2]
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != (H, d):
            raise ValueError(f"{name} must be (n_kv={H}, d={d}), got shape {tuple(x.shape)}")
    if pos.numel() != 1 or pos.dtype != torch.int64:
        raise ValueError(f"pos must be one int64 position, got shape {tuple(pos.shape)} dtype {pos.dtype}")
    if role not in (0, 1):
        raise ValueError(f"role={role!r}; allowed: 0 (the pair's lower layer) or 1 (its upper layer)")
    if P < 0 or (role == 0 and P):
        raise ValueError(f"P={P}: pending tokens merge at the upper layer's step (role 1) only, P >= 0")


def minicache_update_ref(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, L: dict, role: int, P: int) -> None:
    """The step's write (module docstring) in torch, with the format's own merge arithmetic."""
    from kvbench.methods.minicache import angle, slerp, unit_and_norm
    _check(k, v, pos, L, role, P)
    H = L["kst"].shape[1]
    kst, vst, lens = L["kst"].tolist(), L["vst"].tolist(), L["lens"]
    kdir, kmag, krow, vdir, vmag, vrow, ppos = (L[x] for x in ("kdir", "kmag", "krow", "vdir", "vmag", "vrow",
                                                               "ppos"))
    for h in range(H):
        own = int(lens[role, 4, h])
        if role == 1 and P > 0:
            L0 = int(lens[0, 4, h])
            a0, a1, m0 = L0 - P - 1, own - P, int(L["mcount"][h])
            ka, kb = krow[0, kst[4][h] + a0:kst[4][h] + a0 + P], krow[1, kst[4][h] + a1:kst[4][h] + a1 + P]
            va, vb = vrow[0, vst[4][h] + a0:vst[4][h] + a0 + P], vrow[1, vst[4][h] + a1:vst[4][h] + a1 + P]
            merged = []
            for j, (xa, xb) in enumerate(((ka, kb), (va, vb))):
                ua, na = unit_and_norm(xa)
                ub, nb = unit_and_norm(xb)
                kept = (angle(ua, ub) / math.pi > L["tau"][h, j]).tolist()
                merged.append((kept, slerp(ua, ub, L["t"]).to(xa.dtype), na.to(xa.dtype), nb.to(xb.dtype)))
            (kr, ke, kna, knb), (vr, ve, vna, vnb) = merged
            for i in range(P):
                g = 2 * int(kr[i]) + int(vr[i])
                c = int(lens[0, g, h])
                kd, vd = kst[g][h] + c, vst[g][h] + c
                if kr[i]:
                    krow[0, kd], krow[1, kd] = ka[i], kb[i]
                else:
                    kdir[kd], kmag[0, kd], kmag[1, kd] = ke[i], kna[i], knb[i]
                if vr[i]:
                    vrow[0, vd], vrow[1, vd] = va[i], vb[i]
                else:
                    vdir[vd], vmag[0, vd], vmag[1, vd] = ve[i], vna[i], vnb[i]
                lens[:, g, h] = c + 1
                L["rlog"][h, 0, m0 + i], L["rlog"][h, 1, m0 + i] = int(kr[i]), int(vr[i])
                L["plog"][m0 + i] = ppos[0, kst[4][h] + a0 + i]
            L["mcount"][h] = m0 + P
            # role 0's newest row (this step's token) down to its first pending row
            krow[0, kst[4][h] + a0] = krow[0, kst[4][h] + L0 - 1]
            vrow[0, vst[4][h] + a0] = vrow[0, vst[4][h] + L0 - 1]
            ppos[0, kst[4][h] + a0] = ppos[0, kst[4][h] + L0 - 1]
            lens[0, 4, h] = a0 + 1
            own = a1
        krow[role, kst[4][h] + own] = k[h].to(krow.dtype)
        vrow[role, vst[4][h] + own] = v[h].to(vrow.dtype)
        ppos[role, kst[4][h] + own] = pos.view(())
        lens[role, 4, h] = own + 1


def minicache_update_triton(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, L: dict, role: int,
                            P: int) -> None:
    """Triton version of `minicache_update_ref`: one launch, no host read."""
    _check(k, v, pos, L, role, P)
    k, v = k.contiguous(), v.contiguous()
    names = ("kdir", "kmag", "krow", "vdir", "vmag", "vrow", "kst", "vst", "lens", "ppos", "tau", "rlog", "plog",
             "mcount")
    check_triton_inputs(k, v, pos, *(L[x] for x in names))
    H, d = k.shape
    _update_kernel[(H,)](k, v, pos, *(L[x] for x in names), H, d, L["kdir"].shape[0], L["krow"].shape[1],
                         L["vdir"].shape[0], L["vrow"].shape[1], L["rlog"].shape[2], P, float(L["t"]),
                         ROLE=role, D_PAD=max(16, next_pow2(d)), num_warps=1)
