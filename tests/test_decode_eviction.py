"""Decode-time eviction on the fast decode path (kvbench/fast_decode.py, methods/kernels/decode_evict.py)
against the engine loop, which runs each method's own `on_decode`.

The question is fed on top of the compressed context (query_aware=false), so heads start over their cap and
the first step evicts the question down to it; later steps evict one row per head (or per layer). CPU: the
in-place step runs eagerly (use_graph=False) with the torch references; the Triton kernels (probabilities,
append, the whole step) run under TRITON_INTERPRET=1 in a subprocess (it must be set before triton is
imported).
"""
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvbench import fast_decode
from kvbench.engine import Engine
from kvbench.fast_decode import FastDecoder
from kvbench.method import build_method
from kvbench.metrics import attention_flops
from test_gpu_path import _NoTokenizer, random_ids, tiny  # noqa: F401  (tiny: the same model fixture)

ROOT = Path(__file__).resolve().parents[1]
N_CTX, N_QUESTION, STEPS = 100, 9, 31

DUO_GATES = {"data": {"gates": [[0.9, 0.1], [0.2, 0.8]]}}  # retrieval heads (0, 0) and (1, 1): no profiling


def with_question(lm, name, query_aware=False, **knobs):
    """(engine, cache, method, logits): the context compressed, then (query_aware=False) a question fed on top."""
    method = build_method(name, **knobs)
    if name == "duoattention":
        method._entry = DUO_GATES
    eng = Engine(lm, method, query_aware=query_aware)
    eng.stop_ids = set()  # random weights: never stop early, decode the full length
    cache = eng.new_cache()
    vocab = min(40000, lm.model.config.vocab_size)
    ctx, question = random_ids(N_CTX, seed=1, vocab=vocab), random_ids(N_QUESTION, seed=2, vocab=vocab)
    if query_aware:
        pre = eng.prefill(cache, ctx + question, method, compress=True)
    else:
        eng.prefill(cache, ctx, method, compress=True)
        pre = eng.prefill(cache, question, method, compress=False)
    return eng, cache, method, pre.logits


def kept(cache, score=None):
    """Per layer, per head: {position: score or None} of the rows the cache holds."""
    out = []
    for layer in cache.kv:
        heads = []
        for h in range(layer.n_heads):
            pos = layer.head(h)[2].tolist()
            s = layer.side_head(score, h).tolist() if score else [None] * len(pos)
            assert len(set(pos)) == len(pos), "a position is held twice"
            heads.append(dict(zip(pos, s)))
        out.append(heads)
    return out


def fast(lm, cache, method, logits, steps=STEPS, evict=None):
    plan = fast_decode.plan(method, cache)
    assert plan is not None and plan.ring is None and plan.evict is not None
    fd = FastDecoder(lm.model, cache, steps, use_graph=False, evict=evict or plan.evict)
    ids, step_ms = fd.decode(int(logits.argmax()), steps)
    assert len(step_ms) == steps - 1
    return ids, fd


CASES = [  # (method, knobs, the per-head cap while decoding; None: the plan's per-layer / per-head caps)
    ("h2o", dict(budget=24), 24),
    ("h2o", dict(compression_ratio=0.75), 25),  # the cap is fixed at compression: 25 of the 100-token context
    ("tova", dict(budget=24), 24),
    ("tova", dict(budget=24, per_head=True), 24),
    ("streaming_llm", dict(budget=16, n_sink=4), 16),
    ("recent", dict(budget=16), 16),
    ("cake", dict(budget=24, window_size=4), None),  # per-layer budgets of the cascade; pooled attention
    ("lacache", dict(budget=48, span=1, n_sink=4, recent=8), 48),  # the ladder's scheduled ranks
    # streaming heads (0, 1) and (1, 0) roll at (4·60 − 2·100)/2 = 20 rows with 7 sinks; retrieval heads grow
    ("duoattention", dict(budget=60, min_stream_frac=0.0), None),
    ("d2o", dict(budget=24, window_size=8), None),  # density budgets per layer; merging with EMA thresholds
    ("d2o", dict(budget=100, window_size=8), 100),  # nothing merged at prefill: the first removal sets tau
]
SCORES = {"h2o": "h2o_score", "d2o": "d2o_score"}  # side data the method accumulates


def same_rows(c1, c2):
    """Per head, the same keys and values at the same positions (D2O's merges change kept rows)."""
    for a, b in zip(c1.kv, c2.kv):
        for h in range(a.n_heads):
            (ka, va, pa), (kb, vb, pb) = a.head(h), b.head(h)
            oa, ob = torch.argsort(pa), torch.argsort(pb)
            assert torch.equal(pa[oa], pb[ob])
            torch.testing.assert_close(kb[ob], ka[oa], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vb[ob], va[oa], rtol=1e-5, atol=1e-5)


def _id(x):
    return x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x)


def head_caps(evict, cache):
    """Per layer, per head: the cap the plan gives (None: the head only grows)."""
    return [fast_decode.head_caps(c, layer.n_heads) for c, layer in zip(evict.caps, cache.kv)]


@pytest.mark.parametrize("name,knobs,cap", CASES, ids=_id)
def test_fast_eviction_matches_engine_loop(tiny, name, knobs, cap):
    """Same greedy tokens, and per layer and head the same kept positions (and H2O scores) as the engine loop;
    the same rows read, FLOPs and held peak as the engine loop measures; the method's state moves on alike."""
    eng, c1, m1, logits = with_question(tiny, name, **knobs)
    _, c2, m2, _ = with_question(tiny, name, **knobs)
    caps = head_caps(fast_decode.plan(m2, c2).evict, c2)
    if cap is not None:
        assert caps == [[cap] * layer.n_heads for layer in c2.kv]
    assert any(c is not None for layer in caps for c in layer)
    for lens, layer_caps in zip(c2.head_lengths(), caps):  # the question sits on top: a ring would not fit
        assert all(c is None or n > c for n, c in zip(lens, layer_caps))
    if m2.decode_ring() is not None:
        assert not fast_decode.ring_fits(c2, m2.decode_ring())
    c1.held.reset_peak()
    ids_ref, _, flops_ref = eng.decode(c1, m1, logits, STEPS)
    read_ref = list(eng.last_read_bytes)
    lens0 = c2.head_lengths()
    ids_fast, fd = fast(tiny, c2, m2, logits)
    assert ids_fast == ids_ref
    assert c2.seen_tokens == c1.seen_tokens == N_CTX + N_QUESTION + STEPS - 1
    score = SCORES.get(name)
    k1, k2 = kept(c1, score), kept(c2, score)
    for layer1, layer2, layer_caps, lens in zip(k1, k2, caps, lens0):
        for h1, h2, c, n in zip(layer1, layer2, layer_caps, lens):
            assert set(h2) == set(h1)
            assert len(h1) == (n + STEPS - 1 if c is None else c)
            if score:
                torch.testing.assert_close(torch.tensor([h2[p] for p in sorted(h1)]),
                                           torch.tensor([h1[p] for p in sorted(h1)]), rtol=1e-5, atol=1e-5)
    if name == "tova" and not knobs.get("per_head"):  # one choice per layer: every head keeps the same tokens
        assert all(set(h) == set(layer[0]) for layer in k2 for h in layer)
    if name == "lacache":  # the ladder's cursor moved on as the engine loop's (a next turn goes on from there)
        assert m2.state == m1.state
        fd.finish()
        assert m2.state == m1.state  # once only
    if name == "d2o":  # merged keys and values, and the thresholds the engine loop leaves
        same_rows(c1, c2)
        assert m2.tau.keys() == m1.tau.keys() and len(m1.tau) == 4
        assert all(m2.tau[k] == pytest.approx(m1.tau[k], rel=1e-6) for k in m1.tau)
    # the rows each step reads (the engine's fast-path bookkeeping) are what the engine loop read
    plan_caps = list(fd.evict.caps)
    row_bytes = [layer.row_bytes for layer in c2.kv]
    rows = [fast_decode.step_rows(lens0, plan_caps, i) for i in range(STEPS - 1)]
    assert [sum(b * sum(r) for b, r in zip(row_bytes, step)) for step in rows] == read_ref
    for step in rows[1:]:  # at most cap + 1 rows after the first step
        assert all(c is None or r <= c + 1 for rs, cs in zip(step, caps) for r, c in zip(rs, cs))
    assert any(r == c + 1 for rs, cs in zip(rows[-1], caps) for r, c in zip(rs, cs) if c is not None)
    flops = [eng._linear_flops + attention_flops(step, eng._group, eng._head_dim) for step in rows]
    assert flops == flops_ref
    assert fast_decode.held_peak(lens0, plan_caps, row_bytes, STEPS - 1) == c1.held.peak  # the engine loop's meter


@pytest.mark.parametrize("name,knobs", [("h2o", dict(budget=24)), ("tova", dict(budget=24))], ids=["h2o", "tova"])
def test_fast_eviction_from_a_cache_at_its_cap(tiny, name, knobs):
    """query_aware=true: the heads start at the cap, every step (the first included) evicts one row."""
    eng, c1, m1, logits = with_question(tiny, name, query_aware=True, **knobs)
    _, c2, m2, _ = with_question(tiny, name, query_aware=True, **knobs)
    assert c2.head_lengths() == [[24, 24]] * 2
    ids_ref, _, _ = eng.decode(c1, m1, logits, STEPS)
    ids_fast, fd = fast(tiny, c2, m2, logits)
    assert not fd.overflow and ids_fast == ids_ref
    assert kept(c2, "h2o_score" if name == "h2o" else None).__len__() == 2
    for layer1, layer2 in zip(kept(c1), kept(c2)):
        assert [set(h) for h in layer2] == [set(h) for h in layer1]


@pytest.mark.parametrize("name", ["h2o", "tova"])
def test_fast_eviction_with_window_and_softcap(name):
    """Gemma-2 (layer 0 slides over 8 positions, scores soft-capped): the step's probabilities know the window
    (rows out of it have probability 0, the first TOVA evicts) and the cap, as the engine loop's."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from kvbench.attention import register
    from kvbench.models import LoadedModel
    config = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                                  max_position_embeddings=256, sliding_window=8, attn_logit_softcapping=5.0,
                                  final_logit_softcapping=30.0, query_pre_attn_scalar=16, initializer_range=0.1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    register()
    model.set_attn_implementation("kvbench")
    lm = LoadedModel(model, _NoTokenizer(), "gemma2", torch.device("cpu"), torch.float32, 256)
    eng, c1, m1, logits = with_question(lm, name, budget=12)
    _, c2, m2, _ = with_question(lm, name, budget=12)
    ids_ref, _, _ = eng.decode(c1, m1, logits, 20)
    ids_fast, _ = fast(lm, c2, m2, logits, steps=20)
    assert ids_fast == ids_ref
    score = "h2o_score" if name == "h2o" else None
    for l1, l2 in zip(kept(c1, score), kept(c2, score)):
        for h1, h2 in zip(l1, l2):
            assert set(h2) == set(h1) and len(h1) == 12
            if score:
                torch.testing.assert_close(torch.tensor([h2[p] for p in sorted(h1)]),
                                           torch.tensor([h1[p] for p in sorted(h1)]), rtol=1e-5, atol=1e-5)


WRONG_RULES = [  # (method, knobs, a wrong description of its on_decode)
    ("h2o", dict(budget=24), dict(rank="attention")),     # TOVA's rule over H2O's cache
    ("h2o", dict(budget=24), dict(recent=(0, 0))),        # no protected recent window
    ("tova", dict(budget=24), dict(shared=False)),        # per head instead of per layer
    ("streaming_llm", dict(budget=16, n_sink=4), dict(n_sink=0)),  # the sinks evicted
    ("cake", dict(budget=24, window_size=4), dict(pool=0)),   # the raw attention, not pooled
    ("cake", dict(budget=24, window_size=4), dict(recent=(0, 0))),  # the window evicted
    ("lacache", dict(budget=48, span=1, n_sink=4, recent=8), dict(rank="position", schedule=None)),  # oldest first
    ("duoattention", dict(budget=60, min_stream_frac=0.0), dict(n_sink=0)),  # the streaming heads' sinks evicted
    ("d2o", dict(budget=24, window_size=8), dict(recent=(0, 0))),  # no protected recent window
]


@pytest.mark.parametrize("name,knobs,wrong", WRONG_RULES, ids=_id)
def test_a_wrong_victim_rule_is_detected(tiny, name, knobs, wrong):
    """The comparison above has teeth: the fast path run with a wrong rule keeps other positions than the
    engine loop (which runs the method's own on_decode)."""
    eng, c1, m1, logits = with_question(tiny, name, **knobs)
    _, c2, m2, _ = with_question(tiny, name, **knobs)
    eng.decode(c1, m1, logits, STEPS)
    bad = dataclasses.replace(fast_decode.plan(m2, c2).evict, **wrong)
    fast(tiny, c2, m2, logits, evict=bad)
    assert any(set(h2) != set(h1) for l1, l2 in zip(kept(c1), kept(c2)) for h1, h2 in zip(l1, l2))


def test_d2o_merging_is_detected(tiny):
    """D2O's merges change kept rows: without them the fast path keeps the engine loop's positions but not its
    keys and values (the key comparison of the equivalence test has teeth)."""
    eng, c1, m1, logits = with_question(tiny, "d2o", budget=24, window_size=8)
    _, c2, m2, _ = with_question(tiny, "d2o", budget=24, window_size=8)
    eng.decode(c1, m1, logits, STEPS)
    evict = fast_decode.plan(m2, c2).evict
    fast(tiny, c2, m2, logits, evict=dataclasses.replace(evict, merge_tau=(), store_tau=None))
    assert [[set(h) for h in layer] for layer in kept(c2)] == [[set(h) for h in layer] for layer in kept(c1)]
    with pytest.raises(AssertionError):
        same_rows(c1, c2)


def test_pooling_by_position_on_ragged_heads():
    """CAKE's key on the device: per head, the probabilities average-pooled in position order (rows shuffled),
    as pool1d over the head's rows alone, even where the fixed-width grid reaches into the next head's rows."""
    from kvbench.method import pool1d
    from kvbench.methods.kernels.decode_evict import pool_by_position
    g = torch.Generator().manual_seed(0)
    lens, starts, T = [5, 9, 3], [0, 5, 16], 21  # heads 0 and 1 touch; spare rows after heads 1 and 2
    positions = torch.zeros(T, dtype=torch.long)
    probs = torch.zeros(T)
    for a, n in zip(starts, lens):
        positions[a:a + n] = torch.randperm(50, generator=g)[:n]
        probs[a:a + n] = torch.rand(n, generator=g)
    got = pool_by_position(probs, positions, torch.tensor(starts), torch.tensor(lens), width=9, kernel_size=5)
    want = torch.zeros(T)
    for a, n in zip(starts, lens):
        order = torch.argsort(positions[a:a + n])
        want[a + order] = pool1d(probs[a:a + n][order].unsqueeze(0), 5, "avg")[0]
    torch.testing.assert_close(got, want)


def test_finish_leaves_the_engine_loops_cache(tiny):
    """After decoding, the last step's victims are gone (heads hold the cap, as the engine loop leaves them),
    finish() twice changes nothing, and a clone decodes on like the engine loop would (multi-turn)."""
    eng, c1, m1, logits = with_question(tiny, "h2o", budget=24)
    _, c2, m2, _ = with_question(tiny, "h2o", budget=24)
    eng.decode(c1, m1, logits, 12)
    _, fd = fast(tiny, c2, m2, logits, steps=12)
    fd.finish()
    assert c2.head_lengths() == c1.head_lengths() == [[24, 24]] * 2
    assert c2.held.now == c2.nbytes() and c2.nbytes() == c1.nbytes()
    # both caches go on through the engine loop: same tokens (the state, scores included, is the same)
    nxt = torch.zeros(tiny.model.config.vocab_size)
    nxt[123] = 1.0
    a, _, _ = eng.decode(c1.clone(), m1.fork(), nxt, 8)
    b, _, _ = eng.decode(c2.clone(), m2.fork(), nxt, 8)
    assert a == b


def test_plan_routes_methods(tiny):
    """Which methods the fast path takes, and how."""
    _, c, m, _ = with_question(tiny, "streaming_llm", query_aware=True, budget=16, n_sink=4)
    assert fast_decode.plan(m, c).ring == (4, 16)  # the window fits: the ring buffer
    _, c, m, _ = with_question(tiny, "streaming_llm", budget=16, n_sink=4)
    p = fast_decode.plan(m, c)
    assert p.ring is None and p.evict.rank == "position" and p.evict.n_sink == 4  # a question on top
    _, c, m, _ = with_question(tiny, "tova", budget=24)
    assert fast_decode.plan(m, c).evict.shared
    _, c, m, _ = with_question(tiny, "h2o")  # no budget: the cap is the context fixed at compression (as on_decode)
    p = fast_decode.plan(m, c)
    assert p.evict.caps == (N_CTX, N_CTX) and p.evict.score == "h2o_score"
    _, c, m, _ = with_question(tiny, "streaming_llm", budget=16, evict_during_decode=False)
    assert fast_decode.plan(m, c).evict.caps == (None, None)  # nothing evicted while decoding: plain appends
    _, c, m, _ = with_question(tiny, "cake", budget=24, window_size=4)
    p = fast_decode.plan(m, c)
    assert p.evict.rank == "attention" and p.evict.pool == 5 and p.evict.recent == (4, 4)
    _, c, m, _ = with_question(tiny, "cake", budget=24, window_size=4, evict_during_decode=False)
    assert fast_decode.plan(m, c).evict.caps == (None, None)
    _, c, m, _ = with_question(tiny, "lacache", budget=48, span=1, n_sink=4, recent=8)
    assert fast_decode.plan(m, c).evict.rank == "scheduled"
    _, c, m, _ = with_question(tiny, "duoattention", budget=60, min_stream_frac=0.0)
    assert fast_decode.plan(m, c).evict.caps == ((None, 20), (20, None))  # retrieval heads only grow
    _, c, m, _ = with_question(tiny, "d2o", budget=24)
    p = fast_decode.plan(m, c)
    assert p.evict.score == "d2o_score" and len(p.evict.merge_tau) == 2 and p.evict.merge_beta == m.ema_beta


_TRITON = textwrap.dedent("""
    import math, torch
    from kvbench.methods import kernels as K
    g = torch.Generator().manual_seed(0)
    d = 16
    for grp in (1, 3, 4):                         # GQA groups (3: padded to a power of two)
        lens = [0, 1, 37, 70, 5]                  # ragged, with an empty head
        starts, row = [], 2
        for n in lens:
            starts.append(row); row += n + 3      # spare rows between the heads
        T = row
        k, v = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
        q = torch.randn(len(lens) * grp, d, generator=g)
        starts, lengths = torch.tensor(starts), torch.tensor(lens)
        positions = torch.randint(0, 200, (T,), generator=g)
        lw = torch.log(torch.randint(1, 4, (T,), generator=g).float())   # merged rows weigh 1..3
        for opts in (dict(), dict(log_weight=lw), dict(log_weight=lw, softcap=2.0),
                     dict(log_weight=lw, window=60, positions=positions, q_pos=torch.tensor([200]))):
            ref = K.ragged_decode_attention_ref(q, k, v, starts, lengths, 0.4, return_probs=True,
                                                **{**opts, "q_pos": 200} if "window" in opts else opts)
            tri = K.ragged_decode_attention_triton(q, k, v, starts, lengths, 0.4, return_probs=True, num_splits=3,
                                                   block_n=16, **opts)
            torch.testing.assert_close(tri[0], ref[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(tri[1], ref[1], atol=1e-5, rtol=1e-4)
            for a, n in zip(starts.tolist(), lens):
                s = float(tri[1][a:a + n].sum())
                assert n == 0 or abs(s - grp) < 1e-4 or "window" in opts, s   # each query head's sum is 1
            outside = torch.ones(T, dtype=torch.bool)
            for a, n in zip(starts.tolist(), lens):
                outside[a:a + n] = False
            assert bool((tri[1][outside] == 0).all())    # rows outside every head: 0 (added to scores as is)
    print("PROBS_OK")

    # the whole fast step with the Triton kernels (append in ring mode, decode + probabilities), H2O over a
    # question on top, against the engine loop (torch reference, the method's own on_decode)
    import tests.test_decode_eviction as T
    from kvbench import attention, fast_decode
    from kvbench.models import load_model
    lm = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
    lm.tokenizer = T._NoTokenizer()
    for name, knobs in (("h2o", dict(budget=24)), ("tova", dict(budget=24)), ("cake", dict(budget=24, window_size=4))):
        eng, c1, m1, logits = T.with_question(lm, name, **knobs)
        _, c2, m2, _ = T.with_question(lm, name, **knobs)
        ids_ref, _, _ = eng.decode(c1, m1, logits, 12)
        attention.DECODE_KERNEL = "triton"
        ids_fast, _ = T.fast(lm, c2, m2, logits, steps=12)
        attention.DECODE_KERNEL = "auto"
        assert ids_fast == ids_ref, (ids_fast, ids_ref)
        score = "h2o_score" if name == "h2o" else None
        for l1, l2 in zip(T.kept(c1, score), T.kept(c2, score)):
            for h1, h2 in zip(l1, l2):
                assert set(h1) == set(h2)
                if score:
                    torch.testing.assert_close(torch.tensor([h2[p] for p in sorted(h1)]),
                                               torch.tensor([h1[p] for p in sorted(h1)]), rtol=1e-4, atol=1e-4)
    print("STEP_OK")
""")


def test_triton_probabilities_and_step_match_reference():
    """Triton (interpreter) vs torch reference: the decode kernel's probabilities (ragged heads, GQA groups,
    log-weights, softcap, window), then the whole in-place step with eviction vs the engine loop."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",  # tests/: this module imports test_gpu_path
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _TRITON], env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert "PROBS_OK" in r.stdout and "STEP_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.parametrize("name,knobs", [("lacache", dict(budget=48, span=1, n_sink=4, recent=8)),
                                        ("cake", dict(budget=24, window_size=4)),
                                        ("d2o", dict(budget=24, window_size=8))], ids=["lacache", "cake", "d2o"])
def test_compiled_eviction_matches_engine_loop(tiny, name, knobs):
    """The eviction through torch.compile (aot_eager: traced and functionalized as the GPU compiles it before
    capturing): the in-place removals, the pooled probabilities, the schedule's removal counter and D2O's
    merges and thresholds survive."""
    eng, c1, m1, logits = with_question(tiny, name, **knobs)
    _, c2, m2, _ = with_question(tiny, name, **knobs)
    ids_ref, _, _ = eng.decode(c1, m1, logits, 12)
    fd = FastDecoder(tiny.model, c2, 12, use_graph=False, compile="aot_eager", evict=fast_decode.plan(m2, c2).evict)
    ids, _ = fd.decode(int(logits.argmax()), 12)
    assert ids == ids_ref
    assert [[set(h) for h in layer] for layer in kept(c2)] == [[set(h) for h in layer] for layer in kept(c1)]
    if name == "lacache":
        assert m2.state == m1.state
    if name == "d2o":
        same_rows(c1, c2)
        assert all(m2.tau[k] == pytest.approx(m1.tau[k], rel=1e-6) for k in m1.tau)
