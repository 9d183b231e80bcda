"""MiniCache storage (methods/minicache.py) against references written here from the paper's equations
(2405.14366: SLERP of directions Eq. 3, per-layer magnitudes and restoration Eq. 2, retention by angular
distance d = Omega / pi), hand-made vectors, hand-counted bytes, and engine runs on the tiny synthetic model."""
import math

import pytest
import torch

from kvbench.attention import attend
from kvbench.cache import KVBenchCache, LayerKV
from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.methods.minicache import (MiniCache, MiniCacheLayer, _common, _Pair, encode_pair, merge_pair, slerp,
                                        unit_and_norm)
from kvbench.models import load_model
from kvbench.task import Query, Sample


# -- the paper's equations, one token at a time, in float64 ------------------------------------------------
def ref_slerp(a: list[float], b: list[float], t: float) -> list[float]:
    """Eq. 3 on two vectors: e = sin((1-t) W) / sin W * a/|a| + sin(t W) / sin W * b/|b|, W = arccos(cos)."""
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    ua, ub = [x / na for x in a], [x / nb for x in b]
    w = math.acos(max(-1.0, min(1.0, sum(x * y for x, y in zip(ua, ub)))))
    if math.sin(w) < 1e-12:
        return ua
    return [math.sin((1 - t) * w) / math.sin(w) * x + math.sin(t * w) / math.sin(w) * y for x, y in zip(ua, ub)]


def ref_distance(a, b) -> float:
    """The paper's angular distance d = arccos(a.b / (|a||b|)) / pi, in [0, 1]."""
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return math.acos(max(-1.0, min(1.0, sum(x * y for x, y in zip(a, b)) / (na * nb)))) / math.pi


def ref_retained(dist: list[float], gamma: float) -> list[bool]:
    """Retained (unmerged): d above d_max - gamma (d_max - d_min) of the pair's tokens."""
    lo, hi = min(dist), max(dist)
    return [d > hi - gamma * (hi - lo) for d in dist]


def ref_merge(xa: torch.Tensor, xb: torch.Tensor, t: float, gamma: float):
    """Both layers' restored rows (Eq. 2: |x| * e for merged tokens, the original row for retained ones) and the
    retained flags."""
    A, B = xa.double().tolist(), xb.double().tolist()
    keep = ref_retained([ref_distance(a, b) for a, b in zip(A, B)], gamma)
    ra, rb = [], []
    for a, b, k in zip(A, B, keep):
        if k:
            ra.append(a), rb.append(b)
        else:
            e = ref_slerp(a, b, t)
            na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
            ra.append([na * x for x in e]), rb.append([nb * x for x in e])
    return torch.tensor(ra, dtype=torch.float64), torch.tensor(rb, dtype=torch.float64), keep


# -- SLERP, magnitudes, retention ------------------------------------------------------------------------
def test_slerp_of_hand_made_vectors():
    ua, ub = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    s = 1 / math.sqrt(2)
    assert torch.allclose(slerp(ua, ub, 0.5), torch.tensor([[s, s, 0.0]]), atol=1e-7)  # the 45-degree unit vector
    assert torch.allclose(slerp(ua, ub, 0.0), ua) and torch.allclose(slerp(ua, ub, 1.0), ub, atol=1e-7)
    # t = 0.6 (the paper's default) moves 0.6 of the 90 degrees from layer l towards layer l+1: 54 degrees
    a54 = math.radians(54)
    assert torch.allclose(slerp(ua, ub, 0.6), torch.tensor([[math.cos(a54), math.sin(a54), 0.0]]), atol=1e-6)
    # 120 degrees apart, t = 0.5: the unit vector at 60 degrees, on the arc (not the chord's shorter midpoint)
    ub2 = torch.tensor([[math.cos(math.radians(120)), math.sin(math.radians(120)), 0.0]])
    assert torch.allclose(slerp(ua, ub2, 0.5), torch.tensor([[0.5, math.sqrt(3) / 2, 0.0]]), atol=1e-6)
    # parallel rows: the direction itself
    assert torch.allclose(slerp(ua, ua, 0.6), ua)


def test_slerp_and_magnitudes_match_the_paper_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(50, 8, generator=g) * 3, torch.randn(50, 8, generator=g)
    ua, na = unit_and_norm(xa)
    ub, nb = unit_and_norm(xb)
    for t in (0.3, 0.6):
        ref = torch.tensor([ref_slerp(a, b, t) for a, b in zip(xa.double().tolist(), xb.double().tolist())],
                           dtype=torch.float64)
        assert torch.allclose(slerp(ua, ub, t).double(), ref, atol=1e-6)
    assert torch.allclose(na, xa.norm(dim=-1)) and torch.allclose(nb, xb.norm(dim=-1))
    m = merge_pair(xa, xb, 0.6, 0.0)  # gamma 0: nothing retained, every token merged
    assert m.ret.numel() == 0 and torch.allclose(m.mags[0], xa.norm(dim=-1)) and torch.allclose(m.mags[1], nb)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.25, 1.0])
def test_retention_set_is_the_threshold_definition(gamma):
    # layer l+1's token i at a known angle from layer l's: 0, 7.5, ..., 180 degrees -> d = 0 .. 1
    angles = [math.radians(7.5 * i) for i in range(25)]
    xa = torch.tensor([[2.0, 0.0, 0.0]] * 25)
    xb = torch.tensor([[math.cos(w), math.sin(w), 0.0] for w in angles])
    m = merge_pair(xa, xb, 0.6, gamma)
    expect = [i for i, w in enumerate(angles) if w / math.pi > 1 - gamma]  # d_min = 0, d_max = 1
    assert m.ret.tolist() == expect
    assert m.ret.tolist() == [i for i, k in enumerate(ref_retained([w / math.pi for w in angles], gamma)) if k]
    if gamma == 0.25:
        assert expect == [19, 20, 21, 22, 23, 24]  # above 135 degrees
    assert m.dirs.shape == (25 - len(expect), 3) and m.rows[0].shape == (len(expect), 3)


def test_merge_matches_the_reference_and_retained_rows_are_exact():
    g = torch.Generator().manual_seed(3)
    xa = torch.randn(64, 16, generator=g)
    xb = xa + 0.6 * torch.randn(64, 16, generator=g)  # similar layers, as the paper observes mid-depth
    m = merge_pair(xa, xb, 0.6, 0.3)
    ra, rb, keep = ref_merge(xa, xb, 0.6, 0.3)
    assert m.ret.tolist() == [i for i, k in enumerate(keep) if k] and 0 < m.ret.numel() < 64
    assert torch.allclose(m.restore(0).double(), ra, atol=1e-5)
    assert torch.allclose(m.restore(1).double(), rb, atol=1e-5)
    idx = m.ret.long()
    assert torch.equal(m.restore(0)[idx], xa[idx]) and torch.equal(m.restore(1)[idx], xb[idx])


# -- the store: bytes, reconstruction, composition, clone ---------------------------------------------------
def _cache(n_layers=4, h=2, n=40, d=16, dtype=torch.float32, seed=0, noise=0.5, pos=None):
    """A prefilled KVBenchCache of similar adjacent layers (each = the one below + noise)."""
    g = torch.Generator().manual_seed(seed)
    c = KVBenchCache(n_layers)
    k, v = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
    for li in range(n_layers):
        layer = LayerKV.from_dense(k.to(dtype), v.to(dtype), torch.arange(n) if pos is None else pos)
        layer.meter = c.held
        c.held.add(layer.nbytes())
        c.kv[li] = layer
        k = k + noise * torch.randn(h, n, d, generator=g)
        v = v + noise * torch.randn(h, n, d, generator=g)
    c.seen_tokens = n
    return c


def ref_threshold(xa, xb, gamma) -> float:
    dist = [ref_distance(a, b) for a, b in zip(xa.double().tolist(), xb.double().tolist())]
    return max(dist) - gamma * (max(dist) - min(dist))


def pair_bytes(retained: list[int], n: int, d: int, es: int, pending=(0, 0), heads=2):
    """Hand count for a pair with n common tokens per head, r retained of them per (head, keys / values):
    shared = (n - r) directions of d entries + r int32 indices + an fp32 threshold (in layer l's bytes); each
    layer: n - r magnitudes + r rows, and its appended rows not merged yet (keys + values)."""
    shared = sum((n - r) * d * es + 4 * r + 4 for r in retained)
    own = sum((n - r) * es + r * d * es for r in retained)
    return [shared + own + pending[0] * heads * 2 * d * es, own + pending[1] * heads * 2 * d * es]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_bytes_count_shared_rows_once(dtype):
    es = torch.empty(0, dtype=dtype).element_size()
    c = _cache(n_layers=5, dtype=dtype)
    plain = [l.clone() for l in c.kv]
    fmt = MiniCache(t=0.6, gamma=0.2)  # 5 layers: start 2, pair (2, 3), layer 4 stays plain
    assert fmt.pairs(5) == [(2, 3)]
    fmt.encode_cache(c)
    assert [type(l).__name__ for l in c.kv] == ["LayerKV", "LayerKV", "MiniCacheLayer", "MiniCacheLayer", "LayerKV"]
    kinds = [(h, x) for h in range(2) for x in (0, 1)]  # (head, keys 0 / values 1)
    rows = lambda li, h, x: plain[li].head(h)[x].float()
    r_ctx = [sum(ref_merge(rows(2, h, x), rows(3, h, x), 0.6, 0.2)[2]) for h, x in kinds]
    lower, upper = pair_bytes(r_ctx, 40, 16, es)
    assert c.kv[2].nbytes() == lower and c.kv[3].nbytes() == upper
    assert c.nbytes() == 3 * 40 * 2 * 2 * 16 * es + lower + upper
    assert c.held.now == c.nbytes()  # the meter moved from the plain rows to the stores
    assert c.kv[3].read_bytes() == c.kv[2].nbytes()  # layer l+1's attention reads the shared directions too
    # appended tokens: plain rows in each layer until the upper layer gets the next ones, then merged; a new
    # token is retained when its angle exceeds the encoding's threshold (token 41's keys: opposite in layer 3)
    g = torch.Generator().manual_seed(5)
    ka, va = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    kb, vb = ka + 0.1 * torch.randn(2, 3, 16, generator=g), va + 0.1 * torch.randn(2, 3, 16, generator=g)
    kb[:, 1] = -ka[:, 1]
    new_pos = torch.tensor([40, 41, 42])
    c.kv[2].append(ka, va, new_pos)
    assert c.kv[2].nbytes() == lower + 3 * 2 * 2 * 16 * es and c.held.now == c.nbytes()
    c.kv[3].append(kb, vb, new_pos)
    assert (c.kv[2].head_lengths, c.kv[3].head_lengths) == ([43, 43], [43, 43])
    assert c.kv[3].nbytes() == upper + 3 * 2 * 2 * 16 * es and c.kv[2].pair.pos[0].numel() == 40
    one = torch.randn(2, 1, 16, generator=g)
    c.kv[2].append(one, one, torch.tensor([43]))
    c.kv[3].append(one, one, torch.tensor([43]))  # tokens 40..42 merge now; 43 stays plain in both
    assert c.kv[2].pair.pos[1].tolist() == list(range(43)) and c.kv[3].head_lengths == [44, 44]
    new = {0: (ka, kb), 1: (va, vb)}
    r_new = [sum(d > ref_threshold(rows(2, h, x), rows(3, h, x), 0.2)
                 for d in (ref_distance(a, b) for a, b in zip(new[x][0][h].tolist(), new[x][1][h].tolist())))
             for h, x in kinds]
    assert r_new[0] == r_new[2] == 1  # the opposite keys, and only them
    lower, upper = pair_bytes([a + b for a, b in zip(r_ctx, r_new)], 43, 16, es, pending=(1, 1))
    assert (c.kv[2].nbytes(), c.kv[3].nbytes()) == (lower, upper) and c.held.now == c.nbytes()
    for li, (k, v) in ((2, (ka, va)), (3, (kb, vb))):  # the retained new keys are the originals
        assert torch.equal(c.kv[li].materialize().head(0)[0][41], k[0, 1].to(dtype))


def test_identical_layers_reconstruct_exactly():
    c = _cache(n_layers=2, noise=0.0)
    orig = c.kv[0].clone()
    MiniCache(start_layer=0).encode_cache(c)
    for li in range(2):
        st = c.kv[li]
        assert all(m.ret.numel() == 0 for per in st.pair.merged for m in per.values())  # all merged
        mat = st.materialize()
        for h in range(2):
            k, v, p = mat.head(h)
            k0, v0, p0 = orig.head(h)
            assert torch.equal(p, p0)
            assert torch.allclose(k, k0, rtol=1e-6, atol=1e-6) and torch.allclose(v, v0, rtol=1e-6, atol=1e-6)


def test_store_attention_equals_dense_reference_over_the_papers_restoration():
    c = _cache(n_layers=2, n=48)
    plain = [l.clone() for l in c.kv]
    MiniCache(start_layer=0, t=0.6, gamma=0.1).encode_cache(c)
    q = torch.randn(4, 1, 16, generator=torch.Generator().manual_seed(9))
    for li in range(2):
        out, _ = c.kv[li].attend(q, 0.25)
        for h in range(2):
            ka, va, _ = plain[0].head(h)
            kb, vb, _ = plain[1].head(h)
            k = ref_merge(ka, kb, 0.6, 0.1)[li]
            v = ref_merge(va, vb, 0.6, 0.1)[li]
            qh = q[2 * h:2 * h + 2, 0].double()  # 2 query heads per KV head
            ref = torch.softmax(qh @ k.T * 0.25, dim=-1) @ v
            assert torch.allclose(out[2 * h:2 * h + 2, 0].double(), ref, atol=1e-5)


def test_composition_merges_only_positions_kept_in_both_layers():
    c = _cache(n_layers=2, n=30)
    keep_a = [torch.tensor([0, 2, 3, 5, 8, 13, 21, 29]), torch.arange(0, 30, 2)]
    keep_b = [torch.tensor([1, 2, 3, 8, 13, 20, 29]), torch.arange(0, 30, 3)]
    c.kv[0].keep(keep_a)
    c.kv[1].keep(keep_b)
    plain = [l.clone() for l in c.kv]
    MiniCache(start_layer=0, gamma=0.0).encode_cache(c)  # gamma 0: every common token merged
    for h in range(2):
        common = sorted(set(keep_a[h].tolist()) & set(keep_b[h].tolist()))
        assert c.kv[0].pair.pos[h].tolist() == common
        for li, keep in ((0, keep_a), (1, keep_b)):
            st = c.kv[li]
            assert st.head_lengths[h] == keep[h].numel()
            own = sorted(set(keep[h].tolist()) - set(common))
            assert st.opos[h].tolist() == own
            k, v, p = st.materialize().head(h)
            k0, v0, p0 = plain[li].head(h)
            assert sorted(p.tolist()) == sorted(p0.tolist())
            for j, pos in enumerate(p.tolist()):  # rows kept in one layer only are the originals, bit for bit
                i0 = p0.tolist().index(pos)
                if pos in own:
                    assert torch.equal(k[j], k0[i0]) and torch.equal(v[j], v0[i0])


def test_cache_clone_copies_each_pairs_shared_tensors_once():
    c = _cache(n_layers=4)
    MiniCache().encode_cache(c)  # start 2: pair (2, 3)
    d = c.clone()
    a, b = d.kv[2], d.kv[3]
    assert isinstance(a, MiniCacheLayer) and a.pair is b.pair and a.pair is not c.kv[2].pair
    assert a.pair.merged[0]["k"].dirs.data_ptr() != c.kv[2].pair.merged[0]["k"].dirs.data_ptr()
    assert d.nbytes() == c.nbytes() and d.held.now == c.nbytes()
    before = [x.materialize().keys.clone() for x in c.kv[2:]]
    a.pair.merged[0]["k"].dirs.zero_()
    a.append(torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.tensor([40]))
    assert b.materialize().keys[:40].abs().sum() < before[1][:40].abs().sum()  # both clone layers see the pair
    assert all(torch.equal(x.materialize().keys, y) for x, y in zip(c.kv[2:], before))  # the original is intact
    assert c.kv[2].head_lengths == [40, 40] and d.held.now == d.nbytes()


# -- the batched encoding against the per-head loop it replaced -----------------------------------------------
def _encode_pair_per_head(fmt, la: LayerKV, lb: LayerKV):
    """encode_pair as it was, one KV head at a time (~30 small ops per head): the reference of the batched one."""
    pos, merged, own = [], [], ([], [])
    for h in range(la.n_heads):
        ka, va, pa = la.head(h)
        kb, vb, pb = lb.head(h)
        ia, ib = _common(pa, pb)  # positions kept in both layers, in position order
        pos.append(pa[ia].clone())
        merged.append({"k": merge_pair(ka[ia], kb[ib], fmt.t, fmt.gamma),
                       "v": merge_pair(va[ia], vb[ib], fmt.t, fmt.gamma)})
        for role, (k, v, p, i) in enumerate(((ka, va, pa, ia), (kb, vb, pb, ib))):
            rest = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
            rest[i] = False  # kept in this layer only: plain, as they are (in position order)
            o = torch.argsort(p)
            o = o[rest[o]]
            own[role].append((k[o].clone(), v[o].clone(), p[o].clone()))
    d, dtype = la.keys.shape[1], la.keys.dtype
    empty = lambda: [la.keys.new_zeros(0, d) for _ in range(la.n_heads)]
    new = [[empty(), empty(), [la.positions.new_zeros(0) for _ in range(la.n_heads)]] for _ in range(2)]
    pair = _Pair(fmt.t, pos, merged, new)
    return tuple(MiniCacheLayer(fmt, pair, role, [x[0] for x in own[role]], [x[1] for x in own[role]],
                                [x[2] for x in own[role]], dtype, d)
                 for role in range(2))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _assert_same_pair(got, ref):
    """Two encodings of a pair hold the same tensors, bit for bit, head by head, and count the same bytes."""
    pg, pr = got[0].pair, ref[0].pair
    assert got[1].pair is pg and len(pg.pos) == len(pr.pos)
    for h in range(len(pr.pos)):
        assert _same(pg.pos[h], pr.pos[h])
        for kind in ("k", "v"):
            mg, mr = pg.merged[h][kind], pr.merged[h][kind]
            assert mg.n == mr.n
            for x, y in [(mg.dirs, mr.dirs), (mg.ret, mr.ret), (mg.tau, mr.tau), *zip(mg.mags, mr.mags),
                         *zip(mg.rows, mr.rows)]:
                assert _same(x, y), (h, kind)
    for lg, lr in zip(got, ref):
        for h in range(len(pr.pos)):
            assert _same(lg.ok[h], lr.ok[h]) and _same(lg.ov[h], lr.ov[h]) and _same(lg.opos[h], lr.opos[h])
        assert lg.nbytes() == lr.nbytes() and lg.read_bytes() == lr.read_bytes()
        assert lg.head_lengths == lr.head_lengths


def _layer_pair(h=4, n=64, d=16, dtype=torch.float32, seed=0, noise=0.5, spare=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
    pos = torch.randperm(n, generator=g) if shuffle else torch.arange(n)  # heads' rows in any position order
    la = LayerKV.from_dense(k.to(dtype), v.to(dtype), pos, spare=spare)
    lb = LayerKV.from_dense((k + noise * torch.randn(h, n, d, generator=g)).to(dtype),
                            (v + noise * torch.randn(h, n, d, generator=g)).to(dtype), pos, spare=spare)
    return la, lb


def _check_batched(la, lb, fmt):
    got, ref = encode_pair(fmt, la, lb), _encode_pair_per_head(fmt, la, lb)
    _assert_same_pair(got, ref)
    return got, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(h=4, n=64, d=16), dict(h=8, n=300, d=32, spare=5, shuffle=True),
                                   dict(h=2, n=1, d=8), dict(h=3, n=2100, d=16)])
def test_batched_encoding_equals_per_head_loop_uniform_heads(dtype, shape):
    la, lb = _layer_pair(dtype=dtype, **shape)
    got, ref = _check_batched(la, lb, MiniCache(t=0.6, gamma=0.05))
    assert any(m.ret.numel() for per in got[0].pair.merged for m in per.values()) or shape["n"] < 4
    # appended tokens merge onto the encoding (`_Merged.extend` over the per-head views) as onto the reference
    h, d = shape["h"], shape["d"]
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        k, v = torch.randn(h, 2, d, generator=g).to(dtype), torch.randn(h, 2, d, generator=g).to(dtype)
        p = torch.tensor([10_000 + 2 * step, 10_001 + 2 * step])
        for layers in (got, ref):
            layers[0].append(k, v, p)
            layers[1].append(-k if step == 1 else k + 0.1, v, p)  # step 1: opposite keys, retained
    _assert_same_pair(got, ref)
    for lg, lr in zip(got, ref):
        assert all(_same(x, y) for x, y in zip(lg.materialize().dense(), lr.materialize().dense()))
    c = got[0].clone()  # a clone owns its tensors: writing into it leaves the encoding as it was
    c.pair.merged[0]["k"].dirs.zero_()
    c.ok[0].zero_()
    _assert_same_pair(got, ref)


def test_batched_encoding_equals_per_head_loop_ragged_heads():
    """Composed with an eviction method: each head keeps its own positions, different in the two layers."""
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        la, lb = _layer_pair(h=6, n=200, d=16, dtype=dtype, seed=3)
        keep_a = [torch.randperm(200, generator=g)[:120],   # two random sets: many common positions
                  torch.arange(0, 100),                     # no position in common with layer b's head 1
                  torch.tensor([5, 17, 40, 41, 199]),       # one common position (40)
                  torch.arange(0, 200, 2),                  # layer b keeps them all, and more
                  torch.tensor([], dtype=torch.long),       # holds nothing in layer a
                  torch.arange(150, 200)]
        keep_b = [torch.randperm(200, generator=g)[:90],
                  torch.arange(100, 200),
                  torch.tensor([3, 40, 90, 150]),
                  torch.arange(0, 200),
                  torch.arange(10, 30),
                  torch.arange(150, 200)]                   # the same positions as layer a
        la.keep(keep_a)
        lb.keep(keep_b)
        for gamma in (0.0, 0.05, 0.5, 1.0):
            got, _ = _check_batched(la, lb, MiniCache(t=0.6, gamma=gamma))
            n = [m["k"].n for m in got[0].pair.merged]
            assert n[1] == n[4] == 0 and n[2] == 1 and n[3] == 100 and n[5] == 50
            assert got[0].pair.merged[1]["k"].tau.item() == 1.0  # no token: nothing is farther than d = 1
            if gamma == 1.0:  # the threshold is d_min: a single common token (d = d_min) is merged
                assert got[0].pair.merged[2]["k"].ret.numel() == 0


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_batched_encoding_equals_per_head_loop_identical_layers(gamma):
    """Layer l+1 = layer l: every angle 0, every token merged (d is never above the threshold)."""
    la, _ = _layer_pair(h=4, n=100, d=16, seed=5)
    got, _ = _check_batched(la, la.clone(), MiniCache(t=0.6, gamma=gamma))
    assert all(m.ret.numel() == 0 for per in got[0].pair.merged for m in per.values())
    la, lb = _layer_pair(h=4, n=100, d=16, seed=5, noise=1.0)
    _check_batched(la, lb, MiniCache(t=0.3, gamma=gamma))  # gamma 1: all but each head's closest retained


# -- engine runs on the tiny synthetic model (2 layers: start_layer=0 merges them) ---------------------------
@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")  # CPU byte counts


def _run(lm, name, budget=None, n=300, new=8, **knobs):
    ids = torch.randint(10, 400, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(lm, build_method(name, budget=budget, **knobs), query_aware=True)
    cache, m = eng.new_cache(), eng.method.fork()
    pre = eng.prefill(cache, ids, m, compress=True)
    after = (cache.nbytes(), [list(x) for x in cache.head_lengths()])
    out, _, _ = eng.decode(cache, m, pre.logits, new)
    return eng, cache, after, out


def test_engine_minicache_alone_and_composed_with_snapkv(tiny):
    _, full, (full_bytes, full_lens), full_out = _run(tiny, "full")
    eng, c, (mb, lens), out = _run(tiny, "minicache", start_layer=0)
    assert lens == full_lens and all(isinstance(x, MiniCacheLayer) for x in c.kv)
    assert len(out) == len(full_out) and c.kv[0].pair is c.kv[1].pair
    # 300 tokens, fp32, d = 16, 2 heads, keys and values: r retained of 300 per (head, kind)
    # (the retained counts come from the store; test_retention_set_is_the_threshold_definition checks the set)
    rs = [int((m.ret < 300).sum()) for per in c.kv[0].pair.merged for m in per.values()]
    pb = pair_bytes(rs, 300, 16, 4)
    assert mb == sum(pb) < full_bytes
    # 7 decoded tokens fed back: 300..305 merged across the pair, 306 still plain in both layers
    assert c.kv[0].head_lengths == [307, 307] and c.kv[0].pair.pos[0][-6:].tolist() == list(range(300, 306))
    assert [x[2][0].tolist() for x in c.kv[0].pair.new] == [[306], [306]]
    shared = pb[0] - pb[1]  # read by both layers' attention
    assert eng.last_read_bytes[0] == sum(pb) + shared + 2 * 2 * 2 * 16 * 4  # + the token being decoded
    # eviction x merging: snapkv's kept positions, merged where both layers kept them
    _, plain, (pb, plens), _ = _run(tiny, "snapkv", budget=64)
    _, sk, (sb, slens), _ = _run(tiny, "snapkv", budget=64, storage={"name": "minicache", "start_layer": 0})
    assert slens == plens and sb < pb
    for h in range(2):
        kept = [set(plain.kv[li].head(h)[2][:64].tolist()) for li in range(2)]
        common = sorted(kept[0] & kept[1])
        assert sk.kv[0].pair.pos[h].tolist() == common + list(range(300, 306))  # + the decoded tokens merged
        for li in range(2):
            st = sk.kv[li]
            assert st.opos[h].tolist() == sorted(kept[li] - kept[1 - li])  # kept in one layer only: plain


def test_engine_decode_reads_the_papers_restoration(tiny):
    """A decode step over the merged cache gives the logits of the same step over plain layers holding the
    reference restoration (Eq. 2-3 and retention, computed here from the full cache's rows)."""
    ids = torch.randint(10, 400, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    full = Engine(tiny, build_method("full"), query_aware=True)
    cf = full.new_cache()
    full.prefill(cf, ids, None, compress=False)
    la, lb = cf.kv
    rows = {li: {"k": [], "v": []} for li in range(2)}
    for h in range(2):
        ka, va, _ = la.head(h)
        kb, vb, _ = lb.head(h)
        for kind, (xa, xb) in (("k", (ka, kb)), ("v", (va, vb))):
            ra, rb, _ = ref_merge(xa, xb, 0.6, 0.05)
            rows[0][kind].append(ra.float()), rows[1][kind].append(rb.float())
    exact = full._forward(cf.clone(), [7], None, "decode")[0]
    cf.kv = [LayerKV.from_dense(torch.stack(rows[li]["k"]), torch.stack(rows[li]["v"]), torch.arange(200))
             for li in range(2)]
    ref = full._forward(cf, [7], None, "decode")[0]
    eng = Engine(tiny, build_method("minicache", start_layer=0), query_aware=True)
    cm, m = eng.new_cache(), eng.method.fork()
    eng.prefill(cm, ids, m, compress=True)
    got = eng._forward(cm, [7], m, "decode")[0]
    assert torch.allclose(got, ref, atol=1e-4) and not torch.allclose(got, exact, atol=1e-4)


def test_engine_multi_request_clones_the_merged_context(tiny):
    eng = Engine(tiny, build_method("minicache", start_layer=0), query_aware=False, use_chat_template=False)
    ctx = torch.randint(10, 400, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    q1, q2 = [5, 6, 7], [8, 9, 10, 11]
    cache0, m = eng.new_cache(), eng.method.fork()
    eng.prefill(cache0, ctx, m, compress=True)
    snap = [l.materialize() for l in cache0.kv]
    logits = []
    for q in (q1, q2):  # each query on its own clone of the merged context, as run_sample does
        c = cache0.clone()
        assert c.kv[0].pair is c.kv[1].pair and c.kv[0].pair is not cache0.kv[0].pair
        pre = eng.prefill(c, q, m, compress=False)  # the question: plain rows appended in each layer
        out, _, _ = eng.decode(c, m, pre.logits, 4)
        assert c.kv[0].head_lengths == [120 + len(q) + 3] * 2 and c.held.now == c.nbytes()
        logits.append(pre.logits)
    for l, s in zip(cache0.kv, snap):  # the shared context is untouched by its clones
        assert l.head_lengths == [120, 120] and torch.equal(l.materialize().keys, s.keys)
    fresh = eng.prefill(cache0, q2, m, compress=False)  # q2 on the context itself: same logits as on a clone
    assert torch.equal(fresh.logits, logits[1]) and not torch.equal(logits[0], logits[1])
    # and through run_sample (multi_request): every query records the merged context's bytes
    recs = eng.run_sample(Sample(id="a", context=" ".join(f"item{i}" for i in range(120)), mode="multi_request",
                                 queries=[Query(question=" first?", answers=[], max_new_tokens=3),
                                          Query(question=" second one?", answers=[], max_new_tokens=3)]))
    assert [r["context_reused"] for r in recs] == [False, True]
    assert recs[0]["kv_bytes"] == recs[1]["kv_bytes"] < recs[0]["kv_bytes_full"]


# -- knobs -----------------------------------------------------------------------------------------------------
def test_default_start_layer_is_half_depth():
    assert MiniCache().pairs(32) == [(l, l + 1) for l in range(16, 32, 2)]
    assert MiniCache().pairs(7) == [(3, 4), (5, 6)]
    assert MiniCache(start_layer=1).pairs(4) == [(1, 2)]


def test_bad_knobs_are_one_line(tiny):
    with pytest.raises(ValueError, match=r"^method.storage.t=1.5; allowed: a number in \[0, 1\]$"):
        build_method("snapkv", budget=64, storage={"name": "minicache", "t": 1.5})
    with pytest.raises(ValueError, match=r"^method.storage.gamma=-0.1; allowed: a number in \[0, 1\]$"):
        build_method("snapkv", budget=64, storage={"name": "minicache", "gamma": -0.1})
    with pytest.raises(ValueError, match=r"^method.start_layer=-1; allowed: null \(n_layers // 2\) or a layer"):
        build_method("minicache", start_layer=-1)
    with pytest.raises(ValueError, match=r"^method.t='x'; allowed"):
        build_method("minicache", t="x")
    with pytest.raises(ValueError, match=r"method.storage.colour is not a knob of storage minicache"):
        build_method("snapkv", budget=64, storage={"name": "minicache", "colour": 1})
    with pytest.raises(ValueError, match=r"method=h2o scores or evicts rows while decoding"):
        build_method("h2o", budget=64, storage="minicache")
    with pytest.raises(ValueError, match=r"method=minicache is the minicache storage itself"):
        build_method("minicache", storage="kivi")
    # the tiny model has 2 layers: the default start (2 // 2 = 1) leaves no pair; refused before any sample
    with pytest.raises(ValueError, match=r"^method.start_layer=1 \(n_layers // 2\) leaves no pair of layers to "
                                         r"merge in a 2-layer model; allowed: 0 .. 0$"):
        Engine(tiny, build_method("minicache"), query_aware=True)
    with pytest.raises(ValueError, match=r"^method.storage.start_layer=5 leaves no pair"):
        Engine(tiny, build_method("snapkv", budget=8, storage={"name": "minicache", "start_layer": 5}))
