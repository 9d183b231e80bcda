"""AdaKV's cut queued on the device (methods/kernels/adakv_budgets.py, AdaKV.cut_on_device, kvbench.cache's
PendingLengths) against the host's cut (AdaKV.DEFER = "never", the path before it): the safeguard mix bit for bit
(the torch version, and the Triton program under TRITON_INTERPRET=1), the same kept rows and held bytes end to end
on a tiny random Llama, and the layers' host lengths read once after the prefill, not once per layer.

The Triton interpreter is chosen when triton is imported (TRITON_INTERPRET=1 must be set before that), so this
module sets it before its imports if triton is not loaded yet; if another test module already loaded triton
without it, the Triton tests here are skipped in-process and rerun in one fresh subprocess (as tests/test_kernels.py).
"""
from __future__ import annotations

import random

import pytest
import torch

import triton_modes  # noqa: E402  (tests/: how this process runs Triton)


def _import():
    import kvbench.methods.kernels as kernels
    from kvbench.methods.kernels import HAS_TRITON, adakv_budgets
    from kvbench.methods.kernels import ragged_rows  # noqa: F401  (its kernel, in the chosen mode)
    return HAS_TRITON, adakv_budgets, kernels


HAS_TRITON, AB, KERNELS = triton_modes.import_kernels(_import)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kvbench.cache import KVBenchCache, LayerKV, PendingLengths  # noqa: E402
from kvbench.engine import Engine  # noqa: E402
from kvbench.method import build_method  # noqa: E402
from kvbench.methods.adakv import SCORERS, AdaKV, global_topk_counts, safeguard_mix  # noqa: E402


MODE, DEV, needs_triton = triton_modes.module_modes(HAS_TRITON, getattr(AB, "_budgets_kernel", None))


# ---------------------------------------------------------------- the mix: cases and the host's answer

def host_layout(f, c, budget, L, alpha) -> torch.Tensor:
    """The (3, n_kv) layout the device mix must give: starts, kept, kept from the host's `safeguard_mix`."""
    kept = torch.tensor(safeguard_mix(list(f), list(c), budget, L, alpha))
    return torch.stack([kept.cumsum(0) - kept, kept, kept])


def random_case(rng: random.Random, max_heads: int = 32, max_len: int = 300):
    """(f, c, budget, L, alpha) as a layer gives them: each head's +inf tokens f (one window for every head, or
    any count per head: none, all L (no room), the budget, more), and counts c of the global top-k (the heads'
    free budgets together, none above a head's room), spread at random or evenly (ties in counts, so ties in
    residuals); alpha 0, 1, quarters, thirds or random."""
    h = rng.randint(1, max_heads)
    L = rng.randint(1, max_len)
    budget = rng.randint(1, L)
    if rng.random() < 0.5:
        f = [rng.randint(0, min(L, budget + 2))] * h
    else:
        f = [rng.choice([0, rng.randint(0, L), L, budget, min(L, budget + 1)]) for _ in range(h)]
    base, room = [max(0, budget - x) for x in f], [L - x for x in f]
    c = [0] * h
    if rng.random() < 0.3:
        for _ in range(sum(base)):  # as even as the rooms allow
            i = min((i for i in range(h) if c[i] < room[i]), key=lambda i: (c[i], i))
            c[i] += 1
    else:
        for i in rng.sample([i for i in range(h) for _ in range(room[i])], sum(base)):
            c[i] += 1
    alpha = rng.choice([0.0, 1.0, 0.5, 0.2, 0.25, 0.75, 1 / 3, rng.random()])
    return f, c, budget, L, alpha


def mix_facts(f, c, budget, L, alpha) -> set[str]:
    """Which branches of the host's mix a case takes (the tests check the random cases cover them all)."""
    base, room = [max(0, budget - x) for x in f], [L - x for x in f]
    total = sum(base)
    facts = {"alpha=0"} if alpha == 0 else {"alpha=1"} if alpha == 1 else set()
    if total == 0:
        return facts | {"total=0"}
    if any(r == 0 for r in room):
        facts.add("a head with no room")
    raw = torch.tensor(c) * (1.0 - alpha) + torch.tensor([int(b * alpha) for b in base])
    out = torch.minimum(torch.round(raw), torch.tensor(room, dtype=raw.dtype)).long()
    if any(float(r) % 1 == 0.5 for r in raw):
        facts.add("half to even")
    diff = total - int(out.sum())
    resid = (raw.double() - out).tolist()
    if diff:
        facts.add("grow" if diff > 0 else "shrink")
        if len(set(resid)) < len(resid):
            facts.add("tied residuals")
    return facts


HAND_WORKED = [
    # three heads of base 3, alpha 0.5 (floor int(1.5) = 1), window 1: round([3.5, 2, 2]) = [4, 2, 2] is one short;
    # residuals [-0.5, 0, 0]: the tie goes to the earlier head, 1 (tests/test_faithful_methods.py)
    (([1, 1, 1], [5, 2, 2], 4, 7, 0.5), [5, 4, 3]),
    # base 2, alpha 0.5 (floor 1): round([1.5, 1.5, 3]) = [2, 2, 3] is one over; residuals [-0.5, -0.5, 0]: the
    # earlier of the two rounded up the most gives one back
    (([0, 0, 0], [1, 1, 4], 2, 6, 0.5), [1, 2, 3]),
    # no head has a free budget (windows of 5 and 6 over a budget of 4): min(f, budget)
    (([5, 6], [0, 0], 4, 10, 0.2), [4, 4]),
    # head 0 holds nothing but its window (no room): the missing token goes to head 1 whatever the residuals
    (([5, 0], [0, 3], 3, 5, 0.2), [5, 3]),
    # alpha 1: the safeguard alone, every head its base; alpha 0: the global top-k counts as they are
    (([2, 2], [6, 0], 5, 9, 1.0), [5, 5]),
    (([2, 2], [6, 0], 5, 9, 0.0), [8, 2]),
]


@pytest.mark.parametrize("case,want", HAND_WORKED)
def test_mix_hand_worked(case, want):
    assert safeguard_mix(*case) == want
    assert torch.equal(AB.adakv_budgets_ref(torch.tensor(case[:2]), *case[2:]), host_layout(*case))
    assert AB.adakv_budgets_ref(torch.tensor(case[:2]), *case[2:])[1].tolist() == want


def test_torch_mix_equals_host_mix_on_random_cases():
    """600 random layers: the torch version (no host read) gives the host's counts exactly, and the cases take
    every branch of the mix."""
    rng = random.Random(0)
    seen: set[str] = set()
    for n in range(600):
        f, c, budget, L, alpha = case = random_case(rng)
        assert AB.ref_exact(len(f), budget, alpha)
        seen |= mix_facts(*case)
        got = AB.adakv_budgets_ref(torch.tensor([f, c]), budget, L, alpha)
        assert torch.equal(got, host_layout(*case)), (n, case)
    assert seen >= {"alpha=0", "alpha=1", "total=0", "a head with no room", "half to even", "grow", "shrink",
                    "tied residuals"}, seen


def test_torch_mix_from_scores_equals_the_host_cut():
    """From scores as the scorers give them (ties, +inf windows of every length, some above the budget): the
    device mix of `global_topk_counts` is the host's `adaptive_head_budgets`."""
    from kvbench.methods.adakv import adaptive_head_budgets
    g = torch.Generator().manual_seed(0)
    for n in range(100):
        h, L = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 60, (1,), generator=g))
        budget = int(torch.randint(1, L, (1,), generator=g))
        s = torch.randint(0, 4, (h, L), generator=g).float()
        w = int(torch.randint(0, min(L, budget + 3), (1,), generator=g))
        if w:
            s[:, L - w:] = float("inf")
        alpha = [0.0, 0.2, 0.5, 1.0][n % 4]
        got = AB.adakv_budgets_ref(global_topk_counts(s, budget), budget, L, alpha)
        assert got[1].tolist() == adaptive_head_budgets(s, budget, alpha), n
        assert int(got[1].sum()) == h * budget  # what the device cut counts on


def test_ref_exact_marks_where_the_torch_mix_is_exact():
    assert AB.ref_exact(32, 1 << 15, 0.2) and not AB.ref_exact(64, 1 << 15, 0.2)
    assert AB.ref_exact(8, 512, 1.0) and not AB.ref_exact(8, 512, 1 - 2.0 ** -30)
    assert not AB.ref_exact(2048, 1, 0.2)


# ---------------------------------------------------------------- the Triton program

@needs_triton
def test_triton_mix_equals_torch_mix_and_host_mix(interpret_env):
    """The one-program kernel gives the host's counts on 500 random layers (and the torch version's), the
    hand-worked ones, and where the torch version is not exact: budgets of n_kv * B > 2^20, alpha within 2^-30 of
    1, 64 heads."""
    rng = random.Random(1)
    for n in range(500):
        f, c, budget, L, alpha = case = random_case(rng)
        stats = torch.tensor([f, c])
        got = AB.adakv_budgets_triton(stats.to(DEV), budget, L, alpha).cpu()
        assert torch.equal(got, host_layout(*case)), (n, case)
        assert torch.equal(got, AB.adakv_budgets_ref(stats, budget, L, alpha)), (n, case)
    for case, want in HAND_WORKED:
        assert AB.adakv_budgets_triton(torch.tensor(case[:2]).to(DEV), *case[2:]).cpu()[1].tolist() == want
    g = torch.Generator().manual_seed(2)
    for h, budget, alpha in [(32, 40_000, 0.2), (64, 20_000, 0.5), (3, 5, 1 - 2.0 ** -30), (64, 7, 1 - 2.0 ** -40)]:
        L = budget * 2
        w = int(torch.randint(0, 4, (1,), generator=g))
        f = [w] * h
        total, room = h * (budget - w), L - w
        share = torch.rand(h, generator=g) ** 4  # uneven shares of the heads' free budgets, none above its room
        c = [min(room, x) for x in (share / share.sum() * total).long().tolist()]
        for i in range(h):
            c[i] += min(room - c[i], total - sum(c))
        assert sum(c) == total and max(c) <= room
        got = AB.adakv_budgets_triton(torch.tensor([f, c]).to(DEV), budget, L, alpha).cpu()
        assert torch.equal(got, host_layout(f, c, budget, L, alpha)), (h, budget, alpha)


def score_cases(seed: int, n: int):
    """(scores, budget) as the scorers give them: ties, -0.0, +inf windows of every length (some above the budget,
    some per head), float32 or bfloat16, some non-contiguous; a few with over 1024 global top-k slots."""
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        h = int(torch.randint(1, 9, (1,), generator=g))
        L = int(torch.randint(2, 80, (1,), generator=g)) if k % 5 else int(torch.randint(300, 700, (1,), generator=g))
        budget = int(torch.randint(1, L, (1,), generator=g)) if k % 5 else L // 2
        s = torch.randint(-2, 4, (h, L), generator=g).float() * 0.5
        s[s == 0] = -0.0 if k % 2 else 0.0
        w = int(torch.randint(0, min(L, budget + 3), (1,), generator=g))
        if w:
            s[:, L - w:] = float("inf")
        if k % 7 == 3:  # a head of its own: more +inf tokens
            s[0, : L // 2] = float("inf")
        if k % 3 == 1:
            s = s.to(torch.bfloat16)
        if k % 4 == 2:
            s = torch.cat([s, s], dim=1)[:, :L]  # a row stride of 2 L
        yield s, budget


@needs_triton
def test_triton_window_counts_equal_torch(interpret_env):
    """The window kernel: the masked scores bit for bit, the +inf counts and the total as the torch version."""
    for n, (s, budget) in enumerate(score_cases(3, 60)):
        want = AB.window_counts_ref(s, budget)
        got = AB.window_counts_triton(s.to(DEV), budget)
        assert torch.equal(got[0].cpu().view(torch.int32), want[0].view(torch.int32)), n
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2]), n


@needs_triton
def test_triton_mix_from_topk_equals_torch_and_host(interpret_env):
    """The mix counting each head's share of the global top-k in the program: the layout of the torch version
    (`global_topk_counts`, then the mix) and of the host's cut, whatever the top-k's slots past k hold; and
    `adakv_layout` on the device path (the window kernel, the top-k, this mix) the same."""
    from kvbench.methods.adakv import adaptive_head_budgets
    from kvbench.methods.kernels.topk_select import topk_select_ref
    for n, (s, budget) in enumerate(score_cases(4, 60)):
        h, L = s.shape
        alpha = [0.0, 0.2, 0.5, 1.0, 1 / 3][n % 5]
        masked, forced, total = AB.window_counts_ref(s, budget)
        kept = topk_select_ref(masked.view(1, -1), total, h * budget)[0]
        kept = torch.where(torch.arange(h * budget) < total, kept, torch.randint(0, h * L, (h * budget,)))
        got = AB.adakv_budgets_topk_triton(forced.to(DEV), kept.to(DEV), budget, L, alpha).cpu()
        want = AB.adakv_budgets_ref(global_topk_counts(s, budget), budget, L, alpha)
        assert torch.equal(got, want), n
        assert got[1].tolist() == adaptive_head_budgets(s, budget, alpha), n
        assert torch.equal(AB.adakv_layout(s.to(DEV), budget, alpha).cpu(), want), n  # DEV's path
        if DEV == "cpu":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(KERNELS, "use_triton", lambda *t: True)
                assert torch.equal(AB.adakv_layout(s, budget, alpha), want), n


@needs_triton
def test_triton_ragged_rows_equal_torch(interpret_env):
    """The gather rows of a device cut: each head's first counts[h] per-head top-k slots (later slots garbage)
    shifted by its first buffer row, at the layout's starts, as the torch ops give them (heads keeping 0 rows,
    all rows, over 1024 rows)."""
    from kvbench.methods.kernels import ragged_rows
    g = torch.Generator().manual_seed(5)
    for n in range(40):
        h = int(torch.randint(1, 9, (1,), generator=g))
        width = int(torch.randint(1, 40, (1,), generator=g)) if n % 4 else 1500
        cnt = torch.randint(0, width + 1, (h,), generator=g)
        cnt[0] = 0 if n % 3 == 0 else width
        layout = torch.stack([cnt.cumsum(0) - cnt, cnt, cnt])
        order = torch.randint(0, 5000, (h, width), generator=g)
        starts = torch.randint(0, 10_000, (h,), generator=g)
        total = int(cnt.sum())
        want = ragged_rows.ragged_rows_ref(order, layout, starts, total)
        got = ragged_rows.ragged_rows_triton(order.to(DEV), layout.to(DEV), starts.to(DEV), total).cpu()
        assert torch.equal(got, want), n


@needs_triton
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_triton_device_cut_keeps_the_host_cut_rows(alpha, interpret_env, monkeypatch):
    """A layer cut on the device path with the Triton kernels (the window counts, the mix counting the top-k's
    shares, the gather rows) keeps the host cut's rows (DEFER = "never"): per head the same positions in the same
    order, the same keys and values, the same lengths once read."""
    from kvbench.methods.kernels import ragged_rows
    ran = []
    for mod, name in ((AB, "window_counts_triton"), (AB, "adakv_budgets_topk_triton"),
                      (ragged_rows, "ragged_rows_triton")):
        f = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, f=f, name=name: (ran.append(name), f(*a))[1])
    cut = 0
    for n, (s, budget) in enumerate(score_cases(6, 14)):
        s = s.float().contiguous()
        h, L = s.shape
        f = (s == float("inf")).sum(1)
        if not (bool((f <= budget).all()) or bool((f >= budget).all())):
            continue  # windows on both sides of the budget: not cut on the device (AdaKV.cut_on_device)
        g = torch.Generator().manual_seed(n)
        kv = [torch.randn(h, L, 4, generator=g) for _ in range(2)]
        host = LayerKV.from_dense(*kv, torch.arange(L))
        dev = LayerKV.from_dense(*(t.to(DEV) for t in kv), torch.arange(L, device=DEV))
        m = build_method("adakv", budget=budget, scorer="snapkv", alpha_safeguard=alpha)
        m.reset()
        monkeypatch.setattr(AdaKV, "DEFER", "never")
        m.cut(host, s, budget)
        monkeypatch.setattr(AdaKV, "DEFER", "always")
        with pytest.MonkeyPatch.context() as mp:
            if DEV == "cpu":
                mp.setattr(KERNELS, "use_triton", lambda *t: True)
            del ran[:]
            m.cut(dev, s.to(DEV), budget)
            assert ran == ["window_counts_triton", "adakv_budgets_topk_triton", "ragged_rows_triton"], n
        m._pending.resolve()
        assert dev.head_lengths == host.head_lengths, n
        for i in range(h):
            for t, u in zip(dev.head(i), host.head(i)):  # keys, values, positions
                assert torch.equal(t.cpu(), u), (n, i)
        cut += 1
    assert cut >= 10


def test_triton_suite_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module on a machine without CUDA: rerun here."""
    triton_modes.rerun_in_fresh_process(MODE, __file__, "triton", 600)


# ---------------------------------------------------------------- end to end on a tiny Llama

@pytest.fixture(scope="module")
def lm():
    from kvbench.models import load_model
    torch.set_num_threads(1)
    return load_model("synthetic", shape="tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lm4():
    """4 layers, 4 KV heads: reads per layer and once per prefill differ by more than one."""
    from kvbench import models
    models.SYNTHETIC_SHAPES["tiny-4x4"] = dict(models.SYNTHETIC_SHAPES["tiny-mha"], num_hidden_layers=4)
    try:
        return models.load_model("synthetic", shape="tiny-4x4", device="cpu", dtype="float32")
    finally:
        del models.SYNTHETIC_SHAPES["tiny-4x4"]


def ids(n, seed=0):
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill(lm, mode, monkeypatch, n=160, question=0, decode=0, **knobs):
    """Prefill n random tokens compressing with AdaKV's DEFER = mode (then a question of `question` tokens on
    top, then `decode` greedy tokens). Returns the cache, the method, how many layers were cut on the device,
    and the decoded tokens."""
    monkeypatch.setattr(AdaKV, "DEFER", mode)
    on_device = []
    orig = AdaKV.cut_on_device
    monkeypatch.setattr(AdaKV, "cut_on_device", lambda self, *a: (on_device.append(1), orig(self, *a)))
    m = build_method("adakv", **knobs)
    eng = Engine(lm, m, query_aware=question == 0)
    eng.stop_ids = set()  # random weights: never stop early
    torch.manual_seed(0)  # the random scorer draws its seed from torch's generator
    m.reset()
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids(n), m, compress=True)
    if question:
        pre = eng.prefill(cache, ids(question, seed=1), m, compress=False)
    out = eng.decode(cache, m, pre.logits, decode)[0] if decode else []
    monkeypatch.setattr(AdaKV, "cut_on_device", orig)
    return cache, m, len(on_device), out


def assert_same_cache(a: KVBenchCache, b: KVBenchCache) -> None:
    """Per layer and head the same kept positions in the same row order, the same keys and values, the same
    host and device layout, and the same bytes held now and at the peak."""
    assert a.head_lengths() == b.head_lengths()
    for x, y in zip(a.kv, b.kv):
        assert (x._starts, x._lens, x._caps) == (y._starts, y._lens, y._caps)
        for t, u in ((x.starts, y.starts), (x.lengths, y.lengths), (x.caps, y.caps)):
            assert torch.equal(t, u)
        for h in range(x.n_heads):
            for t, u in zip(x.head(h), y.head(h)):  # keys, values, positions
                assert torch.equal(t, u)
    assert (a.nbytes(), a.held.now, a.held.peak) == (b.nbytes(), b.held.now, b.held.peak)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_device_cut_keeps_the_host_cut_rows(lm, scorer, alpha, monkeypatch):
    knobs = dict(budget=40, scorer=scorer, alpha_safeguard=alpha, window_size=8, kernel_size=5)
    host, _, n_host, _ = prefill(lm, "never", monkeypatch, **knobs)
    dev, m, n_dev, _ = prefill(lm, "always", monkeypatch, **knobs)
    assert (n_host, n_dev) == (0, 2) and len(m._pending) == 0
    assert_same_cache(host, dev)
    if alpha < 1 and scorer not in ("tova",):  # tova: one choice for every head by default
        assert any(len(set(lens)) > 1 for lens in dev.head_lengths())  # ragged: the mix did something


@pytest.mark.parametrize("scorer,budget", [("snapkv", 6), ("cake", 6), ("pyramidkv", 20)])
def test_device_cut_with_windows_at_or_over_the_budget(lm, scorer, budget, monkeypatch):
    """Budget 6 under a window of 8: snapkv's window shrinks to the budget (no free budget: the total == 0
    branch), cake's stays at 8 (every head's window over the budget); pyramidkv: a budget per layer."""
    knobs = dict(budget=budget, scorer=scorer, window_size=8, kernel_size=5)
    host, _, _, _ = prefill(lm, "never", monkeypatch, **knobs)
    dev, _, n_dev, _ = prefill(lm, "always", monkeypatch, **knobs)
    assert n_dev == 2
    assert_same_cache(host, dev)


def test_device_cut_then_a_question_and_decoding(lm, monkeypatch):
    """The context compressed on the device, a question fed on top, 6 tokens decoded: the same tokens and the
    same cache as the host's cut (the pending lengths were read before the question needed them)."""
    knobs = dict(budget=40, scorer="snapkv", window_size=8, kernel_size=5)
    host, _, _, out_host = prefill(lm, "never", monkeypatch, question=12, decode=6, **knobs)
    dev, _, n_dev, out_dev = prefill(lm, "always", monkeypatch, question=12, decode=6, **knobs)
    assert n_dev == 2 and out_dev == out_host and len(out_dev) == 6
    assert_same_cache(host, dev)


# ---------------------------------------------------------------- host reads

class HostReads:
    """Counts what reads a tensor's values on the host (a device-to-host read, on a GPU): Tensor.tolist / .cpu /
    .numpy calls and scalar reads (.item(), int(), bool(): aten._local_scalar_dense), with the elements each
    read, and whether AdaKV's per-layer hook or its after_prefill was running. (On CPU it also counts reads of
    host-made tensors, e.g. the host mix's own; .to(device) is left out: on CPU it cannot tell a read from a
    host-to-device copy.)"""

    def __init__(self, monkeypatch):
        self.where = "outside"
        self.reads: list[tuple[str, int]] = []
        for name in ("tolist", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        for hook in ("compress_layer", "after_prefill"):
            monkeypatch.setattr(AdaKV, hook, self._inside(hook, getattr(AdaKV, hook)))
        reads = self.reads
        outer = self

        class Scalars(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    reads.append((outer.where, 1))
                return func(*args, **(kwargs or {}))
        self.mode = Scalars()

    def _wrap(self, f):
        def read(t, *args, **kwargs):
            self.reads.append((self.where, t.numel()))
            return f(t, *args, **kwargs)
        return read

    def _inside(self, where, f):
        def hook(method, *args, **kwargs):
            self.where = where
            try:
                return f(method, *args, **kwargs)
            finally:
                self.where = "outside"
        return hook

    def during(self, where: str) -> list[int]:
        return [n for w, n in self.reads if w == where]


@pytest.mark.parametrize("mode", ["never", "always"])
def test_host_lengths_are_read_once_after_the_prefill(lm4, mode, monkeypatch):
    """4 layers of 4 KV heads: the host's cut reads each layer's (2, 4) counts in its hook (4 reads of 8, among
    the host mix's reads of its own tensors); the device cut reads nothing there and every layer's lengths in one
    read of 16 after the prefill. The host lengths then equal the device's."""
    knobs = dict(budget=40, scorer="snapkv", window_size=8, kernel_size=5)
    counter = HostReads(monkeypatch)
    with counter.mode:
        cache, m, n_dev, _ = prefill(lm4, mode, monkeypatch, **knobs)
    if mode == "never":
        assert n_dev == 0 and counter.during("compress_layer").count(8) == 4 and counter.during("after_prefill") == []
    else:
        assert n_dev == 4 and counter.during("compress_layer") == [] and counter.during("after_prefill") == [16]
    assert any(len(set(lens)) > 1 for lens in cache.head_lengths())
    for layer in cache.kv:
        assert layer._lens == layer.lengths.tolist() and layer._caps == layer.caps.tolist()
        assert layer._starts == layer.starts.tolist()


def test_pending_lengths_resolve_on_first_read(monkeypatch):
    """Before any read a device-cut layer knows its heads, rows and bytes (the held-bytes meter counts the cut
    exactly); the first read of any host length reads every queued layer at once, correctly; later reads read
    nothing more."""
    queue = PendingLengths()
    cache = KVBenchCache(2)
    counter = HostReads(monkeypatch)
    with counter.mode:
        layers = []
        for i, counts in enumerate([[3, 0, 5], [1, 4, 4]]):
            layer = LayerKV.from_dense(*(torch.randn(3, 10, 4) for _ in range(2)), torch.arange(10))
            layer.meter = cache.held
            cache.kv[i] = layer
            cache.held.add(layer.nbytes())
            cnt = torch.tensor(counts)
            layout = torch.stack([cnt.cumsum(0) - cnt, cnt, cnt])
            layer.keep_ragged(torch.cat([torch.arange(c) * 2 for c in counts]), layout, queue)
            layers.append(layer)
        assert counter.reads == [] and len(queue) == 2
        assert [l.n_heads for l in layers] == [3, 3] and [l.n_rows for l in layers] == [8, 9]
        assert cache.nbytes() == cache.held.now == 17 * layers[0].row_bytes
        assert cache.held.peak == (8 + 30) * layers[0].row_bytes  # layer 1 whole beside layer 0 cut
        assert counter.reads == []
        assert layers[1].head_lengths == [1, 4, 4]        # the first read: both layers, 6 lengths
        assert counter.reads == [("outside", 6)] and len(queue) == 0
        assert layers[0].head_lengths == [3, 0, 5] and layers[0]._starts == [0, 3, 3] and layers[0]._caps == [3, 0, 5]
        assert counter.reads == [("outside", 6)]
    # the kept rows: head h's every other row, in order
    assert layers[0].head(2)[2].tolist() == [0, 2, 4, 6, 8] and layers[1].head(0)[2].tolist() == [0]


def test_pending_lengths_refuse_a_total_the_host_did_not_count():
    queue = PendingLengths()
    cnt = torch.tensor([2, 3])
    layer = LayerKV(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), cnt.cumsum(0) - cnt, cnt,
                    cnt, host=queue.add(cnt, 4))  # 5 rows on the device, 4 counted on the host
    assert layer.n_rows == 4
    with pytest.raises(RuntimeError, match="holds 5 rows, not the 4"):
        layer.head_lengths
