"""ThinK storage (methods/think.py) against references written here from the paper (2407.21018, Section 3.2) and
the official code's rules (github.com/SalesforceAIResearch/ThinK, ThinK_flash/src/kv_pruning_utils.py), hand-
worked bytes, the lowrank_decode Triton kernel under the interpreter, and end-to-end engine / CLI runs."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvbench.attention import attend
from kvbench.cache import LayerKV
from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.methods.think import ThinK, ThinKLayer, kept_channels
from kvbench.models import load_model


def paper_kept_channels(q_win: torch.Tensor, keys: torch.Tensor, ratio: float) -> list[int]:
    """The paper's score, channel by channel: Score[c] = ||Q_win[:, c] K[:, c]^T||_F (the outer product's Frobenius
    norm), in float64; the official code prunes the int(d * ratio) lowest, the rest are kept."""
    d = keys.shape[1]
    score = [float(torch.linalg.matrix_norm(torch.outer(q_win[:, c].double(), keys[:, c].double()))) for c in range(d)]
    n_keep = d - int(d * ratio)
    return sorted(sorted(range(d), key=lambda c: -score[c])[:n_keep])


def _layer(lens=(300, 300), d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lens)
    k, v = torch.randn(len(lens), n, d, generator=g), torch.randn(len(lens), n, d, generator=g)
    layer = LayerKV.from_dense(k, v, torch.arange(n))
    if len(set(lens)) > 1:
        layer.keep([torch.arange(x) for x in lens])  # ragged heads: head h keeps its first lens[h] rows
    return layer, k, v


def test_kept_channels_hand_worked():
    # ||Q[:, c]|| = [1, 0, 2, 1], ||K[:, c]|| = [5, sqrt 2, 1, 0] -> scores [5, 0, 2, 0]: keep channels 0 and 2
    q = torch.tensor([[1.0, 0.0, 2.0, 1.0]])
    k = torch.tensor([[3.0, 1.0, 1.0, 0.0], [4.0, 1.0, 0.0, 0.0]])
    assert kept_channels(q, k, 2).tolist() == [0, 2]
    assert kept_channels(q, k, 3).tolist() == [0, 1, 2]  # a tie (0, 0) goes to the lower channel


@pytest.mark.parametrize("ratio", [0.5, 0.4, 0.25])
def test_kept_channels_equal_the_papers_score_per_kv_head(ratio):
    g = torch.Generator().manual_seed(7)
    layer, k, _ = _layer(lens=(200, 120), d=32, seed=1)
    # scale channels so that the ranking is not decided by noise alone
    query = torch.randn(4, 32, 32, generator=g) * torch.linspace(0.2, 3.0, 32)
    st = ThinKLayer.encode(ThinK(ratio=ratio, recent_size=16), layer, query)
    for h, n in enumerate((200, 120)):
        q_grp = query[2 * h:2 * h + 2].reshape(-1, 32)  # GQA: the window queries of the KV head's query group
        assert st.ch[h].tolist() == paper_kept_channels(q_grp, k[h, :n], ratio)
        assert st.dk == 32 - int(32 * ratio)  # official: int(head_dim * ratio) pruned


def test_stored_bytes_are_the_formats_size():
    layer, k, v = _layer(lens=(300, 100, 10), d=32)
    st = ThinKLayer.encode(ThinK(ratio=0.5, recent_size=32), layer, torch.randn(3, 32, 32))
    # per head: pruned rows (n - 32) x 16 kept channels of fp32 keys + their (n - 32) x 32 values,
    # 16 int16 channel indices, 32 full rows (keys + values, 32 each); a head of 10 rows has no pruned row
    def head(n):
        p = max(0, n - 32)
        return p * 16 * 4 + p * 32 * 4 + 16 * 2 + (n - p) * 2 * 32 * 4
    assert st.nbytes() == head(300) + head(100) + head(10)
    assert st.head_lengths == [300, 100, 10]
    before = st.nbytes()
    st.append(torch.randn(3, 5, 32), torch.randn(3, 5, 32), torch.arange(300, 305))  # new tokens: full rows
    assert st.nbytes() == before + 3 * 5 * 2 * 32 * 4
    assert st.full.head_lengths == [37, 37, 15] and st.np_ == [268, 68, 0]
    assert st.read_bytes(1) == st.nbytes() + 3 * 2 * 32 * 4
    # pruned keys are the original keys at the kept channels, bit for bit; full rows are the originals
    assert torch.equal(st.kp[:268], k[0, :268][:, st.ch_long[0]])
    assert torch.equal(st.full.head(0)[0][:32], k[0, 268:300])
    assert torch.equal(st.vp[:268], v[0, :268])


def _thinK_reference(q, k, v, ch, n_p, scaling, causal_tail=0):
    """Dense fp32 ThinK attention of one KV head's query group q (g, m, d): scores q[ch] . k for the first n_p
    (pruned) rows and q . k for the rest, one softmax, times v; the m queries are the last m rows (causal)."""
    s = torch.cat([q[..., ch] @ k[:n_p, ch].T, q @ k[n_p:].T], dim=-1) * scaling  # (g, m, n)
    m, n = q.shape[1], k.shape[0]
    if m > 1:
        qpos = torch.arange(n - m, n).view(m, 1)
        s = s.masked_fill(torch.arange(n).view(1, n) > qpos, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_attention_equals_dense_fp32_reference():
    layer, k, v = _layer(lens=(150, 70), d=32, seed=3)
    st = ThinKLayer.encode(ThinK(ratio=0.5, recent_size=32), layer, torch.randn(4, 32, 32))
    q = torch.randn(4, 1, 32)
    out, _ = st.attend(q, 32 ** -0.5)
    for h, n in enumerate((150, 70)):
        ref = _thinK_reference(q[2 * h:2 * h + 2], k[h, :n], v[h, :n], st.ch_long[h], n - 32, 32 ** -0.5)
        assert torch.allclose(out[2 * h:2 * h + 2], ref, atol=1e-5)
    # the question: 3 new tokens appended (full rows), causal among themselves
    kn, vn = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    st.append(kn, vn, torch.arange(150, 153))
    q3 = torch.randn(4, 3, 32)
    out3, _ = st.attend(q3, 32 ** -0.5)
    for h, n in enumerate((150, 70)):
        kk, vv = torch.cat([k[h, :n], kn[h]]), torch.cat([v[h, :n], vn[h]])
        ref = _thinK_reference(q3[2 * h:2 * h + 2], kk, vv, st.ch_long[h], n - 32, 32 ** -0.5)
        assert torch.allclose(out3[2 * h:2 * h + 2], ref, atol=1e-5)


def test_ratio_zero_is_exactly_full_attention():
    layer, k, v = _layer(lens=(150, 70), d=32, seed=4)
    st = ThinKLayer.encode(ThinK(ratio=0.0), layer, torch.randn(4, 32, 32))
    assert st.dk == 32 and st.ch[0].tolist() == list(range(32))
    q = torch.randn(4, 1, 32)
    assert torch.equal(st.attend(q, 0.2)[0], attend(q, layer, 0.2)[0])
    m = st.materialize()
    for h in range(2):
        assert torch.equal(m.head(h)[0], layer.head(h)[0]) and torch.equal(m.head(h)[2], layer.head(h)[2])


def test_kernel_matches_reference_under_the_triton_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench import attention
        from kvbench.cache import LayerKV
        from kvbench.methods.think import ThinK, ThinKLayer
        from kvbench.methods.kernels.lowrank_decode import lowrank_decode_attention_ref, lowrank_decode_attention_triton
        g = torch.Generator().manual_seed(0)
        for ratio, lens, extra in ((0.5, [150, 90, 20], 3), (0.25, [70, 70, 70], 0), (0.0, [40, 10, 100], 1)):
            layer = LayerKV.from_dense(torch.randn(3, 150, 32, generator=g), torch.randn(3, 150, 32, generator=g),
                                       torch.arange(150))
            layer.keep([torch.arange(n) for n in lens])  # ragged heads, one shorter than the recent window
            st = ThinKLayer.encode(ThinK(ratio=ratio, recent_size=32), layer, torch.randn(6, 32, 32, generator=g))
            if extra:
                st.append(torch.randn(3, extra, 32, generator=g), torch.randn(3, extra, 32, generator=g),
                          torch.arange(150, 150 + extra))
            q = torch.randn(6, 32, generator=g)
            ref = lowrank_decode_attention_ref(q, st.parts(), 0.2)
            dense = st.attend(q.unsqueeze(1), 0.2)[0][:, 0]  # the torch path over materialize()
            assert torch.allclose(ref, dense, atol=1e-5), (ratio, (ref - dense).abs().max())
            for splits in (None, 3):
                tri = lowrank_decode_attention_triton(q, st.parts(), 0.2, num_splits=splits, block_n=16)
                assert torch.allclose(ref, tri, atol=1e-5), (ratio, splits, (ref - tri).abs().max())
            attention.DECODE_KERNEL = "triton"  # attend()'s GPU dispatch, here on the interpreter
            via = st.attend(q.unsqueeze(1), 0.2)[0][:, 0]
            attention.DECODE_KERNEL = "auto"
            assert torch.allclose(ref, via, atol=1e-5), (ratio, (ref - via).abs().max())
        # keys of dim 9 (gathered query channels) beside values of dim 16, and a part with no row at all
        q = torch.randn(4, 16, generator=g)
        ch = torch.stack([torch.randperm(16, generator=g)[:9].sort().values for _ in range(2)]).to(torch.int16)
        parts = [(torch.randn(50, 9, generator=g), torch.randn(50, 16, generator=g), torch.tensor([0, 30]),
                  torch.tensor([30, 20]), ch),
                 (torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.tensor([0, 4]),
                  torch.tensor([0, 0]), None)]
        ref = lowrank_decode_attention_ref(q, parts, 0.3)
        tri = lowrank_decode_attention_triton(q, parts, 0.3, block_n=16)
        assert torch.allclose(ref, tri, atol=1e-5), (ref - tri).abs().max()
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")  # CPU byte counts


def _run(lm, name, budget=None, n=300, new=12, query_aware=True, **knobs):
    ids = torch.randint(10, 400, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(lm, build_method(name, budget=budget, **knobs), query_aware=query_aware)
    cache, m = eng.new_cache(), eng.method.fork()
    pre = eng.prefill(cache, ids, m, compress=True)
    if not query_aware:  # the question fed on top of the compressed context
        pre = eng.prefill(cache, ids[:20], m, compress=False)
    after = (cache.nbytes(), [list(x) for x in cache.head_lengths()])
    out, _, _ = eng.decode(cache, m, pre.logits, new)
    return eng, cache, after, out, pre.logits


def test_engine_think_alone(tiny):
    _, full, (fb, flens), fout, flog = _run(tiny, "full")
    # ratio 0: every channel kept, the same logits and tokens as the full cache
    _, c0, (b0, lens0), out0, log0 = _run(tiny, "think", ratio=0.0)
    assert all(isinstance(x, ThinKLayer) for x in c0.kv) and lens0 == flens
    assert torch.equal(log0, flog) and out0 == fout
    eng, c, (kb, lens), _, _ = _run(tiny, "think")
    assert lens == flens
    # 300 tokens, d=16, fp32, ratio 0.5, R=32: per head 268 pruned rows (8-channel keys + 16-wide values), 8
    # int16 indices, 32 full rows; 2 layers x 2 KV heads
    per_head = 268 * 8 * 4 + 268 * 16 * 4 + 8 * 2 + 32 * 2 * 16 * 4
    assert kb == per_head * 2 * 2 and kb < fb
    assert eng.last_read_bytes[0] == kb + 2 * 2 * 2 * 16 * 4  # + the token being decoded, a full row


@pytest.mark.parametrize("base", ["snapkv", "pyramidkv"])
def test_engine_think_composed_with_eviction(tiny, base):
    _, plain, (pb, plens), _, _ = _run(tiny, base, budget=64, query_aware=False)
    eng, c, (tb, tlens), _, _ = _run(tiny, base, budget=64, query_aware=False, storage={"name": "think"})
    assert tlens == plens and tb < pb
    for li, layer in enumerate(c.kv):
        assert isinstance(layer, ThinKLayer)
        for h in range(2):  # the same kept tokens as the plain method, in the same order
            pos_think = layer.materialize().head(h)[2][:plens[li][h]].tolist()
            assert pos_think == plain.kv[li].head(h)[2][:plens[li][h]].tolist()
        # the question (20 tokens) and the 11 decoded ones are full rows beside the 32 recent ones
        assert layer.full.head_lengths == [32 + 20 + 11] * 2


def test_cli_pyramidkv_with_think_runs_end_to_end(tmp_path):
    exe = Path(sys.executable).with_name("kvbench")
    args = [str(exe), "run", "model=synthetic", "model.shape=tiny", "task=niah", "task.lengths=[300]",
            "task.depths=[50]", "task.max_new_tokens=4", "method=pyramidkv", "budget=64", "method.storage=think",
            "method.storage.ratio=0.25", f"results_dir={tmp_path}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for p in tmp_path.rglob("records.jsonl") for x in p.read_text().splitlines() if x]
    assert recs and all(0 < x["kv_bytes"] < x["kv_bytes_full"] for x in recs)
    cfg = next(tmp_path.rglob("config.yaml")).read_text()
    assert "think" in cfg and "0.25" in cfg


def test_bad_knobs_are_one_line():
    with pytest.raises(ValueError, match=r"^method.storage.ratio=1.0; allowed: 0 <= ratio < 1"):
        build_method("snapkv", budget=64, storage={"name": "think", "ratio": 1.0})
    with pytest.raises(ValueError, match=r"^method.ratio=-0.1; allowed: 0 <= ratio < 1"):
        build_method("think", ratio=-0.1)
    with pytest.raises(ValueError, match=r"^method.storage.recent_size=-1; allowed: an integer >= 0"):
        build_method("pyramidkv", budget=64, storage={"name": "think", "recent_size": -1})
    with pytest.raises(ValueError, match=r"^method=think is the think storage itself"):
        build_method("think", storage="kivi")
    with pytest.raises(ValueError, match=r"^method=h2o scores or evicts rows while decoding"):
        build_method("h2o", budget=64, storage="think")
