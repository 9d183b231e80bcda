"""End to end: kvbench.runner.execute on the LongBench and SCBench fixtures (official schema) with the tiny
synthetic Llama and SnapKV, checking records, scores (the task's metric re-applied to the stored prediction),
summary aggregates and the shared-context bookkeeping (compressions per context, reuse, turns)."""
import json
from pathlib import Path

import pytest

from kvbench import runner
from kvbench.methods.snapkv import SnapKV
from kvbench.tasks import _metrics as M
from kvbench.tasks.longbench import DATASET2METRIC, DATASET2MAXLEN, LongBench
from kvbench.tasks.scbench import SCBench

FIX = Path(__file__).parent / "fixtures"
N_LAYERS = 2  # model.shape=tiny
BUDGET = 64


def config(tmp_path, task: dict) -> dict:
    return {"model": {"name": "synthetic", "shape": "tiny"}, "device": "cpu", "dtype": "float32",
            "method": {"name": "snapkv", "window_size": 32, "kernel_size": 7, "pooling": "max"},
            "budget": BUDGET, "query_aware": False, "task": task, "results_dir": str(tmp_path), "sweep": "e2e",
            "seed": 0, "warmup": False}  # the compression counts below are those of the timed samples alone


@pytest.fixture
def compressions(monkeypatch):
    """Every SnapKV.compress_layer call, as (layer index, tokens in the layer before compression)."""
    calls = []
    orig = SnapKV.compress_layer

    def counting(self, ctx):
        calls.append((ctx.layer_idx, max(ctx.layer.head_lengths)))
        return orig(self, ctx)
    monkeypatch.setattr(SnapKV, "compress_layer", counting)
    return calls


def rescore(task, recs, tokenizer):
    """The task's own postprocess + score, on a fresh task object, applied to the stored predictions."""
    samples = {s.id: s for s in task.samples(tokenizer, max_context_tokens=8192)}
    for r in recs:
        s = samples[r["sample_id"]]
        q = s.queries[r["query_idx"]]
        assert r["score"] == task.score(task.postprocess(r["prediction"], q, s), q, s)


def run(cfg):
    summary = runner.execute(cfg)
    assert summary["status"] == "ok", summary
    recs = [json.loads(line) for line in open(Path(summary["_dir"]) / "records.jsonl")]
    assert all(r["status"] == "ok" for r in recs), recs
    return summary, recs


def test_longbench_two_subsets(tmp_path, compressions, tokenizer):
    task = {"name": "longbench", "subsets": ["hotpotqa", "trec"], "data_dir": str(FIX / "longbench"),
            "max_length": 512, "num_samples": 1}
    summary, recs = run(config(tmp_path, task))
    assert [r["meta"]["subtask"] for r in recs] == ["hotpotqa", "trec"]
    rows = {s: json.loads((FIX / "longbench" / f"{s}.jsonl").read_text().splitlines()[0]) for s in ("hotpotqa", "trec")}
    for r in recs:
        name, row = r["meta"]["subtask"], rows[r["meta"]["subtask"]]
        assert r["sample_id"] == f"{name}/{row['_id']}" and r["answers"] == row["answers"]
        assert r["new_tokens"] <= DATASET2MAXLEN[name]
        assert 0.0 <= r["score"] <= 1.0
        # the official metric on the official cleanup (trec: first line) of the stored prediction
        pred = r["prediction"].lstrip("\n").split("\n")[0].strip() if name == "trec" else r["prediction"].strip()
        expect = max(DATASET2METRIC[name](pred, a, all_classes=row.get("all_classes") or []) for a in row["answers"])
        assert r["score"] == pytest.approx(expect)
        # the context was compressed to the budget (middle-truncated to max_length first)
        assert BUDGET < r["context_tokens"] <= 512 + 64 and r["kept_tokens"] == BUDGET
        assert r["kv_bytes"] < r["kv_bytes_full"]
    assert len(compressions) == 2 * N_LAYERS  # one compression per sample
    extra = summary["extra"]
    assert extra["score/hotpotqa"] == pytest.approx(recs[0]["score"])
    assert extra["score/trec"] == pytest.approx(recs[1]["score"])
    assert extra["score/cat/multi_doc_qa"] == pytest.approx(recs[0]["score"])
    assert extra["score/cat/few_shot"] == pytest.approx(recs[1]["score"])
    assert extra["score/avg_en"] == pytest.approx((recs[0]["score"] + recs[1]["score"]) / 2)
    rescore(LongBench(**{k: v for k, v in task.items() if k != "name"}), recs, tokenizer)


def scbench_rows():
    return [json.loads(line) for line in (FIX / "scbench" / "scbench_kv.jsonl").read_text().splitlines()][:1]


def check_scbench_records(recs, summary):
    row = scbench_rows()[0]
    turns = row["multi_turns"]
    assert [r["query_idx"] for r in recs] == list(range(len(turns)))
    assert all(r["sample_id"] == f"scbench_kv/{row['id']}" for r in recs)
    for r, t in zip(recs, turns):
        assert r["answers"] == [t["answer"]]
        assert 0.0 <= r["score"] <= 1.0
        assert r["score"] == float(t["answer"] in r["prediction"].strip()) == M.kv_match(r["prediction"].strip(), t["answer"])
        assert r["kept_tokens"] == BUDGET < r["context_tokens"]
    assert [r["context_reused"] for r in recs] == [False] + [True] * (len(turns) - 1)
    extra = summary["extra"]
    mean = sum(r["score"] for r in recs) / len(recs)
    assert extra["score/scbench_kv"] == pytest.approx(mean) and extra["score/avg"] == pytest.approx(mean)
    return turns


def test_scbench_multi_request(tmp_path, compressions, tokenizer):
    task = {"name": "scbench", "subsets": ["scbench_kv"], "mode": "multi_request", "max_turns": 5,
            "max_length": 2048, "data_dir": str(FIX / "scbench"), "num_samples": 1}
    summary, recs = run(config(tmp_path, task))
    turns = check_scbench_records(recs, summary)
    rescore(SCBench(**{k: v for k, v in task.items() if k != "name"}), recs, tokenizer)
    assert len(turns) == 3
    assert all(r["mode"] == "multi_request" for r in recs)
    # the context is compressed once; every query starts from that same compressed context
    assert len(compressions) == N_LAYERS
    assert len({r["kv_bytes"] for r in recs}) == 1 and len({r["context_tokens"] for r in recs}) == 1
    # reuse skips the context prefill: its TTFT is recorded apart, and is shorter
    assert recs[0]["ttft_ms"] > 0 and recs[0]["ttft_reused_ms"] is None
    assert all(r["ttft_ms"] is None and 0 < r["ttft_reused_ms"] < recs[0]["ttft_ms"] for r in recs[1:])
    assert summary["ttft_ms"] == pytest.approx(recs[0]["ttft_ms"])
    assert summary["ttft_reused_ms"] == pytest.approx(sum(r["ttft_reused_ms"] for r in recs[1:]) / (len(recs) - 1))


def test_scbench_multi_turn(tmp_path, compressions, tokenizer):
    task = {"name": "scbench", "subsets": ["scbench_kv"], "mode": "multi_turn", "max_turns": 5,
            "max_length": 2048, "data_dir": str(FIX / "scbench"), "num_samples": 1}
    summary, recs = run(config(tmp_path, task))
    turns = check_scbench_records(recs, summary)
    assert all(r["mode"] == "multi_turn" for r in recs)
    assert [r["meta"]["turn"] for r in recs] == list(range(len(turns)))
    assert len(compressions) == N_LAYERS  # later turns extend the compressed cache, they never recompress
    # the cache grows by each turn's question and golden answer
    before = [r["meta"]["cache_tokens_before_answer"] for r in recs]
    assert before == sorted(before) and len(set(before)) == len(before)
    extra = summary["extra"]
    for k, r in enumerate(recs):
        assert extra[f"score/scbench_kv/turn{k}"] == pytest.approx(r["score"])
    rescore(SCBench(**{k: v for k, v in task.items() if k != "name"}), recs, tokenizer)
