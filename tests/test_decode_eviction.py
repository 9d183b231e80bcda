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
from kvbench.models import load_model

ROOT = Path(__file__).resolve().parents[1]
N_CTX, N_QUESTION, STEPS = 100, 9, 31


class _NoTokenizer:  # the engine reads only these two attributes; prompts here are raw token ids
    eos_token_id = None
    chat_template = None


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")
    lm.tokenizer = _NoTokenizer()
    return lm


def random_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (n,), generator=g).tolist()


def with_question(lm, name, query_aware=False, **knobs):
    """(engine, cache, method, logits): the context compressed, then (query_aware=False) a question fed on top."""
    method = build_method(name, **knobs)
    eng = Engine(lm, method, query_aware=query_aware)
    eng.stop_ids = set()  # random weights: never stop early, decode the full length
    cache = eng.new_cache()
    ctx, question = random_ids(N_CTX, seed=1), random_ids(N_QUESTION, seed=2)
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


CASES = [  # (method, knobs, the per-head cap while decoding)
    ("h2o", dict(budget=24), 24),
    ("h2o", dict(compression_ratio=0.75), 25),  # the cap is fixed at compression: 25 of the 100-token context
    ("tova", dict(budget=24), 24),
    ("tova", dict(budget=24, per_head=True), 24),
    ("streaming_llm", dict(budget=16, n_sink=4), 16),
    ("recent", dict(budget=16), 16),
]


def _id(x):
    return x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x)


@pytest.mark.parametrize("name,knobs,cap", CASES, ids=_id)
def test_fast_eviction_matches_engine_loop(tiny, name, knobs, cap):
    """Same greedy tokens, and per layer and head the same kept positions (and H2O scores) as the engine loop."""
    eng, c1, m1, logits = with_question(tiny, name, **knobs)
    _, c2, m2, _ = with_question(tiny, name, **knobs)
    assert min(min(lens) for lens in c2.head_lengths()) > cap  # the question sits on top: a ring would not fit
    if m2.decode_ring() is not None:
        assert not fast_decode.ring_fits(c2, m2.decode_ring())
    ids_ref, _, flops_ref = eng.decode(c1, m1, logits, STEPS)
    read_ref = list(eng.last_read_bytes)
    lens0 = c2.head_lengths()
    ids_fast, fd = fast(tiny, c2, m2, logits)
    assert ids_fast == ids_ref
    assert c2.seen_tokens == c1.seen_tokens == N_CTX + N_QUESTION + STEPS - 1
    score = "h2o_score" if name == "h2o" else None
    k1, k2 = kept(c1, score), kept(c2, score)
    for layer1, layer2 in zip(k1, k2):
        for h1, h2 in zip(layer1, layer2):
            assert set(h2) == set(h1)
            assert len(h1) == cap
            if score:
                torch.testing.assert_close(torch.tensor([h2[p] for p in sorted(h1)]),
                                           torch.tensor([h1[p] for p in sorted(h1)]), rtol=1e-5, atol=1e-5)
    if name == "tova" and not knobs.get("per_head"):  # one choice per layer: every head keeps the same tokens
        assert all(set(h) == set(layer[0]) for layer in k2 for h in layer)
    # the rows each step reads (the engine's fast-path bookkeeping) are what the engine loop read
    caps = list(fd.evict.caps)
    row_bytes = [layer.row_bytes for layer in c2.kv]
    rows = [fast_decode.step_rows(lens0, caps, i) for i in range(STEPS - 1)]
    assert [sum(b * sum(r) for b, r in zip(row_bytes, step)) for step in rows] == read_ref
    assert max(max(map(max, step)) for step in rows[1:]) == cap + 1  # at most cap + 1 rows after the first step
    flops = [eng._linear_flops + attention_flops(step, eng._group, eng._head_dim) for step in rows]
    assert flops == flops_ref
