"""MiniCache's decode attention (methods/kernels/minicache_decode.py): the torch reference against a hand computation
(every head's key and value rows materialized one by one, merged rows as mag * dir rounded to the model dtype, then
softmax(q K^T * scaling) V), the Triton kernel under TRITON_INTERPRET=1 against the reference (SmolLM2's shape:
d = 64, 3 KV heads of 3 query heads; empty parts, a head with no row, several tiles and splits), the launch reading
nothing on the host, and bad inputs refused.

Triton's mode is chosen at import (tests/triton_modes.py): where another test module already loaded triton
without the interpreter, the Triton tests here are skipped in-process and rerun in one fresh subprocess.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import triton_modes  # noqa: E402  (tests/: how this process runs Triton)


def _import():
    from kvbench.methods.kernels import HAS_TRITON, minicache_decode
    return HAS_TRITON, minicache_decode


HAS_TRITON, M = triton_modes.import_kernels(_import)
MODE, DEV, needs_triton = triton_modes.module_modes(HAS_TRITON, getattr(M, "_minicache_split_kernel", None))

KIND = (3, 1, 2, 0, 0)  # both merged; keys merged; values merged; both plain; the layer's plain rows
# The interpreter keeps bf16 as raw uint16 bits and its tl.dot multiplies those bits (triton-lang/triton#11584: bf16
# is not supported by the interpreter): bf16 runs on CUDA only; fp16 (numpy-native) takes the same rounded path here.
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    MODE != "cuda", reason="the Triton interpreter's tl.dot does not support bfloat16"))]


def make_case(lens, kind, d, g, dtype=torch.float32, seed=0, gap=2):
    """A layer in MiniCache's layout. lens: P lists of H row counts. Regions are packed part by part (keys head
    by head, values in reverse head order, so kst != vst), `gap` unused rows before and after each."""
    gen = torch.Generator().manual_seed(seed)
    n_parts, n_kv = len(lens), len(lens[0])
    nxt = {"kdir": gap, "krow": gap, "vdir": gap, "vrow": gap}
    kst = [[0] * n_kv for _ in range(n_parts)]
    vst = [[0] * n_kv for _ in range(n_parts)]
    for p in range(n_parts):
        kb, vb = "kdir" if kind[p] & 1 else "krow", "vdir" if kind[p] & 2 else "vrow"
        for h in range(n_kv):
            kst[p][h] = nxt[kb]
            nxt[kb] += lens[p][h] + gap
        for h in reversed(range(n_kv)):
            vst[p][h] = nxt[vb]
            nxt[vb] += lens[p][h] + gap

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def unit(n):
        x = randn(n, d)
        return (x / x.norm(dim=1, keepdim=True)).to(dtype)

    def mags(n):
        return (0.5 + 3 * torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype)

    kdir, vdir = unit(nxt["kdir"]), unit(nxt["vdir"])
    buffers = {"q": randn(n_kv * g, d).to(dtype), "kdir": kdir, "kmag": mags(kdir.shape[0]),
               "krow": randn(nxt["krow"], d).to(dtype), "vdir": vdir, "vmag": mags(vdir.shape[0]),
               "vrow": randn(nxt["vrow"], d).to(dtype)}
    layout = [torch.tensor(x, dtype=torch.int64) for x in (kst, vst, lens)]
    return buffers, layout


def args(case, dev="cpu"):
    b, (kst, vst, lens) = case
    return [t.to(dev) for t in (b["q"], b["kdir"], b["kmag"], b["krow"], b["vdir"], b["vmag"], b["vrow"], kst, vst,
                                lens)]


def hand_attention(case, kind, scaling):
    """float64: each head's rows materialized one at a time, then softmax(q K^T * scaling) V."""
    b, (kst, vst, lens) = case
    q, dtype = b["q"], b["kdir"].dtype
    n_parts, n_kv = lens.shape
    g = q.shape[0] // n_kv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(n_kv):
        K, V = [], []
        for p in range(n_parts):
            for r in range(int(lens[p, h])):
                i, j = int(kst[p, h]) + r, int(vst[p, h]) + r
                K.append((b["kmag"][i].float() * b["kdir"][i].float()).to(dtype) if kind[p] & 1 else b["krow"][i])
                V.append((b["vmag"][j].float() * b["vdir"][j].float()).to(dtype) if kind[p] & 2 else b["vrow"][j])
        if not K:
            continue  # no row: output 0
        K, V = torch.stack(K).double(), torch.stack(V).double()
        qh = q[h * g:(h + 1) * g].double()
        out[h * g:(h + 1) * g] = torch.softmax(qh @ K.T * scaling, dim=-1) @ V
    return out


def random_lens(n_parts, n_kv, max_len, seed, empty_head=None):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len + 1, (n_parts, n_kv), generator=gen)
    lens[torch.rand(n_parts, n_kv, generator=gen) < 0.25] = 0  # some empty parts
    if empty_head is not None:
        lens[:, empty_head] = 0
    return lens.tolist()


# ---------------------------------------------------------------- the reference

def test_ref_hand_worked_example():
    # one KV head, one query head, d = 2, scaling 1; part 0 merged (key 2 * (1, 0), value 3 * (0, 1)), part 1 plain
    # (key (0, 0), value (1, 1)); q = (ln 3 / 2, 0): scores ln 3 and 0, probabilities 3/4 and 1/4
    q = torch.tensor([[math.log(3) / 2, 0.0]])
    kdir, kmag = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
    vdir, vmag = torch.tensor([[0.0, 1.0]]), torch.tensor([3.0])
    krow, vrow = torch.zeros(1, 2), torch.ones(1, 2)
    kst = vst = torch.zeros(2, 1, dtype=torch.int64)
    lens = torch.ones(2, 1, dtype=torch.int64)
    out = M.minicache_decode_attention_ref(q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens, (3, 0), scaling=1.0)
    assert torch.allclose(out, torch.tensor([[0.25, 2.5]]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ref_equals_hand_materialized_rows(dtype):
    lens = [[2, 0], [0, 3], [0, 2], [3, 1], [2, 2]]  # (P, H): parts 1 and 2 empty for head 0, part 0 for head 1
    case = make_case(lens, KIND, d=8, g=2, dtype=dtype, seed=1)
    want = hand_attention(case, KIND, 0.3)
    got = M.minicache_decode_attention_ref(*args(case), KIND, scaling=0.3)
    assert got.dtype == dtype and got.shape == (4, 8)
    if dtype == torch.float32:
        assert torch.allclose(got.double(), want, atol=1e-5)
    else:  # one rounding of the output to bf16/fp16 (<= 2**-8 relative), the same rounded rows as inputs
        assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)
    # a head with no row at all outputs 0
    empty = [[n if h else 0 for h, n in enumerate(row)] for row in lens]
    case = make_case(empty, KIND, d=8, g=2, dtype=dtype, seed=2)
    got = M.minicache_decode_attention_ref(*args(case), KIND)
    assert torch.equal(got[:2], torch.zeros(2, 8, dtype=dtype))
    assert torch.allclose(got.double(), hand_attention(case, KIND, 8 ** -0.5), rtol=1e-2, atol=1e-2)
    # on CPU the dispatcher is the reference
    assert torch.equal(M.minicache_decode_attention(*args(case), KIND), got)


def rounding_case(dtype):
    """One query head: part 0 a merged key 1.7 * (0.6, 0.8) (product not representable in half precision), part 1
    a plain key holding that product rounded to dtype; values (1, 0) and (0, 1). Rounded before the dot, the two
    scores are equal: output (0.5, 0.5). Unrounded, they differ by about 2e-4 (fp16) or 1e-3 (bf16), which the
    scaling of 1e4 turns into probabilities far from 1/2."""
    kdir, kmag = torch.tensor([[0.6, 0.8]]).to(dtype), torch.tensor([1.7]).to(dtype)
    krow = (kmag.float()[:, None] * kdir.float()).to(dtype)
    assert krow[0, 0].float() != kmag[0].float() * kdir[0, 0].float()  # the rounding matters here
    vrow = torch.eye(2, dtype=dtype)
    empty = torch.zeros(0, 2, dtype=dtype)
    lay = [torch.tensor([[0], [0]]), torch.tensor([[0], [1]]), torch.tensor([[1], [1]])]  # kst, vst, lens
    return [torch.tensor([[1.0, 0.0]], dtype=dtype), kdir, kmag, krow, empty, empty[:, 0], vrow, *lay]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ref_rounds_merged_rows_before_the_dot(dtype):
    out = M.minicache_decode_attention_ref(*rounding_case(dtype), (1, 0), scaling=1e4)
    assert torch.equal(out, torch.tensor([[0.5, 0.5]], dtype=dtype))


# ---------------------------------------------------------------- the Triton kernel

def _close(tri, ref):
    assert tri.dtype == ref.dtype and tri.shape == ref.shape
    err = (tri.float() - ref.float()).abs().max().item()
    # half types: the kernel rounds the probabilities to the model dtype for its p.v dot (as ragged_decode)
    rel = {torch.float32: None, torch.float16: 5e-3, torch.bfloat16: 2e-2}[ref.dtype]
    tol = 1e-5 if rel is None else rel * ref.float().abs().max().item()
    assert err <= tol, (err, tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("num_splits", [None, 1, 3, (3, 1, 2, 1, 2)])
def test_triton_equals_ref_smollm2_shape(dtype, num_splits, interpret_env):
    # d = 64, 3 KV heads of 3 query heads; head 1 has no row; parts of 0..40 rows (several 16-row tiles)
    lens = random_lens(5, 3, 40, seed=3, empty_head=1)
    lens[0][0], lens[2][0], lens[4][2] = 40, 21, 37  # every part holds rows somewhere
    case = make_case(lens, KIND, d=64, g=3, dtype=dtype, seed=4)
    ref = M.minicache_decode_attention_ref(*args(case), KIND)
    tri = M.minicache_decode_attention_triton(*args(case, DEV), KIND, num_splits=num_splits, block_n=16)
    _close(tri.cpu(), ref)
    assert torch.equal(tri[3:6].cpu(), torch.zeros(3, 64, dtype=dtype))


@needs_triton
@pytest.mark.parametrize("kind,lens,gap", [
    ((3,), [[5, 70]], 1),                       # one part, both merged; 70 rows: two 64-row tiles
    ((1, 0), [[3, 0], [2, 9]], 0),               # no merged value anywhere: vdir has no row at all
    ((2, 2, 1), [[4, 1], [0, 6], [7, 0]], 3),    # the same kind twice
])
def test_triton_equals_ref_other_kinds(kind, lens, gap, interpret_env):
    case = make_case(lens, kind, d=24, g=1, seed=5, gap=gap)
    ref = M.minicache_decode_attention_ref(*args(case), kind, scaling=0.2)
    tri = M.minicache_decode_attention_triton(*args(case, DEV), kind, scaling=0.2)  # default splits, block_n 64
    _close(tri.cpu(), ref)


@needs_triton
@pytest.mark.parametrize("dtype", HALF)
def test_triton_rounds_merged_rows_before_the_dot(dtype, interpret_env):
    out = M.minicache_decode_attention_triton(*[t.to(DEV) for t in rounding_case(dtype)], (1, 0), scaling=1e4)
    assert torch.equal(out.cpu(), torch.tensor([[0.5, 0.5]], dtype=dtype))


@needs_triton
def test_triton_launch_reads_nothing_on_the_host(monkeypatch, interpret_env):
    """CUDA-graph safe: no host read of the lengths (or anything); the split count from the buffer sizes."""
    launches, reads = [], []

    class Stub:  # records the launch instead of running it
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.name, grid, kw))

    class Scalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    case = make_case(random_lens(5, 3, 300, seed=6), KIND, d=64, g=3, seed=6)
    a = args(case, DEV)
    monkeypatch.setattr(M, "_minicache_split_kernel", Stub("split"))
    monkeypatch.setattr(M, "_decode_reduce_kernel", Stub("reduce"))
    for name in ("tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda t, *x, **y: reads.append(t))
    with Scalars():
        M.minicache_decode_attention_triton(*a, KIND, block_n=64)
        M.minicache_decode_attention_triton(*a, KIND, block_n=64, num_splits=(4, 1, 2, 1, 3))
    assert reads == []
    avg_rows = (a[1].shape[0] + a[3].shape[0]) // 3
    splits = max(1, min(-(-avg_rows // 128), -(-(M.num_programs_hint(a[0].device) // 2) // 3)))
    assert [(n, grid) for n, grid, _ in launches] == [("split", (3, 5 * splits)), ("reduce", (9,)),
                                                       ("split", (3, 11)), ("reduce", (9,))]
    assert launches[0][2]["K_MERGED"] == 0b00011 and launches[0][2]["V_MERGED"] == 0b00101
    assert launches[1][2]["NUM_SPLITS"] == 5 * splits and launches[3][2]["NUM_SPLITS"] == 11
    # each slot: its part, its split among the part's, the part's count
    assert torch.equal(M._slots((4, 1, 2, 1, 3), a[0].device), torch.tensor([
        [0, 0, 4], [0, 1, 4], [0, 2, 4], [0, 3, 4], [1, 0, 1], [2, 0, 2], [2, 1, 2], [3, 0, 1], [4, 0, 3],
        [4, 1, 3], [4, 2, 3]], dtype=torch.int32, device=a[0].device))


def test_triton_suite_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module on a machine without CUDA: rerun here."""
    triton_modes.rerun_in_fresh_process(MODE, __file__, "triton", 600)


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change,match", [
    (lambda a, k: (a, (3, 1, 2, 0)), "kind must be 5 ints"),
    (lambda a, k: (a, (3, 1, 2, 0, 4)), "kind must be 5 ints"),
    (lambda a, k: (a[:9] + [a[9].int()], k), "lens must be an int64"),
    (lambda a, k: (a[:7] + [a[7][:4]] + a[8:], k), r"kst must be an int64 tensor of shape \(5, 3\)"),
    (lambda a, k: (a[:2] + [a[2][:-1]] + a[3:], k), "kmag must be a 1-D float tensor"),
    (lambda a, k: (a[:3] + [a[3][:, :8].contiguous()] + a[4:], k), r"krow must be \(rows, d=16\)"),
    (lambda a, k: (a[:6] + [a[6].double()] + a[7:], k), "vrow must be"),
    (lambda a, k: ([a[0][:5]] + a[1:], k), "not a multiple"),
    (lambda a, k: (a[:9] + [a[9][0]], k), r"lens must be \(P, H\)"),
])
def test_bad_inputs_raise(change, match):
    case = make_case(random_lens(5, 3, 4, seed=7), KIND, d=16, g=2, seed=7)
    a, kind = change(args(case), KIND)
    for f in (M.minicache_decode_attention_ref, M.minicache_decode_attention_triton):
        with pytest.raises(ValueError, match=match):
            f(*a, kind)


def test_ref_refuses_rows_outside_the_buffers():
    case = make_case([[2, 3]], (0,), d=8, g=1, seed=8, gap=0)
    a = args(case)
    a[9] = torch.tensor([[2, 4]])  # head 1's 4 key rows from row 2: past the 5 rows of krow
    with pytest.raises(ValueError, match="outside the buffers"):
        M.minicache_decode_attention_ref(*a, (0,))
