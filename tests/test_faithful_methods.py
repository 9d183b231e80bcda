"""Issue 18 (Methods): each method against an independent truth — a slow reference written here from the
paper's / official code's definition, a hand-worked example, or a value of the official code reproduced by
hand (cited in the test's docstring). Official code read: KVCache-Factory `pyramidkv/pyramidkv_utils.py`
(PyramidKVCluster, SnapKVCluster, AdaKVCluster), FFY0/AdaKV `adaptive_snapkv/monkeypatch/snapkv_utils.py`
(AdaptiveSnapKVCluster), schwartz-lab-NLP/TOVA `src/tova_cache.py` (TOVACache.reduce), optim996/WindowKV
`models/compress_utils.py` (WindowKVCluster), FasterDecoding/SnapKV (F.avg_pool1d/F.max_pool1d, padding
kernel_size // 2). Model: the tiny random Llama (2 layers, 4 query heads, 2 KV heads, d=16).
"""
import io
import math
import os
import subprocess
import sys
from contextlib import redirect_stdout
from fractions import Fraction

import pytest
import torch

from kvbench.engine import Engine
from kvbench.method import build_method, load_all_methods, pool1d

N, GEN = 160, 64


@pytest.fixture(scope="module")
def lm():
    from kvbench.models import load_model
    torch.set_num_threads(1)
    return load_model("synthetic", shape="tiny", device="cpu", dtype="float32")


def ids(n=N, seed=0):
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(lm, method, n=N, seed=0, decode=0, on_step=None, chunk=0):
    """Prefill random ids (compressing, optionally in chunks); capture each layer's queries (of the last
    forward) and its uncompressed keys at compression. Returns (cache, captured, kept positions per layer/head)."""
    captured = {}
    orig = method.compress_layer

    def spy(ctx):
        k, v, p = ctx.layer.dense()
        captured[ctx.layer_idx] = (ctx.query.detach().clone(), k.clone(), ctx.scaling)
        orig(ctx)

    method.compress_layer = spy
    eng = Engine(lm, method, query_aware=True, prefill_chunk=chunk)
    eng.stop_ids = set()  # random weights: never stop early
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids(n, seed), method, compress=True)
    after = [[sorted(cache.layer(l).head(h)[2].tolist()) for h in range(cache.layer(l).n_heads)]
             for l in range(len(cache))]
    if decode:
        eng.decode(cache, method, pre.logits, decode, on_step=on_step)
    return cache, captured, after


# -- slow references --------------------------------------------------------------------------------------
def ref_attention(q, k, scaling, rows):
    """(n_q, len(rows), L): causal softmax of the query at each absolute position in `rows`, one by one."""
    n_q, T, _ = q.shape
    n_kv, L, _ = k.shape
    g = n_q // n_kv
    out = torch.zeros(n_q, len(rows), L)
    for hq in range(n_q):
        for a, pos in enumerate(rows):
            logits = (k[hq // g, : pos + 1] @ q[hq, pos - (L - T)]) * scaling
            out[hq, a, : pos + 1] = torch.softmax(logits, dim=0)
    return out


def ref_pool(x, kernel, kind):
    """The official F.max_pool1d / F.avg_pool1d(kernel, stride=1, padding=kernel // 2), written out: output i
    covers inputs i - kernel//2 .. i - kernel//2 + kernel - 1; avg divides by kernel (count_include_pad=True)."""
    r = kernel // 2
    out = []
    for i in range(len(x)):
        vals = [float(x[j]) for j in range(i - r, i - r + kernel) if 0 <= j < len(x)]
        out.append(max(vals) if kind == "max" else sum(vals) / kernel)
    return out


def top(scores, k):
    """Indices of the k largest scores (earlier first on ties), sorted."""
    return sorted(sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k])


def ref_snapkv(cap, window, kernel, kind, budget):
    """SnapKV for one layer (official SnapKVCluster): window rows' attention averaged over the window and the
    query group, pooled over the prefix, the top budget - window prefix tokens plus the window."""
    q, k, s = cap
    L = k.shape[1]
    p = ref_attention(q, k, s, list(range(L - window, L)))            # (n_q, w, L)
    votes = p.mean(1).reshape(k.shape[0], -1, L).mean(1)             # (n_kv, L)
    return [top(ref_pool(votes[h, : L - window], kernel, kind), budget - window) + list(range(L - window, L))
            for h in range(k.shape[0])]


# -- 1. H2O with compression_ratio ---------------------------------------------------------------------------
def test_h2o_ratio_cap_fixed_at_compression_over_64_token_decode(lm):
    """Ratio 0.75 on a 160-token prompt: round(160 · 0.25) = 40 tokens per head, fixed at compression (as TOVA),
    for all 64 decode steps; the round(40 · 0.5) = 20 most recent positions are always among them. (Old code:
    the cap was recomputed from the live length, 41 → 10 → 3 → 1 ...)"""
    seen, recent_ok = [], []

    def step(cache):
        seen.append(cache.head_lengths())
        for l in range(len(cache)):
            for h in range(2):
                pos = cache.layer(l).head(h)[2].tolist()
                newest = max(pos)
                recent_ok.append(set(range(newest - 19, newest + 1)) <= set(pos))

    cache, _, after = run(lm, build_method("h2o", compression_ratio=0.75), decode=GEN, on_step=step)
    assert all(len(p) == 40 for layer in after for p in layer)
    assert len(seen) >= GEN - 1
    assert all(x == [[40, 40], [40, 40]] for x in seen)
    assert all(recent_ok)


# -- 2. PyramidKV budgets ------------------------------------------------------------------------------------
def official_pyramid_shape(B, w, n_tokens, beta):
    """KVCache-Factory PyramidKVCluster.update_kv's branches: (kind, min_num, max_num)."""
    if n_tokens < B:
        return "none", None, None
    if n_tokens < (B - w) * 2:
        return "snapkv", None, None
    lo = (B - w) // beta
    hi = (B - w) * 2 - lo
    if hi >= n_tokens - w:
        hi = n_tokens - w
        lo = (B - w) * 2 - hi
    return "pyramid", int(lo), int(hi)


@pytest.mark.parametrize("B,n", [(1024, 1500), (512, 800), (128, 1024), (512, 4096), (512, 965), (128, 250)])
def test_pyramidkv_allocation_follows_official_and_spends_the_budget(B, n):
    """The issue's cases (budget 1024 at 1,500 tokens: old mean 960; 512 at 800: 494) and the official code's
    three branches for 32 layers, window 32, beta 20: plain SnapKV (every layer B) when n < 2(B − w); otherwise
    the line from max_num + w (layer 0) to min_num + w (last layer), rebalanced to max_num = n − w when the
    bottom layer would exceed the prefix (512 at 965, 128 at 250). Mean kept per layer == B exactly."""
    m = build_method("pyramidkv", budget=B)
    n_layers, w = 32, 32
    got = [m.layer_budget(i, n_layers, n) for i in range(n_layers)]
    assert sum(got) == B * n_layers and max(got) <= n
    kind, lo, hi = official_pyramid_shape(B, w, n, 20.0)
    if kind == "snapkv":
        assert got == [B] * n_layers
    else:
        line = [hi - Fraction(i * (hi - lo), n_layers - 1) for i in range(n_layers)]
        assert got[0] == hi + w and got[-1] == lo + w
        assert all(abs(g - w - x) < 1 for g, x in zip(got, line))


def test_pyramidkv_short_context_is_plain_snapkv(lm):
    """n = 60 < 2 · (48 − 8): the official code runs plain SnapKV, every layer keeps 48 = SnapKV's set.
    (Old code: layer budgets [60, 10], mean 35.)"""
    m = build_method("pyramidkv", budget=48, window_size=8, kernel_size=5, pooling="max")
    _, cap, after = run(lm, m, n=60)
    for l in range(2):
        assert after[l] == ref_snapkv(cap[l], 8, 5, "max", 48)


def test_pyramidkv_rebalanced_when_top_layers_exceed_context(lm):
    """n = 80, budget 48, window 8, beta 20: min = 40 // 20 = 2, max = 78 >= 80 − 8, so the official
    rebalancing sets max = 72, min = 80 − 72 = 8: layers keep [72 + 8, 8 + 8] = [80, 16], mean 48.
    (Old code: [min(86, 80), 10], mean 45.)"""
    m = build_method("pyramidkv", budget=48, window_size=8, kernel_size=5, pooling="max")
    _, cap, after = run(lm, m, n=80)
    assert after[0] == [list(range(80))] * 2
    assert after[1] == ref_snapkv(cap[1], 8, 5, "max", 16)


# -- 3. SnapKV / AdaKV budget below the observation window ------------------------------------------------------
@pytest.mark.parametrize("name", ["snapkv", "adakv", "pyramidkv"])
def test_budget_below_window_keeps_the_last_prompt_tokens(lm, name):
    """Budget 6 < window 8: the window is clamped to the budget, so each head keeps the last 6 prompt tokens
    (hand-worked: all 6 slots belong to the window). Old code: 8 tokens scored +inf and the stable sort kept
    the oldest 6 (152..157), dropping the last prompt token 159."""
    _, _, after = run(lm, build_method(name, budget=6, window_size=8))
    assert after == [[list(range(N - 6, N))] * 2] * 2


# -- 4. AdaKV allocation --------------------------------------------------------------------------------------
def test_adakv_official_allocation_hand_worked():
    """FFY0/AdaKV AdaptiveSnapKVCluster: base = B − w = 4, global top-(2 · 4) of the non-window scores
    {10, 9.5 (head 1); 9, 8, 7, 6, 5, 4 (head 0)} → counts [6, 2]; floor = int(0.5 · 4) = 2; capacity =
    round(c · 0.5 + 2) = [5, 3]; plus the window (2) = [7, 5]. The old rule (guarantee 2 each, then a global
    top-k over the rest) gave [8, 4]."""
    from kvbench.methods.adakv import adaptive_head_budgets
    inf = float("inf")
    s = torch.tensor([[9., 8., 7., 6., 5., 4., 0., 0., inf, inf],
                      [10., 9.5, .1, .1, .1, .1, .1, .1, inf, inf]])
    assert adaptive_head_budgets(s, 6, 0.5) == [7, 5]
    # alpha 0: the plain global top-k; alpha 1: uniform
    assert adaptive_head_budgets(s, 6, 0.0) == [8, 4]
    assert adaptive_head_budgets(s, 6, 1.0) == [6, 6]


def test_adakv_rounding_keeps_the_layer_total():
    """Three heads, base 3, alpha 0.5 (floor int(1.5) = 1): counts [5, 2, 2] → round([3.5, 2, 2]) = [4, 2, 2]
    (torch.round: half to even) sums to 8, not 9: the official code would keep one token fewer; we give it to
    the head rounded down the most (head 0: 3.5 → 4 is up, none is down, so the largest raw − count residue,
    heads 1 and 2 at 0, goes first: head 1). Counts with the window (1): [5, 4, 3]."""
    from kvbench.methods.adakv import adaptive_head_budgets
    inf = float("inf")
    s = torch.tensor([[9., 8., 7., 6., 5., 0., inf],
                      [8.5, 7.5, .1, .1, .1, .1, inf],
                      [6.5, 5.5, .1, .1, .1, .1, inf]])
    got = adaptive_head_budgets(s, 4, 0.5)
    assert sum(got) == 12 and got == [5, 4, 3]


# -- 5. TOVA ------------------------------------------------------------------------------------------------
def test_tova_default_is_one_choice_per_layer_from_head_averaged_attention(lm):
    """TOVACache.reduce: mean over all heads of the last query's attention, one top-k, the same indices in
    every KV head; per_head stays a knob. Decoding keeps the heads identical and at the budget."""
    budget, seen = 48, []
    m = build_method("tova", budget=budget)
    assert m.per_head is False
    cache, cap, after = run(lm, m, decode=GEN, on_step=lambda c: seen.append(
        [sorted(c.layer(l).head(h)[2].tolist()) for l in range(2) for h in range(2)]))
    for l in range(2):
        q, k, s = cap[l]
        p = ref_attention(q, k, s, [N - 1])[:, 0].mean(0)          # (L,) mean over the 4 query heads
        assert after[l] == [top(p, budget)] * 2
    assert seen and all(len(x[0]) == budget and x[0] == x[1] and x[2] == x[3] for x in seen)
    _, _, per = run(lm, build_method("tova", budget=budget, per_head=True))
    assert per[0][0] != per[0][1]  # the knob still chooses per KV head


# -- 6. WindowKV ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("avg,n_layers,shared", [(96, 30, 8), (480, 30, 8), (224, 28, 8), (96, 32, 8), (100, 22, 4)])
def test_windowkv_budgets_average_the_budget_over_layers(avg, n_layers, shared):
    """Mean over *layers* within one token below the budget, never above; the last group keeps
    avg · shared // beta (official), budgets decrease with depth. (Old code, 30 layers in groups of 8: the
    official first = 2B − last over 4 groups of [8, 8, 8, 6] layers, mean 3–6% above B.)"""
    from kvbench.methods.windowkv import group_budgets
    b = group_budgets(avg, n_layers, shared, 14.0)
    assert len(b) == n_layers
    assert avg * n_layers - n_layers < sum(b) <= avg * n_layers
    assert b[-1] in (avg * shared // 14, avg * shared // 14 + 1)
    assert all(x >= y for x, y in zip(b, b[1:]))
    assert all(len(set(b[g:g + shared])) == 1 for g in range(0, n_layers, shared))


def test_windowkv_max_score_hand_worked():
    """Official get_window_score("max"): torch.topk(window, review_window_size // 2) on the (heads, tokens)
    window, i.e. per head. Heads [1, 0, 0, 0] and [1, 1, 0, 0], size 4: per-head top 2 means 0.5 and 1 →
    0.75 (the old flattened top 2 over both heads gave 1.0); "average": 3 / 8. A short last window of 2
    tokens: each head's top min(2, 2) = all, mean 0.3 (old: the flattened top 2, 0.5)."""
    from kvbench.methods.windowkv import window_scores
    a = torch.tensor([[1., 0., 0., 0., .2, .4], [1., 1., 0., 0., .6, 0.]])
    mx = window_scores(a, 4, "max")
    assert torch.allclose(mx, torch.tensor([0.75, 0.3]))  # short last window: both of each head's 2 tokens
    assert torch.allclose(window_scores(a, 4, "average"), torch.tensor([3 / 8, 1.2 / 4]))


# -- 7. DuoAttention -----------------------------------------------------------------------------------------
def test_duoattention_says_prefill_is_full_attention():
    """Streaming heads get full attention during prefill (the attention output is computed before method
    hooks): the docstring and the `kvbench list` line say so plainly."""
    from kvbench.cli import cmd_list
    import kvbench.methods.duoattention as duo
    out = io.StringIO()
    with redirect_stdout(out):
        cmd_list([])
    line = next(x for x in out.getvalue().splitlines() if x.strip().startswith("duoattention"))
    assert "full attention during prefill" in line and "NOT AS THE PAPER" in line
    assert "full* attention" in duo.__doc__ and "during prefill" in duo.__doc__


# -- 8. chunked prefill ---------------------------------------------------------------------------------------
KNOBS = {"random": {"budget": 48, "seed": 1},  # (default: a seed drawn per sample, so two runs differ)
         "lacache": {"budget": 48, "span": 1, "overlap": 0, "n_sink": 4, "recent": 8},  # 2 layers: span < 2
         "fastgen": {"budget": 48, "recovery": 0.1}}  # random weights: 0.95 needs the full policy
# methods that keep every token (`uses_budget = False`: full, storage formats alone) evict nothing, and a
# storage format's encoded layers have no per-head rows to compare: they are not compared here
EVICTING = sorted(n for n, c in load_all_methods().items() if getattr(c, "uses_budget", True))


def _method(name, lm):
    m = build_method(name, **KNOBS.get(name, {"budget": 48}))
    if name == "duoattention":
        m._entry = {"data": {"gates": [[0.9, 0.1], [0.2, 0.8]]}}
    elif name == "razorattention":
        m._entry = {"data": {"induction": [[0.9, 0.8, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3]],
                             "echo": [[0, 0, 0, 0], [0, 0, 0.5, 0]], "n_kv": 2}}
    elif name == "fastgen":
        m.prepare(lm)
    return m


@pytest.mark.parametrize("name", EVICTING)
def test_chunked_prefill_keeps_the_same_tokens(lm, name):
    """prefill_chunk=64 (chunks 64, 64, 40 of 168 tokens) and prefill_chunk=16 (ten chunks of 16, then 8: a
    last chunk shorter than every default observation window) keep exactly the tokens of an unchunked
    prefill, in every layer and head. Accumulating statistics (H2O, D2O, EMS, FastGen) sum every chunk's
    queries; observation windows (SnapKV, PyramidKV, AdaKV, WindowKV, D2O, EMS, FastGen, CAKE, CompressKV,
    CORM) read their queries across chunks. Every evicting method is compared; none differs. Not compared:
    methods that keep every token (`uses_budget = False`: full and the storage formats, whose layers are
    encoded, not evicted)."""
    n = 168
    _, _, whole = run(lm, _method(name, lm), n=n)
    assert any(len(p) < n for layer in whole for p in layer)  # it did compress
    for chunk in (64, 16):
        _, _, chunked = run(lm, _method(name, lm), n=n, chunk=chunk)
        assert chunked == whole, f"prefill_chunk={chunk}"


def test_query_tail_carries_the_window_across_chunks(lm):
    """The window's queries seen by SnapKV's scorer after a chunked prefill (chunks of 5, window 12) equal the
    last 12 queries of an unchunked prefill (the slow truth: the same layer's queries captured whole)."""
    got = {}
    m = build_method("snapkv", budget=20, window_size=12)
    inner = m.score

    def spy(ctx):
        got[ctx.layer_idx] = ctx.query.detach().clone()
        return inner(ctx)

    m.score = spy
    run(lm, m, n=43, chunk=5)
    _, cap, _ = run(lm, build_method("snapkv", budget=20, window_size=12), n=43)
    for l in range(2):
        assert got[l].shape[1] == 12
        assert torch.allclose(got[l], cap[l][0][:, -12:], atol=1e-5)


# -- 9. average pooling: torch path and Triton kernel --------------------------------------------------------
def test_pool1d_matches_official_padding_hand_worked():
    """F.avg_pool1d([1, 2, 3, 4], 3, stride=1, padding=1) (count_include_pad=True, the official default):
    [(0+1+2)/3, 2, 3, (3+4+0)/3] = [1, 2, 3, 7/3]; the old count_include_pad=False gave 1.5 and 3.5 at the
    ends. Kernel 4 (even): outputs cover inputs i−2..i+1, the 5th output dropped."""
    x = torch.tensor([[1., 2., 3., 4.]])
    assert torch.allclose(pool1d(x, 3, "avg"), torch.tensor([[1., 2., 3., 7 / 3]]))
    assert torch.allclose(pool1d(x, 4, "avg"), torch.tensor([[3 / 4, 6 / 4, 10 / 4, 9 / 4]]))
    assert torch.allclose(pool1d(x, 4, "max"), torch.tensor([[2., 3., 4., 4.]]))
    y = torch.rand(3, 23, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3, 4, 5, 7):
        for kind in ("max", "avg"):
            assert torch.allclose(pool1d(y, k, kind), torch.tensor([ref_pool(r, k, kind) for r in y]), atol=1e-6)


def test_snapkv_avg_pooling_keeps_official_set(lm):
    """SnapKV with pooling=avg keeps the official set (F.avg_pool1d, zero padding counted)."""
    m = build_method("snapkv", budget=48, window_size=8, kernel_size=7, pooling="avg")
    _, cap, after = run(lm, m)
    for l in range(2):
        assert after[l] == ref_snapkv(cap[l], 8, 7, "avg", 48)


_KERNEL_SCRIPT = r"""
import torch
from kvbench.cache import LayerKV
from kvbench.method import LayerContext
import kvbench.methods.snapkv as snap
from kvbench.methods.kernels import window_scores_triton
assert type(window_scores_triton).__name__ == "function"
g = torch.Generator().manual_seed(0)
n_kv, grp, L, d, w = 2, 2, 41, 16, 6
keys = torch.randn(n_kv, L, d, generator=g)
query = torch.randn(n_kv * grp, L, d, generator=g)
layer = LayerKV.from_dense(keys, keys.clone(), torch.arange(L))
ctx = LayerContext(0, 1, query, layer, d ** -0.5, None)
bad = []
for kind in ("max", "avg"):
    for k in (1, 2, 3, 4, 5, 7):
        snap.USE_KERNEL = "never"
        ref = snap.snap_scores(ctx, w, k, kind)
        flat = window_scores_triton(query[:, -w:], layer.keys, layer.starts, layer.lengths, d ** -0.5, k, kind,
                                    block_m=16, block_n=16)
        got = flat.view(n_kv, L).clone()
        got[:, L - w:] = float("inf")
        if not torch.allclose(got, ref, atol=1e-6):
            bad.append((kind, k, float((got[:, :L - w] - ref[:, :L - w]).abs().max())))
print("BAD", bad)
"""


def test_triton_window_kernel_pools_as_the_torch_path():
    """SnapKV scores from the Triton kernel (TRITON_INTERPRET=1, a fresh process: the interpreter is chosen at
    import) equal the torch path (pool1d) for every pooling kind and kernel size the method allows (max/avg,
    odd and even). Old code: avg differed at the prefix ends (count_include_pad) and even sizes raised."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BAD []" in r.stdout, r.stdout
