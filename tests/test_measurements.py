"""What a record measures: one-time costs kept out of timings, the most KV bytes held, peak memory without
the harness's copies, and the conditions a run was timed under."""
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvbench import runner
from kvbench.engine import Engine
from kvbench.method import METHODS, Method, build_method, register_method
from kvbench.metrics import HostLoad, PeakMemory, loaded
from kvbench.models import load_model
from kvbench.task import Query, Sample


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic", shape="tiny", seed=0, device="cpu", dtype="float32")


# -- one-time costs never enter a recorded timing ---------------------------------------------------------
_PAID = {"prefill": False, "decode": False}
DELAY_S = 1.5


@dataclass
class OneTimeCost(Method):
    """Keeps everything; the first prefill and the first decode step *in the process* each pay a one-time
    delay, as Triton's JIT compilation or a first CUDA-graph capture would."""

    def compress_layer(self, ctx):
        if not _PAID["prefill"]:
            _PAID["prefill"] = True
            time.sleep(DELAY_S)

    def on_decode(self, ctx):
        if not _PAID["decode"]:
            _PAID["decode"] = True
            time.sleep(DELAY_S)


@pytest.fixture
def one_time_cost():
    register_method("one_time_cost_test")(OneTimeCost)
    _PAID.update(prefill=False, decode=False)
    try:
        yield
    finally:
        METHODS.pop("one_time_cost_test", None)


def run_cfg(tmp_path, warmup: bool) -> dict:
    return {"model": {"name": "synthetic", "shape": "tiny"}, "device": "cpu", "dtype": "float32",
            "method": {"name": "one_time_cost_test"}, "budget": 64, "query_aware": False, "seed": 0,
            "task": {"name": "niah", "lengths": [300], "depths": [25, 75], "max_new_tokens": 6},
            "results_dir": str(tmp_path), "sweep": "warm", "warmup": warmup}


def records_of(summary) -> list[dict]:
    return [json.loads(line) for line in open(Path(summary["_dir"]) / "records.jsonl")]


def test_one_time_costs_are_paid_in_warm_up_not_in_any_timing(tmp_path, one_time_cost):
    summary = runner.execute(run_cfg(tmp_path, warmup=True))
    recs = records_of(summary)
    assert summary["status"] == "ok" and len(recs) == 2 and _PAID["prefill"] and _PAID["decode"]
    for r in recs:  # the tiny model takes milliseconds: a 1.5 s delay would stand out in any of these
        assert r["ttft_ms"] < 500 and r["prefill_ms"] < 500 and r["compress_ms"] < 500
        assert r["decode_ms_per_token"] < 500 and r["decode_setup_ms"] < 500
    assert summary["setup"]["warmup_ms"] >= 2 * DELAY_S * 1e3  # reported apart
    assert summary["ttft_ms_median"] is not None and summary["decode_ms_per_token_median"] is not None


def test_without_warm_up_the_first_sample_pays_them(tmp_path, one_time_cost):
    """The control: the same run without warm-up records the delays in its first sample."""
    recs = records_of(runner.execute(run_cfg(tmp_path, warmup=False)))
    assert recs[0]["ttft_ms"] >= DELAY_S * 1e3 and recs[1]["ttft_ms"] < 500
    first_decode_ms = recs[0]["decode_ms_per_token"] * (recs[0]["new_tokens"] - 1)
    assert first_decode_ms >= DELAY_S * 1e3


# -- the most KV bytes held at any point of a query ------------------------------------------------------
ROW = 16 * (4 + 4)  # tiny: head_dim 16, fp32 key + value bytes of one token of one KV head
HEADS, LAYERS = 2, 2


def held_max(lm, name, budget, n_new=64):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    context = " ".join(words[i % len(words)] for i in range(90))
    sample = Sample(id="s", context=context, chat_template=False,
                    queries=[Query(question=" What jumps?", answers=["fox"], max_new_tokens=n_new)])
    eng = Engine(lm, build_method(name, budget=budget, window_size=8) if name == "snapkv"
                 else build_method(name, budget=budget, n_sink=4))
    eng.stop_ids = set()  # decode all n_new tokens
    ctx_text, q_text = eng.prompts.first_turn(sample.context, " What jumps?", "", False)
    n_ctx, n_q = len(eng.prompts.encode(ctx_text, first=True)), len(eng.prompts.encode(q_text))
    rec = eng.run_sample(sample)[0]
    assert rec["new_tokens"] == n_new and rec["context_tokens"] == n_ctx
    return rec, n_ctx, n_q


def test_max_held_bytes_prefill_only_vs_decode_evicting(tiny):
    B = 32
    # SnapKV compresses once: each layer holds its whole context until its compression right after its
    # attention, so the prefill's peak is layer 0 compressed + layer 1 whole; then the question (n_q rows)
    # and 63 decoded tokens (the first comes from the prefill's logits) grow every head
    rec, n, q = held_max(tiny, "snapkv", B)
    assert rec["kv_bytes"] == B * HEADS * LAYERS * ROW
    assert rec["kv_bytes_held_max"] == max((B + n) * HEADS * ROW, (B + q + 63) * HEADS * LAYERS * ROW)
    assert rec["kv_bytes_held_max"] == (B + q + 63) * HEADS * LAYERS * ROW  # decoding set this one
    # StreamingLLM evicts while decoding: after the question every head holds B + n_q rows; the first step
    # appends one more to layer 0 before its eviction brings it back to B, so the decode never holds more
    # than (B + n_q) rows in both layers + one row per head; the prefill's peak is the same as SnapKV's
    rec2, n2, q2 = held_max(tiny, "streaming_llm", B)
    assert (n2, q2) == (n, q)
    assert rec2["kv_bytes_held_max"] == max((B + n) * HEADS * ROW, ((B + q) * LAYERS + 1) * HEADS * ROW)
    assert rec2["kv_bytes_held_max"] < rec["kv_bytes_held_max"]
    # ... and decoding longer does not raise it
    assert held_max(tiny, "streaming_llm", B, n_new=96)[0]["kv_bytes_held_max"] == rec2["kv_bytes_held_max"]


# -- peak memory leaves out the harness's copies --------------------------------------------------------
class FakeMemory:
    """A process's resident memory and its high-water mark, moved by hand (what RSS would do)."""

    def __init__(self):
        self.rss = self.hwm = 1000

    def alloc(self, n):
        self.rss += n
        self.hwm = max(self.hwm, self.rss)

    def free(self, n):
        self.rss -= n


def test_peak_memory_leaves_out_uncounted_blocks(monkeypatch):
    from kvbench import metrics
    m = FakeMemory()
    monkeypatch.setattr(metrics, "_rss_hwm", lambda: (m.rss, m.hwm))
    monkeypatch.setattr(metrics.PeakMemory, "_reset_high", lambda self: setattr(m, "hwm", m.rss))
    with PeakMemory(torch.device("cpu")) as mem:
        m.alloc(300)
        m.free(300)
        m.alloc(100)
    assert mem.peak == 300                  # the high-water mark, not where it ended
    with PeakMemory(torch.device("cpu")) as mem:
        m.alloc(50)                         # measured code
        with mem.uncounted():
            m.alloc(400)                    # a copy the harness makes
        m.alloc(120)                        # measured code after it
        m.free(20)
    assert mem.peak == 170                  # 50 + 120: the copy's 400 left out
    with PeakMemory(torch.device("cpu")) as mem:
        m.alloc(500)                        # the largest moment comes before the copy
        m.free(450)
        with mem.uncounted():
            m.alloc(400)
        m.alloc(10)
    assert mem.peak == 500


CAKE_PEAKS = """
import json, sys
from kvbench.metrics import fixed_mmap_threshold
fixed_mmap_threshold()  # every large tensor a fresh mapping: a copy in the measured window would show in RSS
import contextlib
if sys.argv[1] == "copies_counted":  # the control: what the engine did before (copies inside the window)
    from kvbench import cache, metrics
    metrics.PeakMemory.uncounted = lambda self: contextlib.nullcontext()
    del cache.LayerKV.__deepcopy__
from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.models import load_model
from kvbench.task import Query, Sample
lm = load_model("synthetic", shape="smollm2-135m", seed=0, device="cpu", dtype="float32")
words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
context = " ".join(words[(i * 7) % len(words)] for i in range(1500))
queries = [Query(question=f" Question {i}: which word comes first?", answers=["alpha"], max_new_tokens=3)
           for i in range(3)]
recs = Engine(lm, build_method("cake", budget=512)).run_sample(
    Sample(id="s", context=context, queries=queries, mode="multi_request"))
print(json.dumps({"kv": recs[0]["kv_bytes"], "peaks": [r["peak_mem_bytes"] for r in recs[1:]],
                  "reused": [r["context_reused"] for r in recs[1:]]}))
"""


def cake_peaks(mode: str) -> dict:
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", CAKE_PEAKS, mode], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cake_multi_request_peak_has_no_cache_copy():
    """Later queries of a shared context start from a copy of the compressed cache (and of CAKE, whose
    state refers to the cache's layers); neither copy may count in their peak memory. In a process where
    every large tensor shows in RSS (the control proves a copy would be seen)."""
    r = cake_peaks("engine")
    assert r["kv"] > 20 * 2**20  # 30 layers × 3 heads × 512 rows × 512 B = 22.5 MiB
    assert all(r["reused"]) and all(p < r["kv"] / 4 for p in r["peaks"]), r
    control = cake_peaks("copies_counted")
    assert any(p > r["kv"] / 2 for p in control["peaks"]), control


def test_forking_a_method_shares_the_cache_layers_it_refers_to(tiny):
    eng = Engine(tiny, build_method("cake", budget=16, window_size=4))
    cache, m = eng.new_cache(), eng.method.fork()
    m.reset()
    eng.prefill(cache, list(range(100, 160)), m, compress=True)
    f = m.fork()
    layers = [entry[0] for entry in m.state["layers"].values()]
    assert layers and all(a is b for a, b in zip(layers, (e[0] for e in f.state["layers"].values())))
    assert f.state is not m.state and f.state["budgets"] == m.state["budgets"]


# -- the conditions a run was timed under ---------------------------------------------------------------
def test_host_load_sees_another_busy_process():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)
        with HostLoad() as load:
            time.sleep(1.5)  # this process idles; the child keeps one core busy
    finally:
        busy.wait()
    assert load.other_cores is not None and load.other_cores >= 0.6


def test_loaded_flag():
    assert not loaded(0.2, 2, 2)          # a little background work
    assert loaded(1.0, 2, 2)              # another process took a core from a 2-thread run on 2 cores
    assert not loaded(1.0, 16, 2)         # plenty of free cores
    assert loaded(15.0, 16, 2)
    assert not loaded(None, 2, 2)


def test_records_and_summary_carry_conditions(tmp_path):
    cfg = {"model": {"name": "synthetic", "shape": "tiny"}, "device": "cpu", "dtype": "float32",
           "method": {"name": "snapkv", "window_size": 8}, "budget": 64, "query_aware": False, "seed": 0,
           "task": {"name": "niah", "lengths": [300], "depths": [50], "max_new_tokens": 4},
           "results_dir": str(tmp_path), "sweep": "cond"}
    summary = runner.execute(cfg)
    rec = records_of(summary)[0]
    for r in (rec, summary["conditions"]):
        assert r["device"].startswith("cpu") and r["cpu_count"] >= 1 and r["load_avg_1m"] >= 0
    assert rec["other_cores"] >= 0 and isinstance(summary["conditions"]["loaded"], bool)
    assert summary["kv_bytes_held_max"] >= summary["kv_bytes"] > 0
    assert summary["setup"]["model_load_ms"] >= 0 and summary["setup"]["warmup_ms"] > 0


# -- the garbage collector stays out of timed blocks ------------------------------------------------------
class _Cycle:
    def __init__(self):
        self.me = self  # only the cyclic collector frees it


def test_timer_collects_leftover_cycles_before_and_holds_the_collector_off_inside():
    import gc
    import weakref
    from kvbench.metrics import Timer
    gc.disable()  # no automatic collection between making the cycle and entering the timer
    try:
        ref = weakref.ref(_Cycle())
        assert ref() is not None
        with Timer(torch.device("cpu")):
            assert ref() is None          # freed before the clock starts
            assert not gc.isenabled()
    finally:
        gc.enable()
    assert gc.isenabled()
    gc.disable()
    try:
        ref = weakref.ref(_Cycle())
        with Timer(torch.device("cpu"), collect=False):  # decode steps: nothing collected before, nothing inside
            assert ref() is not None and not gc.isenabled()
            with Timer(torch.device("cpu"), collect=False):
                pass
            assert not gc.isenabled()        # a nested block restores the state it found
    finally:
        gc.enable()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with Timer(torch.device("cpu")):
            raise RuntimeError("a failing sample")
    assert gc.isenabled()                  # restored after an exception too


def test_prefill_and_decode_run_with_the_collector_off(tiny):
    import gc
    seen = []

    @dataclass
    class Probe(Method):
        def compress_layer(self, ctx):
            seen.append(("prefill", gc.isenabled()))

        def on_decode(self, ctx):
            seen.append(("decode", gc.isenabled()))

    eng = Engine(tiny, Probe(), query_aware=True)
    cache = eng.new_cache()
    pre = eng.prefill(cache, list(range(10, 40)), eng.method, compress=True)
    eng.decode(cache, eng.method, pre.logits, 3, stop_ids=set())
    assert {p for p, _ in seen} == {"prefill", "decode"}
    assert not any(on for _, on in seen) and gc.isenabled()
