"""The full cache's static prefill (kvbench/graph_prefill.py) against the engine's eager prefill.

On CPU the static forward runs eagerly (use_graph=False): the same padded buckets, store, offsets and masks
that the CUDA graphs replay. Truth is the engine's own eager prefill of the same tokens (itself tested against
transformers' forward in test_attention_models.py / test_engine.py): logits, every head's rows and positions,
the bytes held, and the greedy tokens decoded on top. The GPU test replays the graphs (skipped without CUDA).
"""
import gc

import pytest
import torch

from kvbench import graph_prefill
from kvbench.engine import Engine
from kvbench.graph_prefill import GraphPrefill
from kvbench.metrics import PeakMemory, held_elsewhere
from kvbench.models import load_model
from kvbench.task import Query, Sample
from test_gpu_path import _same_cache


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0)


def random_ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (n,), generator=g).tolist()


def same_cache(c1, c2):
    """Every head's rows and positions (test_gpu_path's check), and the bytes held."""
    _same_cache(c1, c2)
    assert c2.nbytes() == c1.nbytes() and c2.held.now == c1.held.now


def static_engine(lm, gp, **kw):
    eng = Engine(lm, None, query_aware=False, **kw)
    eng._static_why, eng._static = None, gp  # on CPU the engine never picks it by itself
    return eng


@pytest.mark.parametrize("n_ctx,n_q", [(100, 13), (64, 8), (1, 1), (33, 17)])
def test_static_context_and_question_equal_the_eager_prefill(tiny, n_ctx, n_q):
    """Padded buckets (rows=32, q_rows=8) of every shape: a bucket filled exactly, one token, a question
    spanning several question buckets."""
    eager = Engine(tiny, None, query_aware=False)
    eager.stop_ids = set()
    gp = GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8)
    eng = static_engine(tiny, gp)
    eng.stop_ids = set()
    ctx, q, new = random_ids(n_ctx), random_ids(n_q, seed=1), 9
    c1, c2 = eager.new_cache(), eng.new_cache()
    p1 = eager.prefill(c1, ctx, None, compress=True, spare=n_q + new)
    p2 = eng.prefill(c2, ctx, None, compress=True, spare=n_q + new)
    assert (p1.path, p2.path) == ("eager: cpu device", "graph")
    torch.testing.assert_close(p2.logits, p1.logits)
    same_cache(c1, c2)
    assert c2.kv[0].keys is gp.slots[(32 * -(-n_ctx // 32), 32 * -(-(n_ctx + n_q + new + 8) // 32))].keys[0]
    q1 = eager.prefill(c1, q, None, compress=False)
    q2 = eng.prefill(c2, q, None, compress=False)
    assert q2.path == "graph"
    torch.testing.assert_close(q2.logits, q1.logits)
    same_cache(c1, c2)
    t1, _, _ = eager.decode(c1, None, q1.logits, new)
    t2, _, _ = eng.decode(c2, None, q2.logits, new)
    assert t2 == t1 and len(t1) == new
    same_cache(c1, c2)


def test_a_lent_store_is_never_overwritten(tiny):
    """While a cache holds a bucket's store, another context of that bucket prefills eagerly (and right);
    once the cache is gone, the store is reused."""
    gp = GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8)
    eng = static_engine(tiny, gp)
    eager = Engine(tiny, None)
    a, b = random_ids(50), random_ids(52, seed=3)
    ca = eng.new_cache()
    assert eng.prefill(ca, a, None, True, spare=10).path == "graph"
    keys_a = ca.kv[1].head(1)[0].clone()
    cb = eng.new_cache()
    pb = eng.prefill(cb, b, None, True, spare=10)
    assert pb.path == "eager: its bucket's store is lent to a live cache"
    torch.testing.assert_close(ca.kv[1].head(1)[0], keys_a)  # untouched
    ref = eager.new_cache()
    torch.testing.assert_close(pb.logits, eager.prefill(ref, b, None, True, spare=10).logits)
    del ca
    gc.collect()
    cc = eng.new_cache()
    pc = eng.prefill(cc, b, None, True, spare=10)
    assert pc.path == "graph"
    torch.testing.assert_close(pc.logits, pb.logits)
    same_cache(ref, cc)


def test_a_question_that_does_not_fit_goes_eager_and_frees_the_store(tiny):
    gp = GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8)
    eng = static_engine(tiny, gp)
    eager = Engine(tiny, None)
    ctx, q = random_ids(40), random_ids(70, seed=2)
    c1, c2 = eager.new_cache(), eng.new_cache()
    eager.prefill(c1, ctx, None, True, spare=2)
    eng.prefill(c2, ctx, None, True, spare=2)  # cap = 96: 40 + 70 rows do not fit
    q1, q2 = eager.prefill(c1, q, None, False), eng.prefill(c2, q, None, False)
    assert q2.path == "eager: 70 tokens do not fit the store's spare rows"
    torch.testing.assert_close(q2.logits, q1.logits)
    same_cache(c1, c2)
    slot = next(iter(gp.slots.values()))
    assert not slot.busy()  # the layers grew into new buffers: the store is free again


def test_run_sample_records_the_paths_and_the_same_answers(tiny):
    sample = Sample("s0", "the quick brown fox jumps over the lazy dog " * 12,
                    [Query(" What jumps?", ["fox"], max_new_tokens=6), Query(" Who sleeps?", ["dog"], max_new_tokens=6)],
                    mode="multi_request")
    ref = Engine(tiny, None).run_sample(sample)
    eng = static_engine(tiny, GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8))
    got = eng.run_sample(sample)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in ref]
    assert [r["kv_bytes"] for r in got] == [r["kv_bytes"] for r in ref]
    assert [r["kv_bytes_held_max"] for r in got] == [r["kv_bytes_held_max"] for r in ref]
    assert got[0]["prefill_path"] == "graph" and ref[0]["prefill_path"] == "eager: cpu device"
    # query 0 feeds its question into a copy of the shared context; the last one into the context itself
    assert got[0]["question_path"] == "eager: the cache's layers are not a static store"
    assert got[1]["question_path"] == "graph"
    assert all(r["prefill_setup_ms"] == 0.0 for r in got)  # nothing is captured on CPU


def test_methods_that_compress_and_chunked_prefills_stay_eager(tiny):
    from kvbench.method import build_method
    eng = static_engine(tiny, GraphPrefill(tiny.model, use_graph=False))
    eng.method = build_method("snapkv", budget=16)
    c = eng.new_cache()
    assert eng.prefill(c, random_ids(40), eng.method, True).path == \
        "eager: snapkv compresses (the static prefill is the full cache's)"
    eng.prefill_chunk = 16
    assert eng.prefill(eng.new_cache(), random_ids(40), None, True).path == \
        "eager: chunked prefill (prefill_chunk=16)"


def test_sliding_window_models_fall_back_to_eager():
    from test_attention_models import tiny_model, use_kvbench
    lm = tiny_model("mistral")
    use_kvbench(lm)
    gp = GraphPrefill(lm.model, use_graph=False, rows=16, q_rows=8)
    eng = static_engine(lm, gp)
    ref = Engine(lm, None)
    ids = list(range(5, 45))
    p = eng.prefill(eng.new_cache(), ids, None, True, spare=4)
    assert p.path.startswith("eager: static prefill unsupported: the static prefill computes plain causal")
    torch.testing.assert_close(p.logits, ref.prefill(ref.new_cache(), ids, None, True, spare=4).logits)
    assert eng.prefill(eng.new_cache(), ids, None, True).path == p.path  # decided once


def test_mode_and_auto_choice(monkeypatch, tiny):
    cpu, gpu = [torch.device("cpu")], [torch.device("cuda", 0)]
    assert graph_prefill.wanted(tiny.model, cpu) == "cpu device"
    assert graph_prefill.wanted(tiny.model, gpu) is None  # auto: a small model on one GPU
    assert graph_prefill.wanted(tiny.model, gpu * 2) == "model spread over 2 devices"
    monkeypatch.setattr(graph_prefill, "AUTO_MAX_PARAMS", 10)
    assert graph_prefill.wanted(tiny.model, gpu).startswith("a model over 1B parameters")
    monkeypatch.setenv("KVBENCH_GRAPH_PREFILL", "1")
    assert graph_prefill.wanted(tiny.model, gpu) is None
    monkeypatch.setenv("KVBENCH_GRAPH_PREFILL", "0")
    assert graph_prefill.wanted(tiny.model, gpu) == "KVBENCH_GRAPH_PREFILL=0"
    monkeypatch.setenv("KVBENCH_GRAPH_PREFILL", "yes")
    with pytest.raises(ValueError, match="KVBENCH_GRAPH_PREFILL='yes'; allowed: auto, 0, 1"):
        graph_prefill.mode()


def test_held_elsewhere_raises_the_innermost_block_peak():
    dev = torch.device("cpu")
    with PeakMemory(dev) as outer:
        with PeakMemory(dev) as inner:
            held_elsewhere(1 << 40)
        assert inner.peak >= 1 << 40
    assert outer.peak < 1 << 40
    held_elsewhere(1 << 40)  # no block open: nothing to tell


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_the_eager_prefill_on_cuda(bench_module):
    lm = bench_module("gpu_speed").build_model("tiny", device="cuda", dtype="float32")  # no tokenizer needed
    eager = Engine(lm, None)
    eager._static_why = "off for the reference"
    eager.stop_ids = set()
    eng = Engine(lm, None)
    eng.stop_ids = set()
    assert eng._static_why is None
    for seed, n in enumerate((300, 290)):  # the second sample replays the first one's bucket
        ctx, q = random_ids(n, seed), random_ids(21, seed + 7)
        c1, c2 = eager.new_cache(), eng.new_cache()
        with PeakMemory(lm.device) as m1:
            p1 = eager.prefill(c1, ctx, None, True, spare=21 + 12)
        with PeakMemory(lm.device) as m2:
            p2 = eng.prefill(c2, ctx, None, True, spare=21 + 12)
        assert p2.path == "graph" and (p2.setup_ms > 0) == (seed == 0)
        # the store (capacity and padding included) and the forward's activations count in the peak, also
        # when an earlier sample allocated them: at least the eager prefill's cache, at most a few times its peak
        slot = next(iter(eng._static.slots.values()))
        assert m2.peak >= slot.store_bytes >= c1.allocated_bytes() and m2.peak < 4 * max(m1.peak, slot.store_bytes)
        torch.testing.assert_close(p2.logits, p1.logits, rtol=1e-4, atol=1e-4)
        q1, q2 = eager.prefill(c1, q, None, False), eng.prefill(c2, q, None, False)
        assert q2.path == "graph"
        torch.testing.assert_close(q2.logits, q1.logits, rtol=1e-4, atol=1e-4)
        same_cache(c1, c2)
        t1, _, _ = eager.decode(c1, None, q1.logits, 12)
        t2, _, _ = eng.decode(c2, None, q2.logits, 12)
        assert t2 == t1
        del c1, c2


def test_regional_compile_of_the_static_prefill_gives_the_same_results(tiny, monkeypatch):
    monkeypatch.setenv("KVBENCH_COMPILE_PREFILL", "regional:aot_eager")
    gp = GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8)
    assert gp.compile == "aot_eager"
    eng, eager = static_engine(tiny, gp), Engine(tiny, None)
    ctx, q = random_ids(70), random_ids(9, seed=4)
    c1, c2 = eager.new_cache(), eng.new_cache()
    torch.testing.assert_close(eng.prefill(c2, ctx, None, True, spare=20).logits,
                               eager.prefill(c1, ctx, None, True, spare=20).logits)
    torch.testing.assert_close(eng.prefill(c2, q, None, False).logits, eager.prefill(c1, q, None, False).logits)
    same_cache(c1, c2)
    assert all(m._compiled_call_impl is None for m in tiny.model.modules())  # the model is left as it was
    monkeypatch.setenv("KVBENCH_COMPILE_PREFILL", "max-autotune")
    with pytest.raises(ValueError, match="KVBENCH_COMPILE_PREFILL='max-autotune'; allowed: 0, regional"):
        graph_prefill.wanted(tiny.model, [torch.device("cpu")])


def test_buckets_are_kept_least_recently_used_within_the_count_and_bytes(tiny):
    gp = GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8, max_slots=2)
    eng = static_engine(tiny, gp)
    for n in (20, 50, 20, 80):  # buckets 32, 64, 32 (used again), 96: 64 goes
        assert eng.prefill(eng.new_cache(), random_ids(n), None, True).path == "graph"
    assert [r for r, _ in gp.slots] == [32, 96]
    one = next(iter(gp.slots.values())).store_bytes
    cfg = tiny.model.config
    assert one == cfg.num_hidden_layers * cfg.num_key_value_heads * 32 * (2 * cfg.head_dim * 4 + 8)  # cap: 20 + 8 rows -> 32
    # stores of 1 + 3 units held; a new one of 2 units (cap 64) within 5: the least recently used one goes
    gp.max_slots, gp.max_bytes = 10, 5 * one
    assert eng.prefill(eng.new_cache(), random_ids(40), None, True).path == "graph"
    assert [r for r, _ in gp.slots] == [96, 64]


def test_each_replay_reports_the_store_to_the_running_peak(tiny, monkeypatch):
    """The store is allocated once (outside the running sample's growth) and reported by every replay, so each
    sample's peak counts it whether or not that sample allocated it."""
    reported, set_ups = [], []
    monkeypatch.setattr(graph_prefill, "held_elsewhere", reported.append)
    orig = PeakMemory.uncounted
    monkeypatch.setattr(PeakMemory, "uncounted", lambda self: (set_ups.append(1), orig(self))[1])
    eng = static_engine(tiny, GraphPrefill(tiny.model, use_graph=False, rows=32, q_rows=8))
    for seed in (0, 1):
        with PeakMemory(torch.device("cpu")):
            assert eng.prefill(eng.new_cache(), random_ids(40, seed), None, True, spare=4).path == "graph"
        assert len(set_ups) == 1  # the first sample allocated the store, uncounted; the second reused it
    (slot,) = eng._static.slots.values()
    assert reported == [slot.store_bytes] * 2 and slot.store_bytes > 0
