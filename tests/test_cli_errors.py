"""Bad input at the config boundary: `kvbench run ...` exits with code 2 and one stderr line naming the bad
value (and the allowed ones), never a traceback, and starts no run.

Most checks need no torch import, so each subprocess takes about half a second.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KVBENCH = str(Path(sys.executable).with_name("kvbench")) if Path(sys.executable).with_name("kvbench").exists() \
    else shutil.which("kvbench")
TINY = ["model=synthetic", "model.shape=tiny", "task=niah", "task.lengths=[300]", "task.depths=[50]",
        "task.max_new_tokens=4"]


def kvbench(tmp_path, *args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([KVBENCH, "run", *TINY, f"results_dir={tmp_path}", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)


# (arguments, words the one-line message must contain)
BAD = [
    (["method=nope"], ["method", "'nope'", "snapkv", "h2o", "full"]),
    (["task=nope"], ["task", "'nope'", "niah", "ruler"]),
    (["model=nope"], ["model", "'nope'", "synthetic", "gguf"]),
    (["budget=0"], ["budget=0", "positive integer"]),
    (["budget=-1"], ["budget=-1", "positive integer"]),
    (["budget=1.5"], ["budget=1.5", "positive integer"]),
    (["budget=abc"], ["budget='abc'", "positive integer"]),
    (["-m", "budget=64,0"], ["budget=0"]),  # one bad value of a sweep refuses the whole sweep
    (["foo=1"], ["'foo'", "unknown key", "budget", "method"]),
    (["+foo=1"], ["'foo'", "unknown key"]),
    (["task.foo=1"], ["'task.foo'", "depths", "lengths"]),
    (["model=gguf", "model.path=/no/such/model.gguf"], ["model.path", "/no/such/model.gguf", "does not exist"]),
    (["model=gguf"], ["model.path", "required"]),
    (["model=hf", "model.name=./no/such/dir"], ["model.name", "./no/such/dir", "does not exist"]),
    (["model.shape=huge"], ["model.shape='huge'", "tiny", "llama-3.1-8b"]),
    (["dtype=fp8"], ["dtype='fp8'", "bfloat16", "float32"]),
    (["device=gpu"], ["device='gpu'", "cuda"]),
    (["method.window_size=abc"], ["method.window_size='abc'", "integer", "32"]),
    (["method.window_size=null"], ["method.window_size=null", "integer"]),
    (["+method.nope=1"], ["method.nope", "snapkv", "window_size"]),
    (["method=h2o", "method.recent_ratio=abc"], ["method.recent_ratio='abc'", "number"]),
    (["query_aware=maybe"], ["query_aware='maybe'", "true/false"]),
    (["seed=abc"], ["seed='abc'", "integer"]),
    (["compression_ratio=2"], ["compression_ratio=2", "[0, 1)"]),
    (["task.depths=[500]"], ["depths", "500", "[0, 100]"]),
    (["method=snapkv,h2o"], ["method=snapkv,h2o", "-m"]),  # a sweep without -m
    (["hydra/launcher=nope"], ["hydra/launcher", "'nope'", "joblib", "submitit_slurm"]),
    (["task.lengths=[300"], ["task.lengths=[300"]),  # unparsable override
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    out = kvbench(tmp_path, *args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kvbench: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not any(tmp_path.rglob("summary.json")) and not any(tmp_path.rglob("config.yaml"))


@pytest.mark.parametrize("var,value,allowed", [("KVBENCH_GRAPH_PREFILL", "yes", "auto, 0, 1"),
                                               ("KVBENCH_COMPILE_PREFILL", "1", "0, regional"),
                                               ("KVBENCH_COMPILE_DECODE", "fast", "0, 1, regional"),
                                               ("KVBENCH_DECODE_GEMV", "fast", "auto, fused, triton, cublas"),
                                               ("KVBENCH_DECODE_NORM", "fast", "auto, triton, torch"),
                                               ("KVBENCH_DECODE_ROPE", "fast", "auto, triton, torch")])
def test_bad_speed_switch_in_the_environment_exits_2_with_one_line(tmp_path, var, value, allowed):
    out = kvbench(tmp_path, env={var: value})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"kvbench: error: {var}={value!r}; allowed: {allowed}"
    assert not any(tmp_path.rglob("config.yaml"))


@pytest.mark.parametrize("var", ["KVBENCH_DECODE_GEMV", "KVBENCH_DECODE_NORM", "KVBENCH_DECODE_ROPE"])
def test_triton_decode_kernels_with_a_compiled_decode_exit_2_with_one_line(tmp_path, var):
    out = kvbench(tmp_path, env={var: "triton", "KVBENCH_COMPILE_DECODE": "1"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(f"kvbench: error: {var}='triton' with KVBENCH_COMPILE_DECODE")
    assert len(out.stderr.strip().splitlines()) == 1


def test_composed_job_equals_hydra_compose():
    """compose_job (group configs composed once, value overrides applied with Hydra's own code) gives
    exactly Hydra's full compose for every job of a sweep."""
    from kvbench.cli import compose, compose_job, validate_overrides
    jobs = validate_overrides(["method=snapkv,pyramidkv", "budget=64,128", "task.lengths=[300],[400,500]",
                               "model=synthetic", "model.shape=tiny-mha", "seed=7", "query_aware=true",
                               "method.window_size=8"], multirun=True)
    assert len(jobs) == 8
    for job in jobs:
        assert compose_job(job) == compose(job)
    cfg = compose_job(jobs[-1])
    formats = {k: cfg["method"].pop(k) for k in ("storage", "selector") if k in cfg["method"]}
    assert all(f == {"name": "plain"} for f in formats.values()), formats  # the default storage/selector
    assert cfg["method"] == {"name": "pyramidkv", "window_size": 8, "kernel_size": 7, "pooling": "max", "beta": 20.0}
    assert cfg["budget"] == 128 and cfg["task"]["lengths"] == [400, 500] and cfg["query_aware"] is True
    assert cfg["model"] == {"name": "synthetic", "path": None, "shape": "tiny-mha", "max_context": None, "device_map": None}


# -- issue 11: more bad input refused up front (exit 2, one line, no run directory) ------------------------
import torch  # noqa: E402

CPU_ONLY = torch.version.cuda is None
BAD_11 = [
    (["task.lengths=[abc]"], ["task.lengths=['abc']", "positive integers"]),
    (["task.lengths=[0]"], ["task.lengths=[0]", "positive integers"]),
    (["task.num_samples=0"], ["task.num_samples=0", "positive integer"]),
    (["task.max_new_tokens=-4"], ["task.max_new_tokens=-4", "positive integer"]),
    pytest.param(["device=cuda"], ["device='cuda'", "without CUDA", "cpu"],
                 marks=pytest.mark.skipif(not CPU_ONLY, reason="this torch has CUDA: device=cuda is valid here")),
    pytest.param(["device=cuda:1"], ["device='cuda:1'", "cpu"],
                 marks=pytest.mark.skipif(not CPU_ONLY, reason="this torch has CUDA")),
    (["budget=128", "compression_ratio=0.5"], ["budget=128", "compression_ratio=0.5", "both set"]),
]


def _one_line_exit_2(out, tmp_path, words):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kvbench"), lines[0]
    assert ": error: " in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    # nothing ran: no run directory, no summary, no config anywhere under the results dir
    assert not any(tmp_path.rglob("summary.json")) and not any(tmp_path.rglob("config.yaml"))
    assert not any(p.is_dir() and p.name == "default" for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))
    return lines[0]


@pytest.mark.parametrize("args,words", BAD_11, ids=[" ".join(p.values[0] if hasattr(p, "values") else p[0])
                                                    for p in BAD_11])
def test_more_bad_input_exits_2_with_one_line(tmp_path, args, words):
    _one_line_exit_2(kvbench(tmp_path, *args), tmp_path, words)


def test_results_dir_that_is_a_file(tmp_path):
    f = tmp_path / "notadir"
    f.write_text("x")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([KVBENCH, "run", *TINY, f"results_dir={f}"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    _one_line_exit_2(out, tmp_path, ["results_dir=", "notadir", "is a file", "directory"])
    assert f.read_text() == "x"


@pytest.mark.parametrize("content", [b"PK\x03\x04 a zip, not a model", b"", b"<html>404</html>"])
def test_gguf_path_that_is_not_gguf(tmp_path, content):
    f = tmp_path / "model.Q4_K_M.gguf"
    f.write_bytes(content)
    out = kvbench(tmp_path, "model=gguf", f"model.path={f}")
    _one_line_exit_2(out, tmp_path, ["model.path=", "model.Q4_K_M.gguf", "not a GGUF file"])


def test_gguf_path_that_is_a_directory(tmp_path):
    d = tmp_path / "weights.gguf"
    d.mkdir()
    _one_line_exit_2(kvbench(tmp_path, "model=gguf", f"model.path={d}"), tmp_path, ["is a directory", ".gguf file"])


# Offline: no network is simulated with a hub endpoint whose port refuses connections (or HF_HUB_OFFLINE=1),
# and an empty hub cache; the answer comes before any run starts, not after the hub client's retries.
def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


OFFLINE_CASES = [
    (["task=longbench"], ["task=longbench", "THUDM/LongBench", "task.data_dir="]),
    (["task=scbench"], ["task=scbench", "microsoft/SCBench", "task.data_dir="]),
    (["model=hf", "model.name=nobody-kvbench/not-a-model"], ["model.name='nobody-kvbench/not-a-model'",
                                                            "local Hugging Face cache", "model.path="]),
]


@pytest.mark.parametrize("how", ["no network", "HF_HUB_OFFLINE=1"])
@pytest.mark.parametrize("args,words", OFFLINE_CASES, ids=[" ".join(a) for a, _ in OFFLINE_CASES])
def test_offline_needs_one_line_at_once(tmp_path, args, words, how):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(v, None)
    if how == "no network":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    else:
        env["HF_HUB_OFFLINE"] = "1"
    base = (["model=synthetic", "model.shape=tiny"] if args[0].startswith("task") else
            [a for a in TINY if a.startswith("task")])
    out = subprocess.run([KVBENCH, "run", *base, *args, f"results_dir={tmp_path}/r"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    # before any run starts (a run would have tried the hub, then failed with exit 1 and a run directory)
    line = _one_line_exit_2(out, tmp_path, words)
    assert ("HF_HUB_OFFLINE is set" if how != "no network" else "no network") in line, line


def test_offline_with_data_in_the_local_cache_goes_offline(tmp_path, monkeypatch):
    """No network, but LongBench's data.zip is in the local hub cache: no error, and the hub client is put in
    offline mode, so the run loads it from the cache at once instead of after the retries."""
    from kvbench import cli, hub
    cache = tmp_path / "hub"
    snap = cache / "datasets--THUDM--LongBench" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "data.zip").write_bytes(b"PK")
    (cache / "datasets--THUDM--LongBench" / "refs").mkdir()
    (cache / "datasets--THUDM--LongBench" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(hub, "_ANSWER", {})
    cfg = {"task": {"name": "longbench", "data_dir": None}, "model": {"name": "smollm2-135m", "path": None}}
    cli.check_hub(cfg)
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and c.HF_HUB_OFFLINE is True
    # the same with the file missing from the cache: refused, naming task.data_dir
    (snap / "data.zip").unlink()
    with pytest.raises(cli.BadInput, match="task.data_dir="):
        cli.check_hub(cfg)


def test_hub_reachable_answers_none(tmp_path, monkeypatch):
    """The probe says "reachable" when something listens at the endpoint (a local socket stands in for the hub)."""
    import socket
    from kvbench import hub
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(v, raising=False)
        monkeypatch.setattr(hub, "_ANSWER", {})
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert hub.unreachable() is None
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
        assert "no network" in hub.unreachable()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub.unreachable() == "HF_HUB_OFFLINE is set"
    finally:
        srv.close()


# -- report / compare given a file ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["summary.json", "notes.txt"])
def test_report_of_a_file_says_what_is_wrong(tmp_path, name):
    f = tmp_path / "results" / "demo" / "abc123" / name
    f.parent.mkdir(parents=True)
    f.write_text("{}")
    out = subprocess.run([KVBENCH, "report", str(f)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench report: error: "), out.stderr
    assert "is a file, not a results directory" in lines[0]
    if name == "summary.json":
        assert f"e.g. {tmp_path / 'results' / 'demo'}" in lines[0], lines[0]
    assert not (tmp_path / "reports").exists()


# -- budget vs compression_ratio: one rule ----------------------------------------------------------------
def test_compression_ratio_alone_replaces_the_default_budget():
    from kvbench.cli import budget_rule, plan_jobs
    (cfg,) = plan_jobs([*TINY, "compression_ratio=0.5"], multirun=False)
    assert cfg["budget"] is None and cfg["compression_ratio"] == 0.5
    cfgs = plan_jobs([*TINY, "compression_ratio=0.25,0.5"], multirun=True)
    assert [(c["budget"], c["compression_ratio"]) for c in cfgs] == [(None, 0.25), (None, 0.5)]
    (cfg,) = plan_jobs([*TINY, "budget=null", "compression_ratio=0.5"], multirun=False)
    assert cfg["budget"] is None and cfg["compression_ratio"] == 0.5
    (cfg,) = plan_jobs([*TINY, "budget=64"], multirun=False)
    assert cfg["budget"] == 64 and cfg["compression_ratio"] is None
    assert budget_rule(["compression_ratio=null"]) == ["compression_ratio=null"]
    with pytest.raises(ValueError, match="both set"):
        budget_rule(["-m", "budget=64,128", "compression_ratio=0.5"])


# -- a run that failed as a whole says why in the table ---------------------------------------------------
def test_table_says_why_a_run_failed():
    from kvbench.cli import fmt_table
    ok = {"task": "niah", "method": "full", "budget": None, "query_aware": False, "score": 1.0, "n": 4, "n_failed": 0,
          "status": "ok", "kv_bytes": 3 * 2**20}
    failed = {"task": "niah", "method": "snapkv", "budget": 256, "query_aware": False, "n": 0, "n_failed": 0,
              "status": "failed", "run_error": True, "error_type": "ValueError",
              "error": "task niah produced no samples with this config"}
    partial = {"task": "niah", "method": "h2o", "budget": 256, "query_aware": False, "score": 0.5, "n": 3,
               "n_failed": 1, "status": "partial", "error_type": "OutOfMemoryError", "error": "sample s1: CUDA out of memory"}
    lines = fmt_table([ok, failed, partial]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[-1] == "why" and "KV MiB" in head and not any("MB" in h and "MiB" not in h for h in head)
    rows = {ln.split("|")[2].strip(): [c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[2:]}
    assert rows["snapkv"][head.index("fail")] == "run"
    assert rows["snapkv"][-1] == "ValueError: task niah produced no samples with this config"
    assert rows["h2o"][-1].startswith("1 failed, first: OutOfMemoryError: sample s1")
    assert rows["full"][-1] == "" and rows["full"][head.index("KV MiB")] == "3.00"
    assert len({len(ln) for ln in lines}) == 1  # aligned
    assert "why" not in fmt_table([ok]).splitlines()[0]


def test_failed_run_end_to_end_shows_why_and_where(tmp_path):
    """A run that fails as a whole (here: LongBench pointed at an empty data dir, found only when the run reads
    its data) is a row that says why, and the output says where results went and what to run next."""
    empty = tmp_path / "nodata"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([KVBENCH, "run", "model=synthetic", "model.shape=tiny", "task=longbench",
                          f"task.data_dir={empty}", "task.subsets=[qasper]", f"results_dir={tmp_path}/r", "sweep=s"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    row = [ln for ln in out.stdout.splitlines() if "| longbench" in ln]
    assert len(row) == 1 and "| failed" in row[0], out.stdout
    assert "no qasper.jsonl or data.zip" in row[0], row[0]
    assert f"results: {tmp_path}/r/s/" in out.stdout and f"kvbench report {tmp_path}/r/s" in out.stdout
    assert f"-> {tmp_path}/r/s/" in out.stderr  # the run's own line names its directory
