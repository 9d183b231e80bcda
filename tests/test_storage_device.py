"""Storage formats on the GPU fast path (kvbench/store.py `device_decode`, kvbench/fast_decode.py).

A format that steps on the device lays itself out with fixed capacity, then appends and attends with every count
in device memory. Checked here on the CPU (the in-place step run eagerly, as on the GPU minus the graph): the same
greedy tokens over 40 steps, the same store afterwards and the same records (bytes read, FLOPs, peak bytes held)
as the engine loop, whose `append` / `attend` are each format's definition; KIVI's device append (its flushes)
bit-equal to `KIVILayer.append`, and its Triton kernel bit-equal to that under the interpreter.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvbench import fast_decode
from kvbench.cache import LayerKV
from kvbench.engine import Engine
from kvbench.fast_decode import EncodedRecords, FastDecoder, Plan
from kvbench.method import build_method
from kvbench.methods.kivi import KIVI, KIVILayer
from kvbench.methods.minicache import MiniCacheLayer
from kvbench.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")


CAL = {"calib_samples": 3, "calib_len": 96}  # (not test_storage_eigen.py's: that one counts its own calibration)
KIVI_KN = {"group_size": 16, "residual_length": 16}
# tiny: 2 layers, 2 KV heads, 4 query heads, d = 16, fp32. 40 steps: KIVI's key run (R = 16) flushes twice
CASES = {
    "kivi": ("kivi", None, {"bits": 2, **KIVI_KN}),
    "snapkv+kivi": ("snapkv", 64, {"storage": {"name": "kivi", "bits": 4, **KIVI_KN}}),
    "adakv+kivi": ("adakv", 64, {"storage": {"name": "kivi", "bits": 2, "group_size": 16, "residual_length": 32}}),
    "quest": ("quest", None, {"token_budget": 64, "skip_layers": 1}),
    "snapkv+quest": ("snapkv", 96, {"selector": {"name": "quest", "token_budget": 32, "skip_layers": 0}}),
    "think": ("think", None, {}),
    "pyramidkv+think": ("pyramidkv", 64, {"storage": {"name": "think"}}),
    "eigen_attention": ("eigen_attention", None, {"rank": 8, **CAL}),
    "flexgen": ("flexgen", None, {"bits": 4, "group_size": 16}),  # keys per token, no residual
    "snapkv+flexgen": ("snapkv", 64, {"storage": {"name": "flexgen", "bits": 2, "group_size": 16,
                                                  "residual_length": 3}}),
    # gamma 0.5: about half the tokens retained, so every group (key / value merged or retained) holds some
    "minicache": ("minicache", None, {"start_layer": 0, "gamma": 0.5}),
    "snapkv+minicache": ("snapkv", 64, {"storage": {"name": "minicache", "start_layer": 0, "gamma": 0.3}}),
}


def prefilled(lm, case, n=300, setup=None, question=0):
    """The case's method over n random tokens, compressed; `question` tokens more on top, appended after."""
    name, budget, knobs = CASES[case]
    method = build_method(name, budget=budget, **knobs)
    if setup is not None:
        setup(method)
    eng = Engine(lm, method, query_aware=True)
    eng.stop_ids = set()  # random weights: never stop early, decode the full length
    ids = torch.randint(10, 400, (n + question,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = eng.new_cache()
    m = eng.method.fork()
    pre = eng.prefill(cache, ids[:n], m, compress=True)
    if question:
        pre = eng.prefill(cache, ids[n:], m, compress=False)
    cache.held.reset_peak()
    return eng, cache, m, pre


@pytest.mark.parametrize("case,question", [(c, 0) for c in CASES] + [("minicache", 7), ("snapkv+minicache", 1)])
def test_device_decode_matches_engine_loop(tiny, case, question):
    steps = 40
    eng, c1, m1, pre = prefilled(tiny, case, question=question)
    ids_ref, _, flops_ref = eng.decode(c1, m1, pre.logits, steps)  # the CPU: the engine loop
    _, c2, m2, _ = prefilled(tiny, case, question=question)
    assert not any(isinstance(layer, LayerKV) for layer in c2.kv)
    assert fast_decode.plan(m2, c2, tiny.model) == Plan()
    records = EncodedRecords(c2, steps - 1, eng._group)  # MiniCache's: from its merge log, after decoding
    fd = FastDecoder(tiny.model, c2, steps, use_graph=False)
    ids_fast, step_ms = fd.decode(int(pre.logits.argmax()), steps)
    assert ids_fast == ids_ref and len(step_ms) == steps - 1
    reads, flops, peaks = records.get()
    # the records the fast path reports are the loop's
    assert reads == eng.last_read_bytes
    assert flops == [f - eng._linear_flops for f in flops_ref]
    assert peaks[-1] == c1.held.peak
    # the same store afterwards
    assert c2.seen_tokens == c1.seen_tokens and c2.head_lengths() == c1.head_lengths()
    assert c2.nbytes() == c1.nbytes()
    c2.resync_held()
    assert c2.held.now == c2.nbytes()
    for a, b in zip(c1.kv, c2.kv):
        ma, mb = a.materialize(), b.materialize()
        for h in range(ma.n_heads):
            (ka, va, pa), (kb, vb, pb) = ma.head(h), mb.head(h)
            assert torch.equal(pa, pb)
            torch.testing.assert_close(kb, ka, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vb, va, atol=1e-5, rtol=1e-5)
    if isinstance(c1.kv[0], MiniCacheLayer):  # the same tokens retained, keys and values, in every head
        for h, (a, b) in enumerate(zip(c1.kv[0].pair.merged, c2.kv[0].pair.merged)):
            assert torch.equal(a["k"].ret, b["k"].ret) and torch.equal(a["v"].ret, b["v"].ret)
            assert torch.equal(c1.kv[0].pair.pos[h], c2.kv[0].pair.pos[h])
        assert any(a["k"].ret.numel() for a in c1.kv[0].pair.merged)
    if isinstance(c1.kv[0], KIVILayer):  # the same flushes (bit-equality of the codes: the unit tests below; here
        for a, b in zip(c1.kv, c2.kv):    # the two paths' hidden states differ in the last bits)
            assert [q.n for q in a.kq + a.vq] == [q.n for q in b.kq + b.vq]
    # the store goes on decoding in the engine loop afterwards (its host view is current)
    more, _, _ = eng.decode(c2, m2, pre.logits, 3)
    assert len(more) == 3


def test_whole_step_compile_keeps_the_formats_step_as_it_is(tiny):
    """torch.compile (aot_eager here) breaks the graph at the format's step: the same tokens as the engine loop."""
    eng, c1, m1, pre = prefilled(tiny, "snapkv+kivi")
    ids_ref, _, _ = eng.decode(c1, m1, pre.logits, 20)
    _, c2, _, _ = prefilled(tiny, "snapkv+kivi")
    fd = FastDecoder(tiny.model, c2, 20, use_graph=False, compile="aot_eager")
    assert fd.decode(int(pre.logits.argmax()), 20)[0] == ids_ref


def _kivi_layer(lens, bits, R, dtype, seed=0, per_token_keys=False):
    from kvbench.methods.flexgen import FlexGenQuant
    g = torch.Generator().manual_seed(seed)
    layer = LayerKV.from_dense(torch.randn(3, max(lens), 32, generator=g).to(dtype),
                               torch.randn(3, max(lens), 32, generator=g).to(dtype), torch.arange(max(lens)))
    layer.keep([torch.arange(n) for n in lens])  # ragged heads
    fmt = FlexGenQuant(bits, 16, R) if per_token_keys else KIVI(bits=bits, group_size=16, residual_length=R)
    return KIVILayer.encode(fmt, layer)


@pytest.mark.parametrize("bits,lens,R,dtype,per_token_keys", [(2, [150, 90, 40], 32, torch.float32, False),
                                                             (4, [70, 70, 10], 16, torch.bfloat16, False),
                                                             (8, [33, 64, 5], 32, torch.float16, False),
                                                             (4, [70, 33, 1], 0, torch.bfloat16, True),
                                                             (2, [70, 33, 1], 5, torch.float32, True)])
def test_kivi_device_append_is_the_formats_append(bits, lens, R, dtype, per_token_keys):
    """The device layout appended one token at a time (torch reference) = `KIVILayer.append`: the same codes,
    parameters, full-precision rows and positions; and `nbytes_after` = the bytes really stored. KIVI (keys
    flushed per channel R at a time) and FlexGen (keys per token, as values; with and without a residual)."""
    from kvbench.methods.kernels.kivi_decode import kivi_append_ref
    a = _kivi_layer(lens, bits, R, dtype, per_token_keys=per_token_keys)
    b = a.clone()
    T = 40
    expect = [a.nbytes_after(t) for t in range(T + 1)]
    b.device_begin(T)
    g = torch.Generator().manual_seed(1)
    flushes = 0
    for t in range(T):
        k, v = torch.randn(3, 32, generator=g).to(dtype), torch.randn(3, 32, generator=g).to(dtype)
        pos = torch.tensor([1000 + t])
        n_kq = [q.n for q in a.kq]
        a.append(k.unsqueeze(1), v.unsqueeze(1), pos)
        flushes += sum(q.n > n for q, n in zip(a.kq, n_kq))
        assert a.nbytes() == expect[t + 1]
        kivi_append_ref(k, v, pos, b._dev)
    assert flushes >= (T if per_token_keys else 3)
    b.device_end()
    for qa, qb in zip(a.kq + a.vq, b.kq + b.vq):
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.mn, qb.mn)
    for ta, tb in zip(a.kr + a.vr + a.pos, b.kr + b.vr + b.pos):
        assert torch.equal(ta, tb)
    assert b.nbytes() == a.nbytes() and b.head_lengths == a.head_lengths


def test_kivi_append_kernel_matches_reference_under_the_triton_interpreter():
    """The Triton append (one launch per step) leaves the layout bit-equal to the torch reference's, in fp32, fp16
    and bf16 (its parameters rounded to nearest even, as torch rounds), and the decode kernel over it gives the
    reference's attention."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench.cache import LayerKV
        from kvbench.methods.kivi import KIVI, KIVILayer
        from kvbench.methods.kernels import kivi_decode as kd
        g = torch.Generator().manual_seed(0)
        from kvbench.methods.flexgen import FlexGenQuant
        for bits, lens, R, dt, fmt in ((2, [150, 90, 40], 32, torch.float32, KIVI),
                                       (4, [70, 70, 10], 16, torch.bfloat16, KIVI),
                                       (8, [33, 64, 5], 32, torch.float16, KIVI),
                                       (4, [70, 33, 1], 0, torch.float32, FlexGenQuant),
                                       (2, [70, 33, 1], 5, torch.bfloat16, FlexGenQuant)):
            layer = LayerKV.from_dense(torch.randn(3, 150, 32, generator=g).to(dt),
                                       torch.randn(3, 150, 32, generator=g).to(dt), torch.arange(150))
            layer.keep([torch.arange(n) for n in lens])
            a = KIVILayer.encode(fmt(bits=bits, group_size=16, residual_length=R), layer)
            b = a.clone()
            a.device_begin(36); b.device_begin(36)
            for t in range(36):
                k, v = torch.randn(3, 32, generator=g).to(dt), torch.randn(3, 32, generator=g).to(dt)
                pos = torch.tensor([1000 + t])
                kd.kivi_append_ref(k, v, pos, a._dev)
                kd.kivi_append_triton(k, v, pos, b._dev)
                for key, x in a._dev.items():
                    if isinstance(x, torch.Tensor):
                        assert torch.equal(x, b._dev[key]), (bits, t, key)
                # (the interpreter's bf16 dot is not the GPU's: checked on the GPU; every 6th step: the suite's time)
                if dt != torch.bfloat16 and t % 6 == 5:
                    q = torch.randn(6, 32, generator=g).to(dt)
                    ref = kd.kivi_decode_attention_ref(q, a._dev, 0.2).float()
                    tri = kd.kivi_decode_attention_triton(q, b._dev, 0.2).float()
                    assert torch.allclose(ref, tri, atol=1e-3), (bits, t, (ref - tri).abs().max())
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_plan_keeps_the_engine_loop_where_the_device_step_does_not_apply(tiny):
    """KIVI with per-channel keys and a residual that is not a power of two has no device step; a method that
    evicts while decoding keeps its hooks in the loop; a model with a sliding window or a soft cap: the formats'
    steps compute neither."""
    _, c, m, _ = prefilled(tiny, "kivi")
    assert fast_decode.plan(m, c, tiny.model) == Plan()
    windowed = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
    windowed.model.config.sliding_window = 64
    assert fast_decode.plan(m, c, windowed.model) is None
    odd = build_method("kivi", bits=2, group_size=8, residual_length=24)  # per-channel keys, R not a power of 2
    eng = Engine(tiny, odd, query_aware=True)
    cm = eng.new_cache()
    eng.prefill(cm, list(range(10, 110)), eng.method.fork(), compress=True)
    assert fast_decode.plan(odd, cm, tiny.model) is None
    with pytest.raises(ValueError, match="no device step"):
        FastDecoder(tiny.model, cm, 4, use_graph=False)
    h2o = build_method("h2o", budget=64)
    assert fast_decode.plan(h2o, c, tiny.model) is None
    with pytest.raises(ValueError, match="decode-time eviction"):
        FastDecoder(tiny.model, c, 4, use_graph=False, ring=(4, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["kivi", "snapkv+kivi", "adakv+kivi", "quest", "snapkv+quest", "think",
                                  "pyramidkv+think", "eigen_attention", "flexgen", "snapkv+flexgen", "minicache",
                                  "snapkv+minicache"])
def test_cuda_graph_decode_of_storage_formats_matches_the_engine_loop(case):
    """On the GPU: the format's step captured in a CUDA graph and replayed gives the engine loop's tokens, store
    and records, and the engine's own CUDA path takes it (decode_path "graph ...")."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import gpu_speed
    finally:
        sys.path.pop(0)
    lm = gpu_speed.build_model("tiny", device="cuda", dtype="float32")  # works without the embedded tokenizer
    steps = 40
    # without the embedded tokenizer EigenAttention has no text to calibrate on: random orthonormal bases
    setup = lambda method: gpu_speed.random_eigen_bases(method, lm)  # noqa: E731
    eng, c1, m1, pre = prefilled(lm, case, setup=setup)
    eng.fast_decode = False
    ids_ref, _, flops_ref = eng.decode(c1, m1, pre.logits, steps)
    reads_ref = list(eng.last_read_bytes)
    _, c2, m2, _ = prefilled(lm, case, setup=setup)
    fd = FastDecoder(lm.model, c2, steps)
    ids_fast, _ = fd.decode(int(pre.logits.argmax()), steps)
    assert fd.graph_error is None and fd.setup_steps >= 1
    assert ids_fast == ids_ref and c2.head_lengths() == c1.head_lengths() and c2.nbytes() == c1.nbytes()
    eng.fast_decode = True
    _, c3, m3, _ = prefilled(lm, case, setup=setup)
    ids_eng, _, flops_eng = eng.decode(c3, m3, pre.logits, steps)
    assert eng.last_decode_path.startswith("graph")
    assert ids_eng == ids_ref and flops_eng == flops_ref and eng.last_read_bytes == reads_ref
    assert c3.held.peak == c1.held.peak


def test_quest_select_reference_is_the_top_pages_then_the_last():
    """Hand-worked: 2 KV heads x 2 query heads, 6 scored pages; the top 3 by score (-inf: -1; ties: the lower
    page first), then the head's last page (rows - 1) // 16."""
    from kvbench.methods.kernels.quest_decode import quest_select_ref, quest_select_topk
    inf = float("inf")
    scores = torch.tensor([[0.5, 2.0, -1.0, 2.0, 0.1, -inf],
                           [-inf, -inf, -inf, -inf, -inf, -inf],
                           [3.0, 1.0, -inf, -inf, -inf, -inf],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    pages = quest_select_ref(scores, torch.tensor([100, 40]), 16, 3)
    assert pages.tolist() == [[1, 3, 0, 6], [-1, -1, -1, 6], [0, 1, -1, 2], [0, 1, 2, 2]]
    # torch.topk's choice (the engine loop's `select`): the same pages where no two scores are equal
    distinct = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))
    distinct[:, 2500:] = -inf
    lens = torch.tensor([2600 * 16, 1700 * 16])
    assert torch.equal(quest_select_topk(distinct, lens, 16, 63), quest_select_ref(distinct, lens, 16, 63))


def test_quest_device_kernels_match_references_under_the_triton_interpreter():
    """The fused append (row + its page's bounds) and the one-launch selection give the torch references' bits;
    the scores with the scored pages taken from the head lengths give the reference's."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench.cache import LayerKV
        from kvbench.methods.quest import Quest, QuestLayer
        from kvbench.methods.kernels import quest_decode as qd
        g = torch.Generator().manual_seed(0)
        for dt, lens in ((torch.float32, [200, 130, 77]), (torch.float16, [64, 65, 1])):
            layer = LayerKV.from_dense(torch.randn(3, 200, 32, generator=g).to(dt),
                                       torch.randn(3, 200, 32, generator=g).to(dt), torch.arange(200))
            layer.keep([torch.arange(n) for n in lens])
            a, b = (QuestLayer.encode(Quest(token_budget=64), layer.clone(), True, 6) for _ in range(2))
            a.device_begin(40); b.device_begin(40)
            for t in range(40):
                k, v = torch.randn(3, 32, generator=g).to(dt), torch.randn(3, 32, generator=g).to(dt)
                pos = torch.tensor([500 + t])
                qd.quest_append_ref(k, v, pos, a.layer, a.kmin, a.kmax, 16)
                qd.quest_append_triton(k, v, pos, b.layer, b.kmin, b.kmax, 16)
                assert torch.equal(a.layer.lengths, b.layer.lengths)
                owned = [r for s0, n in zip(a.layer.starts.tolist(), a.layer.lengths.tolist()) for r in range(s0, s0 + n)]
                for x, y in ((a.layer.keys, b.layer.keys), (a.layer.values, b.layer.values),
                             (a.layer.positions, b.layer.positions)):
                    assert torch.equal(x[owned], y[owned]), (dt, t)  # (spare rows: unset memory)
                assert torch.equal(a.kmin, b.kmin) and torch.equal(a.kmax, b.kmax), (dt, t)
                if t % 8 not in (0, 7):  # scores and selection at 10 of the 40 steps (the suite's time)
                    continue
                cap = a.kmin.shape[1]
                q = torch.randn(6, 32, generator=g).to(dt)
                last = (a.layer.lengths - 1) // 16
                ref = qd.quest_page_scores_ref(q, a.kmin[:, :cap - 1], a.kmax[:, :cap - 1], last)
                tri = qd.quest_page_scores_triton(q, a.kmin[:, :cap - 1], a.kmax[:, :cap - 1], a.layer.lengths,
                                                  page_size=16)
                assert torch.equal(torch.isinf(ref), torch.isinf(tri)) and torch.allclose(ref, tri, atol=1e-2)
                for top in (0, 3, cap - 1):
                    assert torch.equal(qd.quest_select_ref(ref, a.layer.lengths, 16, top),
                                       qd.quest_select_triton(ref, a.layer.lengths, 16, top)), (dt, t, top)
        ties = torch.tensor([[1.0, 1.0, 2.0, float("-inf")] * 4] * 6)
        lens = torch.tensor([64, 40, 17])
        assert torch.equal(qd.quest_select_ref(ties, lens, 16, 5), qd.quest_select_triton(ties, lens, 16, 5))
        # the two-launch selection (chunks' tops, then their merge): many ties, -inf, a partial last chunk,
        # a top below, at and above the chunk size
        many = torch.randint(0, 6, (3, 150), generator=g).float()
        many[:, ::7] = float("-inf")
        lens = torch.tensor([2400, 1500, 17])
        for chunk in (16, 64):
            for top in (0, 5, 16, 40, 150):
                assert torch.equal(qd.quest_select_ref(many, lens, 16, top),
                                   qd.quest_select_triton(many, lens, 16, top, chunk=chunk)), (chunk, top)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_eigen_project_append_kernel_matches_reference_under_the_triton_interpreter():
    """Eigen Attention's fused projection + append (one launch) stores the reference's rank-r rows (float32 sums in
    another order: equal to rounding), position and length; its query projection and lift kernels give the
    reference's products."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench.cache import LayerKV
        from kvbench.methods.kernels import lowrank_decode as lr
        g = torch.Generator().manual_seed(0)
        for dt, d, r in ((torch.float32, 32, 8), (torch.float16, 64, 24)):
            pk = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :r].contiguous()
            pv = torch.linalg.qr(torch.randn(3, d, d, generator=g))[0][:, :, :r].contiguous()
            a, b = (LayerKV.from_dense(torch.zeros(3, 50, r, dtype=dt), torch.zeros(3, 50, r, dtype=dt),
                                       torch.arange(50)) for _ in range(2))
            for x in (a, b):
                x.keep([torch.arange(n) for n in (50, 20, 3)])
                x.reserve(10)
            for t in range(10):
                k, v = torch.randn(3, d, generator=g).to(dt), torch.randn(3, d, generator=g).to(dt)
                pos = torch.tensor([100 + t])
                lr.project_append_ref(k, v, pos, pk, pv, a)
                lr.project_append_triton(k, v, pos, pk, pv, b)
            assert torch.equal(a.lengths, b.lengths) and a.lengths.tolist() == [60, 30, 13]
            for h, (s0, n) in enumerate(zip(a.starts.tolist(), a.lengths.tolist())):
                rows = slice(s0, s0 + n)
                assert torch.equal(a.positions[rows], b.positions[rows])
                tol = 1e-5 if dt == torch.float32 else 2e-3
                assert torch.allclose(a.keys[rows].float(), b.keys[rows].float(), atol=tol, rtol=tol), (dt, h)
                assert torch.allclose(a.values[rows].float(), b.values[rows].float(), atol=tol, rtol=tol), (dt, h)
            # the query projection (one matrix) and the lift (each KV head's P_v^T), 2 query heads per KV head
            q, o = torch.randn(6, d, generator=g).to(dt), torch.randn(6, r, generator=g).to(dt)
            for x, w, tr in ((q, pk.unsqueeze(0), False), (o, pv, True)):
                ref, tri = lr.matvec_ref(x, w, tr, dt), lr.matvec_triton(x, w, tr, dt)
                assert torch.allclose(ref.float(), tri.float(), atol=tol, rtol=tol), (dt, tr)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_minicache_update_kernel_matches_reference_under_the_triton_interpreter():
    """MiniCache's device write (methods/kernels/minicache_update.py): the upper layer's merge of the question on
    top, then one token a step, and each layer's append, in Triton (one launch, atan2 by polynomial) as in the
    reference (the format's own merge): the same retained tokens, groups, counts, positions and plain rows, and
    directions and magnitudes equal to float32 rounding; ragged heads with own rows (a composed eviction)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench.cache import LayerKV
        from kvbench.methods.kernels import minicache_update as mu
        from kvbench.methods.minicache import MiniCache, encode_pair
        g = torch.Generator().manual_seed(0)
        for dt in (torch.float32, torch.bfloat16):
            k = torch.randn(3, 80, 64, generator=g)
            v = torch.randn(3, 80, 64, generator=g)
            la = LayerKV.from_dense(k.to(dt), v.to(dt), torch.arange(80))
            lb = LayerKV.from_dense((k + 0.6 * torch.randn(k.shape, generator=g)).to(dt),
                                    (v + 0.6 * torch.randn(v.shape, generator=g)).to(dt), torch.arange(80))
            la.keep([torch.arange(0, 80), torch.arange(0, 60), torch.arange(10, 30)])
            lb.keep([torch.arange(0, 80), torch.arange(5, 70), torch.arange(0, 40)])
            fmt = MiniCache(start_layer=0, t=0.6, gamma=0.3)
            sa, sb = encode_pair(fmt, la, lb)
            for layer in (sa, sb):  # a question of 5 tokens on top, pending in both layers
                layer.append(torch.randn(3, 5, 64, generator=g).to(dt), torch.randn(3, 5, 64, generator=g).to(dt),
                             torch.arange(100, 105))
            sa.device_begin(12)
            sb.device_begin(12)
            A = sa.pair.dev
            B = {n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in A.items()}
            for step in range(8):
                P = 5 if step == 0 else 1
                kb, vb = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
                for role in (0, 1):  # the two layers' rows of a token: near, as the context's
                    kn = (kb + 0.6 * torch.randn(3, 64, generator=g)).to(dt)
                    vn = (vb + 0.6 * torch.randn(3, 64, generator=g)).to(dt)
                    pos = torch.tensor([105 + step])
                    mu.minicache_update_ref(kn, vn, pos, A, role, P if role else 0)
                    mu.minicache_update_triton(kn, vn, pos, B, role, P if role else 0)
            for n in ("lens", "mcount", "rlog", "plog", "ppos", "krow", "vrow"):
                assert torch.equal(A[n], B[n]), (dt, n)
            assert A["mcount"].tolist() == [12, 12, 12] and 0 < int(A["rlog"].sum()) < 72, A["rlog"].sum()
            for n in ("kdir", "vdir", "kmag", "vmag"):
                tol = 2e-6 if dt == torch.float32 else 1e-2
                assert torch.allclose(A[n].float(), B[n].float(), atol=tol, rtol=tol), (dt, n)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_minicache_device_step_in_triton_matches_reference_under_the_interpreter():
    """MiniCache's whole device step with attention.DECODE_KERNEL "triton" (its update and attention kernels, under
    the interpreter) and "ref": the same tokens over a question on top, the same tokens retained, the same store."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import sys
        import torch
        sys.path.insert(0, "tests")
        import test_storage_device as T
        from kvbench import attention
        from kvbench.fast_decode import FastDecoder
        from kvbench.models import load_model
        lm = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
        runs = []
        for kernel in ("ref", "triton"):
            eng, cache, m, pre = T.prefilled(lm, "snapkv+minicache", question=4)
            attention.DECODE_KERNEL = kernel
            try:
                ids, _ = FastDecoder(lm.model, cache, 10, use_graph=False).decode(int(pre.logits.argmax()), 10)
            finally:
                attention.DECODE_KERNEL = "auto"
            runs.append((ids, cache))
        (ids_ref, a), (ids_tri, b) = runs
        assert ids_tri == ids_ref, (ids_tri, ids_ref)
        assert a.head_lengths() == b.head_lengths() and a.nbytes() == b.nbytes()
        pa, pb = a.kv[0].pair, b.kv[0].pair
        for h in range(len(pa.pos)):
            assert torch.equal(pa.pos[h], pb.pos[h])
            for kind in "kv":
                assert torch.equal(pa.merged[h][kind].ret, pb.merged[h][kind].ret), (h, kind)
                torch.testing.assert_close(pb.merged[h][kind].dirs, pa.merged[h][kind].dirs, atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
