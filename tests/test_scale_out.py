"""Scale-out on CPU: one GPU per job (the claim logic, on fake GPU lists and real lock files, with real
processes that die), a submitit job killed by a signal (the sweep finishes, reports it failed with the reason,
and the same command resumes it), and a model spread with accelerate's device_map."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench import gpus
from kvbench.gpus import GPU

HOST = [GPU(0, "GPU-aaaa-0000", "NVIDIA H100 80GB HBM3"), GPU(1, "GPU-bbbb-1111", "NVIDIA H100 80GB HBM3"),
        GPU(2, "GPU-cccc-2222", "NVIDIA H100 80GB HBM3"), GPU(3, "GPU-dddd-3333", "NVIDIA H100 80GB HBM3")]


# -- which GPUs a process may use --------------------------------------------------------------------------
def test_visible_follows_cuda_visible_devices_like_cuda():
    assert gpus.visible(HOST, None) == HOST
    assert gpus.visible(HOST, "2,0") == [HOST[2], HOST[0]]           # indices, in the variable's order
    assert gpus.visible(HOST, "GPU-bbbb,GPU-dddd-3333") == [HOST[1], HOST[3]]  # UUIDs and unique prefixes
    assert gpus.visible(HOST, "1,7,2") == [HOST[1]]                  # CUDA stops at the first invalid entry
    assert gpus.visible(HOST, "") == []                              # submitit with no GPUs asked for
    assert gpus.visible(HOST, "GPU-") == []                          # ambiguous prefix: invalid


def test_host_gpus_parses_nvidia_smi(monkeypatch):
    out = "0, GPU-aaaa-0000, NVIDIA H100 80GB HBM3\n1, GPU-bbbb-1111, NVIDIA H100 80GB HBM3\n"
    monkeypatch.setattr(gpus.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, out, ""))
    assert gpus.host_gpus() == HOST[:2]
    monkeypatch.setattr(gpus.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError()))
    assert gpus.host_gpus() == []  # no driver: nothing to claim, the job runs where device=auto puts it


# -- claiming, across processes ----------------------------------------------------------------------------
HOLDER = """
import sys, time
from kvbench import gpus
from kvbench.gpus import GPU
pool = [GPU(i, u, "x") for i, u in enumerate(sys.argv[2].split(","))]
got = gpus.claim(pool, directory=__import__("pathlib").Path(sys.argv[1]), wait=True, poll_s=0.05)
print(got[0].uuid, flush=True)
time.sleep(float(sys.argv[3]))
"""


def _holder(lock_dir: Path, uuids: list[str], hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), ",".join(uuids), str(hold_s)],
                            stdout=subprocess.PIPE, text=True)


def test_jobs_get_distinct_gpus_and_a_killed_job_frees_its_gpu(tmp_path):
    pool = HOST[:2]
    a = _holder(tmp_path, [g.uuid for g in pool], 60)
    b = _holder(tmp_path, [g.uuid for g in pool], 60)
    a_gpu, b_gpu = a.stdout.readline().strip(), b.stdout.readline().strip()
    assert {a_gpu, b_gpu} == {g.uuid for g in pool}  # two jobs, two GPUs: never the same card
    assert gpus.claim(pool, directory=tmp_path, wait=False) is None  # a third finds both held
    c = _holder(tmp_path, [g.uuid for g in pool], 60)  # ...and waits
    time.sleep(0.5)
    assert c.poll() is None
    a.send_signal(signal.SIGKILL)  # the OOM killer / kill -9: no Python cleanup runs
    a.wait()
    assert c.stdout.readline().strip() == a_gpu  # the kernel dropped a's lock: c gets a's GPU
    b_still = gpus.claim(pool, directory=tmp_path, wait=False)
    assert b_still is None  # b and c hold the two GPUs
    for p in (b, c):
        p.kill()
        p.wait()
    mine = gpus.claim(pool, directory=tmp_path, wait=False)
    assert mine is not None and mine[0] == pool[0]  # all free again: the first of the pool
    os.close(mine[1])


def test_waiting_job_says_which_pids_hold_the_gpus(tmp_path):
    pool = HOST[:1]
    a = _holder(tmp_path, [pool[0].uuid], 60)
    assert a.stdout.readline().strip() == pool[0].uuid
    said = []
    import threading

    def later():
        time.sleep(0.3)
        a.kill()
    threading.Thread(target=later).start()
    got = gpus.claim(pool, directory=tmp_path, wait=True, poll_s=0.05, log=said.append)
    a.wait()
    assert got[0] == pool[0] and len(said) == 1
    assert f"pid {a.pid}" in said[0] and "all 1 are held" in said[0]
    os.close(got[1])


def test_claim_for_job_holds_one_gpu_for_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(gpus, "host_gpus", lambda: HOST)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setattr(gpus, "_CLAIMED", None)
    first = gpus.claim_for_job()
    assert first == HOST[3]  # the first free one in CUDA_VISIBLE_DEVICES's order
    assert gpus.claim_for_job() == HOST[3] and gpus.claimed() == HOST[3]  # the next job of this process: same GPU
    os.close(gpus._CLAIMED[1])
    monkeypatch.setattr(gpus, "_CLAIMED", None)


def test_take_gpu_only_for_device_auto_with_the_lock_on(monkeypatch):
    from kvbench import runner
    called = []
    monkeypatch.setattr(gpus, "claim_for_job", lambda log=None: called.append(1) or HOST[2])
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)  # a GPU machine too: nothing made current
    base = {"device": "auto", "gpu_lock": True, "model": {"name": "synthetic"}}
    for cfg in ({**base, "device": "cuda:1"}, {**base, "gpu_lock": False},
                {**base, "model": {"name": "synthetic", "device_map": "auto"}}):
        assert runner.take_gpu(cfg) == {} and not called
    got = runner.take_gpu(base)  # claimed, but no CUDA to make current
    assert called == [1] and got == {}


# -- a job killed from outside Python --------------------------------------------------------------------
def test_submitit_job_killed_by_a_signal_fails_alone_and_resumes(tmp_path):
    """submitit's local executor; one job SIGKILLs itself (KVBENCH_FAULT=kill) on its second sample. The sweep
    finishes, the other job is ok, the killed one is reported failed with submitit's reason, its first sample
    is on disk; the same command without the fault resumes it at its second sample."""
    from test_sweeps import kvbench, records, runs, summary, table_rows
    results = tmp_path / "res"
    args = ["hydra/launcher=submitit_local", "method=snapkv,streaming_llm", "budget=32", "task.depths=[0,50]"]
    out = kvbench(results, *args, fault="kill:niah-300-50:method.name=snapkv")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    rows = {r["method"]: r for r in table_rows(out.stdout)}
    assert rows["streaming_llm"]["status"] == "ok"
    assert rows["snapkv"]["status"] == "failed"
    assert "died without a result" in rows["snapkv"]["why"], rows["snapkv"]
    found = runs(results)
    killed = found[("snapkv", 32, (0, 50))]
    assert not (killed / "summary.json").exists()
    assert "died without a result" in json.loads((killed / "job_error.json").read_text())["error"]
    (first,) = records(killed)
    assert first["sample_id"] == "niah-300-0"  # what it finished is kept
    assert summary(found[("streaming_llm", 32, (0, 50))])["status"] == "ok"

    again = kvbench(results, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert records(killed)[0] == first  # resumed: its first sample (timings included) was not run again
    assert [r["sample_id"] for r in records(killed)] == ["niah-300-0", "niah-300-50"]
    s = summary(killed)
    assert s["status"] == "ok" and s["n"] == 2
    assert not (killed / "job_error.json").exists()


# -- a model spread over devices ---------------------------------------------------------------------------
def test_device_map_builds_and_runs_a_synthetic_model_on_cpu():
    """accelerate's placement on a CPU-only host puts everything on the CPU: the spread-building path (meta
    skeleton, weights drawn on their device, dispatch hooks) must give a working model with tied embeddings."""
    import torch
    from kvbench.engine import Engine
    from kvbench.models import load_model
    from kvbench.task import Query, Sample
    lm = load_model(name="synthetic", shape="tiny", device_map="auto", seed=0)
    assert lm.devices == (torch.device("cpu"),)
    m = lm.model
    assert m.lm_head.weight is m.get_input_embeddings().weight  # tie_word_embeddings survives the build
    assert not any(p.is_meta for p in m.parameters())
    norms = [p for n, p in m.named_parameters() if p.dim() == 1 and "norm" in n]
    assert norms and all(bool((p == 1).all()) for p in norms)
    w = m.model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002  # N(0, initializer_range)
    inv = m.model.rotary_emb.inv_freq  # a buffer computed at init, not left empty by the meta skeleton
    assert torch.allclose(inv, 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16)))
    eng = Engine(lm, None)
    sample = Sample(id="s", context="hello " * 40, queries=[Query(question="what?", answers=["x"], max_new_tokens=4)])
    (rec,) = eng.run_sample(sample)
    assert rec["new_tokens"] >= 1 and rec["decode_path"].startswith("eager: cpu")


def test_device_map_is_validated_and_left_out_of_the_run_identity(tmp_path):
    from kvbench.models import ModelError, load_model
    from kvbench.runner import normalize_config, run_dir
    with pytest.raises(ModelError, match="device_map='everywhere'; allowed: null, auto"):
        load_model(name="synthetic", shape="tiny", device_map="everywhere")
    old = {"model": {"name": "synthetic", "shape": "tiny"}, "method": {"name": "full"}, "task": {"name": "niah"},
           "results_dir": str(tmp_path)}
    new = {**old, "model": {**old["model"], "device_map": None}, "gpu_lock": False}
    assert run_dir(normalize_config(new)).hash == run_dir(normalize_config(old)).hash  # earlier runs keep their id
    spread = {**old, "model": {**old["model"], "device_map": "auto"}}
    assert run_dir(normalize_config(spread)).hash != run_dir(normalize_config(old)).hash


def test_bad_device_map_is_one_line_and_exit_2(tmp_path):
    from test_sweeps import KVBENCH
    out = subprocess.run([KVBENCH, "run", "model=synthetic", "model.device_map=everywhere", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("kvbench: error: model.device_map='everywhere'; allowed: null, auto, balanced, "
                                  "balanced_low_0, sequential")
