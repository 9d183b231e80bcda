"""Quest selector (methods/quest.py) against references written here from the paper (2406.10774, Alg. 1: the
upper bound sum_c max(q_c m_c, q_c M_c) of each page) and the official code's rules (github.com/mit-han-lab/Quest:
the page budget includes the newest page, which is always attended; the first two layers stay dense; prefill is
dense), hand-worked byte counts, and its Triton kernel (methods/kernels/quest_decode.py)."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvbench.attention import attend
from kvbench.cache import LayerKV
from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.methods.kernels.quest_decode import quest_decode_attention_ref
from kvbench.methods.quest import Quest, QuestLayer
from kvbench.models import load_model

D = 16


def _layer(lens, n=160, h=2, d=D, dtype=torch.float32, seed=0):
    """A plain layer of h heads; heads cut to `lens` rows (ragged, as after AdaKV) unless all equal n."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
    layer = LayerKV.from_dense(k.to(dtype), v.to(dtype), torch.arange(n))
    if any(x != n for x in lens):
        layer.keep([torch.sort(torch.randperm(n, generator=g)[:x]).values for x in lens])
    return layer


def _store(layer, n_q, active=True, **knobs):
    return QuestLayer.encode(Quest(**knobs), layer, active, n_q)


def slow_bounds(keys: torch.Tensor, page_size: int):
    """Per page (consecutive rows in row order, the last one partial), the min and max of each channel."""
    lo, hi = [], []
    for p in range(0, keys.shape[0], page_size):
        blk = keys[p:p + page_size]
        lo.append([min(float(blk[i, c]) for i in range(blk.shape[0])) for c in range(keys.shape[1])])
        hi.append([max(float(blk[i, c]) for i in range(blk.shape[0])) for c in range(keys.shape[1])])
    return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


def slow_select(q: torch.Tensor, layer: LayerKV, page_size: int, token_budget: int) -> list[set[int]]:
    """The paper's selection, per query head: score every page but the newest by sum_c max(q_c m_c, q_c M_c)
    (float64), keep the top (token_budget / page_size - 1) of them, plus the newest page (always)."""
    n_q, n_kv = q.shape[0], layer.n_heads
    budget = token_budget // page_size
    out = []
    for j in range(n_q):
        keys = layer.head(j // (n_q // n_kv))[0]
        lo, hi = slow_bounds(keys, page_size)
        n_pages = lo.shape[0]
        scores = []
        for p in range(n_pages - 1):
            s = sum(max(float(q[j, c]) * lo[p, c].item(), float(q[j, c]) * hi[p, c].item()) for c in range(q.shape[1]))
            scores.append((s, p))
        top = sorted(scores, reverse=True)[:budget - 1]
        out.append({p for _, p in top} | {n_pages - 1})
    return out


def _selected(sel: torch.Tensor) -> list[set[int]]:
    return [{int(p) for p in row if p >= 0} for row in sel]


@pytest.mark.parametrize("lens", [[160, 160], [160, 97, 33]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_bounds_equal_slow_reference_and_follow_appends(lens, dtype):
    layer = _layer(lens, h=len(lens), dtype=dtype)
    st = _store(layer, n_q=2 * len(lens), page_size=16, token_budget=32)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        for h in range(len(lens)):
            keys = st.layer.head(h)[0]
            lo, hi = slow_bounds(keys.double(), 16)
            P = lo.shape[0]
            assert P == math.ceil(keys.shape[0] / 16) == st.pages_per_head()[h]
            assert torch.equal(st.kmin[h, :P].double(), lo) and torch.equal(st.kmax[h, :P].double(), hi)
            assert st.kmin.dtype == dtype
        # appends extend the last page or open new ones (q = 1, then several tokens at once)
        q = 1 if step < 2 else 13
        k = torch.randn(len(lens), q, D, generator=g) * 3
        st.append(k, torch.randn(len(lens), q, D, generator=g), torch.arange(200 + 20 * step, 200 + 20 * step + q))
    assert st.head_lengths == [n + 28 for n in lens]


@pytest.mark.parametrize("lens,budget", [([160, 160], 64), ([160, 160], 16), ([160, 97, 33], 48),
                                         ([161, 161], 320)])
def test_selected_pages_equal_the_papers_formula(lens, budget):
    layer = _layer(lens, n=161 if lens[0] == 161 else 160, h=len(lens))
    n_q = 2 * len(lens)
    st = _store(layer, n_q, page_size=16, token_budget=budget)
    for seed in range(3):
        q = torch.randn(n_q, D, generator=torch.Generator().manual_seed(10 + seed))
        got = _selected(st.select(q))
        want = slow_select(q, layer, 16, budget)
        assert got == want
        for j, pages in enumerate(got):  # budget pages each, the newest included (or every page of a short head)
            n = lens[j // 2]
            assert math.ceil(n / 16) - 1 in pages
            assert len(pages) == min(budget // 16, math.ceil(n / 16))


def test_budget_covering_the_context_is_full_attention_exactly():
    layer = _layer([160, 97, 33], h=3)
    q = torch.randn(6, 1, D, generator=torch.Generator().manual_seed(3))
    full, _ = attend(q, layer, 0.25)
    st = _store(layer, 6, page_size=16, token_budget=160)  # 10 pages >= every head's pages
    assert not any(st.sparse_heads())
    assert torch.equal(st.attend(q, 0.25)[0], full)
    # a skipped layer (the official code's first two) stays dense whatever the budget
    st = _store(layer, 6, active=False, page_size=16, token_budget=16)
    assert torch.equal(st.attend(q, 0.25)[0], full)
    # prefill (several new tokens) is dense too
    q3 = torch.randn(6, 3, D, generator=torch.Generator().manual_seed(4))
    assert torch.equal(_store(layer, 6, page_size=16, token_budget=16).attend(q3, 0.25)[0], attend(q3, layer, 0.25)[0])


@pytest.mark.parametrize("lens", [[160, 160], [160, 97, 33]])
def test_attention_equals_dense_fp32_over_the_selected_rows(lens):
    layer = _layer(lens, h=len(lens))
    n_kv, n_q = len(lens), 2 * len(lens)
    layer.set_side("log_weight", [torch.rand(n, generator=torch.Generator().manual_seed(1)) for n in lens])
    st = _store(layer, n_q, page_size=16, token_budget=48)
    q = torch.randn(n_q, 1, D, generator=torch.Generator().manual_seed(7))
    out, _ = st.attend(q, 0.25)
    sel = slow_select(q[:, 0], layer, 16, 48)
    for j in range(n_q):  # float64 softmax over exactly the rows of the reference's pages
        k, v, _ = layer.head(j // 2)
        lw = layer.side_head("log_weight", j // 2)
        rows = [r for p in sorted(sel[j]) for r in range(16 * p, min(16 * p + 16, k.shape[0]))]
        s = k[rows].double() @ q[j, 0].double() * 0.25 + lw[rows].double()
        ref = torch.softmax(s, 0) @ v[rows].double()
        assert torch.allclose(out[j, 0].double(), ref, atol=1e-5), (j, (out[j, 0] - ref).abs().max())
    # and it is not full attention (the test would pass vacuously if nothing were dropped)
    assert not torch.allclose(out, attend(q, layer, 0.25)[0], atol=1e-3)


def test_stored_and_read_bytes_formulas():
    # 2 KV heads of 100 rows, d = 16, float32 (a row's K+V: 2 * 16 * 4 = 128 B), g = 2, pages of 16, budget 3 pages
    st = _store(_layer([100, 100], n=100), n_q=4, page_size=16, token_budget=48)
    bound = 2 * 16 * 4                                   # min and max of one page: 128 B
    assert st.nbytes() == 2 * 100 * 128 + 2 * 7 * bound  # rows unchanged + 7 pages of bounds per head
    # next step: 101 rows = 7 pages, the last holding 5 rows; each query head reads 2 full pages + 5 rows,
    # each KV head the bounds of its 6 older pages
    assert st.read_bytes(1) == 4 * (2 * 16 + 5) * 128 + 2 * 6 * bound == 20480
    st.append(torch.randn(2, 12, 16), torch.randn(2, 12, 16), torch.arange(100, 112))  # 112 rows: page 7 opens
    assert st.nbytes() == 2 * 112 * 128 + 2 * 7 * bound
    st.append(torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.tensor([112]))
    assert st.nbytes() == 2 * 113 * 128 + 2 * 8 * bound
    # ragged heads: 100 rows (sparse) and 30 rows (2 pages <= 3: all its rows, per query head); the scoring
    # reads the bounds tensor's first 6 pages of both heads
    st = _store(_layer([100, 30], n=100), n_q=4, page_size=16, token_budget=48)
    assert st.read_bytes(1) == 2 * (2 * 16 + 5) * 128 + 2 * 31 * 128 + 2 * 6 * bound
    # dense: a budget covering the context, or a skipped layer, reads every row once (as plain rows)
    plain = 2 * 101 * 128
    assert _store(_layer([100, 100], n=100), 4, page_size=16, token_budget=112).read_bytes(1) == plain
    assert _store(_layer([100, 100], n=100), 4, active=False, page_size=16, token_budget=16).read_bytes(1) == plain


def test_clone_is_independent():
    st = _store(_layer([100, 100], n=100), n_q=4, page_size=16, token_budget=48)
    c = st.clone()
    c.append(torch.full((2, 1, D), 50.0), torch.randn(2, 1, D), torch.tensor([100]))
    assert st.head_lengths == [100, 100] and c.head_lengths == [101, 101]
    assert st.kmax.max() < 50 and c.kmax[:, 6].max() == 50


def test_kernel_matches_reference_under_the_triton_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench.methods.kernels.quest_decode import quest_decode_attention_ref, quest_decode_attention_triton
        g = torch.Generator().manual_seed(0)
        T, d = 400, 32
        starts, lengths = torch.tensor([3, 150, 300]), torch.tensor([140, 131, 37])
        # per query head page lists (g = 2): partial last pages, -1 padding, one head with no page at all
        pages = torch.tensor([[0, 3, 8, -1], [8, 2, 5, 1], [1, 5, 7, 8], [0, -1, -1, -1], [2, 1, 0, -1],
                              [-1, -1, -1, -1]], dtype=torch.int32)
        pos, lw = torch.randperm(T, generator=g), torch.randn(T, generator=g) * 0.3
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            keys = torch.randn(T, d, generator=g).to(dtype)
            values = torch.randn(T, d, generator=g).to(dtype)
            q = torch.randn(6, d, generator=g).to(dtype)
            for kw in ({}, dict(softcap=5.0), dict(window=200, positions=pos, q_pos=torch.tensor([350])),
                       dict(log_weight=lw)):
                ref = quest_decode_attention_ref(q, keys, values, starts, lengths, pages, 16, 0.2, **kw)
                assert ref[5].abs().max() == 0
                for ns, tile in ((None, 64), (1, 32), (3, 16)):
                    tri = quest_decode_attention_triton(q, keys, values, starts, lengths, pages, 16, 0.2,
                                                        num_splits=ns, tile_rows=tile, **kw)
                    err = (ref.float() - tri.float()).abs().max()
                    assert tri.dtype == dtype and err < tol, (dtype, list(kw), ns, err)
        # a store's own selection fed to the kernel = the store's attention (CPU: the torch reference)
        from kvbench.cache import LayerKV
        from kvbench.methods.quest import Quest, QuestLayer
        layer = LayerKV.from_dense(torch.randn(2, 150, 32, generator=g), torch.randn(2, 150, 32, generator=g),
                                   torch.arange(150))
        layer.keep([torch.arange(150), torch.arange(0, 150, 2)])
        st = QuestLayer.encode(Quest(token_budget=48), layer, True, 8)
        q = torch.randn(8, 1, 32, generator=g)
        L = st.layer
        tri = quest_decode_attention_triton(q[:, 0], L.keys, L.values, L.starts, L.lengths, st.select(q[:, 0]), 16,
                                            0.2)
        assert (tri - st.attend(q, 0.2)[0][:, 0]).abs().max() < 1e-5
        # page scores: the bounds of 3 KV heads (a padded tensor: +-inf past a head's pages), g = 4 (fp16, not
        # bf16: the Triton 3.9 interpreter's tl.dot on bf16 operands is wrong, compiled kernels are not)
        from kvbench.methods.kernels.quest_decode import quest_page_scores_ref, quest_page_scores_triton
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            kmin = torch.randn(3, 90, 32, generator=g).to(dtype)
            kmax = (kmin.float() + torch.rand(3, 90, 32, generator=g)).to(dtype)
            kmin[2, 40:], kmax[2, 40:] = float("inf"), float("-inf")
            q = torch.randn(12, 32, generator=g).to(dtype)
            n_sc = torch.tensor([89, 60, 39])
            for width in (90, 75):  # the whole tensor, and a slice (the layer scores all but the last page)
                ref = quest_page_scores_ref(q, kmin[:, :width], kmax[:, :width], n_sc)
                tri = quest_page_scores_triton(q, kmin[:, :width], kmax[:, :width], n_sc, block_p=32)
                fin = torch.isfinite(ref)
                assert torch.equal(fin, torch.isfinite(tri)) and int(fin.sum()) == 4 * (min(89, width) + 60 + 39)
                assert (ref[fin] - tri[fin]).abs().max() < tol, (dtype, (ref[fin] - tri[fin]).abs().max())
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_reference_kernel_equals_full_attention_when_every_page_is_selected():
    layer = _layer([160, 97, 33], h=3)
    q = torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    pages = torch.tensor([[p if p < -(-n // 16) else -1 for p in range(10)] for n in (160, 160, 97, 97, 33, 33)],
                         dtype=torch.int32)
    got = quest_decode_attention_ref(q, layer.keys, layer.values, layer.starts, layer.lengths, pages, 16, 0.25)
    assert torch.allclose(got, attend(q.unsqueeze(1), layer, 0.25)[0][:, 0], atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")  # CPU byte counts


def _run(lm, name, budget=None, n=300, new=12, query_aware=True, **knobs):
    ids = torch.randint(10, 400, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(lm, build_method(name, budget=budget, **knobs), query_aware=query_aware)
    cache, m = eng.new_cache(), eng.method.fork()
    pre = eng.prefill(cache, ids if query_aware else ids[:-20], m, compress=True)
    logits = pre.logits if query_aware else eng.prefill(cache, ids[-20:], m, compress=False).logits
    after = (cache.nbytes(), [list(x) for x in cache.head_lengths()])
    out, _, _ = eng.decode(cache, m, logits, new)
    return eng, cache, after, out


def test_engine_quest_alone_and_composed_with_snapkv(tiny):
    _, _, (full_bytes, full_lens), full_out = _run(tiny, "full")
    # tiny: 2 layers, 2 KV heads, 4 query heads, d = 16, fp32 (a row: 128 B, a page's bounds: 128 B)
    eng, c, (qb, lens), out = _run(tiny, "quest", token_budget=64, skip_layers=1)
    assert lens == full_lens and all(isinstance(x, QuestLayer) for x in c.kv)
    assert [x.active for x in c.kv] == [False, True]
    assert qb == full_bytes + 2 * 2 * 19 * 128               # 300 tokens: 19 pages per head, bounds added
    # first step: 301 rows, 19 pages, the last holding 13; layer 0 dense, layer 1: 4 query heads x (3 pages + 13)
    # rows + 2 heads x 18 pages of bounds
    assert eng.last_read_bytes[0] == 2 * 301 * 128 + 4 * (48 + 13) * 128 + 2 * 18 * 128
    assert eng.last_read_bytes[0] < full_bytes + 2 * 2 * 128
    assert c.nbytes() == c.held.now and len(out) == 12
    # a budget covering the context decodes exactly as full attention
    _, _, _, wide = _run(tiny, "quest", token_budget=1024, skip_layers=0)
    assert wide == full_out
    # the question fed on top of the encoded context (query_aware=false) is a dense multi-token step
    _, cq, _, outq = _run(tiny, "quest", token_budget=64, skip_layers=0, query_aware=False)
    assert cq.head_lengths()[1] == [300 + 11] * 2 and len(outq) == 12
    # eviction x selection: snapkv's kept rows, pages over them
    _, plain, (pb, plens), _ = _run(tiny, "snapkv", budget=96)
    eng2, sq, (sb, slens), _ = _run(tiny, "snapkv", budget=96, selector={"name": "quest", "token_budget": 32,
                                                                          "skip_layers": 0})
    assert slens == plens and sb == pb + 2 * 2 * 6 * 128  # 96 rows: 6 pages per head
    for li in range(2):
        for h in range(2):
            assert sq.kv[li].layer.head(h)[2][:96].tolist() == plain.kv[li].head(h)[2][:96].tolist()
    # 97 rows: 7 pages, last holding 1; 2 pages per query head = 16 + 1 rows; 6 older pages' bounds per KV head
    assert eng2.last_read_bytes[0] == 2 * (4 * 17 * 128 + 2 * 6 * 128)


def test_bad_knobs_and_compositions_are_one_line():
    with pytest.raises(ValueError, match=r"^method.selector.token_budget=100; allowed: a positive multiple of "
                                         r"page_size \(16\)"):
        build_method("snapkv", budget=64, selector={"name": "quest", "token_budget": 100})
    with pytest.raises(ValueError, match=r"^method.selector.page_size=0; allowed: a positive integer"):
        build_method("snapkv", budget=64, selector={"name": "quest", "page_size": 0})
    with pytest.raises(ValueError, match=r"^method.skip_layers=-1; allowed: an integer >= 0"):
        build_method("quest", skip_layers=-1)
    with pytest.raises(ValueError, match=r"^method.token_budget=8; allowed"):
        build_method("quest", token_budget=8)
    with pytest.raises(ValueError, match=r"^method.selector.colour is not a knob of selector quest; allowed: "
                                         r"page_size, skip_layers, token_budget$"):
        build_method("snapkv", budget=64, selector={"name": "quest", "colour": 1})
    with pytest.raises(ValueError, match=r"method.storage='quest' is a selector"):
        build_method("snapkv", budget=64, storage="quest")
    with pytest.raises(ValueError, match=r"method=h2o scores or evicts rows while decoding"):
        build_method("h2o", budget=64, selector="quest")
    with pytest.raises(ValueError, match=r"^method.selector='nope'; allowed: .*quest"):
        build_method("snapkv", budget=64, selector="nope")
    with pytest.raises(ValueError) as e:
        build_method("snapkv", budget=64, selector={"name": "quest", "token_budget": 100})
    assert "\n" not in str(e.value)


def test_command_line_composition():
    from kvbench.cli import format_aliases, plan_jobs
    from kvbench.results import config_hash, method_label
    (cfg,) = plan_jobs(format_aliases(["method=snapkv", "method.selector=quest", "method.selector.token_budget=256"]),
                       False)
    assert cfg["method"]["selector"] == {"name": "quest", "page_size": 16, "token_budget": 256, "skip_layers": 2}
    assert method_label(cfg["method"]) == "snapkv+quest"
    (own,) = plan_jobs(["method=quest", "method.token_budget=256"], False)
    assert own["method"] == {"name": "quest", "page_size": 16, "token_budget": 256, "skip_layers": 2}
    assert config_hash(cfg) != config_hash(own)
