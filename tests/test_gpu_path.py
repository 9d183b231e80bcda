"""The GPU fast path against the engine's reference path.

CPU parts: the in-place static decode step (kvbench/fast_decode.py, run eagerly) gives the engine loop's
tokens and leaves the same cache; the Triton decode dispatch of the attention function gives the torch
reference's output (run in a subprocess under TRITON_INTERPRET=1, which must be set before triton is
imported); the benchmark's roofline arithmetic. GPU parts (skipped without CUDA): the CUDA-graph decoder
gives the eager engine's tokens on a small synthetic model.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvbench.engine import Engine
from kvbench.fast_decode import FastDecoder, supports
from kvbench.method import build_method
from kvbench.metrics import attention_flops
from kvbench.models import load_model

ROOT = Path(__file__).resolve().parents[1]


class _NoTokenizer:  # the engine reads only these two attributes; prompts here are raw token ids
    eos_token_id = None
    chat_template = None


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
    lm.tokenizer = _NoTokenizer()
    return lm


def random_ids(n, seed=0, vocab=40000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n,), generator=g).tolist()


def prefilled(lm, name, n=120, budget=40, **knobs):
    method = build_method(name, budget=None if name == "full" else budget, **knobs)
    eng = Engine(lm, method, query_aware=True)
    eng.stop_ids = set()  # random weights: never stop early, decode the full length
    cache = eng.new_cache()
    pre = eng.prefill(cache, random_ids(n), method, compress=True)
    return eng, cache, method, pre


def decode_two_ways(lm, steps: int, ref_knobs: dict, knobs: dict):
    """Two identical SnapKV caches (97 tokens) decoded `steps` tokens by the in-place step (eager, as on the CPU):
    one with FastDecoder's `ref_knobs` (torch's ops), one with `knobs` (a Triton kernel). Same tokens, same cache;
    returns both decoders (their caches: `.base`)."""
    from kvbench.fast_decode import FastDecoder
    lm.tokenizer = _NoTokenizer()
    decoders, tokens = [], []
    for kn in (ref_knobs, knobs):
        _, cache, _, pre = prefilled(lm, "snapkv", n=97)
        fd = FastDecoder(lm.model, cache, steps, use_graph=False, **kn)
        tokens.append(fd.decode(int(pre.logits.argmax()), steps)[0])
        decoders.append(fd)
    assert tokens[1] == tokens[0]
    _same_cache(decoders[0].base, decoders[1].base)
    return decoders


def _same_cache(c1, c2):
    assert c2.seen_tokens == c1.seen_tokens and c2.head_lengths() == c1.head_lengths()
    for a, b in zip(c1.kv, c2.kv):
        for h in range(a.n_heads):
            ka, va, pa = a.head(h)
            kb, vb, pb = b.head(h)
            torch.testing.assert_close(kb, ka)
            torch.testing.assert_close(vb, va)
            assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["full", "snapkv", "adakv"])
def test_fast_decode_matches_engine_loop(tiny, name):
    """Same greedy tokens, same cache afterwards (rows, positions, lengths) as Engine.decode."""
    eng, c1, m1, pre = prefilled(tiny, name)
    _, c2, m2, _ = prefilled(tiny, name)
    if name == "adakv":
        assert len(set(c2.head_lengths()[0])) > 1, "adakv should leave a ragged cache here"
    assert supports(m2)
    ids_ref, _, _ = eng.decode(c1, m1, pre.logits, 12)
    fd = FastDecoder(tiny.model, c2, 12, use_graph=False)
    ids_fast, step_ms = fd.decode(int(pre.logits.argmax()), 12)
    assert ids_fast == ids_ref and len(step_ms) == 11
    assert c2.seen_tokens == c1.seen_tokens == 120 + 11
    _same_cache(c1, c2)


@pytest.mark.parametrize("name,knobs", [("streaming_llm", {"n_sink": 4}), ("recent", {})])
def test_rolling_window_fast_decode_matches_engine_loop(tiny, name, knobs):
    """StreamingLLM / recent evict while decoding; the fast path runs that as a device ring buffer. Budget 12
    (StreamingLLM: 4 sinks + 8 recent), 30 steps: the ring wraps three times. Same tokens as the engine loop,
    and per head the same kept positions with the same keys/values (row order may differ)."""
    eng, c1, m1, pre = prefilled(tiny, name, budget=12, **knobs)
    _, c2, m2, _ = prefilled(tiny, name, budget=12, **knobs)
    assert supports(m2) and m2.decode_ring() == (knobs.get("n_sink", 0), 12)
    ids_ref, _, flops_ref = eng.decode(c1, m1, pre.logits, 30)
    fd = FastDecoder(tiny.model, c2, 30, use_graph=False, ring=m2.decode_ring())
    ids_fast, _ = fd.decode(int(pre.logits.argmax()), 30)
    assert ids_fast == ids_ref
    assert c2.seen_tokens == c1.seen_tokens
    # the engine loop ends a step with cap rows; the ring holds cap + 1 (the window plus the newest token)
    for a, b in zip(c1.kv, c2.kv):
        for h in range(a.n_heads):
            ka, va, pa = a.head(h)
            kb, vb, pb = b.head(h)
            assert pb.numel() == 13 and pa.numel() == 12
            oa, ob = torch.argsort(pa), torch.argsort(pb)[1 if name == "recent" else 0:]
            if name == "streaming_llm":  # drop the oldest non-sink row of the ring: the engine evicted it
                ob = torch.cat([ob[:4], ob[5:]])
            assert torch.equal(pa[oa], pb[ob])
            torch.testing.assert_close(kb[ob], ka[oa])
            torch.testing.assert_close(vb[ob], va[oa])
    # the engine's CPU loop vs its FLOPs formula for the ring (min(L + i + 1, cap + 1) per head)
    assert flops_ref[-1] == eng._linear_flops + attention_flops([[13] * a.n_heads for a in c1.kv], eng._group,
                                                                eng._head_dim)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fast_decode_matches_engine_loop(tiny, backend):
    """The torch.compile'd step (what the GPU captures in its graph) decodes the engine loop's tokens and
    leaves the same cache: the custom op's in-place appends survive functionalization. aot_eager traces
    and functionalizes without generating code; inductor also generates it (C++ on CPU: needs a compiler)."""
    import shutil
    if backend == "inductor" and shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("Inductor on CPU needs a C++ compiler")
    cases = [("adakv", 120), ("snapkv", 97)] if backend == "aot_eager" else [("adakv", 120)]
    for name, n in cases:  # aot_eager: a second cache of another size (recompiled or dynamic, same result)
        eng, c1, m1, pre = prefilled(tiny, name, n=n)
        _, c2, _, _ = prefilled(tiny, name, n=n)
        ids_ref, _, _ = eng.decode(c1, m1, pre.logits, 10)
        fd = FastDecoder(tiny.model, c2, 10, use_graph=False, compile=backend)
        ids, _ = fd.decode(int(pre.logits.argmax()), 10)
        assert ids == ids_ref
        _same_cache(c1, c2)


def test_regional_compile_matches_engine_loop_and_leaves_the_model_alone(tiny):
    """Regional compilation (each decoder layer's modules but attention, compiled while the step runs) decodes
    the engine loop's tokens over 31 steps, compiles each module kind once for all layers (one graph per kind
    and shape: the layers are not told apart), and leaves the model uncompiled outside the decode."""
    import torch._dynamo
    from kvbench.fast_decode import decoder_layers
    torch._dynamo.reset()
    eng, c1, m1, pre = prefilled(tiny, "snapkv", n=97)
    _, c2, _, _ = prefilled(tiny, "snapkv", n=97)
    ids_ref, _, _ = eng.decode(c1, m1, pre.logits, 32)
    torch._dynamo.utils.counters.clear()
    fd = FastDecoder(tiny.model, c2, 32, use_graph=False, compile="regional:aot_eager")
    ids, _ = fd.decode(int(pre.logits.argmax()), 32)
    assert ids == ids_ref
    _same_cache(c1, c2)
    kinds = {type(m) for layer in decoder_layers(tiny.model) for n, m in layer.named_children() if "attn" not in n}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == len(kinds), graphs  # the MLP and the norm: one graph each for every layer (final norm too)
    assert all(m._compiled_call_impl is None for m in tiny.model.modules())


def test_fast_decode_refuses_decode_time_methods_and_overflow(tiny):
    assert supports(build_method("h2o", budget=32))  # they declare their eviction: run on the device
    assert supports(build_method("tova", budget=32))  # (tests/test_decode_eviction.py)
    assert supports(build_method("streaming_llm", budget=32))  # a rolling window: the device ring buffer
    assert supports(build_method("cake", budget=32))  # pooled attention, fixed layer budgets: on the device
    assert supports(build_method("lacache", budget=32))  # the ladder's ranks scheduled on the host
    assert supports(build_method("duoattention", budget=32))  # per-head caps: streaming heads roll
    assert supports(build_method("d2o", budget=32))  # merging into the most similar row, on the device
    _, cache, _, pre = prefilled(tiny, "snapkv")
    fd = FastDecoder(tiny.model, cache, 4, use_graph=False)
    with pytest.raises(ValueError, match="capacity"):
        fd.decode(int(pre.logits.argmax()), 5)
    with pytest.raises(ValueError, match="use_graph"):
        FastDecoder(tiny.model, cache, 4, use_graph=True)


def test_decode_kernel_setting_is_checked(tiny):
    from kvbench import attention
    _, cache, _, _ = prefilled(tiny, "full")
    q = torch.randn(4, 1, 16)
    old = attention.DECODE_KERNEL
    attention.DECODE_KERNEL = "cuda"
    try:
        with pytest.raises(ValueError, match="allowed: auto, ref, triton"):
            attention.attend(q, cache.layer(0), 0.25)
    finally:
        attention.DECODE_KERNEL = old


_DISPATCH = textwrap.dedent("""
    import torch
    from kvbench import attention
    from kvbench.cache import LayerKV
    g = torch.Generator().manual_seed(0)
    n_kv, grp, d = 2, 3, 16
    kernel, calls = attention._attend_decode_triton, []
    attention._attend_decode_triton = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)  # every step takes it
    for lens in ([7, 7], [5, 19]):            # uniform, then ragged (per-head budgets)
        k = torch.randn(sum(lens) + 6, d, generator=g)   # spare rows: capacity as after reserve()
        v = torch.randn(sum(lens) + 6, d, generator=g)
        starts = torch.tensor([0, lens[0] + 3]); lengths = torch.tensor(lens)
        # each head's rows: shuffled older positions (evicted, reordered), the new token (position 40) last
        pos = torch.zeros(k.shape[0], dtype=torch.long)
        for a, n in zip(starts.tolist(), lens):
            pos[a:a + n - 1] = torch.randperm(39, generator=g)[:n - 1]
            pos[a + n - 1] = 40
        layer = LayerKV(k, v, pos, starts, lengths, lengths + 3)
        q = torch.randn(n_kv * grp, 1, d, generator=g)
        merged = torch.log(torch.randint(1, 4, (k.shape[0],), generator=g).float())  # rows weighing 1..3
        for opts in (dict(), dict(window=12), dict(softcap=2.0), dict(log_weight=True),
                     dict(window=12, softcap=2.0, log_weight=True)):
            layer.side.pop("log_weight", None)
            if opts.pop("log_weight", False):
                layer.side["log_weight"] = merged
            for need in (False, True):
                attention.DECODE_KERNEL = "ref"
                o_ref, p_ref = attention.attend(q, layer, 0.3, need, **opts)
                attention.DECODE_KERNEL = "triton"
                o_tri, p_tri = attention.attend(q, layer, 0.3, need, **opts)
                torch.testing.assert_close(o_tri, o_ref, atol=1e-4, rtol=1e-4)
                if need:
                    for a, b in zip(p_tri, p_ref):
                        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
                        assert abs(float(a.sum()) - grp) < 1e-4   # each query head's probabilities sum to 1
                        if "window" in opts:
                            assert int((a == 0).sum()) > 0   # rows out of the window: probability 0
    assert len(calls) == 2 * 5 * 2, len(calls)   # no step, probabilities or not, fell back to the reference
    print("DISPATCH_OK")
""")


def test_triton_decode_dispatch_matches_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _DISPATCH], env=env, capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert "DISPATCH_OK" in r.stdout, r.stderr[-2000:]


def test_roofline_arithmetic():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_speed
    finally:
        sys.path.pop(0)
    # 2 layers x 4 KV heads x d 8, bf16: one token of every head = 2 * 2 * 4 * 8 * 2 bytes = 256
    assert gpu_speed.kv_bytes_per_token(n_layers=2, n_kv=4, head_dim=8, elem=2) == 256
    # 1 GB of weights + 0.5 GB of KV at 1.5 TB/s: 1 ms
    assert gpu_speed.roofline_ms(1e9, 5e8, 1.5e12) == pytest.approx(1.0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3, bias=False))
    # the embedding table is read one row per token: 4 floats, not 40; the Linear's 12 are read in full
    assert gpu_speed.decode_weight_bytes(model) == (4 + 12) * 4
    assert gpu_speed.median([3.0, 1.0, 2.0, 10.0]) == 2.5
    rows = [dict(n=8, method="snapkv", ttft_ms=10.0, overhead_pct=1.0, decode_ms=5.0, decode_over_roofline=1.1,
                 kv_bytes=100, peak_gib=1.0),
            dict(n=8, method="kvpress:snapkv", ttft_ms=12.0, overhead_pct=4.0, decode_ms=50.0,
                 decode_over_roofline=11.0, kv_bytes=400, peak_gib=2.0)]
    last = gpu_speed.ratio_table(rows).splitlines()[-1].split()
    assert last == ["8", "snapkv", "1.20", "+3.00", "10.00", "10.00", "4.00", "2.00"]
    # decode ms/token over the full cache's fast path at the same length; none against an eager full cache
    full = dict(n=8, method="full", decode_ms=4.0, path="compiled")
    assert gpu_speed.x_full(dict(decode_ms=5.0), full) == pytest.approx(1.25)
    assert gpu_speed.x_full(dict(decode_ms=5.0), dict(full, path="eager")) is None
    assert gpu_speed.x_full(dict(decode_ms=5.0), None) is None
    row = dict(n=8, method="h2o", ttft_ms=10.0, decode_ms=6.0, path="graph", eager_ms=60.0, graph_ms=6.0,
               roofline_ms=5.0, decode_over_roofline=1.2, kv_bytes=2**20, peak_gib=1.0)
    row["x_full"] = gpu_speed.x_full(row, full)
    cells = gpu_speed.fmt(row).split()
    assert cells[:6] == ["8", "h2o", "10.0", "-", "6.00", "1.50"] and cells[6] == "graph"
    assert gpu_speed.HEADER.split()[5:9] == ["dec", "ms", "x", "full"]  # the column after dec ms
    assert {"h2o", "tova", "cake", "d2o", "lacache"} <= set(gpu_speed.METHODS)
    assert "h2o" not in gpu_speed.KVPRESS_METHODS


def test_bench_forks_the_method_per_decode_without_the_cache(tiny):
    """bench/gpu_speed.py decodes each pass with its own copy of the method's state (LaCache's cursor moves on)
    that shares the cache's layers (CAKE refers to them) instead of copying the KV cache."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_speed
    finally:
        sys.path.pop(0)
    _, cache, m, _ = prefilled(tiny, "cake", budget=24, window_size=4)
    f = gpu_speed.fork_sharing_cache(m, cache)
    assert f.state is not m.state and f.state["budgets"] == m.state["budgets"]
    assert all(f.state["layers"][i][0] is cache.kv[i] for i in range(len(cache.kv)))
    _, cache, m, _ = prefilled(tiny, "lacache", budget=48, span=1, n_sink=4, recent=8)
    f = gpu_speed.fork_sharing_cache(m, cache)
    f.state[0][0] += 1
    assert f.state[0][0] == m.state[0][0] + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,compile", [("full", False), ("adakv", False), ("streaming_llm", False),
                                          ("adakv", True), ("streaming_llm", True)])
def test_cuda_graph_decode_matches_eager(name, compile):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_speed
    finally:
        sys.path.pop(0)
    lm = gpu_speed.build_model("tiny", device="cuda", dtype="float32")  # works without the embedded tokenizer
    lm.tokenizer = _NoTokenizer()
    budget = 20 if name == "streaming_llm" else 40  # the window rolls: ring of 4 sinks + 17 rows, 24 steps
    eng, c1, m1, pre = prefilled(lm, name, budget=budget)
    _, c2, m2, _ = prefilled(lm, name, budget=budget)
    _, c3, m3, _ = prefilled(lm, name, budget=budget)
    eng.fast_decode = False
    ids_ref, _, flops_ref = eng.decode(c1, m1, pre.logits, 24)
    fd = FastDecoder(lm.model, c2, 24, compile=compile, ring=m2.decode_ring())
    ids_fast, _ = fd.decode(int(pre.logits.argmax()), 24)
    assert fd.graph_error is None and fd.graph is None  # captured, replayed, released
    assert ids_fast == ids_ref
    ring = name == "streaming_llm"  # the ring holds one row more than the engine loop between steps
    assert [[n - ring for n in layer] for layer in c2.head_lengths()] == c1.head_lengths()
    eng.fast_decode, eng.compile_decode = True, compile  # the engine's own CUDA path: same tokens, FLOPs, cache
    ids_eng, _, flops_eng = eng.decode(c3, m3, pre.logits, 24)
    assert ids_eng == ids_ref and flops_eng == flops_ref and c3.head_lengths() == c2.head_lengths()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,knobs,compile", [("h2o", {"budget": 24}, False), ("h2o", {"budget": 24}, True),
                                                ("tova", {"budget": 24}, False),
                                                ("tova", {"budget": 24, "per_head": True}, True),
                                                ("streaming_llm", {"budget": 16, "n_sink": 4}, False),
                                                ("recent", {"budget": 16}, False),
                                                ("cake", {"budget": 24, "window_size": 4}, False),
                                                ("lacache", {"budget": 48, "span": 1, "n_sink": 4, "recent": 8},
                                                 True),
                                                ("d2o", {"budget": 24, "window_size": 8}, True)])
def test_cuda_graph_eviction_matches_eager(name, knobs, compile):
    """Decode-time eviction inside the CUDA graph (a question fed on top: the first step evicts it, eagerly;
    later steps replay the graph): the eager engine loop's tokens, kept positions, FLOPs and bytes read."""
    from kvbench import fast_decode
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_speed
    finally:
        sys.path.pop(0)
    lm = gpu_speed.build_model("tiny", device="cuda", dtype="float32")
    lm.tokenizer = _NoTokenizer()

    def with_question():
        method = build_method(name, **knobs)
        eng = Engine(lm, method, query_aware=False)
        eng.stop_ids = set()
        cache = eng.new_cache()
        eng.prefill(cache, random_ids(100, seed=1), method, compress=True)
        return eng, cache, method, eng.prefill(cache, random_ids(9, seed=2), method, compress=False).logits

    eng, c1, m1, logits = with_question()
    _, c2, m2, _ = with_question()
    _, c3, m3, _ = with_question()
    eng.fast_decode = False
    ids_ref, _, flops_ref = eng.decode(c1, m1, logits, 24)
    read_ref = list(eng.last_read_bytes)
    plan = fast_decode.plan(m2, c2)
    assert plan is not None and plan.evict is not None
    fd = FastDecoder(lm.model, c2, 24, compile=compile, evict=plan.evict)
    ids_fast, _ = fd.decode(int(logits.argmax()), 24)
    assert fd.graph_error is None and fd.graph is None and fd.overflow  # captured, replayed, released
    assert ids_fast == ids_ref
    for a, b in zip(c1.kv, c2.kv):
        assert [set(a.head(h)[2].tolist()) for h in range(a.n_heads)] == \
               [set(b.head(h)[2].tolist()) for h in range(b.n_heads)]
    eng.fast_decode, eng.compile_decode = True, compile  # the engine's own CUDA path: same tokens, FLOPs, bytes
    ids_eng, _, flops_eng = eng.decode(c3, m3, logits, 24)
    assert ids_eng == ids_ref and flops_eng == flops_ref and eng.last_read_bytes == read_ref
    assert c3.head_lengths() == c1.head_lengths()
