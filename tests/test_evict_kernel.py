"""The fused decode-time eviction kernel (methods/kernels/decode_evict.py: `evict_rows_triton`) against the
torch ops it replaces (`evict_rows`): bit for bit on every tensor either mutates, over random ragged layouts
and the edge cases of the victim choice; and a few fast-decoder steps of H2O and TOVA through the custom op's
Triton dispatch.

The Triton parts run under TRITON_INTERPRET=1 in a subprocess (it must be set before triton is imported, and
other test modules may have imported it already); the subprocess imports this module and calls its `_check_*`
functions.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvbench.methods.kernels.decode_evict import evict_rows, evict_rows_split, evict_rows_triton, fused_evict_ok

ROOT = Path(__file__).resolve().parents[1]
NO_CAP = 2 ** 62
MUTATED = ("keys", "values", "positions", "probs", "score", "log_weight", "lengths", "done")


def _layout(g, lens, d, equal_positions=False, dtype=torch.float32):
    """A ragged cache: heads in a random order in the buffer, spare rows before, between and after them;
    distinct positions per head, rows not in position order. Probabilities on a coarse grid (ties, many 0s),
    0 outside the heads; score and log-weights everywhere (rows outside the heads must stay as they are)."""
    order = torch.randperm(len(lens), generator=g).tolist()
    starts, row = [0] * len(lens), int(torch.randint(0, 4, (1,), generator=g))
    for h in order:
        starts[h] = row
        row += lens[h] + int(torch.randint(0, 4, (1,), generator=g))
    T = row + 1
    positions = torch.randint(0, 300, (T,), generator=g)
    probs = torch.zeros(T)
    shared_pos = torch.randperm(60, generator=g)[:max(lens, default=0)]
    for h, (a, n) in enumerate(zip(starts, lens)):
        positions[a:a + n] = shared_pos[:n] if equal_positions else torch.randperm(60, generator=g)[:n]
        probs[a:a + n] = torch.randint(0, 4, (n,), generator=g).float() / 8  # a quarter of the rows at 0
    t = dict(keys=torch.randn(T, d, generator=g).to(dtype), values=torch.randn(T, d, generator=g).to(dtype),
             positions=positions, probs=probs,
             score=torch.randint(0, 16, (T,), generator=g).float() / 16,  # coarse: sums tie too
             log_weight=torch.randn(T, generator=g), starts=torch.tensor(starts), lengths=torch.tensor(lens),
             done=torch.randint(0, 5, (len(lens),), generator=g))
    return t, 60  # q_pos: every position is older


def _run_both(t, q_pos, caps, width, repeat, rank, n_sink=0, recent=0, shared=False, with_probs=True,
              with_score=True, with_logw=True, with_done=False, block=16, pool=0):
    """Both versions on copies of t; asserts every mutated tensor equal, returns the reference's copy."""
    results = []
    for fn in (evict_rows, evict_rows_triton):
        c = {k: v.clone() for k, v in t.items()}
        kw = dict(block=block) if fn is evict_rows_triton else {}
        fn(c["probs"] if with_probs else None, c["keys"], c["values"], c["positions"], c["starts"], c["lengths"],
           c["score"] if with_score else None, c["log_weight"] if with_logw else None,
           torch.tensor([q_pos]), torch.tensor(caps), width, repeat, rank, n_sink, recent, shared,
           pool=pool, done=c["done"] if with_done else None, **kw)
        results.append(c)
    want, got = results
    case = dict(lens=t["lengths"].tolist(), caps=caps, width=width, repeat=repeat, rank=rank, n_sink=n_sink,
                recent=recent, shared=shared, probs=with_probs, score=with_score, logw=with_logw, block=block,
                pool=pool)
    for name in MUTATED:
        assert torch.equal(got[name], want[name]), (name, case, got[name], want[name])
    return want


def _check_random_layouts(n_cases=120):
    """Random layouts x every fused option, against evict_rows."""
    g = torch.Generator().manual_seed(0)
    moved = 0
    for case in range(n_cases):
        rank = ("position", "attention", "score")[case % 3]
        shared = case % 5 == 4 and rank != "score"
        n_heads = int(torch.randint(1, 5 if shared else 7, (1,), generator=g))
        if shared:  # equal lengths, the same positions in the same rows
            lens = [int(torch.randint(0, 30, (1,), generator=g))] * n_heads
        else:
            lens = torch.randint(0, 40, (n_heads,), generator=g).tolist()
        d = (8, 16, 20)[case % 3]
        t, q_pos = _layout(g, lens, d, equal_positions=shared, dtype=torch.bfloat16 if case % 7 == 0 else torch.float32)
        # caps: some heads over (by one or more), some at or under it, some never evicting
        caps = [max(0, n - int(torch.randint(-1, 3, (1,), generator=g))) if i % 3 else NO_CAP
                for i, n in enumerate(lens)]
        if shared:
            caps = [max(0, lens[0] - 1)] * n_heads
        evicting = [n for n, c in zip(lens, caps) if n > c]
        width = max(evicting + [1]) if case % 2 else max(lens + [1])  # non-evicting heads may hold more
        score = rank == "score" or (not shared and case % 4 == 1)
        want = _run_both(t, q_pos, caps, width, repeat=int(case % 9 != 0), rank=rank,
                         n_sink=(0, 3, 20)[case % 3 if case % 2 else 0], recent=(0, 5, 70)[(case // 3) % 3],
                         shared=shared, with_probs=rank != "position" or score or case % 2 == 0,
                         with_score=score, with_logw=case % 3 != 2, with_done=case % 4 == 3,
                         block=(16, 32, 1024)[case % 3])
        moved += int((want["lengths"] != t["lengths"]).sum())
    assert moved > n_cases // 2, moved  # the cases do remove rows


def _check_edge_cases():
    """The victim is the last row; every row protected; ties; repeat 0; an empty head; a head of one row."""
    g = torch.Generator().manual_seed(1)
    t, q_pos = _layout(g, [6, 9, 0, 1], 16)
    a, n = int(t["starts"][1]), 9
    # position: head 1's last row is its oldest -> a self-copy, then its score and log-weight zeroed
    t["positions"][a:a + n] = torch.arange(n, 0, -1) + 10
    want = _run_both(t, q_pos, [5, 8, NO_CAP, 0], 9, 1, "position")
    assert want["score"][a + n - 1] == 0 and want["lengths"].tolist() == [5, 8, 0, 0]
    # attention: the last row alone has the lowest probability
    t["probs"][a:a + n] = torch.linspace(1.0, 0.5, n)
    _run_both(t, q_pos, [6, 8, NO_CAP, 1], 9, 1, "attention")
    # all protected (sinks, then the recent window): victim row 0, the last row moves there
    want = _run_both(t, q_pos, [5, 8, NO_CAP, 0], 9, 1, "position", n_sink=1000)
    assert torch.equal(want["keys"][a], t["keys"][a + n - 1])
    _run_both(t, q_pos, [5, 8, NO_CAP, 0], 9, 1, "score", recent=1000)
    # ties: all probabilities 0 -> the first row; equal scores after the update; tiles of 16 rows
    t["probs"].zero_()
    _run_both(t, q_pos, [5, 8, NO_CAP, 0], 9, 1, "attention", block=16)
    t["score"].fill_(0.25)
    _run_both(t, q_pos, [5, 8, NO_CAP, 0], 9, 1, "score", n_sink=12, block=16)
    # repeat 0: the scores accumulate, nothing moves
    want = _run_both(t, q_pos, [0, 0, NO_CAP, 0], 9, 0, "score")
    assert torch.equal(want["lengths"], t["lengths"])
    # a tie across tiles: the lowest key in tile 0 and again in tile 2 -> tile 0's row
    t, q_pos = _layout(g, [40], 16)
    t["probs"][int(t["starts"][0]):int(t["starts"][0]) + 40] = 0.5
    t["probs"][int(t["starts"][0]) + 7] = t["probs"][int(t["starts"][0]) + 35] = 0.125
    want = _run_both(t, q_pos, [39], 40, 1, "attention", block=16)
    assert want["positions"][int(t["starts"][0]) + 7] == t["positions"][int(t["starts"][0]) + 39]
    # shared: the keys summed over heads, sinks and the recent window by position; every head drops one row
    for rank in ("position", "attention"):
        t, q_pos = _layout(g, [20] * 4, 16, equal_positions=True)
        _run_both(t, q_pos, [19] * 4, 20, 1, rank, n_sink=5, recent=8, shared=True, with_score=False, block=16)
    # the float32 sum over heads in the reference's order: every row holds the same values, permuted over the
    # heads, so the sums differ only by rounding and the order decides the victim
    for n_heads, seed in ((3, 6), (4, 9)):  # seeds where another order picks another victim
        gs = torch.Generator().manual_seed(seed)
        vals = torch.rand(n_heads, generator=gs)
        x = vals[torch.stack([torch.randperm(n_heads, generator=gs) for _ in range(24)], 1)]  # (heads, rows)
        assert (((x[0] + x[2]) + x[1]) + x[3:].sum(0)).argmin() != x.sum(0).argmin()  # the case has teeth
        t, q_pos = _layout(g, [24] * n_heads, 16, equal_positions=True)
        for h in range(n_heads):
            t["probs"][int(t["starts"][h]):int(t["starts"][h]) + 24] = x[h]
        _run_both(t, q_pos, [23] * n_heads, 24, 1, "attention", shared=True, with_score=False, block=16)
    t, q_pos = _layout(g, [20] * 8, 16, equal_positions=True)  # positions are integers: any head count is exact
    _run_both(t, q_pos, [19] * 8, 20, 1, "position", shared=True, with_score=False, with_probs=False)
    # several removals in one call (the first step over a question), without a score: one launch each
    for rank, shared, lens in (("position", False, [12, 7, 15]), ("attention", False, [12, 7, 15]),
                               ("attention", True, [14] * 3), ("position", True, [14] * 3)):
        t, q_pos = _layout(g, lens, 16, equal_positions=shared)
        caps = [n - 4 for n in lens]
        want = _run_both(t, q_pos, caps, max(lens), 4, rank, n_sink=2, recent=3, shared=shared, with_score=False,
                         with_done=True, block=16)
        assert want["lengths"].tolist() == caps


def _check_fused_pool():
    """CAKE's step in one launch (evict_rows_triton with pool > 1, rank "attention": the probabilities
    average-pooled over each head's rows in position order, then the victim and the move) against evict_rows,
    bit for bit on every tensor (probs: the pooled values, moved with the rows; 0 on a head's rows past the
    grid's width, as pool_by_position's): random ragged layouts (heads of 0, 1 and fewer rows than the kernel,
    heads not full and longer than the width, sinks and recent rows, tiles smaller than a head), pool 3, 4, 5, 7;
    probabilities continuous (the pooled sums round: the order of the window's sum and the division count) with
    many exact zeros; then all zeros (every key ties) and ties between pooled values."""
    g = torch.Generator().manual_seed(7)
    moved = 0
    for case in range(48):
        n_heads = int(torch.randint(1, 7, (1,), generator=g))
        lens = torch.randint(0, 45, (n_heads,), generator=g).tolist()
        lens[0] = (0, 1, 2, 3, int(lens[0]), int(lens[0]))[case % 6]  # empty, one row, fewer rows than the kernel
        t, q_pos = _layout(g, lens, (8, 16)[case % 2], dtype=torch.bfloat16 if case % 5 == 0 else torch.float32)
        held = t["probs"] > 0  # a quarter of each head's rows stay 0 (ties)
        t["probs"] = torch.where(held, torch.rand(t["probs"].shape, generator=g), t["probs"])
        caps = [max(0, n - 1) if i % 3 != 2 else (n, NO_CAP)[case % 2] for i, n in enumerate(lens)]  # some not full
        evicting = [n for n, c in zip(lens, caps) if n > c]
        width = max(evicting + [1]) if case % 3 else max(lens + [1])  # heads not full may hold more than width
        want = _run_both(t, q_pos, caps, width, 1, "attention", n_sink=(0, 3, 20)[case % 3],
                         recent=(0, 5, 70)[(case // 3) % 3], with_score=False, with_logw=case % 4 != 3,
                         with_done=case % 4 == 1, block=(16, 32, 64)[case % 3], pool=(3, 4, 5, 7)[case % 4])
        moved += int((want["lengths"] != t["lengths"]).sum())
    assert moved > 48, moved
    # every probability 0: all keys tie (the first row goes); coarse probabilities: pooled values tie too
    for zero in (True, False):
        t, q_pos = _layout(g, [37, 2, 50, 9], 16)
        if zero:
            t["probs"].zero_()
        for pool in (3, 4, 5, 7):
            _run_both(t, q_pos, [36, 1, 49, 8], 50, 1, "attention", n_sink=2, with_score=False, block=16, pool=pool)
            _run_both(t, q_pos, [36, 1, 49, NO_CAP], 37, 1, "attention", recent=4, with_score=False, block=16,
                      pool=pool)


def _same_positions_both_kernels(lm, name, knobs, steps=6):
    """The fast decoder over a question, with attention.DECODE_KERNEL "ref" then "triton": the same tokens, and
    the same positions in the same rows of every head (keys differ in rounding: the decode attention is Triton's
    too)."""
    import test_decode_eviction as T
    from kvbench import attention
    runs = []
    for kernel in ("ref", "triton"):
        _, cache, method, logits = T.with_question(lm, name, **knobs)
        attention.DECODE_KERNEL = kernel
        try:
            ids, _ = T.fast(lm, cache, method, logits, steps=steps)
        finally:
            attention.DECODE_KERNEL = "auto"
        runs.append((ids, cache))
    (ids_ref, c_ref), (ids_tri, c_tri) = runs
    assert ids_tri == ids_ref, (name, ids_tri, ids_ref)
    for a, b in zip(c_ref.kv, c_tri.kv):
        assert torch.equal(a.lengths, b.lengths)
        for h in range(a.n_heads):
            assert torch.equal(a.head(h)[2], b.head(h)[2]), (name, h)


def _check_decoder_steps():
    """H2O and TOVA through the fast decoder with attention.DECODE_KERNEL="triton" (the fused eviction) keep
    the positions of the same decoder on the torch path (the first step, over a question, repeats the removal:
    TOVA's with the kernel, once per removal; H2O's, which also accumulates its score, with torch ops)."""
    import test_decode_eviction as T
    from kvbench.methods import kernels
    from kvbench.models import load_model
    lm = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
    lm.tokenizer = T._NoTokenizer()
    calls = []
    fused = kernels.evict_rows_triton
    kernels.evict_rows_triton = lambda *a, **k: (calls.append(1), fused(*a, **k))[1]
    for name in ("h2o", "tova"):
        _same_positions_both_kernels(lm, name, dict(budget=24))
    # 2 methods x 2 layers x the 4 steps after the first, + TOVA's first step (its several removals, no score;
    # H2O's first step accumulates a score: torch)
    assert len(calls) == 2 * 2 * 4 + 2, len(calls)


def _check_split():
    """evict_rows_split (torch's choice, one Triton launch for the moves) against evict_rows, for what the fused
    kernel does not choose: CAKE's pooling, LaCache's scheduled ranks, D2O's merge with its thresholds."""
    g = torch.Generator().manual_seed(3)
    moved = 0
    for case in range(36):
        kind = ("pool", "scheduled", "merge")[case % 3]
        n_heads = int(torch.randint(1, 6, (1,), generator=g))
        lens = [int(torch.randint(2, 30, (1,), generator=g))] * n_heads if kind == "scheduled" \
            else torch.randint(2, 30, (n_heads,), generator=g).tolist()
        t, q_pos = _layout(g, lens, (8, 16)[case % 2])
        caps = [n - int(torch.randint(0, 2, (1,), generator=g)) if i % 2 == 0 else NO_CAP for i, n in enumerate(lens)]
        width = max(lens)
        kw = dict(n_sink=(0, 3)[case % 2], recent=(0, 5)[(case // 2) % 2], shared=kind == "scheduled" and case % 2 == 0)
        if kind == "pool":
            kw.update(rank="attention", pool=(3, 5)[case % 2])
        elif kind == "scheduled":
            kw.update(rank="scheduled", ranks=torch.randint(0, 3, (8,), generator=g))
        else:
            taus = torch.rand(n_heads, generator=g, dtype=torch.float64) * 0.5
            taus[::2] = float("nan")  # unset: the first similarity sets it
            kw.update(rank="score", tau=taus, beta=0.3)
        with_score, with_done = kind == "merge", kind == "scheduled"
        results = []
        for fn in (evict_rows, evict_rows_split):
            c = {k: v.clone() for k, v in t.items()}
            opts = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            fn(c["probs"], c["keys"], c["values"], c["positions"], c["starts"], c["lengths"],
               c["score"] if with_score else None, c["log_weight"], torch.tensor([q_pos]), torch.tensor(caps), width, 1,
               done=c["done"] if with_done else None, **opts)
            results.append((c, opts))
        (want, kw_want), (got, kw_got) = results
        for name in MUTATED:
            assert torch.equal(got[name], want[name]), (kind, case, name)
        if kind == "merge":
            assert torch.allclose(kw_got["tau"], kw_want["tau"], rtol=0, atol=0, equal_nan=True), (case, "tau")
        moved += int((want["lengths"] != t["lengths"]).sum())
    assert moved > 10, moved


def _merge_both(t, q_pos, caps, width, taus, n_sink=0, recent=0, block=16, beta=0.3):
    """D2O's step (rank "score", tau, beta) by evict_rows_triton (one launch, MERGE) and evict_rows on copies of
    t: positions, lengths, score, probs, log-weights and which rows were merged exactly equal; keys, values and
    tau close (float32: rtol 1e-5, atol 1e-6; bf16 as float, atol 1e-2). Returns (reference's copy, its tau, the
    merged rows: (head, position) pairs)."""
    results = []
    for fn in (evict_rows, evict_rows_triton):
        c = {k: v.clone() for k, v in t.items()}
        tau = taus.clone()
        kw = dict(block=block) if fn is evict_rows_triton else {}
        fn(c["probs"], c["keys"], c["values"], c["positions"], c["starts"], c["lengths"], c["score"],
           c["log_weight"], torch.tensor([q_pos]), torch.tensor(caps), width, 1, "score", n_sink, recent,
           tau=tau, beta=beta, **kw)
        results.append((c, tau, _merged_rows(t, c)))
    (want, tau_want, merged_want), (got, tau_got, merged_got) = results
    case = dict(lens=t["lengths"].tolist(), caps=caps, width=width, taus=taus.tolist(), n_sink=n_sink,
                recent=recent, block=block, dtype=t["keys"].dtype)
    for name in ("positions", "lengths", "score", "probs", "log_weight", "done"):
        assert torch.equal(got[name], want[name]), (name, case, got[name], want[name])
    assert merged_got == merged_want, (case, merged_got, merged_want)
    tol = dict(rtol=1e-5, atol=1e-6) if t["keys"].dtype == torch.float32 else dict(atol=1e-2)
    for name in ("keys", "values"):
        assert torch.allclose(got[name].float(), want[name].float(), **tol), \
            (name, case, (got[name].float() - want[name].float()).abs().max())
    assert torch.allclose(tau_got, tau_want, rtol=1e-5, atol=1e-6, equal_nan=True), (case, tau_got, tau_want)
    return want, tau_want, merged_want


def _merged_rows(before, after):
    """(head, position) of the rows whose key or value changed (positions are distinct within a head)."""
    merged = set()
    for h, a in enumerate(before["starts"].tolist()):
        old = {int(p): a + i for i, p in enumerate(before["positions"][a:a + int(before["lengths"][h])].tolist())}
        for i in range(int(after["lengths"][h])):
            p, r = int(after["positions"][a + i]), old[int(after["positions"][a + i])]
            if not (torch.equal(after["keys"][a + i], before["keys"][r])
                    and torch.equal(after["values"][a + i], before["values"][r])):
                merged.add((h, p))
    return merged


def _check_fused_merge():
    """D2O's whole step in one launch (evict_rows_triton with tau: score, victim, merge, move) against
    evict_rows: random ragged layouts (unset and set thresholds, heads not full, bf16 and float32, sinks and
    recent rows, tiles smaller than a head), then the merge into the head's last row (the row the move copies
    into the victim's slot), a similarity below the threshold (no merge, tau moves on), every tau unset."""
    g = torch.Generator().manual_seed(5)
    merges = skipped = 0
    for case in range(40):
        n_heads = int(torch.randint(1, 7, (1,), generator=g))
        lens = torch.randint(2, 40, (n_heads,), generator=g).tolist()
        dtype = torch.bfloat16 if case % 2 else torch.float32
        t, q_pos = _layout(g, lens, (8, 16)[(case // 2) % 2], dtype=dtype)
        caps = [n - 1 if i % 3 != 2 else (n, NO_CAP)[case % 2] for i, n in enumerate(lens)]  # some not full
        width = max([n for n, c in zip(lens, caps) if n > c] + [1]) if case % 3 else max(lens)
        taus = torch.rand(n_heads, generator=g, dtype=torch.float64) * 0.9
        taus[(case % 3)::3] = float("nan")
        _, tau, merged = _merge_both(t, q_pos, caps, width, taus, n_sink=(0, 3)[case % 2],
                                     recent=(0, 5)[(case // 2) % 2], block=(16, 32)[case % 4 == 3])
        full = [h for h in range(n_heads) if lens[h] > caps[h]]
        merges += len(merged)
        skipped += sum(1 for h in full if h not in {m[0] for m in merged})
        for h in range(n_heads):  # a head not full keeps its threshold
            if h not in full:
                assert tau[h].isnan() if taus[h].isnan() else tau[h] == taus[h]
    assert merges > 40 and skipped > 5, (merges, skipped)  # both branches ran
    # the merge destination is the head's last row: its key is the victim's, doubled (similarity 1)
    for dtype in (torch.float32, torch.bfloat16):
        t, q_pos = _layout(g, [10, 23, 6], 16, dtype=dtype)
        a, n = int(t["starts"][1]), 23
        t["probs"][a:a + n] = 0.0
        t["score"][a:a + n] = 1.0
        t["score"][a + 4] = 0.0  # the victim: row 4
        t["keys"][a + n - 1] = t["keys"][a + 4] * 2
        taus = torch.tensor([float("nan"), 0.5, float("nan")], dtype=torch.float64)
        want, tau, merged = _merge_both(t, q_pos, [9, 22, NO_CAP], 23, taus, block=16)
        assert (1, int(t["positions"][a + n - 1])) in merged  # the last row, merged, then moved into row 4
        assert want["positions"][a + 4] == t["positions"][a + n - 1]
        assert not torch.equal(want["values"][a + 4], t["values"][a + n - 1])
    # best < tau: nothing merges, tau still moves on
    t, q_pos = _layout(g, [12, 30], 8)
    taus = torch.tensor([0.999, 0.999], dtype=torch.float64)
    want, tau, merged = _merge_both(t, q_pos, [11, 29], 30, taus, n_sink=2, recent=3, block=16)
    assert not merged and (tau < 0.999).all() and not tau.isnan().any(), (merged, tau)
    assert not torch.equal(want["lengths"], t["lengths"])
    # every tau unset: each full head merges (the first similarity sets its threshold)
    t, q_pos = _layout(g, [17, 33, 5, 40], 16, dtype=torch.bfloat16)
    taus = torch.full((4,), float("nan"), dtype=torch.float64)
    want, tau, merged = _merge_both(t, q_pos, [16, 32, 4, NO_CAP], 33, taus, n_sink=1, block=16)
    assert {h for h, _ in merged} == {0, 1, 2} and tau[:3].isfinite().all() and tau[3].isnan(), (merged, tau)


def _check_split_decoder_steps():
    """CAKE, LaCache (evict_rows_split after the first step) and D2O (evict_rows_triton's merge after the first
    step) through the fast decoder with attention.DECODE_KERNEL="triton" keep the tokens and the positions row
    by row of the torch path."""
    import test_decode_eviction as T
    from kvbench.methods import kernels
    from kvbench.models import load_model
    lm = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
    lm.tokenizer = T._NoTokenizer()
    split, fused = kernels.evict_rows_split, kernels.evict_rows_triton
    calls, pooled, merged = {}, {}, {}  # per method: split calls; fused calls' pool and whether with tau
    current = [None]
    kernels.evict_rows_split = lambda *a, **k: (calls.setdefault(current[0], []).append(1), split(*a, **k))[1]
    kernels.evict_rows_triton = lambda *a, **k: (  # pool: the 17th argument, tau: the 20th
        pooled.setdefault(current[0], []).append(a[16] if len(a) > 16 else k.get("pool", 0)),
        merged.setdefault(current[0], []).append((a[19] if len(a) > 19 else k.get("tau")) is not None),
        fused(*a, **k))[2]
    try:
        for name, knobs in (("cake", dict(budget=24, window_size=4)),
                            ("lacache", dict(budget=48, span=1, n_sink=4, recent=8)),
                            ("d2o", dict(budget=24, window_size=8))):
            current[0] = name
            _same_positions_both_kernels(lm, name, knobs)
    finally:
        kernels.evict_rows_split, kernels.evict_rows_triton = split, fused
    assert calls.get("lacache"), "evict_rows_split never ran for LaCache"
    assert "cake" not in calls, "CAKE's steady steps should take the fused kernel"
    # 2 layers x the steps after the first (the first, over a question, repeats the removal: torch's ops)
    assert len(pooled.get("cake", [])) >= 2 * 4 and all(p > 1 for p in pooled["cake"]), pooled.get("cake")
    assert any(merged.get("d2o", [])), "D2O's merge never ran in the fused kernel"


def _check_scheduled(device="cpu"):
    """LaCache's scheduled rank in one launch (`_scheduled_evict_kernel`, through evict_rows_split) against
    evict_rows: any rank up to the head's length (the binary search over positions), sinks and a recent window
    protected, ranks past the candidates (the +inf rows' row order), heads under their cap. (device "cuda": the
    same check on a GPU, python -c "import test_evict_kernel as T; T._check_scheduled('cuda')" in tests/.)"""
    g = torch.Generator().manual_seed(5)
    moved = 0
    for case in range(24):
        n_heads = int(torch.randint(1, 5, (1,), generator=g))
        n = int(torch.randint(2, 40, (1,), generator=g))
        t, q_pos = _layout(g, [n] * n_heads, 16)
        t = {k: v.to(device) for k, v in t.items()}
        caps = [n - 1 if i % 3 else NO_CAP for i in range(n_heads)]
        kw = dict(rank="scheduled", n_sink=(0, 3)[case % 2], recent=(0, 5)[(case // 2) % 2],
                  ranks=torch.randint(0, n if case % 4 == 3 else max(1, n - 8), (6,), generator=g))
        results = []
        for fn in (evict_rows, evict_rows_split):
            c = {k: v.clone() for k, v in t.items()}
            c["done"] = torch.randint(0, 8, (n_heads,), generator=g).to(device) if not results else results[0][1]
            done0 = c["done"].clone()
            fn(c["probs"], c["keys"], c["values"], c["positions"], c["starts"], c["lengths"], None, c["log_weight"],
               torch.tensor([q_pos], device=device), torch.tensor(caps, device=device), n + int(case % 5 == 0), 1,
               done=c["done"], **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
            results.append((c, done0))
        (want, d0), (got, _) = results
        for name in MUTATED:
            assert torch.equal(got[name], want[name]), (case, name)
        moved += int((want["lengths"] != t["lengths"]).sum())
    assert moved > 20, moved


def _interpreted(*checks):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    code = "import test_evict_kernel as T\n" + "".join(f"T.{c}()\nprint('{c} OK')\n" for c in checks)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    for c in checks:
        assert f"{c} OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_fused_kernel_matches_evict_rows():
    """Random ragged layouts and the victim's edge cases: every mutated tensor equal (torch.equal)."""
    _interpreted("_check_random_layouts", "_check_edge_cases")


def test_fused_merge_matches_evict_rows():
    """D2O's step in one launch: the positions, scores and merged rows equal evict_rows', the merged rows and
    thresholds within float32 rounding (see _check_fused_merge)."""
    _interpreted("_check_fused_merge")


def test_split_eviction_matches_evict_rows():
    """Pooling, scheduled ranks and merging: torch's choice and the Triton moves equal evict_rows bit for bit,
    alone and through the fast decoder (CAKE and D2O: the fused kernel; LaCache: the split)."""
    _interpreted("_check_split", "_check_scheduled", "_check_split_decoder_steps")


def test_fused_pool_matches_evict_rows():
    """CAKE's step in one launch: every mutated tensor equal evict_rows' (torch.equal; see _check_fused_pool)."""
    _interpreted("_check_fused_pool")


def test_decoder_steps_take_the_fused_kernel():
    """H2O and TOVA decode steps through the custom op keep the torch path's positions (see _check_decoder_steps)."""
    _interpreted("_check_decoder_steps")


UNFUSED = [  # (option, what the error names)
    (dict(pool=5), "pool"),                          # with a score
    (dict(pool=5, rank="position"), "pool"),
    (dict(pool=3, rank="score"), "pool"),
    (dict(pool=4, repeat=2), "pool"),
    (dict(tau=torch.zeros(2, dtype=torch.float64)), "tau"),  # rank "attention": the merge is fused with "score"
    (dict(tau=torch.zeros(2, dtype=torch.float64), rank="score", shared=True), "tau"),
    (dict(tau=torch.zeros(2, dtype=torch.float64), rank="score", repeat=2), "tau"),
    (dict(rank="scheduled"), "scheduled"),
    (dict(repeat=2), "repeat"),                      # with a score
    (dict(shared=True), "shared"),                   # with a score
    (dict(shared=True, rank="score"), "shared"),
]


@pytest.mark.parametrize("opts,word", UNFUSED, ids=[w + str(i) for i, (_, w) in enumerate(UNFUSED)])
def test_unfused_options_are_rejected(opts, word):
    """fused_evict_ok says no, and evict_rows_triton raises naming the option (before touching anything)."""
    base = dict(rank="attention", pool=0, tau=None, repeat=1, shared=False)
    args = {**base, **opts}
    t, q_pos = _layout(torch.Generator().manual_seed(0), [5, 7], 16)
    assert fused_evict_ok(**base, score=t["score"])
    assert not fused_evict_ok(**args, score=t["score"])
    with pytest.raises(ValueError, match=word):
        evict_rows_triton(t["probs"], t["keys"], t["values"], t["positions"], t["starts"], t["lengths"], t["score"],
                          None, torch.tensor([q_pos]), torch.tensor([4, 6]), 7, args["repeat"], args["rank"],
                          shared=args["shared"], pool=args["pool"], tau=args["tau"])
    assert fused_evict_ok("attention", 1, None, 0, True, None)  # pool 1 is no pooling; shared without a score
    assert fused_evict_ok("attention", 5, None, 1, False, None)  # CAKE: one launch
    assert not fused_evict_ok("attention", 5, None, 1, True, None)      # shared
    assert not fused_evict_ok("attention", 5, None, 2, False, None)     # several removals
    assert not fused_evict_ok("position", 5, None, 1, False, None)      # another rank
    assert not fused_evict_ok("attention", 5, None, 1, False, t["score"])  # with a score
    tau = torch.zeros(2, dtype=torch.float64)
    assert fused_evict_ok("score", 0, tau, 1, False, t["score"])  # D2O: one launch
    assert not fused_evict_ok("score", 0, tau, 1, False, None)    # the merge follows a score
