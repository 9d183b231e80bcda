"""Wave-2 KV-cache methods on a tiny random Llama (2 layers, 4 query heads, 2 KV heads, d=16).

For each method: (1) after prefill every layer/head holds what its allocator promised and the cache's bytes
equal kept tokens × bytes per token; (2) the kept tokens equal a slow reference written here with loops over
heads/rows and explicit causal softmaxes on the layer's captured queries/keys; (3) decode-time methods never
exceed their budget over 64 generated tokens.
"""
import math

import pytest
import torch

from kvbench.cache import KVBenchCache
from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.methods.cake import allocate

N, BUDGET, GEN = 160, 48, 64


@pytest.fixture(scope="module")
def lm():
    from kvbench.models import load_model
    torch.set_num_threads(1)
    return load_model("synthetic", shape="tiny", device="cpu", dtype="float32")


def ids(seed=0, n=N):
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(lm, method, n=N, seed=0, decode=0, on_step=None):
    """Prefill (compressing) random ids; capture each layer's queries and uncompressed K/V/positions."""
    captured = {}
    orig = method.compress_layer

    def spy(ctx):
        k, v, p = ctx.layer.dense()
        captured[ctx.layer_idx] = (ctx.query.detach().clone(), k.clone(), v.clone(), p.clone(), ctx.scaling)
        orig(ctx)

    method.compress_layer = spy
    eng = Engine(lm, method, query_aware=True)
    eng.stop_ids = set()  # random weights: never stop early
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids(seed, n), method, compress=True)
    after = [[cache.layer(l).head(h)[2].clone() for h in range(cache.layer(l).n_heads)] for l in range(len(cache))]
    check_bytes(cache)
    if decode:
        eng.decode(cache, method, pre.logits, decode, on_step=on_step)
    return cache, captured, after


def check_bytes(cache: KVBenchCache):
    layer = cache.layer(0)
    per_token = 2 * layer.keys.shape[1] * layer.keys.element_size()
    kept = sum(sum(l) for l in cache.head_lengths())
    assert cache.nbytes() == kept * per_token


def kept_sets(after, layer):
    return [sorted(p.tolist()) for p in after[layer]]


# -- slow references -------------------------------------------------------------------------------
def ref_attention(q, k, scaling, rows):
    """(n_q, len(rows), L): causal softmax of the query at each absolute position in `rows`, head by head."""
    n_q, T, _ = q.shape
    n_kv, L, _ = k.shape
    g = n_q // n_kv
    out = torch.zeros(n_q, len(rows), L)
    for hq in range(n_q):
        for a, pos in enumerate(rows):
            qi = q[hq, pos - (L - T)]
            logits = (k[hq // g, : pos + 1] @ qi) * scaling
            out[hq, a, : pos + 1] = torch.softmax(logits, dim=0)
    return out


def ref_avg_pool(x, kernel):
    """Official SnapKV's F.avg_pool1d(padding=kernel // 2): the zero padding counts (count_include_pad=True)."""
    r = kernel // 2
    return torch.tensor([float(x[max(0, j - r): j + r + 1].sum()) / kernel for j in range(len(x))])


def top(scores, k):
    """Indices of the k largest scores (the reference ranks with a plain sort)."""
    return sorted(sorted(range(len(scores)), key=lambda j: -float(scores[j]))[:k])


def group_mean(a, n_kv):
    """(n_q, ...) -> (n_kv, ...) mean over each KV head's query group."""
    return a.reshape(n_kv, a.shape[0] // n_kv, *a.shape[1:]).mean(1)


# -- baselines ------------------------------------------------------------------------------------------
def test_recent_keeps_last_tokens_and_rolls(lm):
    m = build_method("recent", budget=BUDGET)
    seen = []
    cache, _, after = run(lm, m, decode=GEN, on_step=lambda c: seen.append(max(max(x) for x in c.head_lengths())))
    for l in range(2):
        assert kept_sets(after, l) == [list(range(N - BUDGET, N))] * 2
    assert max(seen) <= BUDGET
    final = sorted(cache.layer(0).head(0)[2].tolist())
    assert final == list(range(N + GEN - 1 - BUDGET, N + GEN - 1))


def test_random_is_seeded(lm):
    a = run(lm, build_method("random", budget=BUDGET, seed=1))[2]
    b = run(lm, build_method("random", budget=BUDGET, seed=1))[2]
    c = run(lm, build_method("random", budget=BUDGET, seed=2))[2]
    assert all(len(p) == BUDGET for layer in a for p in layer)
    assert kept_sets(a, 0) == kept_sets(b, 0) and kept_sets(a, 0) != kept_sets(c, 0)
    assert kept_sets(a, 0)[0] != kept_sets(a, 0)[1]  # heads draw independently


def test_knorm_keeps_lowest_key_norms(lm):
    _, cap, after = run(lm, build_method("knorm", budget=BUDGET))
    for l in range(2):
        k = cap[l][1]
        for h in range(2):
            norms = [math.sqrt(sum(float(x) ** 2 for x in k[h, j])) for j in range(N)]
            assert sorted(after[l][h].tolist()) == top([-x for x in norms], BUDGET)


# -- TOVA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_head", [True, False])
def test_tova_last_query_and_decode_budget(lm, per_head):
    seen = []
    m = build_method("tova", budget=BUDGET, per_head=per_head)
    _, cap, after = run(lm, m, decode=GEN, on_step=lambda c: seen.append(max(max(x) for x in c.head_lengths())))
    for l in range(2):
        q, k, _, _, s = cap[l]
        p = ref_attention(q, k, s, [N - 1])[:, 0]            # (n_q, L)
        per = group_mean(p, 2)
        for h in range(2):
            sc = per[h] if per_head else p.mean(0)
            assert sorted(after[l][h].tolist()) == top(sc, BUDGET)
    assert seen and max(seen) == BUDGET


# -- Ada-KV ---------------------------------------------------------------------------------------------
def ref_snap(q, k, s, w, kernel):
    L = k.shape[1]
    p = ref_attention(q, k, s, list(range(L - w, L)))      # (n_q, w, L)
    votes = group_mean(p.mean(1), 2)                        # (n_kv, L)
    out = []
    for h in range(2):
        pooled = ref_avg_pool(votes[h, : L - w], kernel).tolist()
        out.append(pooled + [float("inf")] * w)
    return out


def test_adakv_global_topk_with_safeguard(lm):
    """The official allocation (FFY0/AdaKV AdaptiveSnapKVCluster): counts from the unconstrained global top
    n_kv·(B−w) of the prefix scores, then round(c·(1−α) + ⌊α·(B−w)⌋) per head (torch.round)."""
    w, alpha = 8, 0.2
    m = build_method("adakv", budget=BUDGET, scorer="snapkv", window_size=w, kernel_size=5, pooling="avg",
                     alpha_safeguard=alpha)
    _, cap, after = run(lm, m)
    base = BUDGET - w
    for l in range(2):
        q, k, _, _, s = cap[l]
        sc = ref_snap(q, k, s, w, 5)
        pool = sorted(((sc[h][j], h) for h in range(2) for j in range(N - w)), key=lambda t: -t[0])[: 2 * base]
        counts = [sum(1 for _, hh in pool if hh == h) for h in range(2)]
        alloc = [int(torch.round(torch.tensor(c * (1 - alpha) + int(alpha * base), dtype=torch.float64)))
                 for c in counts]
        assert sum(alloc) == 2 * base  # (two heads: the mix's rounding cancels out)
        for h in range(2):
            assert sorted(after[l][h].tolist()) == top(sc[h], alloc[h] + w)


@pytest.mark.parametrize("scorer", ["snapkv", "pyramidkv"])
def test_adakv_deferred_cut_keeps_the_same_rows(lm, scorer, monkeypatch):
    """On CUDA AdaKV cuts each layer on the device and reads the layers' head lengths once, after the prefill
    (AdaKV.DEFER; "always" runs that path on CPU): the same rows in the same order as the host's cut, every
    layer, nothing left pending; the held bytes and their peak are the same (no layer waits uncompressed)."""
    from kvbench.methods.adakv import AdaKV
    caches, on_device = {}, []
    orig = AdaKV.cut_on_device
    monkeypatch.setattr(AdaKV, "cut_on_device", lambda self, *a: (on_device.append(1), orig(self, *a)))
    for mode in ("never", "always"):
        on_device.clear()
        AdaKV.DEFER = mode
        try:
            m = build_method("adakv", budget=BUDGET, scorer=scorer, window_size=8, kernel_size=5)
            m.reset()
            caches[mode] = run(lm, m)[0]
        finally:
            AdaKV.DEFER = "auto"
        assert len(on_device) == (2 if mode == "always" else 0)  # both layers cut on the device, or neither
        assert len(m._pending) == 0  # after_prefill read every layer's lengths
    now, later = caches["never"], caches["always"]
    assert now.head_lengths() == later.head_lengths() and len(set(now.head_lengths()[0])) > 1  # ragged
    for a, b in zip(now.kv, later.kv):
        assert (a._starts, a._caps) == (b._starts, b._caps)
        assert torch.equal(a.starts, b.starts) and torch.equal(a.lengths, b.lengths) and torch.equal(a.caps, b.caps)
        for h in range(a.n_heads):
            for x, y in zip(a.head(h), b.head(h)):
                assert torch.equal(x, y)
    assert (later.held.now, later.held.peak) == (now.held.now, now.held.peak)


def test_adakv_bad_scorer():
    with pytest.raises(ValueError, match="scorer"):
        build_method("adakv", budget=BUDGET, scorer="nope")


# -- CAKE -----------------------------------------------------------------------------------------------
def test_allocate_hand_examples():
    assert allocate([1, 3], 8, [10, 10]) == [2, 6]
    assert allocate([1, 3], 8, [10, 5]) == [3, 5]          # capped layer's excess goes to the other
    assert allocate([1, 1, 1], 10, [10, 10, 10]) == [4, 3, 3]
    assert allocate([1, 1], 30, [4, 6]) == [4, 6]          # more than fits


def test_cake_layer_budgets_and_indicator(lm):
    w, gamma = 8, 200.0
    seen = []
    m = build_method("cake", budget=BUDGET, window_size=w, gamma=gamma)
    cache, cap, after = run(lm, m, decode=GEN, on_step=lambda c: seen.append(c.head_lengths()))
    lens = [len(after[l][0]) for l in range(2)]
    assert sum(lens) == BUDGET * 2 and all(len(p) == lens[l] for l in range(2) for p in after[l])
    prefs = []
    for l in range(2):
        q, k, _, _, s = cap[l]
        p = ref_attention(q, k, s, list(range(N - w, N)))    # (n_q, w, L)
        pre = p[:, :, : N - w]
        ent = -sum(float(x * math.log(x + 1e-10)) for x in pre.flatten())
        var = float(pre.var(dim=1).sum())
        prefs.append(ent * var)
        ind = group_mean(torch.stack([ref_avg_pool(p[hq].mean(0)[: N - w] + gamma * p[hq].var(0)[: N - w], 5)
                                      for hq in range(4)]), 2)
        for h in range(2):
            assert sorted(after[l][h].tolist()) == top(ind[h], lens[l] - w) + list(range(N - w, N))
    total = 2 * (BUDGET - w)
    assert abs((lens[0] - w) - total * prefs[0] / sum(prefs)) <= 1
    assert all(max(layer[h] for h in range(2)) <= lens[l] for step in seen for l, layer in enumerate(step))


# -- WindowKV -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("select", ["max", "average"])
def test_windowkv_windows_shared_in_group(lm, select):
    size, w = 8, 8
    m = build_method("windowkv", budget=BUDGET, review_window_size=size, suffix_size=w, shared_layers=2,
                     window_select=select)
    _, cap, after = run(lm, m)
    q, k, _, _, s = cap[0]
    p = ref_attention(q, k, s, list(range(N - w, N))).sum(1)[:, : N - w]   # (n_q, prefix)
    n_win = (N - w) // size
    scores = []
    for i in range(n_win):  # official get_window_score: "max" = in each query head, the top size // 2 tokens
        rows = [sorted(p[hq, i * size:(i + 1) * size].tolist(), reverse=True) for hq in range(p.shape[0])]
        vals = [x for r in rows for x in (r if select == "average" else r[: size // 2])]
        scores.append(sum(vals) / len(vals))
    keep = n_win - math.ceil((N - BUDGET) / size)
    wins = top(scores, keep)
    expect = [t for i in wins for t in range(i * size, (i + 1) * size)] + list(range(N - w, N))
    for l in range(2):  # layer 1 reuses layer 0's windows
        assert kept_sets(after, l) == [expect, expect]


# -- CompressKV -----------------------------------------------------------------------------------------
def test_compresskv_retrieval_heads_and_error_budgets(lm):
    w, first_k = 8, 2
    m = build_method("compresskv", budget=BUDGET, window_size=w, first_k=first_k, min_tokens=16)
    _, cap, after = run(lm, m)
    lens = [len(after[l][0]) for l in range(2)]
    assert sum(lens) == 2 * BUDGET and 16 <= min(lens)
    errs = []
    for l in range(2):
        q, k, v, _, s = cap[l]
        p = ref_attention(q, k, s, list(range(N - w, N)))                # (n_q, w, L)
        mass = [float(p[hq, :, 4: N - w].sum()) for hq in range(4)]
        heads = top(mass, first_k)
        sc = torch.stack([ref_avg_pool(p[hq].sum(0)[: N - w], 5) for hq in heads]).mean(0).tolist()
        sc += [float("inf")] * w
        uni = top(sc, BUDGET)
        err = 0.0
        for hq in range(4):
            kept_p = torch.zeros(N)
            kept_p[uni] = 1
            for a in range(w):
                full = p[hq, a] @ v[hq // 2]
                pk = p[hq, a] * kept_p
                err += float(((full - (pk / pk.sum()) @ v[hq // 2]) ** 2).sum())
        errs.append(math.sqrt(err))
        assert kept_sets(after, l) == [top(sc, lens[l])] * 2
    # the layer with the larger eviction error gets the larger budget
    assert (lens[0] - lens[1]) * (errs[0] - errs[1]) >= 0


# -- CORM -----------------------------------------------------------------------------------------------
def ref_corm(q, k, s, w):
    p = ref_attention(q, k, s, list(range(N - w, N)))                   # (n_q, w, L)
    vis = torch.arange(N - w + 1, N + 1).view(1, w, 1)
    rel = (p * vis).reshape(2, 2, w, N).amax(dim=(1, 2))
    rel[:, N - w:] = float("inf")
    return rel


def test_corm_budget_and_budget_free(lm):
    w = 16
    _, cap, after = run(lm, build_method("corm", budget=BUDGET, window_size=w))
    for l in range(2):
        rel = ref_corm(*cap[l][:2], cap[l][4], w)
        assert kept_sets(after, l) == [top(rel[h], BUDGET) for h in range(2)]
    # random weights attend almost uniformly (every key gets ~1.0-1.08 × uniform): a threshold in that range
    cache, cap, after = run(lm, build_method("corm", window_size=w, alpha=1.05))
    for l in range(2):
        rel = ref_corm(*cap[l][:2], cap[l][4], w)
        assert kept_sets(after, l) == [[j for j in range(N) if rel[h, j] >= 1.05] for h in range(2)]
    assert len(set(len(p) for layer in after for p in layer)) > 1   # ragged: real per-head budgets


# -- LaCache --------------------------------------------------------------------------------------------
def ref_ladder(n_layers, layer, span, overlap, n_sink, recent, positions, drops, state):
    """Drop `drops` tokens one at a time from the sorted `positions` list (the ladder walk)."""
    before = 1 + max(0, math.ceil((n_layers - span) / (span - overlap)))
    after = min(math.ceil(span / (span - overlap)), before)
    off = layer % (before - after + 1)
    droppable = [o for o in range(before) if not (off <= o < off + after)]
    for _ in range(drops):
        cur, done = state
        if cur + before - done > len(positions) - recent:
            cur, done = n_sink, 0
        positions.pop(cur + droppable[done] - done)
        done += 1
        if done == len(droppable):
            cur, done = cur + after, 0
        state[:] = [cur, done]


def test_lacache_ladder_and_iterative_compaction(lm):
    knobs = dict(span=1, overlap=0, n_sink=4, recent=8)
    seen = []
    cache, _, after = run(lm, build_method("lacache", budget=BUDGET, **knobs), decode=GEN,
                          on_step=lambda c: seen.append(max(max(x) for x in c.head_lengths())))
    assert max(seen) == BUDGET
    for l in range(2):
        pos, st = list(range(N)), [4, 0]
        ref_ladder(2, l, 1, 0, 4, 8, pos, N - BUDGET, st)
        assert kept_sets(after, l) == [pos, pos]
        for t in range(N, N + GEN - 1):  # each decode step appends one token, then compacts one
            pos.append(t)
            ref_ladder(2, l, 1, 0, 4, 8, pos, 1, st)
        assert sorted(cache.layer(l).head(1)[2].tolist()) == pos
    assert kept_sets(after, 0) != kept_sets(after, 1)  # the ladder: layers keep different tokens


# -- D2O ------------------------------------------------------------------------------------------------
def test_d2o_density_budgets_merge_and_decode(lm):
    w, ratio = 8, 0.5
    seen = []
    m = build_method("d2o", budget=BUDGET, window_size=w, recent_ratio=ratio)
    _, cap, after = run(lm, m, decode=GEN, on_step=lambda c: seen.append(c.head_lengths()))
    lens = [len(after[l][0]) for l in range(2)]
    assert sum(lens) == 2 * BUDGET
    dens = []
    for l in range(2):
        q, k, v, _, s = cap[l]
        p = ref_attention(q, k, s, list(range(N)))                    # every prompt query
        wp = p[:, N - w:]
        ent = -(wp * torch.log(wp.clamp_min(1e-30))).sum(-1)
        dens.append(float((ent.exp() / torch.arange(N - w + 1, N + 1)).mean()))
        acc = p.sum(1).reshape(2, 2, N).sum(1)                         # accumulated, summed over the group
        b = lens[l]
        recent = round(b * ratio)
        for h in range(2):
            kept = sorted(list(range(N - recent, N)) + top(acc[h, : N - recent], b - recent))
            assert sorted(after[l][h].tolist()) == kept
    assert abs(lens[0] - 2 * BUDGET * dens[0] / sum(dens)) <= 1
    assert all(layer[h] <= lens[l] for step in seen for l, layer in enumerate(step) for h in range(2))


def test_d2o_merge_rule(lm):
    """Keys of kept tokens after prefill: nearest-neighbour merge with the EMA threshold (first = mean sim)."""
    m = build_method("d2o", budget=BUDGET, window_size=8)
    captured = {}
    orig = m.after_prefill

    def spy(cache):
        captured.update({l: cache.layer(l).dense()[0].clone() for l in range(len(cache))})
        orig(cache)

    m.after_prefill = spy
    cache, _, after = run(lm, m)
    l, h = 0, 1
    k0 = captured[l][h]
    kept = sorted(after[l][h].tolist())
    ev = [j for j in range(N) if j not in kept]
    best = []
    for j in ev:
        sims = [float(k0[j] @ k0[c] / (k0[j].norm() * k0[c].norm())) for c in kept]
        best.append((max(range(len(kept)), key=lambda i: sims[i]), max(sims)))
    tau = sum(sv for _, sv in best) / len(best)
    for i, c in enumerate(kept):
        ins = [(j, sv) for j, (t, sv) in zip(ev, best) if t == i and sv >= tau]
        den = math.e + sum(math.exp(sv) for _, sv in ins)
        expect = (math.e * k0[c] + sum(math.exp(sv) * k0[j] for j, sv in ins)) / den
        row = (cache.layer(l).head(h)[2] == c).nonzero()[0, 0]
        assert torch.allclose(cache.layer(l).head(h)[0][row], expect, atol=1e-5)


# -- EMS ------------------------------------------------------------------------------------------------
def test_ems_global_local_and_merge(lm):
    w = 8
    cache, cap, after = run(lm, build_method("ems", budget=BUDGET, window_size=w, merge_ratio=0.5))
    for l in range(2):
        q, k, _, _, s = cap[l]
        p = ref_attention(q, k, s, list(range(N)))
        acc = p.sum(1).reshape(2, 2, N).sum(1)
        glob = acc / torch.tensor([min(N - j, N) for j in range(N)], dtype=torch.float)
        loc = p[:, N - w:].sum(1).reshape(2, 2, N).sum(1)
        sc = torch.maximum(glob / glob.sum(1, keepdim=True), loc / loc.sum(1, keepdim=True))
        sc[:, N - w:] = float("inf")
        assert kept_sets(after, l) == [top(sc[h], BUDGET) for h in range(2)]
    # merging changed some kept keys (their original rows are in the captured keys)
    k_orig = cap[0][1][0]
    kk, _, pos = cache.layer(0).head(0)
    changed = sum(not torch.allclose(kk[i], k_orig[int(pos[i])]) for i in range(len(pos)))
    assert 0 < changed < BUDGET


# -- hand-worked allocator / threshold checks -----------------------------------------------------------
def test_adakv_allocation_hand_example():
    from kvbench.methods.adakv import adaptive_head_budgets
    s = torch.tensor([[10., 9., 8., 7., 6., 5.], [.1, .2, .3, .4, .5, .6]])
    # budget 3 per head, 6 in all; alpha 0: a plain global top-6 gives everything to head 0
    assert adaptive_head_budgets(s, 3, 0.0) == [6, 0]
    # alpha 0.34: each head is guaranteed int(0.34 * 3) = 1 slot, the other 4 go to head 0's 9, 8, 7, 6
    assert adaptive_head_budgets(s, 3, 0.34) == [5, 1]
    # +inf (an observation window) is always kept and counted: free = 3 - 1 = 2, guard = 1 + int(0.5 * 2) = 2
    s[1, 5] = float("inf")
    assert adaptive_head_budgets(s, 3, 0.5) == [4, 2]


@pytest.mark.parametrize("seed", range(4))
def test_adakv_global_counts_equal_a_loop(seed):
    """global_topk_counts against the rule written as a loop: every head's +inf (window) tokens, then the
    heads' free budgets together taken from the other scores, best first, ties to the earlier head, then
    the earlier token."""
    from kvbench.methods.adakv import global_topk_counts
    g = torch.Generator().manual_seed(seed)
    h, L, budget = 4, 37, 9
    s = torch.randint(0, 5, (h, L), generator=g).float()  # many ties
    for i in range(h):
        s[i, L - int(torch.randint(0, 12, (1,), generator=g)):] = float("inf")
    forced = [int(torch.isinf(s[i]).sum()) for i in range(h)]
    total = sum(max(0, budget - f) for f in forced)
    rest = sorted(((-float(s[i, j]), i, j) for i in range(h) for j in range(L) if not torch.isinf(s[i, j])))
    want = [0] * h
    for _, i, _ in rest[:total]:
        want[i] += 1
    assert global_topk_counts(s, budget).tolist() == [forced, want]


def test_adakv_on_model_is_head_adaptive(lm):
    m = build_method("adakv", budget=BUDGET, scorer="knorm", alpha_safeguard=0.0)
    _, cap, after = run(lm, m)
    for l in range(2):
        k = cap[l][1]
        sc = [(-float(k[h, j].norm()), h, j) for h in range(2) for j in range(N)]
        chosen = sorted(sc, key=lambda t: -t[0])[: 2 * BUDGET]
        for h in range(2):
            assert sorted(after[l][h].tolist()) == sorted(j for _, hh, j in chosen if hh == h)


def test_cake_preference_formula(lm):
    w, tau1, tau2 = 8, 1.0, 2.0
    m = build_method("cake", budget=BUDGET, window_size=w, tau1=tau1, tau2=tau2)
    _, cap, _ = run(lm, m)
    for l in range(2):
        q, k, _, _, s = cap[l]
        pre = ref_attention(q, k, s, list(range(N - w, N)))[:, :, : N - w]
        ent = -sum(float(x * math.log(x + 1e-10)) for x in pre.flatten())
        var = float(pre.var(dim=1).sum())
        assert m.state["layers"][l][1] == pytest.approx(ent ** (1 / tau1) * var ** (1 / tau2), rel=1e-4)


def test_d2o_ema_threshold_steps():
    m = build_method("d2o", budget=4, ema_beta=0.7)
    k = torch.tensor([[1., 0.], [0., 1.], [1., 1.], [1., .1], [-1., 1.]])
    v = torch.arange(10.).view(5, 2)
    kept = torch.tensor([0, 1])
    # first eviction of rows 2 and 3: sims cos45 = .7071 and .9950, tau starts at their mean (.8511)
    nk, _ = m._merge_step("x", k, v, kept, torch.tensor([2, 3]))
    s2, s3 = 1 / math.sqrt(2), 1 / math.sqrt(1.01)
    tau0 = (s2 + s3) / 2
    assert m.tau["x"] == pytest.approx(0.7 * tau0 + 0.3 * tau0)
    e = math.exp(s3)  # only row 3 (sim .995 >= tau) merges, into row 0
    assert torch.allclose(nk[0], (math.e * k[0] + e * k[3]) / (math.e + e)) and torch.equal(nk[1], k[1])
    # next step: row 4 (nearest row 1, sim .7071 < tau) is dropped unmerged; tau moves towards .7071
    nk, _ = m._merge_step("x", k, v, kept, torch.tensor([4]))
    assert torch.equal(nk, k[kept])
    assert m.tau["x"] == pytest.approx(0.7 * s2 + 0.3 * tau0)


def test_windowkv_never_exceeds_budget(lm):
    # 2 groups of 1 layer: prefix budgets decay from first = 2·43 − last to last = 43 · 1 // 14 = 3, i.e. 83 and 3;
    # whole windows of 8 only: 10 windows (80 tokens) and none, plus the 8-token suffix
    m = build_method("windowkv", budget=51, review_window_size=8, suffix_size=8, shared_layers=1, beta=14)
    _, _, after = run(lm, m)
    assert [len(after[l][0]) for l in range(2)] == [88, 8]
    assert all(len(after[l][1]) == len(after[l][0]) for l in range(2))
