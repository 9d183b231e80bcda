"""DuoAttention, RazorAttention, FastGen and `kvbench profile` on the tiny random Llama (2 layers, 4 query /
2 KV heads, d=16). Every kept set is checked against a slow reference computed here from the full cache or
from attention probabilities recomputed independently; profiles against hand-worked cases."""
import json
import math

import pytest
import torch

from kvbench.engine import Engine
from kvbench.methods import _profiles
from kvbench.methods.duoattention import DuoAttention, gated_attention
from kvbench.methods.fastgen import FastGen, choose, policy_masks, recoveries, token_classes
from kvbench.methods.razorattention import RazorAttention, echo_induction_scores, head_scores, random_repeats
from kvbench.profile import profile_main

D = 16
BYTES_PER_ROW = D * 2 * 4  # key + value, fp32


@pytest.fixture(scope="module")
def lm():
    from kvbench.models import load_model
    return load_model("synthetic", shape="tiny")


@pytest.fixture(scope="module")
def prompt(lm):
    """60 token ids with a few special and punctuation tokens (FastGen's cheap policies need them)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (60,), generator=g).tolist()
    special, punct = token_classes(lm.tokenizer)
    sp, pu = sorted(special)[:2], sorted(punct)[:3]
    ids[0], ids[30] = sp[0], sp[1]
    for p, t in zip((7, 19, 44, 52), pu + pu):
        ids[p] = t
    return ids


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("KVBENCH_PROFILES", raising=False)


def full_cache(lm, ids):
    eng = Engine(lm, None)
    cache = eng.new_cache()
    eng.prefill(cache, ids, None, compress=False)
    return cache


def compress(lm, method, ids):
    eng = Engine(lm, method)
    cache = eng.new_cache()
    pre = eng.prefill(cache, ids, method, compress=True)
    return eng, cache, pre


def head_rows(cache, layer, h):
    k, v, p = cache.layer(layer).head(h)
    return k, v, p.tolist()


# -- shared rule ----------------------------------------------------------------------------------------
def test_streaming_length_rule_hand_worked():
    # (R·n + (N−R)·s)/N = target: n=100, N=4
    assert _profiles.streaming_length(100, 4, 1, 40, 2) == 20       # (160 − 100)/3
    assert _profiles.streaming_length(100, 4, 0, 40, 2) == 40
    assert _profiles.streaming_length(100, 4, 2, 40, 2) == 2        # (160 − 200)/2 < 0 → the minimum
    assert _profiles.streaming_length(100, 4, 4, 40, 2) == 100      # every head is a retrieval head
    assert _profiles.sink_recent_indices(10, 2, 3).tolist() == [0, 1, 7, 8, 9]


# -- DuoAttention ---------------------------------------------------------------------------------------
def test_gated_attention_matches_slow_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    gates = torch.tensor([[0.25, 1.0]])
    sink, recent, scale = 2, 3, 8 ** -0.5

    class Mod:
        layer_idx = 0
    out = gated_attention(gates, sink, recent)(Mod(), q, k, v, None, scaling=scale)[0]  # (1, q, n_q, d)
    ref = torch.zeros(1, 10, 4, 8)
    for h in range(4):
        kv = h // 2
        a = float(gates[0, kv])
        for i in range(10):
            def attend(visible):
                s = torch.tensor([float(q[0, h, i] @ k[0, kv, j]) * scale for j in visible])
                p = torch.softmax(s, 0)
                return sum(p[t] * v[0, kv, j] for t, j in enumerate(visible))
            full = attend(list(range(i + 1)))
            stream = attend([j for j in range(i + 1) if j < sink or i - j < recent])
            ref[0, i, h] = a * full + (1 - a) * stream
    assert torch.allclose(out, ref, atol=1e-5)


def test_duoattention_keeps_promised_and_rolls(lm, prompt):
    m = DuoAttention(budget=40, sparsity=0.5)
    m._entry = {"data": {"gates": [[0.9, 0.1], [0.2, 0.8]]}}   # retrieval heads: (0, 0) and (1, 1)
    full = full_cache(lm, prompt)
    eng, cache, pre = compress(lm, m, prompt)
    # s = (4·40 − 2·60)/2 = 20 tokens per streaming head; sinks = round(20·128/384) = 7, recent 13
    assert cache.head_lengths() == [[60, 20], [20, 60]]
    assert sum(sum(x) for x in cache.head_lengths()) / 4 == 40
    stream_pos = list(range(7)) + list(range(47, 60))
    for layer, h in ((0, 1), (1, 0)):
        k, v, pos = head_rows(cache, layer, h)
        assert pos == stream_pos
        fk, fv, _ = full.layer(layer).head(h)
        assert torch.equal(k, fk[stream_pos]) and torch.equal(v, fv[stream_pos])
    for layer, h in ((0, 0), (1, 1)):
        assert head_rows(cache, layer, h)[2] == list(range(60))
    assert cache.nbytes() == 160 * BYTES_PER_ROW == cache.allocated_bytes()
    # decoding: streaming heads keep their 20 rows (oldest non-sink leaves), retrieval heads grow
    out, _, _ = eng.decode(cache, m, pre.logits, 4)
    steps = len(out) - 1
    assert cache.head_lengths() == [[60 + steps, 20], [20, 60 + steps]]
    assert sorted(head_rows(cache, 0, 1)[2]) == list(range(7)) + list(range(47 + steps, 60 + steps))


def test_duoattention_demotes_retrieval_heads_to_fit_budget(lm, prompt):
    gates = [[0.9, 0.1], [0.2, 0.8]]
    # budget 30, floor 15: with 2 retrieval heads s = (120 − 120)/2 = 0 < 15 → demote the lower gate (1, 1);
    # with 1: s = (120 − 60)/3 = 20 ≥ 15 → heads (0, 0) full, the rest 20 rows (mean 30)
    m = DuoAttention(budget=30, sparsity=0.5)
    m._entry = {"data": {"gates": gates}}
    _, cache, _ = compress(lm, m, prompt)
    assert cache.head_lengths() == [[60, 20], [20, 20]]
    # min_stream_frac=0: the profile's set stays, streaming heads fall to 2 rows and the mean (31) exceeds 30
    m = DuoAttention(budget=30, sparsity=0.5, min_stream_frac=0.0)
    m._entry = {"data": {"gates": gates}}
    _, cache, _ = compress(lm, m, prompt)
    assert cache.head_lengths() == [[60, 2], [2, 60]]
    assert head_rows(cache, 0, 1)[2] == [0, 59]


def test_duoattention_no_budget_uses_paper_window(lm, prompt):
    m = DuoAttention(sparsity=0.5, sink_size=4, recent_size=8)
    m._entry = {"data": {"gates": [[0.9, 0.1], [0.2, 0.8]]}}
    _, cache, _ = compress(lm, m, prompt)
    assert cache.head_lengths() == [[60, 12], [12, 60]]
    assert head_rows(cache, 0, 1)[2] == [0, 1, 2, 3] + list(range(52, 60))


def test_duo_profile_cli_hand_worked_and_cached(lm, prompt, tmp_path, capsys, monkeypatch):
    # train_recent covers every sample, so streaming == full attention: the distillation term is 0 and only
    # the L1 term acts; its gradient has the same sign every step, so AdamW moves each gate by exactly lr.
    args = ["method=duoattention", "model=synthetic", "model.shape=tiny", "train_steps=5", "train_len=40",
            "train_samples=2", "train_sink=4", "train_recent=4096", f"profile_dir={tmp_path}"]
    before = _profiles.COMPUTED["duoattention"]
    assert profile_main(args) == 0
    out = capsys.readouterr().out
    assert "computed in" in out and "tokens processed" in out
    path = tmp_path / "synthetic-tiny" / "duoattention.json"
    assert path.exists() and _profiles.COMPUTED["duoattention"] == before + 1
    entry = next(iter(json.loads(path.read_text())["entries"].values()))
    gates = torch.tensor(entry["data"]["gates"])
    assert gates.shape == (2, 2)
    assert torch.allclose(gates, torch.full((2, 2), 1 - 5 * 0.02), atol=1e-4)
    assert entry["cost"]["tokens"] > 0 and entry["cost"]["wall_s"] > 0
    mtime = path.stat().st_mtime_ns

    # second call: loaded, not recomputed
    monkeypatch.setattr(DuoAttention, "compute_profile", lambda self, lm: pytest.fail("recomputed"))
    assert profile_main(args) == 0
    assert "loaded from" in capsys.readouterr().out
    assert _profiles.COMPUTED["duoattention"] == before + 1 and path.stat().st_mtime_ns == mtime

    # a run without prepare() finds the same profile from the layer-0 attention module's fingerprint
    m = DuoAttention(budget=40, train_steps=5, train_len=40, train_samples=2, train_sink=4, train_recent=4096,
                     profile_dir=str(tmp_path))
    _, cache, _ = compress(lm, m, prompt)
    assert m._entry["data"]["gates"] == entry["data"]["gates"]
    # equal gates: top_heads keeps the first two in flat order → (0, 0), (0, 1) are retrieval heads
    assert cache.head_lengths() == [[60, 60], [20, 20]]


def test_profile_bad_input(lm, capsys, tmp_path):
    assert profile_main(["method=snapkv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "snapkv" in err and "duoattention" in err
    assert profile_main(["oops"]) == 2
    assert profile_main(["method=duoattention", "model=synthetic", "model.shape=nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert profile_main(["method=duoattention", "sparsity=3"]) == 2
    assert profile_main(["method=fastgen", "model=synthetic", "model.shape=tiny"]) == 2  # needs a budget
    m = DuoAttention(budget=8, profile_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="kvbench profile method=duoattention"):
        compress(lm, m, list(range(1000, 1040)))


# -- RazorAttention -------------------------------------------------------------------------------------
def test_echo_induction_scores_hand_made():
    m, L = 4, 8
    qpos = torch.arange(m, L)
    probs = torch.zeros(3, m, L)
    for r, p in enumerate(qpos.tolist()):
        probs[0, r, p - m] = 1.0          # echo head: the previous occurrence of its own token
        probs[1, r, p - m + 1] = 1.0      # induction head: the token that followed it
        probs[2, r, p - m] = 0.25         # mixed
        probs[2, r, p - m + 1] = 0.5
        probs[2, r, p] = 0.25
    echo, ind = echo_induction_scores(probs, qpos, m)
    assert echo.tolist() == [1.0, 0.0, 0.25] and ind.tolist() == [0.0, 1.0, 0.5]


def test_razor_scores_match_eager_reference(lm):
    seqs = random_repeats(lm.tokenizer, 12, 2, seed=3)
    assert all(s[:12] == s[12:] and len(set(s[:12])) == 12 for s in seqs)
    echo, ind = head_scores(lm.model, seqs, 12)
    ref_e, ref_i = torch.zeros(2, 4), torch.zeros(2, 4)
    lm.model.set_attn_implementation("eager")
    try:
        for s in seqs:
            with torch.no_grad():
                att = lm.model(input_ids=torch.tensor([s]), output_attentions=True, use_cache=False).attentions
            for layer in range(2):
                for h in range(4):
                    ref_e[layer, h] += sum(float(att[layer][0, h, p, p - 12]) for p in range(12, 24)) / 12 / 2
                    ref_i[layer, h] += sum(float(att[layer][0, h, p, p - 11]) for p in range(12, 24)) / 12 / 2
    finally:
        lm.model.set_attn_implementation("kvbench")
    assert torch.allclose(echo, ref_e, atol=1e-5) and torch.allclose(ind, ref_i, atol=1e-5)


def test_razor_keeps_promised_with_compensation(lm, prompt):
    m = RazorAttention(budget=40)
    # per KV head (max over its 2 query heads): induction L0 [0.9, 0.1], L1 [0.1, 0.3]; echo L1 [0, 0.5]
    m._entry = {"data": {"induction": [[0.9, 0.8, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3]],
                         "echo": [[0, 0, 0, 0], [0, 0, 0.5, 0]], "n_kv": 2}}
    # 4 KV heads: ceil(0.14·4) = 1 induction head (0, 0), ceil(0.01·4) = 1 echo head (1, 1)
    assert m.retrieval_mask(m._entry, 2).tolist() == [[True, False], [False, True]]
    full = full_cache(lm, prompt)
    _, cache, _ = compress(lm, m, prompt)
    # s = (4·40 − 2·60)/2 = 20 rows: 4 sinks + 15 recent + 1 compensation row
    assert cache.head_lengths() == [[60, 20], [20, 60]]
    for layer, h in ((0, 1), (1, 0)):
        k, v, pos = head_rows(cache, layer, h)
        assert pos == [0, 1, 2, 3] + list(range(45, 60)) + [-1]
        fk, fv, _ = full.layer(layer).head(h)
        kept = [0, 1, 2, 3] + list(range(45, 60))
        assert torch.equal(k[:19], fk[kept]) and torch.equal(v[:19], fv[kept])
        assert torch.allclose(k[19], fk[4:45].mean(0), atol=1e-6)
        assert torch.allclose(v[19], fv[4:45].mean(0), atol=1e-6)
        # equation 5: the compensation row weighs the 41 tokens it replaces, every other row 1
        lw = cache.layer(layer).side_head("log_weight", h)
        assert lw[19].item() == pytest.approx(math.log(41)) and not lw[:19].any()
    assert not cache.layer(0).side_head("log_weight", 0).any()
    assert head_rows(cache, 0, 0)[2] == list(range(60))
    assert cache.nbytes() == 160 * BYTES_PER_ROW == cache.allocated_bytes()


def test_razor_profile_cli(tmp_path, capsys):
    args = ["method=razorattention", "model=synthetic", "model.shape=tiny", "probe_len=16", "probe_samples=2",
            f"profile_dir={tmp_path}"]
    assert profile_main(args) == 0 and "computed in" in capsys.readouterr().out
    assert profile_main(args) == 0 and "loaded from" in capsys.readouterr().out
    entry = next(iter(json.loads((tmp_path / "synthetic-tiny" / "razorattention.json")
                                                .read_text())["entries"].values()))
    assert len(entry["data"]["echo"]) == 2 and len(entry["data"]["echo"][0]) == 4
    assert entry["cost"]["tokens"] == 2 * 32


# -- FastGen --------------------------------------------------------------------------------------------
def test_fastgen_policy_hand_made():
    probs = torch.tensor([[0.5, 0.1, 0.2, 0.0, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    ids = torch.tensor([1, 50, 13, 60, 70, 80])           # 1 special, 13 punctuation
    acc = torch.tensor([5.0, 4.0, 0.5, 0.1, 0.2, 0.3])    # heavy hitters: 0, 1
    masks = policy_masks(ids, frozenset({1}), frozenset({13}), acc, n_frequent=2, n_local=2)
    assert masks.int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                    [1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]]
    rec = recoveries(probs, masks)  # (0.5+0.3)/2, (0.7+0.4)/2, (0.8+0.7)/2, (1.0+0.9)/2, 1
    assert torch.allclose(rec, torch.tensor([0.4, 0.55, 0.75, 0.95, 1.0]))
    assert [choose(rec, t) for t in (0.3, 0.4, 0.5, 0.95, 0.96)] == [0, 0, 1, 3, 4]


def _fastgen_reference(lm, ids, window, budget, threshold):
    """Slow reference: capture post-RoPE q/k with a plain attention function, build full causal softmax
    matrices, and apply the policy rule with Python sets."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    qk = {}

    def capture(module, query, key, value, attention_mask=None, scaling=None, **kw):
        qk[module.layer_idx] = (query[0].clone(), key[0].clone(), scaling)
        return sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=True).transpose(1, 2), None
    with torch.no_grad(), _profiles.attention_override(lm.model, capture):
        lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    special, punct = token_classes(lm.tokenizer)
    L = len(ids)
    kept = {}
    for layer, (q, k, scale) in qk.items():
        for kv in range(2):
            rows = []
            acc = [0.0] * L
            for h in (2 * kv, 2 * kv + 1):
                for i in range(L):
                    p = torch.softmax(torch.tensor([float(q[h, i] @ k[kv, j]) * scale for j in range(i + 1)]), 0)
                    for j in range(i + 1):
                        acc[j] += float(p[j])
                    if i >= L - window:
                        rows.append(p.tolist() + [0.0] * (L - i - 1))
            half = budget // 2
            heavy = set(sorted(range(L), key=lambda j: -acc[j])[:half])
            sets = [{j for j in range(L) if ids[j] in special}]
            sets.append(sets[-1] | {j for j in range(L) if ids[j] in punct})
            sets.append(sets[-1] | heavy)
            sets.append(sets[-1] | set(range(L - half, L)))
            sets.append(set(range(L)))
            choice = next(s for s in sets if sum(sum(r[j] for j in s) for r in rows) / len(rows) >= threshold - 1e-6)
            kept[(layer, kv)] = sorted(choice)
    return kept


@pytest.mark.parametrize("threshold", [0.02, 0.06, 0.2, 0.3, 0.95])  # each picks a different policy here
def test_fastgen_keeps_slow_reference(lm, prompt, threshold):
    m = FastGen(budget=20, recovery=threshold, window=8)
    m.prepare(lm)
    _, cache, _ = compress(lm, m, prompt)
    ref = _fastgen_reference(lm, prompt, 8, 20, threshold)
    rows = 0
    for (layer, kv), want in ref.items():
        assert sorted(head_rows(cache, layer, kv)[2]) == want, (layer, kv, m.chosen)
        rows += len(want)
    assert cache.nbytes() == rows * BYTES_PER_ROW == cache.allocated_bytes()


def test_fastgen_needs_prepare(lm, prompt):
    with pytest.raises(ValueError, match="prepare"):
        compress(lm, FastGen(budget=20), prompt)
    with pytest.raises(ValueError, match="recovery"):
        FastGen(budget=20, recovery=1.5)


def test_fastgen_calibration_matches_real_compression(lm, tmp_path, capsys):
    args = ["method=fastgen", "model=synthetic", "model.shape=tiny", "budget=40", "calib_samples=2",
            "calib_len=64", "window=8", f"profile_dir={tmp_path}"]
    assert profile_main(args) == 0 and "computed in" in capsys.readouterr().out
    assert profile_main(args) == 0 and "loaded from" in capsys.readouterr().out
    doc = json.loads((tmp_path / "synthetic-tiny" / "fastgen.json").read_text())
    d = next(iter(doc["entries"].values()))["data"]
    kept = [s["mean_kept"] for s in d["sweep"]]
    assert kept == sorted(kept)                      # a higher T never keeps less
    fits = [s["threshold"] for s in d["sweep"] if s["mean_kept"] <= 40]
    assert d["threshold"] == (max(fits) if fits else d["sweep"][0]["threshold"])
    # the sweep's numbers are what compressing the calibration prompts with that T really keeps
    from kvbench.profile import calibration_prompts
    prompts = calibration_prompts(lm.tokenizer, 2, 64, 0)
    for s in (d["sweep"][0], d["sweep"][len(d["sweep"]) // 2], d["sweep"][-1]):
        m = FastGen(budget=40, recovery=s["threshold"], window=8)
        m.prepare(lm)
        lens = [L for p in prompts for layer in compress(lm, m, p)[1].head_lengths() for L in layer]
        assert math.isclose(sum(lens) / len(lens), s["mean_kept"], rel_tol=1e-9)
    # recovery=auto picks the calibrated threshold up
    auto = FastGen(budget=40, recovery="auto", window=8, calib_samples=2, calib_len=64, profile_dir=str(tmp_path))
    auto.prepare(lm)
    assert auto._threshold == d["threshold"]
