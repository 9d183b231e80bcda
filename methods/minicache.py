"""MiniCache — Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models"
(NeurIPS 2024, arXiv 2405.14366; project page github.com/AkideLiu/MiniCache, which publishes no code).

Adjacent layers from the middle depth on hold nearly the same KV states, token by token. MiniCache merges
each pair of layers (l, l+1), l = S, S+2, ... with S = `start_layer` (the paper's default: half the depth,
n_layers // 2; an odd layer left at the top stays plain). For each token i of each KV head, keys and values
alike (each on its own), with x_a = layer l's row, x_b = layer l+1's row:
- magnitudes ||x_a||, ||x_b|| are kept per layer (the paper's reparameterization, Eq. 2-3);
- the two unit directions are merged by SLERP (Eq. 3), the paper's interpolation parameter t (`t`, default
  0.6, its best value; t weighs the deeper layer, t = 0 gives layer l's direction):
      Omega = arccos(u_a . u_b),   e = sin((1 - t) Omega) / sin(Omega) u_a + sin(t Omega) / sin(Omega) u_b;
- restoration (Eq. 2): x_hat_a = ||x_a|| e, x_hat_b = ||x_b|| e (e is a unit vector);
- token retention: d_i = Omega_i / pi, the angular distance of the pair. The paper sets the threshold from
  the min-max range of the pair's distances with gamma (`gamma`, default 0.05), so that gamma = 0 retains
  nothing and a larger gamma retains more tokens and compresses less (its ablation), a small set at 0.05; it
  retains the highly distinct pairs. We retain the tokens whose angle exceeds the top gamma of that range:
      retained = {i : d_i > d_max - gamma (d_max - d_min)},   over one KV head's tokens, keys and values apart
  (our reading of the threshold, fitted to the paper's stated purpose and its gamma ablation; the exact printed
  inequality could not be checked here, and no official code is public).
  A retained token stays unmerged in both layers: its original rows are stored, exact.
Decoding (the paper's overview figure): each layer's attention restores its rows from the pair's merge and
reads its newest tokens as they are; the new tokens are then merged across the pair as well. Ours: tokens
appended after encoding (the question when query_aware=false, decoded tokens) stay plain rows until the
pair's upper layer receives the next ones, then the tokens both layers hold are merged (one step later than
the paper, the same tokens); one is retained when its angle exceeds the threshold fixed at encoding (the
paper defines the threshold over a set of tokens, not one arriving at a time).
Stored per pair and KV head (keys and values alike): the merged directions (model dtype), the retained tokens'
indices (int32) and the threshold (fp32), once for the pair — counted in layer l's bytes; per layer: its
magnitudes of the merged tokens (model dtype), its retained rows, and its rows not merged (tokens the other
layer did not keep, appended tokens not merged yet). A decode step's attention in either layer reads the
shared directions, so both layers' `read_bytes` include them. What we simplified: merged directions are stored
for merged tokens only (the paper's figure keeps a full-length merged cache and overwrites the retained tokens
on restoration). In the engine loop a step attends with the torch reference over the restored layer
(`materialize`); on the GPU fast path (`device_begin`, below) the pair is laid out in fixed-capacity parts and a
step is Triton launches: the append and merge (methods/kernels/minicache_update.py), then attention that restores
merged rows inside its tile (methods/kernels/minicache_decode.py).

Storage format `minicache` (`method.storage=minicache`, cross-layer: per_layer = False, encoded after the
whole prefill) and method `minicache` (every token kept, layers merged). Composed with an eviction method
(`method=snapkv method.storage=minicache`), only the positions a KV head kept in both layers of a pair merge;
every other kept row stays as it is (plain, in its own layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.cache import KVBenchCache, LayerKV
from kvbench.method import Method, register_method
from kvbench.store import EncodedLayer, Storage, register_storage, tensor_bytes

_EPS = 1e-6


# -- the merge (the format's definition; the tests check it against a reference written from the paper) --
def unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) -> fp32 unit directions (a zero row gives a zero direction) and fp32 norms (n,)."""
    xf = x.float()
    n = xf.norm(dim=-1)
    return xf / torch.where(n > 0, n, 1.0).unsqueeze(-1), n


def angle(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """Omega (n,) in [0, pi] between unit rows: arccos(ua . ub), computed as 2 atan2(|ua - ub|, |ua + ub|),
    which is exact near 0 and pi (arccos of a rounded cosine reads equal rows as ~3e-4 rad apart in fp32)."""
    return 2 * _atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))


def _atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.atan2, one function for every element wherever it sits in the call. On the CPU, ATen computes a
    contiguous call with a vector routine except its last < 32 elements (per thread), which go to libm's atan2f;
    the two differ in the last bit, so a token's angle would depend on how many rows share the call (a head's
    merge on the heads encoded with it). Strided inputs take ATen's scalar loop for every element. (On a GPU
    every element runs the same atan2f.)"""
    if y.device.type != "cpu":
        return torch.atan2(y, x)
    yx = torch.stack([y, x], dim=-1)
    return torch.atan2(yx[..., 0], yx[..., 1])


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's Eq. 3 on fp32 unit rows: sin((1-t) W)/sin W ua + sin(t W)/sin W ub, W their angle; unit rows.
    Where sin W ~ 0 (parallel, or antipodal rows whose arc is undefined) the limit (1-t) ua + t ub, normalized
    (antipodal and t = 0.5: ub)."""
    w = angle(ua, ub).unsqueeze(-1)
    s = torch.sin(w)
    ok = s > _EPS
    sd = torch.where(ok, s, 1.0)
    e = torch.where(ok, torch.sin((1 - t) * w) / sd * ua + torch.sin(t * w) / sd * ub, (1 - t) * ua + t * ub)
    n = e.norm(dim=-1, keepdim=True)
    return torch.where(n > _EPS, e / torch.where(n > _EPS, n, 1.0), ub)


def threshold(dist: torch.Tensor, gamma: float) -> torch.Tensor:
    """The retention threshold of a pair's tokens: d_max - gamma (d_max - d_min), fp32 (1,); 1.0 when there are
    no tokens (nothing is farther than d = 1)."""
    if dist.numel() == 0:
        return torch.ones(1, device=dist.device)
    lo, hi = dist.min(), dist.max()
    return (hi - gamma * (hi - lo)).float().view(1)


def head_thresholds(dist: torch.Tensor, head: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """`threshold` of every KV head at once: dist (n,) of the heads' tokens, `head` (n,) each one's KV head,
    `counts` (H,) tokens per head -> (H,) fp32, 1.0 for a head with no token. Min and max per head by scatter
    (exact, in any order), then the same fp32 arithmetic as `threshold`."""
    lo = dist.new_zeros(counts.shape).scatter_reduce(0, head, dist, "amin", include_self=False)
    hi = dist.new_zeros(counts.shape).scatter_reduce(0, head, dist, "amax", include_self=False)
    return torch.where(counts > 0, hi - gamma * (hi - lo), 1.0)


@dataclass
class _Merged:
    """One KV head's merge of one of keys / values over a pair's n common tokens (in the pair's order): what the
    pair shares (directions of the merged tokens, indices of the retained ones, the retention threshold) and,
    per layer, magnitudes of the merged tokens and the retained rows."""
    n: int                    # common tokens
    dirs: torch.Tensor        # (n - n_r, d) model dtype, shared
    ret: torch.Tensor         # (n_r,) int32 indices into the common tokens, shared
    tau: torch.Tensor         # (1,) fp32 retention threshold on d, fixed at encoding, shared
    mags: list[torch.Tensor]  # per layer of the pair: (n - n_r,) model dtype
    rows: list[torch.Tensor]  # per layer of the pair: (n_r, d) original rows

    def shared_bytes(self) -> int:
        return tensor_bytes(self.dirs, self.ret, self.tau)

    def own_bytes(self, role: int) -> int:
        return tensor_bytes(self.mags[role], self.rows[role])

    def restore(self, role: int) -> torch.Tensor:
        """Layer `role`'s (n, d) rows: magnitude x merged direction (Eq. 2), retained rows as stored."""
        out = self.dirs.new_empty(self.n, self.dirs.shape[1])
        merged = torch.ones(self.n, dtype=torch.bool, device=self.dirs.device)
        merged[self.ret.long()] = False
        out[merged] = (self.mags[role].float().unsqueeze(1) * self.dirs.float()).to(out.dtype)
        out[~merged] = self.rows[role]
        return out

    def extend(self, more: "_Merged") -> None:
        """Tokens merged later (appended tokens) go after the ones held."""
        self.dirs = torch.cat([self.dirs, more.dirs])
        self.ret = torch.cat([self.ret, more.ret + self.n])
        self.mags = [torch.cat([a, b]) for a, b in zip(self.mags, more.mags)]
        self.rows = [torch.cat([a, b]) for a, b in zip(self.rows, more.rows)]
        self.n += more.n

    def clone(self) -> "_Merged":
        return _Merged(self.n, self.dirs.clone(), self.ret.clone(), self.tau.clone(), [m.clone() for m in self.mags],
                       [r.clone() for r in self.rows])


def merge_pair(xa: torch.Tensor, xb: torch.Tensor, t: float, gamma: float = 0.0,
               tau: torch.Tensor | None = None) -> _Merged:
    """Merge (n, d) rows of layer l (xa) and layer l+1 (xb) of the same tokens and KV head; tokens whose
    angular distance exceeds the threshold `tau` (default: from these tokens' range and gamma) are retained."""
    ua, na = unit_and_norm(xa)
    ub, nb = unit_and_norm(xb)
    dist = angle(ua, ub) / math.pi
    tau = threshold(dist, gamma) if tau is None else tau
    keep = dist > tau
    m = ~keep
    return _Merged(n=xa.shape[0], dirs=slerp(ua[m], ub[m], t).to(xa.dtype),
                   ret=keep.nonzero().view(-1).to(torch.int32), tau=tau.clone(),
                   mags=[na[m].to(xa.dtype), nb[m].to(xb.dtype)],
                   rows=[xa[keep].clone(), xb[keep].clone()])


class _HeadMerges:
    """`merge_pair` of every KV head of a pair at once, on flat rows head by head (`head`: each row's KV head,
    `counts`: rows per head, on the device). Two steps, so that a pair's keys and values read their retained
    counts from the device together: the constructor finds the retained rows (no host sync); `split`, given the
    counts on the host, merges the other rows and cuts the flat results into each head's `_Merged` (views)."""

    def __init__(self, xa: torch.Tensor, xb: torch.Tensor, head: torch.Tensor, counts: torch.Tensor, gamma: float):
        self.xa, self.xb, self.head = xa, xb, head
        # the directions are computed again in `split`, of the merged rows only: no (n, d) fp32 tensor is held
        # across the host read (row by row, the same values)
        dist = angle(unit_and_norm(xa)[0], unit_and_norm(xb)[0]) / math.pi
        self.tau = head_thresholds(dist, head, counts, gamma)
        self.keep = dist > self.tau[head]
        self.retained = torch.zeros_like(counts).scatter_add_(0, head, self.keep.long())  # per head
        self.first = torch.cumsum(counts, 0) - counts  # each head's first row

    def split(self, counts: list[int], retained: list[int], t: float) -> list[_Merged]:
        n_merged = [c - r for c, r in zip(counts, retained)]
        order = torch.argsort(self.keep.to(torch.int8), stable=True)  # merged rows, then retained; head by head
        im, ir = order[:sum(n_merged)], order[sum(n_merged):]
        (ua, na), (ub, nb) = unit_and_norm(self.xa[im]), unit_and_norm(self.xb[im])
        dirs = slerp(ua, ub, t).to(self.xa.dtype).split(n_merged)
        mags = [na.to(self.xa.dtype).split(n_merged), nb.to(self.xb.dtype).split(n_merged)]
        rows = [self.xa[ir].split(retained), self.xb[ir].split(retained)]
        local = torch.arange(order.numel(), device=order.device) - self.first[self.head]  # index in its head
        ret, tau = local[ir].to(torch.int32).split(retained), self.tau.split(1)
        return [_Merged(n, dirs[h], ret[h], tau[h], [mags[0][h], mags[1][h]], [rows[0][h], rows[1][h]])
                for h, n in enumerate(counts)]


class _Pair:
    """What layers l and l+1 share, per KV head: the common tokens' positions and their key / value merges,
    and each layer's appended tokens not merged yet (`new[role]`: keys, values, positions per head)."""

    def __init__(self, t: float, pos: list[torch.Tensor], merged: list[dict[str, _Merged]], new: list[list[list]]):
        self.t, self.pos, self.merged, self.new = t, pos, merged, new
        self.dev: dict | None = None            # the device layout while the fast path decodes (lay_out)
        self.dev_layers: list = [None, None]    # the two layers, as they call device_begin
        self.records: _DecodeRecords | None = None  # what the last device decode stored and read, step by step

    def shared_bytes(self) -> int:
        return sum(m.shared_bytes() for per in self.merged for m in per.values())

    def role_bytes(self, role: int) -> int:
        """Layer `role`'s own bytes held here: magnitudes, retained rows, appended rows not merged yet."""
        k, v, _ = self.new[role]
        return sum(m.own_bytes(role) for per in self.merged for m in per.values()) + tensor_bytes(*k, *v)

    def total_bytes(self) -> int:
        return self.shared_bytes() + self.role_bytes(0) + self.role_bytes(1)

    def add_new(self, role: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        nk, nv, npos = self.new[role]
        for h in range(len(nk)):
            nk[h] = torch.cat([nk[h], k[h].to(nk[h].dtype)])
            nv[h] = torch.cat([nv[h], v[h].to(nv[h].dtype)])
            npos[h] = torch.cat([npos[h], positions.to(npos[h].device, torch.long)])

    def merge_new(self) -> None:
        """Merge the appended tokens both layers hold (decoded tokens, the question), each retained when its
        angle exceeds the threshold fixed at encoding."""
        for h in range(len(self.pos)):
            (ka, va, pa), (kb, vb, pb) = ([x[h] for x in self.new[r]] for r in (0, 1))
            ia, ib = _common(pa, pb)
            if ia.numel() == 0:
                continue
            per = self.merged[h]
            for kind, (xa, xb) in (("k", (ka, kb)), ("v", (va, vb))):
                per[kind].extend(merge_pair(xa[ia], xb[ib], self.t, tau=per[kind].tau))
            self.pos[h] = torch.cat([self.pos[h], pa[ia]])
            for r, (k, v, p), i in ((0, (ka, va, pa), ia), (1, (kb, vb, pb), ib)):
                rest = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
                rest[i] = False
                self.new[r][0][h], self.new[r][1][h], self.new[r][2][h] = k[rest], v[rest], p[rest]

    # -- the device layout (methods/kernels/minicache_update.py) ------------------------------------------------
    def lay_out(self, extra: int) -> None:
        """Fixed-capacity parts for `extra` decode steps: per KV head, the merged tokens by group (2 * key retained
        + value retained) with room for every token merged while decoding, then each layer's plain rows (own rows,
        pending tokens) with room for two more. The per-head tensors are released until `take_back`."""
        la, lb = self.dev_layers
        H, d, dt = len(self.pos), la.head_dim, la.dtype
        dev = self.pos[0].device if H else torch.device("cpu")
        p = [len(x) for x in self.new[0][2]]
        if len(set(p)) > 1 or p != [len(x) for x in self.new[1][2]]:
            raise RuntimeError(f"minicache: layers of a pair hold different pending tokens {p} and "
                               f"{[len(x) for x in self.new[1][2]]}; the engine appends the same tokens to both")
        p = p[0] if p else 0
        M = p + extra  # tokens merged while decoding, at most
        groups, counts = [], []
        for per in self.merged:
            kret, vret = (torch.zeros(per["k"].n, dtype=torch.long, device=dev) for _ in range(2))
            kret[per["k"].ret.long()] = 1
            vret[per["v"].ret.long()] = 1
            groups.append(2 * kret + vret)
            counts.append(torch.bincount(groups[-1], minlength=4).tolist())
        own = [[len(x) for x in layer.opos] for layer in (la, lb)]
        plain_cap = [max(a, b) + p + 2 for a, b in zip(*own)]
        kst, vst = [[0] * H for _ in range(5)], [[0] * H for _ in range(5)]
        sizes = {"kdir": 0, "krow": 0, "vdir": 0, "vrow": 0}

        def region(buf: str, n: int) -> int:
            at = sizes[buf]
            sizes[buf] += n
            return at
        for h in range(H):
            for g in range(4):
                kst[g][h] = region("krow" if g >= 2 else "kdir", counts[h][g] + M)
                vst[g][h] = region("vrow" if g % 2 else "vdir", counts[h][g] + M)
        for h in range(H):
            kst[4][h], vst[4][h] = region("krow", plain_cap[h]), region("vrow", plain_cap[h])
        z = lambda *shape: torch.zeros(*shape, d, dtype=dt, device=dev)  # noqa: E731
        L = {"kdir": z(sizes["kdir"]), "kmag": torch.zeros(2, sizes["kdir"], dtype=dt, device=dev),
             "krow": z(2, sizes["krow"]), "vdir": z(sizes["vdir"]),
             "vmag": torch.zeros(2, sizes["vdir"], dtype=dt, device=dev), "vrow": z(2, sizes["vrow"]),
             "kst": torch.tensor(kst, device=dev), "vst": torch.tensor(vst, device=dev),
             "ppos": torch.zeros(2, sizes["krow"], dtype=torch.long, device=dev),
             "tau": torch.stack([torch.cat([per["k"].tau, per["v"].tau]) for per in self.merged]).float().to(dev)
             if H else torch.zeros(0, 2, device=dev),
             "rlog": torch.zeros(H, 2, max(M, 1), dtype=torch.int8, device=dev),
             "plog": torch.zeros(max(M, 1), dtype=torch.long, device=dev),
             "mcount": torch.zeros(H, dtype=torch.long, device=dev), "t": float(self.t), "pending": p}
        lens = [[[0] * H for _ in range(5)] for _ in range(2)]
        for h, (per, grp) in enumerate(zip(self.merged, groups)):
            for kind, st, buf in (("k", kst, "k"), ("v", vst, "v")):
                m = per[kind]
                ret = (grp >= 2) if kind == "k" else (grp % 2 == 1)
                mi, ri = torch.cumsum(~ret, 0) - 1, torch.cumsum(ret, 0) - 1  # index among merged / retained rows
                for g in range(4):
                    idx = (grp == g).nonzero().view(-1)
                    a = st[g][h]
                    if (g >= 2) if kind == "k" else (g % 2 == 1):
                        for r in range(2):
                            L[buf + "row"][r, a:a + len(idx)] = m.rows[r][ri[idx]]
                    else:
                        L[buf + "dir"][a:a + len(idx)] = m.dirs[mi[idx]]
                        for r in range(2):
                            L[buf + "mag"][r, a:a + len(idx)] = m.mags[r][mi[idx]]
            for r, layer in enumerate((la, lb)):
                nk, nv, npos = (x[h] for x in self.new[r])
                rows_k, rows_v = torch.cat([layer.ok[h], nk]), torch.cat([layer.ov[h], nv])
                n = rows_k.shape[0]
                L["krow"][r, kst[4][h]:kst[4][h] + n] = rows_k
                L["vrow"][r, vst[4][h]:vst[4][h] + n] = rows_v
                L["ppos"][r, kst[4][h]:kst[4][h] + n] = torch.cat([layer.opos[h], npos])
                lens[r][4][h] = n
                for g in range(4):
                    lens[r][g][h] = counts[h][g]
        L["lens"] = torch.tensor(lens, device=dev)
        from kvbench.methods.kernels.minicache_decode import part_splits  # split counts by each part's capacity
        L["splits"] = part_splits([max((c[g] for c in counts), default=0) + M for g in range(4)] +
                                  [max(plain_cap, default=0)], H, dev)
        # what the decode's records start from (bytes before it; a token's cost, merged or retained)
        e = torch.empty(0, dtype=dt).element_size()
        self.begin = _Begin([la.own_bytes(), lb.own_bytes()], self.shared_bytes(), [la.nbytes(), lb.nbytes()], p,
                            H * la.row_bytes, d * e, e)
        self.dev_state = {"groups": groups, "own": own}
        for m in (m for per in self.merged for m in per.values()):  # released: the layout holds the pair
            m.dirs = m.mags = m.rows = None
        for layer in (la, lb):
            layer.ok = layer.ov = None
        self.new = None
        self.dev, self.records = L, None

    def take_back(self) -> None:
        """Per-head tensors again, from the layout (one host read of its counts and log); the merge log becomes
        the decode's records. The layout is released."""
        L, la, lb = self.dev, *self.dev_layers
        st = self.dev_state
        lens, kst, vst = L["lens"].tolist(), L["kst"].tolist(), L["vst"].tolist()
        mcount = L["mcount"].tolist()
        m = mcount[0] if mcount else 0
        rlog = L["rlog"][:, :, :m].long()
        plog = L["plog"][:m]
        merged_pos = plog.to(self.pos[0].device) if self.pos else plog
        new = [[[], [], []] for _ in range(2)]
        for h in range(len(self.pos)):
            grp = torch.cat([st["groups"][h], 2 * rlog[h, 0] + rlog[h, 1]])
            onehot = torch.nn.functional.one_hot(grp, 4)
            rank = (torch.cumsum(onehot, 0) - onehot).gather(1, grp.view(-1, 1)).view(-1)  # index in its group
            for kind, stt in (("k", kst), ("v", vst)):
                ret = (grp >= 2) if kind == "k" else (grp % 2 == 1)
                at = torch.tensor([stt[g][h] for g in range(4)], device=grp.device)[grp] + rank
                mm = self.merged[h][kind]
                mm.n = grp.numel()
                mm.dirs = L[kind + "dir"][at[~ret]].clone()
                mm.mags = [L[kind + "mag"][r][at[~ret]].clone() for r in range(2)]
                mm.rows = [L[kind + "row"][r][at[ret]].clone() for r in range(2)]
                mm.ret = ret.nonzero().view(-1).to(torch.int32)
            self.pos[h] = torch.cat([self.pos[h], merged_pos])
            for r, layer in enumerate((la, lb)):
                o, n = st["own"][r][h], lens[r][4][h]
                k0, v0 = kst[4][h], vst[4][h]
                krow, vrow, pp = L["krow"][r], L["vrow"][r], L["ppos"][r]
                if layer.ok is None:
                    layer.ok, layer.ov = [None] * len(self.pos), [None] * len(self.pos)
                layer.ok[h], layer.ov[h] = krow[k0:k0 + o].clone(), vrow[v0:v0 + o].clone()
                new[r][0].append(krow[k0 + o:k0 + n].clone())
                new[r][1].append(vrow[v0 + o:v0 + n].clone())
                new[r][2].append(pp[k0 + o:k0 + n].clone())
        self.new = new
        self.records = _DecodeRecords(self.begin, rlog.sum(0).tolist() if len(self.pos) else [[], []],
                                      rlog.shape[0], m)
        self.dev = self.dev_state = None
        self.dev_layers = [None, None]

    def clone(self) -> "_Pair":
        return _Pair(self.t, [p.clone() for p in self.pos],
                     [{k: m.clone() for k, m in per.items()} for per in self.merged],
                     [[[x.clone() for x in xs] for xs in role] for role in self.new])


# what the keys and values of each part are (methods/kernels/minicache_decode.py): bit 0 keys merged (kmag * kdir,
# else krow), bit 1 values merged. Parts 0-3: the merged tokens by group 2 * (key retained) + (value retained);
# part 4: the layer's plain rows
PART_KINDS = (3, 1, 2, 0, 0)


@dataclass
class _Begin:
    own: list[int]      # each layer's own bytes when decoding began (pending rows included)
    shared: int         # the pair's shared bytes then
    nbytes: list[int]   # each layer's nbytes() then
    pending: int        # tokens each layer held unmerged then
    new_row: int        # one token's plain rows in all heads
    dir_bytes: int      # a merged direction (d values), or a retained row
    mag_bytes: int      # a magnitude (one value)


class _DecodeRecords:
    """Bytes of the pair after s full decode steps, from the bytes when it began and the merge log: after s >= 1
    steps the pair has merged pending + s - 1 tokens (the upper layer merges what it holds, then appends) and each
    layer holds one token pending. A merged key or value costs the pair a direction and each layer a magnitude;
    a retained one the pair an int32 index and each layer its row."""

    def __init__(self, begin: _Begin, retained: list[list[int]], n_heads: int, merges: int):
        self.b, self.n_heads, self.merges = begin, n_heads, merges
        # retained[kind][j]: heads whose j-th merged key (kind 0) / value (kind 1) was retained
        self.ret = [0]
        for j in range(merges):
            self.ret.append(self.ret[-1] + sum(r[j] for r in retained))
        self.new_row = begin.new_row

    def merged(self, s: int) -> int:
        m = 0 if s == 0 else self.b.pending + s - 1
        if m > self.merges:
            raise ValueError(f"minicache records: step {s} is past the decode's {self.merges} merged tokens")
        return m

    def _counts(self, s: int) -> tuple[int, int]:
        """(retained, merged) keys and values over every head, among the tokens merged after s steps."""
        m = self.merged(s)
        return self.ret[m], 2 * self.n_heads * m - self.ret[m]

    def shared(self, s: int) -> int:
        r, g = self._counts(s)
        return self.b.shared + g * self.b.dir_bytes + r * 4

    def own(self, role: int, s: int) -> int:
        r, g = self._counts(s)
        pending = self.b.pending if s == 0 else 1
        return (self.b.own[role] + (pending - self.b.pending) * self.new_row + g * self.b.mag_bytes
                + r * self.b.dir_bytes)

    def after(self, role: int, t: int) -> int:
        """nbytes() of layer `role` after its t-th append: the lower layer's comes before the upper layer merges
        that step, whose change of both layers the upper layer's count carries (the pair's total is exact)."""
        lower = self.b.nbytes[0] if t == 0 else self.own(0, t - 1) + self.shared(t - 1) + self.new_row
        if role == 0:
            return lower
        return self.own(0, t) + self.own(1, t) + self.shared(t) - lower

    def read_at(self, role: int, t: int) -> int:
        """read_bytes(1) before decode step t: both layers read the shared directions."""
        return self.own(role, t) + self.shared(t) + self.new_row


def _common(pa: torch.Tensor, pb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into pa and into pb of the positions both hold, in position order in both."""
    oa, ob = torch.argsort(pa), torch.argsort(pb)
    return oa[torch.isin(pa[oa], pb)], ob[torch.isin(pb[ob], pa)]


_KEY_SPAN = 1 << 40  # positions are below it: head * span + position orders flat rows by (head, position)


def _rows_by_head(layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The storage index of every row a layer holds, head by head (a head's spare capacity skipped), and the
    row's KV head; on the device, no host sync."""
    dev, lens, n = layer.keys.device, layer.lengths, layer.n_rows
    head = torch.repeat_interleave(torch.arange(layer.n_heads, device=dev), lens, output_size=n)
    return layer.starts[head] + torch.arange(n, device=dev) - (torch.cumsum(lens, 0) - lens)[head], head


def _common_first(head: torch.Tensor, pos: torch.Tensor, head_other: torch.Tensor, pos_other: torch.Tensor,
                  n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_common` of every KV head at once, one layer's side, on its flat rows (`head`, `pos`: each row's KV head
    and position): the order of its rows that puts first those whose position the other layer's same head holds,
    then the rest, each part head by head in position order; and the common tokens per head (on the device)."""
    key = head * _KEY_SPAN + pos
    o = torch.argsort(key)
    # a head holds a position once: keys are unique in each layer (so isin runs no `unique`, a host sync)
    both = torch.isin(key[o], head_other * _KEY_SPAN + pos_other, assume_unique=True)
    count = torch.zeros(n_heads, dtype=torch.long, device=pos.device).scatter_add_(0, head[o], both.long())
    return o[torch.argsort((~both).to(torch.int8), stable=True)], count


class MiniCacheLayer(EncodedLayer):
    """One layer of a merged pair. Per KV head h, rows in order: the pair's common tokens (pair.pos[h]; rebuilt
    from the shared merge), this layer's own rows (context tokens the other layer of the pair did not keep),
    then its appended tokens not merged yet."""
    shared_clone = True  # KVBenchCache.clone passes a memo: the pair's shared tensors are cloned once

    def __init__(self, fmt: "MiniCache", pair: _Pair, role: int, ok, ov, opos, dtype: torch.dtype, head_dim: int):
        self.fmt, self.pair, self.role = fmt, pair, role  # role 0: layer l (holds the shared bytes), 1: l+1
        self.ok, self.ov, self.opos = ok, ov, opos          # per head: own keys, values, positions
        self.dtype, self.head_dim = dtype, head_dim
        self.row_bytes = 2 * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def head_lengths(self) -> list[int]:
        new_pos = self.pair.new[self.role][2]
        return [a.numel() + b.numel() + c.numel() for a, b, c in zip(self.pair.pos, self.opos, new_pos)]

    @property
    def n_heads(self) -> int:
        return len(self.opos)  # (known while the device layout holds the rows)

    def own_bytes(self) -> int:
        return self.pair.role_bytes(self.role) + tensor_bytes(*self.ok, *self.ov)

    def nbytes(self) -> int:
        return self.own_bytes() + (self.pair.shared_bytes() if self.role == 0 else 0)

    def read_bytes(self, extra_tokens: int = 0) -> int:
        # both layers' attention reads the shared directions (one decode step reads them twice)
        return self.own_bytes() + self.pair.shared_bytes() + extra_tokens * self.n_heads * self.row_bytes

    def head_kv(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per = self.pair.merged[h]
        nk, nv, npos = (x[h] for x in self.pair.new[self.role])
        return (torch.cat([per["k"].restore(self.role), self.ok[h], nk]),
                torch.cat([per["v"].restore(self.role), self.ov[h], nv]),
                torch.cat([self.pair.pos[h], self.opos[h], npos]))

    def materialize(self) -> LayerKV:
        kvp = [self.head_kv(h) for h in range(self.n_heads)]
        return LayerKV._packed(torch.cat([x[0] for x in kvp]), torch.cat([x[1] for x in kvp]),
                               torch.cat([x[2] for x in kvp]), self.head_lengths)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """New tokens are plain rows until the pair's upper layer gets the next ones: then the tokens both layers
        hold are merged, so each layer's attention sees its newest tokens exactly (the paper merges a decoded
        token right after the step's attention; ours is one step later, the same token)."""
        before = self.pair.total_bytes()  # (a merge changes both layers' bytes; they share the cache's meter)
        if self.role == 1:
            self.pair.merge_new()
        self.pair.add_new(self.role, k, v, positions)
        if self.meter is not None:
            self.meter.add(self.pair.total_bytes() - before)

    # -- the GPU fast path (kvbench/store.py): the pair in fixed-capacity parts, merged on the device ---------
    # (methods/kernels/minicache_update.py describes the layout.) Each layer appends its token to its plain rows;
    # the upper layer first merges what it holds pending, as `append` does. What a decode stores depends on which
    # tokens are retained: the records come from the merge log after decoding (`records_after_decode`).
    device_decode = True
    device_first_step_differs = True  # the first step merges the question on top (P tokens), later steps one
    records_after_decode = True

    def device_begin(self, extra: int) -> None:
        """Both layers of the pair call this; the second lays the pair out (and releases its per-head tensors)."""
        self.pair.dev_layers[self.role] = self
        if all(layer is not None for layer in self.pair.dev_layers):
            self.pair.lay_out(extra)

    def device_step(self, q, k, v, pos, scaling):
        from kvbench.attention import _decode_kernel
        from kvbench.methods.kernels import minicache_decode as md, minicache_update as mu
        L, r = self.pair.dev, self.role
        P = 0
        if r == 1:
            P, L["pending"] = L["pending"], 1
        triton = _decode_kernel(q) == "triton"
        (mu.minicache_update_triton if triton else mu.minicache_update_ref)(k, v, pos, L, r, P)
        args = (q, L["kdir"], L["kmag"][r], L["krow"][r], L["vdir"], L["vmag"][r], L["vrow"][r], L["kst"], L["vst"],
                L["lens"][r], PART_KINDS, scaling)
        if triton:
            return md.minicache_decode_attention_triton(*args, num_splits=L["splits"])
        return md.minicache_decode_attention_ref(*args)

    def device_end(self) -> None:
        if self.pair.dev is not None:
            self.pair.take_back()

    def nbytes_after(self, t: int) -> int:
        return self._records().after(self.role, t)

    def read_bytes_at(self, t: int) -> int:
        return self._records().read_at(self.role, t)

    def _records(self) -> "_DecodeRecords":
        if self.pair.records is None:
            raise RuntimeError("minicache's decode records come from its merge log: read them after decoding")
        return self.pair.records

    def clone(self, memo: dict | None = None) -> "MiniCacheLayer":
        """A copy; `memo` (one per cache clone) makes the two layers of a pair share one copy of the pair."""
        memo = {} if memo is None else memo
        pair = memo.get(id(self.pair))
        if pair is None:
            pair = memo[id(self.pair)] = self.pair.clone()
        return MiniCacheLayer(self.fmt, pair, self.role, [t.clone() for t in self.ok], [t.clone() for t in self.ov],
                              [p.clone() for p in self.opos], self.dtype, self.head_dim)


def encode_pair(fmt: "MiniCache", la: LayerKV, lb: LayerKV) -> tuple[MiniCacheLayer, MiniCacheLayer]:
    """Layers l (la) and l+1 (lb) -> their two stores sharing one `_Pair`. Every KV head at once, on flat rows
    head by head: a fixed number of batched ops and two host reads (common tokens per head, then retained keys
    and values per head). A loop over heads (~30 small ops each, several of them host syncs) is launch-bound on
    a GPU: it added ~350 ms to an 8B model's time to first token at any length. Each head's tensors are views
    of the flat results (`_Merged.extend` and the decode's appends replace them, never write into them)."""
    for layer in (la, lb):
        if layer.log_weight() is not None:
            raise ValueError("minicache merges token rows across layers; a method that merges rows (log-weights) "
                             "does not compose with it")
    if la.n_heads != lb.n_heads:
        raise ValueError(f"minicache: layers of a pair have {la.n_heads} and {lb.n_heads} KV heads")
    H = la.n_heads
    (ra, ha), (rb, hb) = _rows_by_head(la), _rows_by_head(lb)
    pa, pb = la.positions[ra], lb.positions[rb]
    oa, count = _common_first(ha, pa, hb, pb, H)  # positions kept in both layers first, the same order in both
    ob, _ = _common_first(hb, pb, ha, pa, H)
    common = count.tolist()  # host read 1
    c = sum(common)
    ca, cb, head = ra[oa[:c]], rb[ob[:c]], ha[oa[:c]]
    merges = [_HeadMerges(xa[ca], xb[cb], head, count, fmt.gamma)
              for xa, xb in ((la.keys, lb.keys), (la.values, lb.values))]
    retained = torch.stack([m.retained for m in merges]).tolist()  # host read 2
    k, v = (m.split(common, r, fmt.t) for m, r in zip(merges, retained))
    pos, merged = list(pa[oa[:c]].split(common)), [{"k": k[h], "v": v[h]} for h in range(H)]
    own = []
    for layer, rows, order, p in ((la, ra, oa, pa), (lb, rb, ob, pb)):
        rest = order[c:]  # kept in this layer only: plain, as they are (head by head, in position order)
        sizes = [n - m for n, m in zip(layer.head_lengths, common)]
        own.append([list(x.split(sizes)) for x in (layer.keys[rows[rest]], layer.values[rows[rest]], p[rest])])
    d, dtype = la.keys.shape[1], la.keys.dtype
    empty = lambda: [la.keys.new_zeros(0, d) for _ in range(H)]
    new = [[empty(), empty(), [la.positions.new_zeros(0) for _ in range(H)]] for _ in range(2)]
    pair = _Pair(fmt.t, pos, merged, new)
    return tuple(MiniCacheLayer(fmt, pair, role, *own[role], dtype, d) for role in range(2))


@register_storage("minicache")
@dataclass
class MiniCache(Storage):
    start_layer: int | None = None  # first merged layer S (pairs S, S+1; S+2, S+3; ...); None: n_layers // 2
    t: float = 0.6                  # SLERP interpolation parameter (weight of the deeper layer's direction)
    gamma: float = 0.05             # retention threshold: top gamma of the pair's angular-distance range

    paper = "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models (2405.14366)"
    per_layer = False
    prefix = "method.storage."  # how errors name the knobs (method=minicache: "method.")

    def __post_init__(self):
        if self.start_layer is not None and (isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int)
                                             or self.start_layer < 0):
            raise ValueError(f"method.storage.start_layer={self.start_layer!r}; allowed: null (n_layers // 2) or "
                             "a layer index >= 0")
        for knob in ("t", "gamma"):
            x = getattr(self, knob)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= float(x) <= 1.0:
                raise ValueError(f"method.storage.{knob}={x!r}; allowed: a number in [0, 1]")

    def first_layer(self, n_layers: int) -> int:
        return n_layers // 2 if self.start_layer is None else self.start_layer

    def pairs(self, n_layers: int) -> list[tuple[int, int]]:
        return [(l, l + 1) for l in range(self.first_layer(n_layers), n_layers - 1, 2)]

    def check_model(self, n_layers: int, n_kv: int, head_dim: int) -> None:
        if n_layers and not self.pairs(n_layers):
            s = self.first_layer(n_layers)
            which = f"{s} (n_layers // 2)" if self.start_layer is None else str(s)
            raise ValueError(f"{self.prefix}start_layer={which} leaves no pair of layers to merge in a "
                             f"{n_layers}-layer model; allowed: 0 .. {n_layers - 2}")

    def encode(self, layer, layer_idx, n_layers, query=None):
        raise ValueError("minicache spans two layers: it encodes the whole cache (encode_cache), not one layer")

    def encode_cache(self, cache: KVBenchCache) -> None:
        self.check_model(len(cache.kv), 0, 0)
        for a, b in self.pairs(len(cache.kv)):
            la, lb = cache.kv[a], cache.kv[b]
            if not (isinstance(la, LayerKV) and isinstance(lb, LayerKV)):
                continue  # a layer without plain rows (not prefilled, or already encoded) is left as it is
            before = la.nbytes() + lb.nbytes()
            meter = la.meter
            sa, sb = encode_pair(self, la, lb)
            sa.meter = sb.meter = meter
            cache.kv[a], cache.kv[b] = sa, sb
            if meter is not None:
                meter.add(sa.nbytes() + sb.nbytes() - before)


@register_method("minicache")
@dataclass
class MiniCacheMethod(Method):
    """Every token kept, layers merged by MiniCache: `method=minicache method.t=0.5` is `method=full
    method.storage=minicache method.storage.t=0.5`."""
    start_layer: int | None = None
    t: float = 0.6
    gamma: float = 0.05

    paper = MiniCache.paper
    family = "cross-layer merging: SLERP of adjacent layers' directions, per-layer magnitudes, token retention"
    uses_budget = False

    def __post_init__(self):
        super().__post_init__()
        try:
            self.storage = MiniCache(self.start_layer, self.t, self.gamma)
        except ValueError as e:  # name the knob as the user wrote it (method.t, not method.storage.t)
            raise ValueError(str(e).replace("method.storage.", "method.")) from None
        self.storage.prefix = "method."
