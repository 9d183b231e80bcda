"""KV-cache kernels: torch references against naive float64 loops and hand-worked examples; Triton kernels
against the torch references (Triton interpreter on CPU, compiled kernels where CUDA is present).

The Triton interpreter is chosen when triton is imported (TRITON_INTERPRET=1 must be set before that), so
this module sets it before its imports if triton is not loaded yet. If another test module already loaded
triton without it, the Triton tests here are skipped in-process and rerun in one fresh subprocess.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import triton_modes  # noqa: E402  (tests/: how this process runs Triton)


def _import():
    from kvbench.methods import kernels
    from kvbench.methods.kernels import ragged_decode
    return kernels, ragged_decode


K, _rd = triton_modes.import_kernels(_import)
MODE, DEV, needs_triton = triton_modes.module_modes(K.HAS_TRITON, getattr(_rd, "_decode_split_kernel", None))


# ---------------------------------------------------------------- inputs

def ragged_cache(lengths, d, gap=3, dtype=torch.float32, seed=0):
    """Flat-packed cache with unused rows between (and before) the heads' regions."""
    gen = torch.Generator().manual_seed(seed)
    starts, row = [], gap
    for n in lengths:
        starts.append(row)
        row += n + gap
    keys = torch.randn(row, d, generator=gen, dtype=torch.float64).to(dtype)
    values = torch.randn(row, d, generator=gen, dtype=torch.float64).to(dtype)
    return keys, values, torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def to(dev, *ts):
    return [t.to(dev) for t in ts]


# ---------------------------------------------------------------- naive float64 oracles

def naive_softmax(x):
    e = torch.exp(x - x.max())
    return e / e.sum()


def naive_decode(q, keys, values, starts, lengths, scaling):
    n_q, g = q.shape[0], q.shape[0] // len(starts)
    out = torch.zeros(n_q, q.shape[1], dtype=torch.float64)
    probs = torch.zeros(keys.shape[0], dtype=torch.float64)
    for j in range(n_q):
        a, n = int(starts[j // g]), int(lengths[j // g])
        p = naive_softmax(keys[a:a + n].double() @ q[j].double() * scaling)
        out[j] = p @ values[a:a + n].double()
        probs[a:a + n] += p
    return out, probs


def naive_window(q_win, keys, starts, lengths, scaling, kernel_size, pooling):
    n_q, w, _ = q_win.shape
    g = n_q // len(starts)
    out = torch.zeros(keys.shape[0], dtype=torch.float64)
    for h in range(len(starts)):
        a, n = int(starts[h]), int(lengths[h])
        k = keys[a:a + n].double()
        acc = torch.zeros(n, dtype=torch.float64)
        for j in range(h * g, (h + 1) * g):
            for i in range(w):
                seen = n - w + i + 1  # the window's row i is the token at position n - w + i
                acc[:seen] += naive_softmax(k[:seen] @ q_win[j, i].double() * scaling)
        mean = acc / (g * w)
        prefix, pad = n - w, kernel_size // 2
        for p in range(n):
            if p >= prefix:
                out[a + p] = mean[p]
                continue
            vals = [float(mean[x]) for x in range(p - pad, p + pad + 1) if 0 <= x < prefix]
            out[a + p] = max(vals) if pooling == "max" else sum(vals) / kernel_size
    return out


def naive_colsum(q, keys, scaling, causal):
    n_q, m, _ = q.shape
    n_kv, n, _ = keys.shape
    g = n_q // n_kv
    out = torch.zeros(n_kv, n, dtype=torch.float64)
    for j in range(n_q):
        for i in range(m):
            seen = n - m + i + 1 if causal else n
            out[j // g, :seen] += naive_softmax(keys[j // g, :seen].double() @ q[j, i].double() * scaling)
    return out


def naive_compact(keys, values, starts, lengths, keep_idx, counts):
    rows, pos = [], 0
    for h, c in enumerate(counts.tolist()):
        for i in keep_idx[pos:pos + c].tolist():
            rows.append(int(starts[h]) + i)
        pos += c
    new_starts = [sum(counts.tolist()[:h]) for h in range(len(counts))]
    return keys[rows], values[rows], torch.tensor(new_starts), counts


# ---------------------------------------------------------------- references vs naive loops

LENGTHS = [1, 7, 33, 100]


@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_ref_matches_naive(g, d):
    keys, values, starts, lengths = ragged_cache(LENGTHS, d)
    q = randn(len(LENGTHS) * g, d)
    out, probs = K.ragged_decode_attention_ref(q, keys, values, starts, lengths, return_probs=True)
    n_out, n_probs = naive_decode(q, keys, values, starts, lengths, 1 / math.sqrt(d))
    assert (out.double() - n_out).abs().max() < 1e-5
    assert (probs.double() - n_probs).abs().max() < 1e-5
    assert probs[:starts[0]].abs().max() == 0  # unused rows stay 0


@pytest.mark.parametrize("g,pooling,kernel_size,w", [(1, "max", 5, 1), (4, "max", 7, 7), (4, "avg", 5, 7),
                                                      (8, "avg", 1, 3)])
def test_window_ref_matches_naive(g, pooling, kernel_size, w):
    lengths = [max(n, w) for n in LENGTHS]
    keys, _, starts, lengths = ragged_cache(lengths, 64)
    q = randn(len(lengths) * g, w, 64)
    got = K.window_scores_ref(q, keys, starts, lengths, kernel_size=kernel_size, pooling=pooling)
    want = naive_window(q, keys, starts, lengths, 1 / 8, kernel_size, pooling)
    assert (got.double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g,m", [(1, 37), (4, 37), (8, 11)])
def test_colsum_ref_matches_naive(causal, g, m):
    keys = randn(2, 37, 64, seed=2)
    q = randn(2 * g, m, 64)
    got = K.attention_colsum_ref(q, keys, causal=causal, chunk_rows=5)  # several chunks, one partial
    want = naive_colsum(q, keys, 1 / 8, causal)
    assert (got.double() - want).abs().max() < 1e-5


def test_compact_ref_matches_naive():
    keys, values, starts, lengths = ragged_cache(LENGTHS, 16)
    counts = torch.tensor([1, 0, 10, 57])
    gen = torch.Generator().manual_seed(3)
    keep = torch.cat([torch.randperm(n, generator=gen)[:c] for n, c in zip(LENGTHS, counts.tolist())])
    got = K.compact_ref(keys, values, starts, lengths, keep, counts)
    want = naive_compact(keys, values, starts, lengths, keep, counts)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- hand-worked examples (every implementation)

@pytest.mark.parametrize("impl", [K.ragged_append_ref] + ([K.ragged_append_triton] if MODE in ("cuda", "interpret")
                                                          else []), ids=lambda f: f.__name__)
def test_append_writes_first_spare_row_of_every_head(impl, interpret_env):
    # heads of 2, 0 and 1 rows at starts 0, 4, 6 (capacity 4, 2, 2): the new rows land at 2, 4 and 7
    keys = torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
    values, positions = -keys, torch.arange(8) * 10
    starts, lengths = torch.tensor([0, 4, 6]), torch.tensor([2, 0, 1])
    k_new, v_new = torch.full((3, 16), 0.5), torch.full((3, 16), -0.5)
    k0, v0, p0 = keys.clone(), values.clone(), positions.clone()
    args = to(DEV, k_new, v_new, torch.tensor([99]), keys, values, positions, starts, lengths)
    impl(*args)
    keys, values, positions, lengths = (t.cpu() for t in (args[3], args[4], args[5], args[7]))
    assert lengths.tolist() == [3, 1, 2]
    for row in range(8):
        new = row in (2, 4, 7)
        assert torch.equal(keys[row], torch.full((16,), 0.5) if new else k0[row])
        assert torch.equal(values[row], torch.full((16,), -0.5) if new else v0[row])
        assert int(positions[row]) == (99 if new else int(p0[row]))


@pytest.mark.parametrize("impl", [K.ragged_append_ref] + ([K.ragged_append_triton] if MODE in ("cuda", "interpret")
                                                          else []), ids=lambda f: f.__name__)
def test_append_ring_overwrites_the_oldest_non_sink_row(impl, interpret_env):
    # ring of 4 rows, 1 sink. Head 0 starts with positions [0, 5] (capacity 4), head 1 empty (capacity 4).
    # Appending positions 10..14: head 0 -> rows 2, 3, then full: rows 1, 2, 3 (the pointer wraps to 1);
    # head 1 -> rows 0..3, then row 1. Positions after: [0, 12, 13, 14] and [10, 14, 12, 13].
    keys = torch.zeros(8, 16)
    positions = torch.tensor([0, 5, -1, -1, -1, -1, -1, -1])
    starts, lengths, ring_next = torch.tensor([0, 4]), torch.tensor([2, 0]), torch.tensor([1, 1])
    args = to(DEV, keys, keys.clone(), positions, starts, lengths, ring_next)
    for p in range(10, 15):
        new = torch.full((2, 16), float(p))
        impl(*to(DEV, new, new, torch.tensor([p])), *args[:5], ring_next=args[5], ring_rows=4, n_sink=1)
    keys, _, positions, _, lengths, ring_next = (t.cpu() for t in args)
    assert positions.tolist() == [0, 12, 13, 14, 10, 14, 12, 13]
    assert keys[:, 0].tolist() == [0, 12, 13, 14, 10, 14, 12, 13]
    assert lengths.tolist() == [4, 4] and ring_next.tolist() == [1, 2]


def test_append_ref_refuses_a_full_head():
    keys, values, starts, lengths = ragged_cache([3, 2], 16, gap=0)
    with pytest.raises(ValueError, match="head 0 is full"):
        K.ragged_append_ref(torch.zeros(2, 16), torch.zeros(2, 16), torch.tensor([5]), keys, values,
                            torch.zeros(keys.shape[0], dtype=torch.long), starts, lengths, caps=lengths.clone())


def _impls(name):
    impls = [getattr(K, name + "_ref")]
    if MODE in ("cuda", "interpret"):
        impls.append(getattr(K, name + "_triton"))
    return impls


@pytest.mark.parametrize("impl", _impls("ragged_decode_attention"), ids=lambda f: f.__name__)
def test_decode_zero_query_is_mean_of_values(impl, interpret_env):
    # q = 0: every visible key scores 0, so attention is uniform: out = mean of the head's values,
    # each token's probability is 1/L per query head, g/L summed over the group
    keys, values, starts, lengths = ragged_cache([1, 7, 0, 4], 16)
    q = torch.zeros(8, 16)
    out, probs = impl(*to(DEV, q, keys, values, starts, lengths), return_probs=True)
    out, probs = out.cpu(), probs.cpu()
    for h, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        want = values[a:a + n].mean(0) if n else torch.zeros(16)  # an empty head attends to nothing
        assert (out[2 * h:2 * h + 2] - want).abs().max() < 1e-6
        assert torch.allclose(probs[a:a + n], torch.full((n,), 2 / max(n, 1)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", _impls("window_scores"), ids=lambda f: f.__name__)
def test_window_scores_hand_worked(impl, interpret_env):
    # one head, L = 4, window w = 2, q = 0 (uniform over what each row sees):
    # row 0 (position 2) sees keys 0..2 at 1/3, row 1 (position 3) sees keys 0..3 at 1/4
    # mean over the 2 rows: [7/24, 7/24, 7/24, 1/8]; prefix = keys 0, 1
    # max-pool k=3 over the prefix: [7/24, 7/24]; avg-pool k=3 (zero padding counted): [14/72, 14/72]
    keys = torch.randn(4, 16)
    args = to(DEV, torch.zeros(1, 2, 16), keys, torch.tensor([0]), torch.tensor([4]))
    got_max = impl(*args, kernel_size=3, pooling="max").cpu()
    got_avg = impl(*args, kernel_size=3, pooling="avg").cpu()
    assert (got_max - torch.tensor([7 / 24, 7 / 24, 7 / 24, 1 / 8])).abs().max() < 1e-6
    assert (got_avg - torch.tensor([7 / 36, 7 / 36, 7 / 24, 1 / 8])).abs().max() < 1e-6


@pytest.mark.parametrize("impl", _impls("attention_colsum"), ids=lambda f: f.__name__)
def test_colsum_hand_worked(impl, interpret_env):
    # q = 0, causal, n = 3: row 0 -> [1, 0, 0], row 1 -> [1/2, 1/2, 0], row 2 -> [1/3, 1/3, 1/3];
    # column sums [11/6, 5/6, 1/3], times g = 2 query heads
    got = impl(*to(DEV, torch.zeros(2, 3, 16), torch.randn(1, 3, 16))).cpu()
    assert (got - 2 * torch.tensor([[11 / 6, 5 / 6, 1 / 3]])).abs().max() < 1e-5


# ---------------------------------------------------------------- Triton vs torch reference

@needs_triton
@pytest.mark.parametrize("g,d,num_splits,block_n", [(1, 64, None, 64), (4, 128, 3, 16), (8, 64, 5, 16),
                                                    (4, 96, 2, 32)])
def test_decode_triton_matches_ref(g, d, num_splits, block_n, interpret_env):
    keys, values, starts, lengths = ragged_cache(LENGTHS, d, seed=g)
    q = randn(len(LENGTHS) * g, d, seed=d)
    args = to(DEV, q, keys, values, starts, lengths)
    out, probs = K.ragged_decode_attention_triton(*args, return_probs=True, num_splits=num_splits,
                                                  block_n=block_n)
    r_out, r_probs = K.ragged_decode_attention_ref(q, keys, values, starts, lengths, return_probs=True)
    assert (out.cpu() - r_out).abs().max() < 1e-4  # fp32: max abs error 1e-4
    assert (probs.cpu() - r_probs).abs().max() < 1e-4
    plain = K.ragged_decode_attention_triton(*args, num_splits=num_splits, block_n=block_n)
    assert torch.equal(plain, out)


@needs_triton
@pytest.mark.parametrize("stack", [False, True])  # rows tiled per query head / a KV head's g*w rows in one tile
@pytest.mark.parametrize("g,w,pooling,kernel_size,num_splits", [(1, 1, "max", 5, None), (4, 7, "max", 7, 3),
                                                                 (8, 7, "avg", 5, 4), (3, 6, "max", 7, 1)])
def test_window_triton_matches_ref(g, w, pooling, kernel_size, num_splits, stack, interpret_env):
    lengths = [max(n, w) for n in LENGTHS]  # w=1 keeps the lengths [1, 7, 33, 100]
    keys, _, starts, lengths = ragged_cache(lengths, 64, seed=g)
    q = randn(len(lengths) * g, w, 64, seed=w)
    got = K.window_scores_triton(*to(DEV, q, keys, starts, lengths), kernel_size=kernel_size, pooling=pooling,
                                 block_m=16, block_n=16, num_splits=num_splits,  # splits: key chunks of pass 1
                                 stack=stack)  # (3, 6): 18 rows stacked in a tile of 32, padded rows masked
    want = K.window_scores_ref(q, keys, starts, lengths, kernel_size=kernel_size, pooling=pooling)
    assert (got.cpu() - want).abs().max() < 1e-5  # fp32: max abs error 1e-5 (scores are <= 1)


@needs_triton
@pytest.mark.parametrize("g,m", [(1, 37), (3, 37), (4, 20)])
def test_h2o_scores_take_the_colsum_kernel_on_cuda(g, m, interpret_env):
    """H2O's accumulated attention (its torch loop, methods/h2o.py) and the Triton kernel it dispatches to on
    CUDA give the same sums: whole prefills (m = L) and chunks on top of earlier rows (m < L), GQA groups."""
    from kvbench.methods.h2o import accumulated_attention
    keys = randn(2, 37, 64, seed=g)
    q = randn(2 * g, m, 64, seed=m)
    loop = accumulated_attention(q, keys, 64 ** -0.5, chunk=8)  # CPU tensors: the torch loop
    got = K.attention_colsum_triton(*to(DEV, q, keys), 64 ** -0.5, block_m=16, block_n=16)
    assert (got.cpu() - loop).abs().max() < 1e-4
    assert (K.attention_colsum_ref(q, keys, 64 ** -0.5) - loop).abs().max() < 1e-5


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g,m,stack", [(1, 37, None), (4, 37, None), (8, 20, None), (4, 5, True), (2, 37, True)])
def test_colsum_triton_matches_ref(causal, g, m, stack, interpret_env):
    keys = randn(2, 37, 64, seed=g)
    q = randn(2 * g, m, 64, seed=m)
    got = K.attention_colsum_triton(*to(DEV, q, keys), causal=causal, block_m=16, block_n=16, stack=stack)
    want = K.attention_colsum_ref(q, keys, causal=causal)
    assert (got.cpu() - want).abs().max() < 1e-4  # fp32: max abs error 1e-4 (sums up to m * g)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_triton_matches_ref(dtype, interpret_env):
    """Odd d, an empty head, one-row heads, float32 and bfloat16 caches (new rows in the cache's dtype, as
    the model produces them: the interpreter's float32 -> bfloat16 cast truncates where CUDA rounds)."""
    for step in range(3):  # three appends in a row: each lands after the previous one
        if step == 0:
            keys, values, starts, lengths = ragged_cache([1, 0, 5, 1], 40, gap=4, dtype=dtype)
            positions = torch.arange(keys.shape[0])
            ref = [t.clone() for t in (keys, values, positions, lengths)]
            tri = to(DEV, keys, values, positions, lengths)
        k_new, v_new = randn(4, 40, seed=10 + step).to(dtype), randn(4, 40, seed=20 + step).to(dtype)
        pos = torch.tensor([1000 + step])
        K.ragged_append_ref(k_new, v_new, pos, ref[0], ref[1], ref[2], starts, ref[3])
        K.ragged_append_triton(*to(DEV, k_new, v_new, pos), tri[0], tri[1], tri[2], starts.to(DEV), tri[3])
        for a, b in zip(tri, ref):
            assert torch.equal(a.cpu(), b)


@needs_triton
def test_append_ring_triton_matches_ref(interpret_env):
    """Rolling window: heads of 1, 0, 5 and 2 rows, ring of 4 rows with 2 sinks, 9 appends (wraps twice)."""
    keys, values, starts, lengths = ragged_cache([1, 0, 5, 2], 24, gap=5)
    lengths = torch.minimum(lengths, torch.tensor(4))  # a head never holds more than the ring
    positions = torch.arange(keys.shape[0])
    ring = torch.full((4,), 2)
    ref = [t.clone() for t in (keys, values, positions, lengths, ring)]
    tri = to(DEV, keys, values, positions, lengths, ring)
    for step in range(9):
        k_new, v_new = randn(4, 24, seed=30 + step), randn(4, 24, seed=40 + step)
        pos = torch.tensor([500 + step])
        K.ragged_append_ref(k_new, v_new, pos, ref[0], ref[1], ref[2], starts, ref[3], ring_next=ref[4],
                            ring_rows=4, n_sink=2)
        K.ragged_append_triton(*to(DEV, k_new, v_new, pos), tri[0], tri[1], tri[2], starts.to(DEV), tri[3],
                               ring_next=tri[4], ring_rows=4, n_sink=2)
        for a, b in zip(tri, ref):
            assert torch.equal(a.cpu(), b)


@needs_triton
def test_compact_triton_matches_ref(interpret_env):
    keys, values, starts, lengths = ragged_cache(LENGTHS, 96)
    counts = torch.tensor([1, 0, 33, 41])
    gen = torch.Generator().manual_seed(4)
    keep = torch.cat([torch.sort(torch.randperm(n, generator=gen)[:c]).values
                      for n, c in zip(LENGTHS, counts.tolist())])
    got = K.compact_triton(*to(DEV, keys, values, starts, lengths, keep, counts), block_r=16)
    want = K.compact_ref(keys, values, starts, lengths, keep, counts)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def _topk_by_stable_sort(row, k):
    idx = torch.sort(row.float(), descending=True, stable=True).indices[:k]
    return torch.sort(idx).values


@needs_triton
@pytest.mark.parametrize("seed", range(4))
def test_topk_select_triton_matches_reference_and_a_stable_sort(seed, interpret_env):
    """The one-launch top-k (radix select, then the kept indices in order) keeps what a stable descending sort
    keeps, row by row with its own k: ties towards the earlier index, negative scores, -0.0 tied with 0.0,
    +-inf, a row longer than one tile; and what the torch version keeps."""
    g = torch.Generator().manual_seed(seed)
    rows, L = 5, [70, 300, 2100, 9, 513][seed % 5] + seed
    s = torch.randint(-3, 4, (rows, L), generator=g).float() / 4  # many ties
    special = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, 1e-30, -1e-30, 3.4e38])
    at = torch.rand(rows, L, generator=g) < 0.2
    s[at] = special[torch.randint(0, len(special), (int(at.sum()),), generator=g)]
    if seed == 3:
        s = torch.randn(rows, L, generator=g)  # no ties
    k = torch.tensor([0, 1, L // 3, L - 1, L])
    width = int(k.max())
    got = K.topk_select_triton(s.to(DEV), k.to(DEV), width, block=256 if seed % 2 else None).cpu()  # tiles, or one
    ref = K.topk_select_ref(s, k, width)
    one = K.topk_select_triton(s.to(DEV), L // 3, L // 3, block=256 if seed % 2 else None).cpu()  # one k, all rows
    for r in range(rows):
        assert torch.equal(one[r], _topk_by_stable_sort(s[r], L // 3)), r
        want = _topk_by_stable_sort(s[r], int(k[r]))
        assert torch.equal(got[r, :k[r]], want), r
        assert torch.equal(ref[r, :k[r]], want), r


@needs_triton
@pytest.mark.parametrize("case, L, P, block", [("ties", 300, 3, 64), ("ties", 257, 1, 128), ("ties", 70, 8, 64),
                                               ("plateaus", 300, 4, 128), ("plateaus", 131, 2, 64),
                                               ("distinct", 200, 5, 64)])
def test_topk_select_split_triton_matches_reference_and_a_stable_sort(case, L, P, block, interpret_env):
    """The top-k over P programs a row (chunks, several launches) keeps what a stable descending sort keeps: ties
    to the earlier index across chunks and tiles, plateaus (max-pooled scores), a row of +-0.0 only, +inf at a
    row's end, +-inf, both signs; per-row k with 0 and L, one int k; P = 1, chunks and tiles not dividing L, and
    P larger than needed (L = 70, P = 8: chunks of 16, the last 3 empty)."""
    g = torch.Generator().manual_seed(L + P)
    rows = 5
    if case == "distinct":
        s = torch.randn(rows, L, generator=g)
    else:
        s = torch.randint(-3, 4, (rows, L), generator=g).float() / 4
    if case == "ties":
        special = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, 1e-30, -1e-30, 3.4e38])
        at = torch.rand(rows, L, generator=g) < 0.2
        s[at] = special[torch.randint(0, len(special), (int(at.sum()),), generator=g)]
    if case == "plateaus":  # windowed max-pooling, as the scorers' pooling gives
        s = torch.nn.functional.max_pool1d(s[:, None], 7, stride=1, padding=3)[:, 0]
        s[0] = torch.where(torch.rand(L, generator=g) < 0.5, -0.0, 0.0)  # every score tied
        s[1, -8:] = float("inf")
        s[2, :8] = float("-inf")
        s[3] = -s[3]
    k = torch.tensor([0, 1, L // 3, L - 1, L])
    width = int(k.max())
    got = K.topk_select_split_triton(s.to(DEV), k.to(DEV), width, programs_per_row=P, block=block).cpu()
    ref = K.topk_select_ref(s, k, width)
    one = K.topk_select_split_triton(s[:2].to(DEV), L // 3, L // 3, programs_per_row=P, block=block).cpu()
    # the default P: on CUDA one program per SM over the rows; under the interpreter (8 "programs") 5 rows fill
    # it, so the one-launch kernel runs instead
    auto = K.topk_select_split_triton(s.to(DEV), k.to(DEV), width).cpu()
    for r in range(rows):
        want = _topk_by_stable_sort(s[r], int(k[r]))
        assert torch.equal(got[r, :k[r]], want), r
        assert torch.equal(auto[r, :k[r]], want), r
        assert torch.equal(ref[r, :k[r]], want), r
        if r < 2:
            assert torch.equal(one[r], _topk_by_stable_sort(s[r], L // 3)), r


@needs_triton
@pytest.mark.parametrize("seed,P", [(0, 1), (1, 3), (2, 7)])
def test_adakv_global_topk_counts_through_the_split_kernel(seed, P, monkeypatch, interpret_env):
    """AdaKV's per-head share of the global top-k with the split top-k kernel as the GPU runs it (one row of h*L
    scores, k on the device) equals the torch path's (a stable sort; tested against the rule written as a loop
    in test_methods_wave2): many ties, +inf windows of every length up to 11."""
    from kvbench.methods.adakv import global_topk_counts
    g = torch.Generator().manual_seed(seed)
    h, L, budget = 4, 37, 9
    s = torch.randint(0, 5, (h, L), generator=g).float()
    for i in range(h):
        s[i, L - int(torch.randint(0, 12, (1,), generator=g)):] = float("inf")
    want = global_topk_counts(s, budget)  # CPU tensors: the torch path
    topk_module = importlib.import_module("kvbench.methods.kernels.topk_select")  # the package's name is the function
    monkeypatch.setattr(topk_module, "topk_select",
                        lambda x, k, w: K.topk_select_split_triton(x, k, w, programs_per_row=P, block=64))
    assert global_topk_counts(s.to(DEV), budget).cpu().tolist() == want.tolist()


def test_triton_suite_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module on a machine without CUDA: rerun here."""
    triton_modes.rerun_in_fresh_process(
        MODE, __file__, "triton or hand_worked or zero_query or spare_row or ring or topk or h2o_scores", 300)


# ---------------------------------------------------------------- dispatch and input validation

def test_dispatchers_use_reference_on_cpu():
    keys, values, starts, lengths = ragged_cache(LENGTHS, 16)
    q = randn(8, 16)
    assert torch.equal(K.ragged_decode_attention(q, keys, values, starts, lengths),
                       K.ragged_decode_attention_ref(q, keys, values, starts, lengths))


def test_bad_inputs_raise_value_error():
    keys, values, starts, lengths = ragged_cache([8, 9], 16)
    q_win = randn(2, 4, 16)
    with pytest.raises(ValueError, match="pooling"):
        K.window_scores(q_win, keys, starts, lengths, pooling="sum")
    with pytest.raises(ValueError, match="kernel_size"):
        K.window_scores(q_win, keys, starts, lengths, kernel_size=0)  # (even sizes pool as torch does)
    with pytest.raises(ValueError, match="window"):
        K.window_scores(randn(2, 9, 16), keys, starts, lengths)
    with pytest.raises(ValueError, match="multiple"):
        K.ragged_decode_attention(randn(3, 16), keys, values, starts, lengths)
    with pytest.raises(ValueError, match="int64"):
        K.ragged_decode_attention(randn(2, 16), keys, values, starts.int(), lengths)
    with pytest.raises(ValueError, match="outside"):
        K.ragged_decode_attention(randn(2, 16), keys, values, starts, lengths + 100)
    with pytest.raises(ValueError, match="keep_idx_flat"):
        K.compact(keys, values, starts, lengths, torch.tensor([0, 9]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="keep_counts"):
        K.compact(keys, values, starts, lengths, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="m <= n"):
        K.attention_colsum(randn(2, 5, 16), randn(1, 4, 16))


@pytest.mark.parametrize("impl", _impls("ragged_decode_attention"), ids=lambda f: f.__name__)
def test_decode_log_weight_counts_a_row_as_its_copies(impl, interpret_env):
    # a merged row with log_weight log(3) attends exactly as 3 copies of that row in an unweighted cache
    keys, values, starts, lengths = ragged_cache([5, 3], 16, seed=7)
    q = randn(4, 16, seed=8)
    lw = torch.zeros(keys.shape[0])
    r = int(starts[0]) + 1
    lw[r] = math.log(3)
    got = impl(*to(DEV, q, keys, values, starts, lengths), log_weight=lw.to(DEV)).cpu()
    k2 = torch.cat([keys[int(starts[0]):int(starts[0]) + 5], keys[r:r + 1].repeat(2, 1),
                    keys[int(starts[1]):int(starts[1]) + 3]])
    v2 = torch.cat([values[int(starts[0]):int(starts[0]) + 5], values[r:r + 1].repeat(2, 1),
                    values[int(starts[1]):int(starts[1]) + 3]])
    want = K.ragged_decode_attention_ref(q, k2, v2, torch.tensor([0, 7]), torch.tensor([7, 3]))
    assert (got - want).abs().max() < 1e-5
