"""Models whose attention we implement run exactly; the others are refused, never silently wrong (issue 15).

Every supported model_type, as a tiny random model (fp32, 2 layers, sliding window 8 where the type has
one, Gemma-2's logit soft cap), gives through kvbench's engine and attention the logits transformers' eager
attention gives: a whole prefill (every row), a chunked prefill, and token-by-token decoding far past the
window (engine loop and the in-place fast-decode step). The Triton decode kernel's softcap/window equal its
torch reference under TRITON_INTERPRET=1 (in a subprocess). Unsupported models are refused by load_model and
by `kvbench run` (exit 2, one line) before anything runs; an attention sink reaching the attention raises.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench import attention
from kvbench.attention import attend, register, session
from kvbench.cache import LayerKV
from kvbench.compat import cache_kwargs
from kvbench.engine import Engine
from kvbench.fast_decode import FastDecoder
from kvbench.models import SUPPORTED_MODEL_TYPES, LoadedModel, ModelError, load_model

ROOT = Path(__file__).resolve().parents[1]
N, PREFIX, WINDOW = 40, 12, 8  # 40 tokens, decoding from 12 on: 28 steps, far past a window of 8
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
SLIDING_QWEN = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
# per model_type: what makes its attention differ from Llama's (window, soft cap, alternating layers)
EXTRA = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=0),
    "qwen2": SLIDING_QWEN,  # layer 1 slides (i >= max_window_layers), layer 0 attends to everything
    "qwen3": SLIDING_QWEN,
    # Qwen2-MoE masks its sliding layers without passing the window to the attention function
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                      shared_expert_intermediate_size=32, **MOE),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW, **MOE),
    "gemma": {},
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=16),  # a small cap so that it bites on random weights
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=16),
}
assert set(EXTRA) == set(SUPPORTED_MODEL_TYPES)


def tiny_model(model_type: str, seed: int = 0, **extra) -> LoadedModel:
    """A random fp32 model of this type with eager attention (the reference); see `use_kvbench`."""
    # weights of std 0.1 (not 0.02): attention scores of a few units, so the soft cap and every key of the
    # window move the logits well above the tolerance (at 0.02 the cap changed them by 1e-5)
    kw = {**SHAPE, "initializer_range": 0.1, **EXTRA.get(model_type, {}), **extra}
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # init leaves norms and biases at constants: perturb them too, so each one counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tok = SimpleNamespace(eos_token_id=None, chat_template=None)  # the engine's loop never tokenizes here
    return LoadedModel(model, tok, model_type, torch.device("cpu"), torch.float32, 256)


def use_kvbench(lm: LoadedModel) -> None:
    register()
    lm.model.set_attn_implementation("kvbench")


def random_ids(n=N, seed=0):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def eager_logits(lm: LoadedModel, ids) -> torch.Tensor:
    """Transformers' own answer: one forward of the whole sequence, eager attention with its masks."""
    return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@torch.inference_mode()
def kvbench_prefill_logits(eng: Engine, ids) -> torch.Tensor:
    """Every row's logits of a prefill through kvbench's cache and attention (the engine keeps only the last)."""
    cache = eng.new_cache()
    pos = torch.arange(len(ids))
    cache.next_positions = pos
    with session(cache, None, "prefill"):
        out = eng.model(input_ids=torch.tensor([ids]), **cache_kwargs(eng.model, cache, pos), use_cache=True)
    return out.logits[0]


def assert_close(got, want, what):
    err = float((got - want).abs().max())
    assert err < 1e-4, f"{what}: max abs error {err:.2e}"


# -- supported models: kvbench == eager ------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_supported_model_matches_eager(model_type):
    lm = tiny_model(model_type)
    ids = random_ids()
    ref = eager_logits(lm, ids)
    use_kvbench(lm)
    eng = Engine(lm, None)
    assert_close(kvbench_prefill_logits(eng, ids), ref, "prefill, every row")
    # chunked prefill (rows on top of a cache: causal and window offsets), then one token at a time
    chunked = Engine(lm, None, prefill_chunk=5)
    cache = chunked.new_cache()
    assert_close(chunked.prefill(cache, ids[:PREFIX], None, compress=False).logits, ref[PREFIX - 1], "chunked")
    for i in range(PREFIX, N):
        logits, _ = chunked._forward(cache, [ids[i]], None, "decode")
        assert_close(logits, ref[i], f"decode step at position {i}")


def eager_then_prefilled(model_type: str, start: int):
    """A tiny model of this type, a random sequence, transformers' eager logits of it, and kvbench's cache
    prefilled with its first `start` tokens (for a decode step to go on from)."""
    lm = tiny_model(model_type)
    ids = random_ids(seed=1)
    ref = eager_logits(lm, ids)
    use_kvbench(lm)
    eng = Engine(lm, None)
    cache = eng.new_cache()
    eng.prefill(cache, ids[:start], None, compress=False)
    return lm, ids, ref, cache


@pytest.mark.parametrize("model_type", ["gemma2", "qwen2_moe", "mistral"])
def test_fast_decode_step_matches_eager(model_type):
    """The in-place decode step (the CUDA-graph path, run eagerly on CPU) applies the window and softcap."""
    lm, ids, ref, cache = eager_then_prefilled(model_type, PREFIX)
    fd = FastDecoder(lm.model, cache, N - PREFIX, use_graph=False)
    with torch.inference_mode():
        for i in range(PREFIX, N):
            fd.ids.fill_(ids[i])  # teacher forcing: feed the sequence's token, not the argmax
            fd._run_one()
            assert_close(fd.logits, ref[i], f"fast decode step at position {i}")
    fd.finish()
    assert cache.seen_tokens == N


# -- the attention itself on an evicted, reordered cache -------------------------------------------------
def naive_attention(q, heads, scaling, window, softcap):
    """Position by position, in float64: query (n_q, m, d) at the last m positions of `heads`
    [(keys, values, positions)], a key visible iff q_pos - window < k_pos <= q_pos."""
    n_q, m, d = q.shape
    g = n_q // len(heads)
    out = torch.zeros(n_q, m, d, dtype=torch.float64)
    probs = [torch.zeros(len(p), dtype=torch.float64) for _, _, p in heads]
    for j in range(n_q):
        k, v, pos = (t.double() for t in heads[j // g])
        q_pos = pos.max() - (m - 1)
        for i in range(m):
            s = k @ q[j, i].double() * scaling
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            see = pos <= q_pos + i
            if window is not None:
                see &= pos > q_pos + i - window
            p = torch.softmax(s.masked_fill(~see, float("-inf")), 0)
            out[j, i] = p @ v
            probs[j // g] += p
    return out, probs


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("window,softcap", [(8, None), (None, 5.0), (8, 5.0), (None, None)])
def test_attend_window_softcap_on_a_reordered_cache(uniform, window, softcap):
    """Rows evicted per head and stored out of position order: the window follows positions, not rows."""
    g = torch.Generator().manual_seed(0)
    h, grp, n, d, m = 2, 3, 30, 16, 3
    layer = LayerKV.from_dense(torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g), torch.arange(n))
    counts = [20, 20] if uniform else [20, 13]
    order = [torch.randperm(n, generator=g)[:c] for c in counts]  # kept rows, shuffled
    layer.keep_ragged(torch.cat(order), counts)
    assert layer.is_uniform() == uniform
    layer.append(torch.randn(h, m, d, generator=g), torch.randn(h, m, d, generator=g), torch.arange(n, n + m))
    heads = [layer.head(j) for j in range(h)]
    q = torch.randn(h * grp, m, d, generator=g)
    out, _ = attend(q, layer, 0.3, window=window, softcap=softcap)  # m = 3 new rows: the prefill path
    want, _ = naive_attention(q, heads, 0.3, window, softcap)
    assert (out.double() - want).abs().max() < 1e-5
    # decode (one new row), with the per-head probabilities H2O/TOVA read
    layer.append(torch.randn(h, 1, d, generator=g), torch.randn(h, 1, d, generator=g), torch.tensor([n + m]))
    q1 = torch.randn(h * grp, 1, d, generator=g)
    for need in (False, True):
        out, probs = attend(q1, layer, 0.3, need_probs=need, window=window, softcap=softcap)
        want, want_p = naive_attention(q1, [layer.head(j) for j in range(h)], 0.3, window, softcap)
        assert (out.double() - want).abs().max() < 1e-5
        if need:
            for a, b in zip(probs, want_p):
                assert (a.double() - b).abs().max() < 1e-5
    if window is not None:  # rows outside the window get exactly nothing
        pos0 = layer.head(0)[2]
        assert float(probs[0][pos0 <= n + m - window].abs().max()) == 0.0


def test_decode_reference_window_softcap_matches_naive():
    """The kernel's torch reference (the CPU fast-decode path) on a flat-packed cache with gaps."""
    from kvbench.methods.kernels import ragged_decode_attention_ref
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(60, 16, generator=g), torch.randn(60, 16, generator=g)
    positions = torch.randperm(60, generator=g)
    starts, lengths = torch.tensor([2, 30]), torch.tensor([25, 17])
    q = torch.randn(4, 16, generator=g)
    q_pos = torch.tensor([int(positions.max())])
    out, probs = ragged_decode_attention_ref(q, keys, values, starts, lengths, 0.25, return_probs=True,
                                             softcap=4.0, window=20, positions=positions, q_pos=q_pos)
    for h, (a, n) in enumerate([(2, 25), (30, 17)]):
        k, v, pos = keys[a:a + n], values[a:a + n], positions[a:a + n]
        s = 4.0 * torch.tanh(q[2 * h:2 * h + 2] @ k.T * 0.25 / 4.0)
        p = torch.softmax(s.masked_fill(pos <= q_pos - 20, float("-inf")), -1)
        assert (out[2 * h:2 * h + 2] - p @ v).abs().max() < 1e-5
        assert (probs[a:a + n] - p.sum(0)).abs().max() < 1e-5


_TRITON = textwrap.dedent("""
    import torch
    from transformers import AutoConfig
    from kvbench import attention
    from kvbench.methods.kernels import ragged_decode_attention_ref, ragged_decode_attention_triton
    g = torch.Generator().manual_seed(0)
    d = 32
    for lens, grp in (([1, 37, 0, 100], 4), ([64, 64], 1)):
        starts, row = [], 3
        for n in lens:
            starts.append(row); row += n + 5
        keys, values = torch.randn(row, d, generator=g), torch.randn(row, d, generator=g)
        positions = torch.randperm(row, generator=g)       # rows out of position order
        starts, lengths = torch.tensor(starts), torch.tensor(lens)
        q = torch.randn(len(lens) * grp, d, generator=g) * 3
        q_pos = torch.tensor([row - 1])
        for softcap, window in ((None, None), (2.0, None), (None, 50), (2.0, 50), (None, 1)):
            opts = dict(softcap=softcap, window=window, positions=positions, q_pos=q_pos)
            want = ragged_decode_attention_ref(q, keys, values, starts, lengths, 0.2, **opts)
            for splits, block in ((None, 64), (3, 16)):
                got = ragged_decode_attention_triton(q, keys, values, starts, lengths, 0.2, num_splits=splits,
                                                     block_n=block, **opts)
                err = float((got - want).abs().max())
                assert err < 1e-4, (lens, softcap, window, splits, err)
    print("KERNEL_OK")
""")


def _interpret(script: str, marker: str):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert marker in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_triton_decode_softcap_window_matches_reference():
    """The Triton kernel (interpreted on CPU) with softcap and a position window equals its torch reference,
    including heads that see nothing in some splits and window 1 (only the token itself)."""
    _interpret(_TRITON, "KERNEL_OK")


_TRITON_MODEL = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from test_attention_models import tiny_model, use_kvbench, eager_logits, random_ids, N, PREFIX
    from kvbench import attention
    from kvbench.engine import Engine
    from kvbench.fast_decode import FastDecoder
    attention.DECODE_KERNEL = "triton"
    lm = tiny_model("gemma2")
    ids = random_ids()
    ref = eager_logits(lm, ids)
    use_kvbench(lm)
    eng = Engine(lm, None)
    c1, c2 = eng.new_cache(), eng.new_cache()
    eng.prefill(c1, ids[:PREFIX], None, compress=False)
    eng.prefill(c2, ids[:PREFIX], None, compress=False)
    fd = FastDecoder(lm.model, c2, N - PREFIX, use_graph=False)
    with torch.inference_mode():
        for i in range(PREFIX, N):
            logits, _ = eng._forward(c1, [ids[i]], None, "decode")
            fd.ids.fill_(ids[i]); fd._run_one()
            for got in (logits, fd.logits):
                assert float((got - ref[i]).abs().max()) < 1e-4, i
    print("MODEL_OK")
""")


def test_triton_decode_path_of_gemma2_matches_eager():
    """Gemma-2 (softcap + window) decoded through the Triton kernel: engine loop and in-place step."""
    _interpret(_TRITON_MODEL, "MODEL_OK")


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enough to reach `attend`'s GPU-only flash shortcut on CPU."""
    @property
    def is_cuda(self):
        return True


def test_flash_shortcut_is_not_taken_with_window_or_softcap(monkeypatch):
    """A fresh prefill on CUDA uses SDPA's is_causal shortcut (no mask): never with a window or a softcap."""
    calls = []
    real = attention.F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw.get("is_causal", False))
        return real(*a, **kw)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention, "DECODE_KERNEL", "ref")
    layer = LayerKV.from_dense(torch.randn(2, 10, 16), torch.randn(2, 10, 16), torch.arange(10))
    q = torch.randn(4, 10, 16)
    attend(q.as_subclass(_ClaimsCuda), layer, 0.25)
    assert calls == [True]  # the spy sees the shortcut when nothing forbids it
    for window, softcap in ((8, None), (None, 5.0)):
        calls.clear()
        out, _ = attend(q.as_subclass(_ClaimsCuda), layer, 0.25, window=window, softcap=softcap)
        assert True not in calls
        want, _ = naive_attention(q, [layer.head(j) for j in range(2)], 0.25, window, softcap)
        assert (out.as_subclass(torch.Tensor).double() - want).abs().max() < 1e-5


# -- unsupported models are refused -----------------------------------------------------------------------
def _save_config(tmp_path: Path, model_type: str, **extra) -> Path:
    d = tmp_path / model_type
    d.mkdir()
    if model_type == "made_up_lm":
        (d / "config.json").write_text(json.dumps({"model_type": "made_up_lm", "hidden_size": 64}))
    else:
        AutoConfig.for_model(model_type, **SHAPE, **extra).save_pretrained(d)
    return d


@pytest.mark.parametrize("model_type,extra,words", [
    ("gpt_oss", {}, ["'gpt_oss'", "llama", "gemma2", "qwen3_moe"]),
    ("made_up_lm", {}, ["'made_up_lm'", "llama", "mistral"]),
    ("gemma3_text", dict(use_bidirectional_attention=True), ["use_bidirectional_attention", "causal"]),
])
def test_load_model_refuses_unsupported_models(tmp_path, model_type, extra, words):
    d = _save_config(tmp_path, model_type, **extra)
    with pytest.raises(ModelError) as e:
        load_model(name=str(d), device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_attention_sinks_reaching_the_attention_raise():
    """gpt-oss passes its sinks as `s_aux`: kvbench's attention refuses them, it never drops them."""
    config = AutoConfig.for_model("gpt_oss", **SHAPE, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lm = LoadedModel(model, SimpleNamespace(eos_token_id=None, chat_template=None), "gpt_oss",
                     torch.device("cpu"), torch.float32, 256)
    use_kvbench(lm)
    eng = Engine(lm, None)
    with pytest.raises(ValueError, match="s_aux"):
        eng.prefill(eng.new_cache(), random_ids(10), None, compress=False)


def test_cli_refuses_a_local_unsupported_model_before_running(tmp_path):
    exe = Path(sys.executable).with_name("kvbench")
    exe = str(exe) if exe.exists() else shutil.which("kvbench")
    d = _save_config(tmp_path, "gpt_oss")
    out = subprocess.run([exe, "run", "model=hf", f"model.name={d}", "task=niah", "task.lengths=[300]",
                          "task.depths=[50]", "task.max_new_tokens=4", f"results_dir={tmp_path / 'res'}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kvbench: error: ") and "'gpt_oss'" in lines[0] and "llama" in lines[0]
    assert str(d) in lines[0]
    assert not (tmp_path / "res").exists()
