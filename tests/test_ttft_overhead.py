"""bench/ttft_overhead.py: the paired arithmetic, the alternating order, and the script end to end on CPU with
the tiny synthetic shape (a few seconds)."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tt(bench_module):
    return bench_module("ttft_overhead")


def test_paired_overhead_by_hand(tt):
    r = tt.paired_overhead([100.0, 102.0, 98.0], [103.0, 104.0, 100.0], [1.0, 1.2, 0.8])
    # pairs: 3/100 = 3%, 2/102 = 1.9608%, 2/98 = 2.0408%
    assert r["paired_pct"] == pytest.approx([3.0, 200 / 102, 200 / 98])
    assert r["overhead_pct"] == pytest.approx(200 / 98)  # the middle one
    assert r["overhead_min_pct"] == pytest.approx(200 / 102)
    assert r["overhead_max_pct"] == pytest.approx(3.0)
    assert r["full_ms"] == 100.0 and r["method_ms"] == 103.0 and r["pairs"] == 3
    assert r["hook_ms"] == pytest.approx(1.0)
    assert r["hook_pct"] == pytest.approx(1.0)  # median hook 1.0 ms of median full 100 ms


def test_paired_overhead_needs_pairs(tt):
    with pytest.raises(ValueError):
        tt.paired_overhead([], [], [])
    with pytest.raises(ValueError):
        tt.paired_overhead([1.0, 2.0], [1.0], [0.1, 0.1])


def test_pair_order_alternates(tt):
    assert [tt.pair_order(i) for i in range(4)] == [("full", "method"), ("method", "full")] * 2


def test_end_to_end_cpu(tt, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    tt.main(["--shape", "tiny", "--device", "cpu", "--lengths", "128", "--methods", "snapkv", "streaming_llm",
             "--budget", "32", "--pairs", "3", "--json", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("device cpu") and "synthetic-tiny" in printed[0] and "pairs 3" in printed[0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["n"], r["method"]) for r in rows] == [(128, "snapkv"), (128, "streaming_llm")]
    for r in rows:
        assert {"device", "torch", "transformers", "model", "dtype", "budget", "pairs", "full_ms", "method_ms",
                "overhead_pct", "overhead_min_pct", "overhead_max_pct", "hook_ms", "hook_pct", "paired_pct",
                "full_ms_all", "method_ms_all", "hook_ms_all"} <= set(r)
        assert r["pairs"] == 3 and len(r["full_ms_all"]) == len(r["method_ms_all"]) == len(r["hook_ms_all"]) == 3
        assert r["full_ms"] > 0 and r["method_ms"] > 0 and r["hook_ms"] > 0
        assert r["overhead_min_pct"] <= r["overhead_pct"] <= r["overhead_max_pct"]
        assert r["budget"] == 32 and r["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temp file left behind


@pytest.mark.parametrize("argv, named", [
    (["--methods", "snapkv", "nope"], "'nope'"),
    (["--lengths", "128", "-5"], "-5"),
    (["--pairs", "0"], "--pairs 0"),
    (["--shape", "huge"], "'huge'"),
])
def test_bad_input_exits_2_before_the_model(tt, monkeypatch, capsys, argv, named):
    def no_model(*a, **k):
        raise AssertionError("a model was built")
    monkeypatch.setattr(tt.gpu_speed, "build_model", no_model)
    with pytest.raises(SystemExit) as e:
        tt.main(["--device", "cpu", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "allowed" in err[0]
    if "nope" in argv:
        assert "snapkv" in err[0]  # the allowed names are listed
