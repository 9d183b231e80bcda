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


def kvbench(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    assert cfg["method"] == {"name": "pyramidkv", "window_size": 8, "kernel_size": 7, "pooling": "max", "beta": 20.0}
    assert cfg["budget"] == 128 and cfg["task"]["lengths"] == [400, 500] and cfg["query_aware"] is True
    assert cfg["model"] == {"name": "synthetic", "path": None, "shape": "tiny-mha", "max_context": None}
