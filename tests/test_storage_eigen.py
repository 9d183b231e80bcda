"""Eigen Attention storage (methods/eigen_attention.py) against references written here from the paper
(2408.05646: bases = principal directions of the calibration keys / values, attention in the rank-r space) and
the official code's layout (github.com/UtkarshSaxena1/EigenAttn: key basis per layer, value basis per KV head),
a torch.linalg SVD of independently captured calibration keys, hand-counted bytes, the lowrank_decode Triton
kernel under the interpreter, and end-to-end engine / CLI runs."""
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvbench.attention import attend
from kvbench.cache import LayerKV
from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.methods import _profiles
from kvbench.methods.eigen_attention import EigenAttention, EigenLayer, calibrate
from kvbench.models import load_model
from kvbench.profile import calibration_prompts, run_profile


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")  # CPU byte counts


def _orthonormal(*shape, seed=0):
    """Random orthonormal d x d matrices (..., d, d)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0].float()


def _layer(lens=(120, 120), d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lens)
    k, v = torch.randn(len(lens), n, d, generator=g), torch.randn(len(lens), n, d, generator=g)
    layer = LayerKV.from_dense(k, v, torch.arange(n))
    if len(set(lens)) > 1:
        layer.keep([torch.arange(x) for x in lens])
    return layer, k, v


def _fmt(rank, n_kv=2, d=16, n_layers=1, seed=0):
    fmt = EigenAttention(rank=rank)
    fmt.use_bases({"key_basis": _orthonormal(n_layers, d, d, seed=seed),
                   "value_basis": _orthonormal(n_layers, n_kv, d, d, seed=seed + 1)})
    return fmt


def test_pca_basis_equals_linalg_svd_of_the_calibration_keys(tiny):
    prompts = calibration_prompts(tiny.tokenizer, 2, 96, 0)
    got = calibrate(tiny.model, prompts, tiny.device)
    # capture the same post-RoPE keys / values independently (what attention receives), then SVD them
    seen = {}

    def grab(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kw):
        seen.setdefault(module.layer_idx, []).append((key[0].clone(), value[0].clone()))
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    with _profiles.attention_override(tiny.model, grab), torch.inference_mode():
        for ids in prompts:
            tiny.model(input_ids=torch.tensor([ids]), use_cache=False)
    for li, kvs in seen.items():
        K = torch.cat([k.reshape(-1, k.shape[-1]) for k, _ in kvs]).double()  # every KV head's keys stacked
        _, S, Vh = torch.linalg.svd(K, full_matrices=False)
        assert torch.allclose(got["key_eigvals"][li].double(), S ** 2, rtol=1e-4, atol=1e-6)
        for r in (2, 8, 12):  # the rank-r subspace (sign-free: the projector)
            B = got["key_basis"][li, :, :r].double()
            assert torch.allclose(B @ B.T, Vh[:r].T @ Vh[:r], atol=1e-4), (li, r)
        for h in range(kvs[0][1].shape[0]):  # values: one basis per KV head
            V = torch.cat([v[h] for _, v in kvs]).double()
            _, S, Vh = torch.linalg.svd(V, full_matrices=False)
            assert torch.allclose(got["value_eigvals"][li, h].double(), S ** 2, rtol=1e-4, atol=1e-6)
            B = got["value_basis"][li, h, :, :8].double()
            assert torch.allclose(B @ B.T, Vh[:8].T @ Vh[:8], atol=1e-4), (li, h)
        basis = got["key_basis"][li].double()
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-5)


def test_reconstruction_error_is_the_dropped_energy():
    # bases calibrated on the layer's own keys: ||K - K P P^T||_F^2 = sum of the eigenvalues beyond rank r
    layer, k, v = _layer(d=16, seed=2)
    keys = k.reshape(-1, 16).double()
    ev, evec = torch.linalg.eigh(keys.T @ keys)
    vb = torch.stack([torch.linalg.eigh(v[h].double().T @ v[h].double())[1].flip(-1) for h in range(2)])
    fmt = EigenAttention(rank=6)
    fmt.use_bases({"key_basis": evec.flip(-1).unsqueeze(0), "value_basis": vb.unsqueeze(0)})
    st = fmt.encode(layer, 0, 1)
    rec = st.materialize()
    err = sum(float((rec.head(h)[0].double() - k[h].double()).pow(2).sum()) for h in range(2))
    assert err == pytest.approx(float(ev.flip(0)[6:].sum()), rel=1e-4)


def test_stored_bytes_are_the_formats_size():
    layer, _, _ = _layer(lens=(120, 50), d=16)
    st = _fmt(rank=6).encode(layer, 0, 1)
    assert st.nbytes() == (120 + 50) * 6 * 2 * 4  # rank-6 keys and values, fp32; the bases are per-model
    before = st.nbytes()
    st.append(torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.arange(120, 123))  # projected on append
    assert st.nbytes() == before + 2 * 3 * 6 * 2 * 4 and st.head_lengths == [123, 53]
    assert st.read_bytes(1) == st.nbytes() + 2 * 6 * 2 * 4


def _lowrank_reference(q, k, v, pk, pv, scaling):
    """Dense fp32 Eigen Attention of one KV head's query group q (g, m, d): softmax((q P_k)(K P_k)^T s) (V P_v) P_v^T,
    causal over the last m rows."""
    s = (q @ pk) @ (k @ pk).T * scaling
    m, n = q.shape[1], k.shape[0]
    if m > 1:
        s = s.masked_fill(torch.arange(n).view(1, n) > torch.arange(n - m, n).view(m, 1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ (v @ pv)) @ pv.T


@pytest.mark.parametrize("rank", [5, 16])
def test_attention_equals_dense_fp32_reference(rank):
    layer, k, v = _layer(lens=(120, 50), d=16, seed=3)
    fmt = _fmt(rank)
    st = fmt.encode(layer, 0, 1)
    pk, pv = fmt.projections(0, "cpu")
    q = torch.randn(4, 1, 16)
    out, _ = st.attend(q, 0.25)
    kn, vn = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    for h, n in enumerate((120, 50)):
        ref = _lowrank_reference(q[2 * h:2 * h + 2], k[h, :n], v[h, :n], pk, pv[h], 0.25)
        assert torch.allclose(out[2 * h:2 * h + 2], ref, atol=1e-5)
    if rank == 16:  # rank = head_dim: full attention up to float error
        assert torch.allclose(out, attend(q, layer, 0.25)[0], atol=1e-5)
        full = layer.clone()
        full.append(kn, vn, torch.arange(120, 123))
    st.append(kn, vn, torch.arange(120, 123))
    q3 = torch.randn(4, 3, 16)
    out3, _ = st.attend(q3, 0.25)
    for h, n in enumerate((120, 50)):
        kk, vv = torch.cat([k[h, :n], kn[h]]), torch.cat([v[h, :n], vn[h]])
        ref = _lowrank_reference(q3[2 * h:2 * h + 2], kk, vv, pk, pv[h], 0.25)
        assert torch.allclose(out3[2 * h:2 * h + 2], ref, atol=1e-5)
    if rank == 16:
        assert torch.allclose(out3, attend(q3, full, 0.25)[0], atol=1e-5)
    # the reference path over the reconstructed rows says the same
    assert torch.allclose(out3, attend(q3, st.materialize(), 0.25)[0], atol=1e-5)


def test_kernel_matches_reference_under_the_triton_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from kvbench import attention
        from kvbench.cache import LayerKV
        from kvbench.methods.eigen_attention import EigenAttention
        from kvbench.methods.kernels.lowrank_decode import lowrank_decode_attention_ref, lowrank_decode_attention_triton
        g = torch.Generator().manual_seed(0)
        for rank, lens in ((8, [150, 90, 20]), (12, [70, 0, 70]), (32, [5, 60, 33])):
            layer = LayerKV.from_dense(torch.randn(3, 150, 32, generator=g), torch.randn(3, 150, 32, generator=g),
                                       torch.arange(150))
            layer.keep([torch.arange(n) for n in lens])
            fmt = EigenAttention(rank=rank)
            fmt.use_bases({"key_basis": torch.linalg.qr(torch.randn(1, 32, 32, generator=g))[0],
                           "value_basis": torch.linalg.qr(torch.randn(1, 3, 32, 32, generator=g))[0]})
            st = fmt.encode(layer, 0, 1)
            st.append(torch.randn(3, 2, 32, generator=g), torch.randn(3, 2, 32, generator=g), torch.arange(150, 152))
            q = torch.randn(6, 32, generator=g)
            qp = q @ st.pk
            r = st.rows
            parts = [(r.keys, r.values, r.starts, r.lengths, None)]  # DK = DV = rank, spare rows in the buffer
            ref = lowrank_decode_attention_ref(qp, parts, 0.2)
            for splits in (None, 3):
                tri = lowrank_decode_attention_triton(qp, parts, 0.2, num_splits=splits, block_n=16)
                assert torch.allclose(ref, tri, atol=1e-5), (rank, splits, (ref - tri).abs().max())
            torch_path = st.attend(q.unsqueeze(1), 0.2)[0]  # projected rows through kvbench.attention.attend
            attention.DECODE_KERNEL = "triton"  # attend()'s GPU dispatch, here on the interpreter
            via = st.attend(q.unsqueeze(1), 0.2)[0]
            attention.DECODE_KERNEL = "auto"
            assert torch.allclose(via, torch_path, atol=1e-5), (rank, (via - torch_path).abs().max())
            assert torch.allclose(via, st._lift(ref.unsqueeze(1)), atol=1e-5), rank
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


CAL = {"calib_samples": 2, "calib_len": 128}


def _run(lm, name, budget=None, n=300, new=12, **knobs):
    ids = torch.randint(10, 400, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(lm, build_method(name, budget=budget, **knobs), query_aware=True)
    cache, m = eng.new_cache(), eng.method.fork()
    pre = eng.prefill(cache, ids, m, compress=True)
    after = (cache.nbytes(), [list(x) for x in cache.head_lengths()])
    out, _, _ = eng.decode(cache, m, pre.logits, new)
    return eng, cache, after, out, pre.logits


def test_engine_eigen_alone_and_composed_with_snapkv(tiny):
    computed = _profiles.COMPUTED["eigen_attention"]
    _, full, (fb, flens), fout, flog = _run(tiny, "full")
    # rank = head_dim: the same logits as the full cache up to float error, the same tokens
    _, c16, (b16, l16), out16, log16 = _run(tiny, "eigen_attention", rank=16, **CAL)
    assert all(isinstance(x, EigenLayer) for x in c16.kv) and l16 == flens and b16 == fb
    assert torch.allclose(log16, flog, atol=1e-4) and out16 == fout
    eng, c8, (b8, l8), _, _ = _run(tiny, "eigen_attention", rank=8, **CAL)
    assert l8 == flens and b8 == 2 * 2 * 300 * 8 * 2 * 4  # 2 layers x 2 KV heads x 300 rows, rank-8 K and V, fp32
    assert eng.last_read_bytes[0] == b8 + 2 * 2 * 8 * 2 * 4  # + the token being decoded, projected
    # eviction x low rank: the same kept tokens as plain snapkv, at rank 8
    _, plain, (pb, plens), _, _ = _run(tiny, "snapkv", budget=64)
    _, sk, (sb, slens), _, _ = _run(tiny, "snapkv", budget=64, storage={"name": "eigen_attention", "rank": 8, **CAL})
    assert slens == plens and sb == pb // 2
    for li in range(len(sk.kv)):
        for h in range(2):
            assert sk.kv[li].rows.head(h)[2][:64].tolist() == plain.kv[li].head(h)[2][:64].tolist()
    # the bases were computed once for this model, then read back from the profile cache
    assert _profiles.COMPUTED["eigen_attention"] == computed + 1


def test_profile_command_computes_then_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_PROFILES", str(tmp_path))
    args = {"method": "eigen_attention", "model": "synthetic", "model.shape": "tiny", "rank": 8, **CAL}
    out = io.StringIO()
    first = run_profile(dict(args), out=out)
    second = run_profile({**args, "rank": 4}, out=out)  # another rank reuses the same sorted bases
    assert not first["cached"] and second["cached"] and "computed" in out.getvalue() and "loaded" in out.getvalue()
    assert list(tmp_path.rglob("eigen_attention.*.pt")) and list(tmp_path.rglob("eigen_attention.json"))
    t1, t2 = first["entry"]["data"]["tensors"], second["entry"]["data"]["tensors"]
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert t1["key_basis"].shape == (2, 16, 16) and t1["value_basis"].shape == (2, 2, 16, 16)


def test_cli_snapkv_with_eigen_attention_runs_end_to_end(tmp_path):
    exe = Path(sys.executable).with_name("kvbench")
    args = [str(exe), "run", "model=synthetic", "model.shape=tiny", "task=niah", "task.lengths=[300]",
            "task.depths=[50]", "task.max_new_tokens=4", "method=snapkv", "budget=64",
            "method.storage=eigen_attention", "method.storage.rank=8", "method.storage.calib_samples=2",
            "method.storage.calib_len=128", f"results_dir={tmp_path}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "KVBENCH_PROFILES": str(tmp_path / "profiles")})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for p in tmp_path.rglob("records.jsonl") for x in p.read_text().splitlines() if x]
    assert recs and all(0 < x["kv_bytes"] < x["kv_bytes_full"] for x in recs)
    assert list((tmp_path / "profiles").rglob("eigen_attention.json"))


def test_bad_knobs_are_one_line(tiny):
    with pytest.raises(ValueError, match=r"^method.storage.rank=0; allowed: a positive integer"):
        build_method("snapkv", budget=64, storage={"name": "eigen_attention", "rank": 0})
    with pytest.raises(ValueError, match=r"^method.calib_samples=0; allowed: a positive integer"):
        build_method("eigen_attention", calib_samples=0)
    with pytest.raises(ValueError, match=r"^method.storage.rank=32 exceeds the model's head dim 16; allowed: 1..16"):
        Engine(tiny, build_method("snapkv", budget=64, storage={"name": "eigen_attention", "rank": 32}))
    with pytest.raises(ValueError, match=r"^eigen_attention: no calibrated bases"):
        EigenAttention(rank=4).encode(_layer()[0], 0, 1)
