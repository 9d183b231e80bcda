"""bench/sweep_vs_kvpress.py's pure parts: compression ratio, samples/s, reading kvbench's records, the table.
No model runs and kvpress is never imported."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sv(bench_module):
    return bench_module("sweep_vs_kvpress")


def test_module_import_is_light(sv):
    src = (ROOT / "bench" / "sweep_vs_kvpress.py").read_text()
    top = [l for l in src.splitlines() if l.startswith(("import ", "from "))]
    assert not any(m in l for l in top for m in ("torch", "kvpress", "kvbench", "transformers"))


def test_compression_ratio(sv):
    assert sv.compression_ratio(256, 1024) == pytest.approx(0.75)
    assert sv.compression_ratio(256, 4000) == pytest.approx(1 - 256 / 4000)
    assert sv.compression_ratio(256, 200) == 0.0      # context smaller than the budget: nothing dropped
    assert sv.compression_ratio(256, 256) == 0.0
    assert sv.compression_ratio(256, 0) == 0.0
    # kvpress keeps int(n * (1 - r)) tokens: the budget, up to rounding
    for n in (895, 3900, 7900):
        r = sv.compression_ratio(256, n)
        assert abs(n * (1 - r) - 256) < 1e-6


def test_samples_per_s_and_ratio(sv):
    assert sv.samples_per_s(600, 300.0) == pytest.approx(2.0)
    assert sv.samples_per_s(600, 0) is None
    assert sv.samples_per_s(600, None) is None
    assert sv.speed_ratio(4.0, 2.0) == pytest.approx(2.0)
    assert sv.speed_ratio(None, 2.0) is None
    assert sv.speed_ratio(4.0, 0) is None


def _write_run(root: Path, name: str, method: str, recs: list[dict], summary: dict | None = None, torn=False):
    d = root / "default" / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"method:\n  name: {method}\nbudget: 256\n")
    lines = [json.dumps(r) for r in recs]
    (d / "records.jsonl").write_text("\n".join(lines) + "\n" + ('{"sample_id": "x", "sta' if torn else ""))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def _rec(sid, length, subset, score, status="ok", ctx=900, q=40):
    return {"sample_id": sid, "query_idx": 0, "status": status, "score": score if status == "ok" else None,
            "context_tokens": ctx if status == "ok" else None, "question_tokens": q if status == "ok" else None,
            "meta": {"length": length, "subtask": subset}}


def test_read_kvbench_records(sv, tmp_path):
    _write_run(tmp_path, "aaa", "full", [_rec("a", 4096, "niah_single_1", 1.0), _rec("b", 8192, "niah_single_1", 0.0)],
               {"wall_s": 10.0, "setup": {"warmup_ms": 1000.0, "model_load_ms": 2000.0}})
    _write_run(tmp_path, "bbb", "snapkv", [_rec("a", 4096, "niah_single_1", 1.0),
                                            _rec("b", 8192, "niah_single_1", None, status="failed")],
               {"wall_s": 5.0, "setup": {"warmup_ms": 500.0}}, torn=True)
    records, summaries = sv.read_kvbench_records(tmp_path)
    assert len(records) == 4  # the torn last line is skipped
    assert sorted({r["_method"] for r in records}) == ["full", "snapkv"]
    assert sv.kvbench_loop_s(summaries) == pytest.approx((10 - 3) + (5 - 0.5))
    rows = sv.normalize_kvbench(records)
    s = sv.summarize(rows)
    assert s[("full", 4096)] == dict(samples=1, failed=0, accuracy=100.0, prompt_tokens=940.0)
    assert s[("snapkv", 8192)]["failed"] == 1 and s[("snapkv", 8192)]["accuracy"] is None
    assert sv.mean_prompt_tokens(rows) == pytest.approx(940.0)


def test_kvbench_loop_s_missing(sv):
    assert sv.kvbench_loop_s([]) is None
    assert sv.kvbench_loop_s([{"setup": {}}]) is None


def test_table_from_fake_rows(sv):
    def rows(method, scores, failed=0):
        out = [dict(method=method, length=4096, subset="niah_single_1", ok=True, score=s, prompt_tokens=3900)
               for s in scores]
        return out + [dict(method=method, length=4096, subset="niah_single_1", ok=False, score=None,
                           prompt_tokens=None)] * failed
    per_fw = {"kvbench": dict(rows=rows("full", [1, 1]) + rows("snapkv", [1, 0]), wall_s=2.0, loop_s=1.0),
              "kvpress": dict(rows=rows("full", [1, 0]) + rows("snapkv", [0, 0], failed=0), wall_s=8.0, loop_s=4.0)}
    t = sv.totals(per_fw)
    assert t["kvbench"]["samples_per_s"] == pytest.approx(2.0)
    assert t["kvpress"]["samples_per_s"] == pytest.approx(0.5)
    assert t["kvbench"]["loop_samples_per_s"] == pytest.approx(4.0)
    table = sv.build_table(per_fw, ["full", "snapkv"])
    lines = table.splitlines()
    assert any(l.split()[:3] == ["kvbench", "full", "4096"] and "100.0" in l for l in lines)
    assert any(l.split()[:3] == ["kvpress", "snapkv", "4096"] and "0.0" in l for l in lines)
    assert "end to end 4.00x" in table and "loop only 4.00x" in table


def test_table_counts_failures(sv):
    per_fw = {"kvpress": dict(rows=[dict(method="adakv", length=8192, subset="s", ok=False, score=None,
                                         prompt_tokens=None)] * 3, wall_s=3.0, loop_s=None)}
    table = sv.build_table(per_fw, ["adakv"])
    row = next(l for l in table.splitlines() if l.startswith("kvpress   adakv"))
    assert row.split()[3:6] == ["3", "3", "-"]
    assert sv.totals(per_fw)["kvpress"]["failed"] == 3
    assert "kvbench/kvpress" not in table  # no ratio with one side only


class _Tok:
    """A tokenizer stub with a chat template rendered like SmolLM2's (the user message verbatim)."""
    chat_template = "x"
    bos_token = "<s>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_kvpress_split_matches_kvbench_split(sv):
    from kvbench.prompts import PromptBuilder
    tok = _Tok()
    ctx, q, pre = "Long haystack text.\n", "What is the number?", " The number is"
    assert sv.kvpress_split(tok, ctx, q, pre) == PromptBuilder(tok).first_turn(ctx, q, pre)
    tok.chat_template = None
    assert sv.kvpress_split(tok, ctx, q, pre) == ("<s>" + ctx, q + "\n" + pre)


def test_side_reuse_needs_same_sweep(sv, tmp_path):
    import argparse
    args = argparse.Namespace(samples=20, lengths=[4096, 8192], model="smollm2-135m", methods=list(sv.METHODS),
                              budget=256, device="auto")
    assert sv.load_side(tmp_path, "kvbench", args) is None
    (tmp_path / "kvbench_wall.json").write_text(json.dumps(dict(wall_s=12.5, rc=0, key=sv.side_key(args))))
    assert sv.load_side(tmp_path, "kvbench", args)["wall_s"] == 12.5
    args.budget = 128  # another sweep: not reused
    assert sv.load_side(tmp_path, "kvbench", args) is None


def test_kvpress_parts_join_as_one_process(sv, tmp_path):
    """Two kvpress parts count as one process: walls summed less the second part's setup, loops and per-method
    seconds summed; parts of another sweep, or repeating a method, are not joined."""
    import argparse
    args = argparse.Namespace(samples=20, lengths=[4096], model="smollm2-135m", methods=["full", "snapkv", "adakv"],
                              budget=256, device="auto")

    def part(ms, wall, load, loop, started, budget=256):
        a = argparse.Namespace(**{**vars(args), "budget": budget})
        tag = sv.part_tag(ms)
        (tmp_path / f"kvpress_wall.{tag}.json").write_text(json.dumps(
            dict(wall_s=wall, rc=0, started=started, key=sv.side_key(a, ms))))
        (tmp_path / f"kvpress_timing.{tag}.json").write_text(json.dumps(
            dict(load_s=load, loop_s=loop, method_s={m: loop / len(ms) for m in ms})))

    part(["adakv"], 50.0, 6.0, 43.0, started=2.0)
    part(["full", "snapkv"], 100.0, 8.0, 90.0, started=1.0)
    part(["snapkv"], 70.0, 5.0, 64.0, started=3.0)          # snapkv twice: the later file is left out
    part(["full"], 70.0, 5.0, 64.0, started=4.0, budget=128)  # another sweep
    parts = sv.load_kvpress_parts(tmp_path, args)
    assert [p["tag"] for p in parts] == ["full-snapkv", "adakv"]  # in the order they started
    j = sv.join_kvpress_parts(parts)
    assert j["wall_s"] == pytest.approx(100.0 + 50.0 - 6.0)  # the second part's model load left out
    assert j["loop_s"] == pytest.approx(133.0)
    assert j["method_s"] == pytest.approx({"full": 45.0, "snapkv": 45.0, "adakv": 43.0})
    assert sv.join_kvpress_parts([]) == {}


def test_per_method_rates(sv):
    rows = lambda m, n: [dict(method=m, length=4096, subset="s", ok=True, score=1.0, prompt_tokens=10)] * n  # noqa: E731
    per_fw = {"kvbench": dict(rows=rows("full", 4) + rows("snapkv", 4), wall_s=4.0, loop_s=3.0,
                              method_s={"full": 1.0, "snapkv": 2.0}),
              "kvpress": dict(rows=rows("full", 4) + rows("snapkv", 4), wall_s=8.0, loop_s=6.0,
                              method_s={"full": 4.0, "snapkv": 2.0}, reused=True)}
    table = sv.build_table(per_fw, ["full", "snapkv"])
    full = next(l for l in table.splitlines() if l.startswith("full ") and l.rstrip().endswith("x"))
    assert full.split()[-1] == "4.00x"
    snap = next(l for l in table.splitlines() if l.startswith("snapkv ") and l.rstrip().endswith("x"))
    assert snap.split()[-1] == "1.00x"  # 2.0 s on both sides
    assert "(an earlier call's)" in table
    summaries = [{"_method": "full", "wall_s": 10.0, "setup": {"warmup_ms": 1000.0, "model_load_ms": 3000.0}},
                 {"_method": "snapkv", "wall_s": 5.0, "setup": {"warmup_ms": 500.0}}]
    assert sv.kvbench_method_s(summaries) == pytest.approx({"full": 6.0, "snapkv": 4.5})
