"""Capacity planning (kvbench/report/capacity.py): every number checked against a hand computation.

Units: GiB = 2^30 bytes, MiB = 2^20 bytes, GB = 10^9 bytes, TB/s = 10^12 bytes/s.

Worked example 1 (concurrency and throughput), a 16 GB-weight model on an 80 GiB card, 0.9 usable:
  usable  = 0.9 × 80 × 2^30        = 0.9 × 85,899,345,920 = 77,309,411,328 B
  room    = usable − 16,000,000,000 = 61,309,411,328 B for KV caches
  1.25 GiB per sequence           = 1,342,177,280 B  ->  61,309,411,328 / 1,342,177,280 = 45.68  ->  45 sequences
  decode at 3.35 TB/s, each sequence reading 0.5 GiB = 536,870,912 B of KV per token:
    B = 1:  3.35e12 / (16e9 + 536,870,912)                 = 3.35e12 / 16,536,870,912   = 202.5776 tok/s
    B = 45: 45 × 3.35e12 / (16e9 + 45 × 536,870,912)       = 150.75e12 / 40,159,191,040 = 3,753.81 tok/s

Worked example 2 (longest context): the same model and card, a run holding at most 1.25 GiB with a 32,768-token
context: 1,342,177,280 / 32,768 = 40,960 B per context token -> 61,309,411,328 / 40,960 = 1,496,811.8 -> 1,496,811.

Worked example 3 (a shipped spec): Llama-3.1-8B in bf16 (8,030,261,248 × 2 = 16,060,522,496 B) on h100-80gb
(81,559 MiB = 85,520,809,984 B as nvidia-smi reports it): room = 0.9 × 85,520,809,984 − 16,060,522,496
= 60,908,206,489.6 B; a full 32k-token cache is 32,768 × 131,072 B (2 · 32 layers · 8 KV heads · 128 · 2 B)
= 4 GiB = 4,294,967,296 B -> 14.18 -> 14 sequences.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbench.models import SYNTHETIC_SHAPES
from kvbench.report import report_main
from kvbench.report.capacity import (GPUS, decode_held_bytes, decode_tokens_per_s_bound, longest_context_tokens,
                                     max_concurrent_sequences, param_count, parse_gpu, weight_bytes_of)

GIB, MIB = 2**30, 2**20


def test_worked_example_1_concurrency_and_throughput():
    assert max_concurrent_sequences(80 * GIB, 0.9, 16e9, 1.25 * GIB) == 45
    assert decode_tokens_per_s_bound(1, 3.35e12, 16e9, 0.5 * GIB) == pytest.approx(202.5776229, rel=1e-9)
    assert decode_tokens_per_s_bound(45, 3.35e12, 16e9, 0.5 * GIB) == pytest.approx(3753.810674, rel=1e-9)
    # weights larger than the usable memory: no sequence fits
    assert max_concurrent_sequences(80 * GIB, 0.9, 80e9, 1.25 * GIB) == 0


def test_worked_example_2_longest_context():
    assert longest_context_tokens(80 * GIB, 0.9, 16e9, 1.25 * GIB, 32768) == 1_496_811


def test_worked_example_3_shipped_h100():
    h100 = GPUS["h100-80gb"]
    assert h100.memory_bytes == 81559 * MIB == 85_520_809_984 and h100.bandwidth_bytes_per_s == 3.35e12
    weights = param_count(SYNTHETIC_SHAPES["llama-3.1-8b"]) * 2
    assert weights == 16_060_522_496
    assert max_concurrent_sequences(h100.memory_bytes, 0.9, weights, 32768 * 131072) == 14


def test_param_counts_match_published_figures():
    # Llama-3.1-8B 8,030,261,248 and SmolLM2-135M 134,515,008 (the models' cards); Qwen2.5-7B 7,615,616,512
    # (q/k/v biases); Mistral-7B-v0.3 7,248,023,552
    counts = {k: param_count(SYNTHETIC_SHAPES[k]) for k in SYNTHETIC_SHAPES}
    assert counts["llama-3.1-8b"] == 8_030_261_248
    assert counts["llama-3.1-70b"] == 70_553_706_496  # Llama-3.1-70B: 70.55B (the model card's 70B)
    assert counts["smollm2-135m"] == 134_515_008
    assert counts["qwen2.5-7b"] == 7_615_616_512
    assert counts["mistral-7b"] == 7_248_023_552
    # tiny by hand: embeddings 49,152 × 64 = 3,145,728 (tied lm_head); per layer q 64·64 + k, v 2 · 64·32 + o 64·64
    # + MLP 3 · 64·128 + norms 2 · 64 = 36,992, × 2 layers = 73,984; final norm 64 -> 3,219,776
    assert counts["tiny"] == 3_219_776


def test_weight_bytes_sources():
    synth = {"model": {"name": "synthetic", "shape": "tiny"}, "dtype": "auto"}
    assert weight_bytes_of({"conditions": {"model_weight_bytes": 123}}, synth) == (123.0, "measured")
    assert weight_bytes_of({"conditions": {"device": "cuda: NVIDIA H100 80GB HBM3"}}, synth)[0] == 3_219_776 * 2
    assert weight_bytes_of({"conditions": {"device": "cpu: x86_64"}}, synth)[0] == 3_219_776 * 4
    assert weight_bytes_of({}, dict(synth, dtype="bfloat16"))[0] == 3_219_776 * 2
    assert weight_bytes_of({}, synth)[0] is None  # dtype auto, device unknown
    # the embedded smollm2-135m is the synthetic shape of the same name
    assert weight_bytes_of({}, {"model": {"name": "smollm2-135m"}, "dtype": "float32"})[0] == 134_515_008 * 4
    weights, why = weight_bytes_of({}, {"model": {"name": "meta-llama/Llama-3.1-8B"}, "dtype": "bfloat16"})
    assert weights is None and "not a synthetic shape" in why


def test_decode_held_bytes():
    rec = {"status": "ok", "kv_bytes": 1000, "kv_bytes_full": 8000, "context_tokens": 100, "new_tokens": 10,
           "kv_bytes_held_max": 5000, "query_aware": True, "context_reused": False, "meta": {}}
    assert decode_held_bytes(rec) == 1000 + 10 * 80          # 80 B per token; the question is in the context
    assert decode_held_bytes(dict(rec, kv_bytes_held_max=1500)) == 1500  # an evicting method: the measured peak
    assert decode_held_bytes(dict(rec, query_aware=False)) is None      # its question's length is not recorded
    assert decode_held_bytes(dict(rec, query_aware=False, context_reused=True)) == 5000  # peak reset before it
    multi_turn = dict(rec, query_aware=False, meta={"cache_tokens_before_answer": 130})
    assert decode_held_bytes(multi_turn) == 1000 + (30 + 10) * 80


@pytest.mark.parametrize("text", ["h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb", "l40s-48gb"])
def test_parse_shipped(text):
    assert parse_gpu(text) is GPUS[text]


def test_parse_custom_and_shipped_values():
    g = parse_gpu("mem_gb=80,bw_tbs=3.35,name=mycard")
    assert (g.name, g.memory_bytes, g.bandwidth_bytes_per_s) == ("mycard", 80_000_000_000, 3.35e12)
    g = parse_gpu("mem_gib=80,bw_tbs=2")
    assert (g.name, g.memory_bytes, g.bandwidth_bytes_per_s) == ("custom", 80 * GIB, 2e12)
    assert GPUS["h200-141gb"].memory_bytes == 143771 * MIB and GPUS["h200-141gb"].bandwidth_bytes_per_s == 4.8e12
    assert GPUS["a100-80gb"].memory_bytes == 80 * GIB and GPUS["a100-80gb"].bandwidth_bytes_per_s == 2.039e12
    assert GPUS["a100-40gb"].memory_bytes == 40 * GIB and GPUS["a100-40gb"].bandwidth_bytes_per_s == 1.555e12
    assert GPUS["l40s-48gb"].memory_bytes == 46068 * MIB and GPUS["l40s-48gb"].bandwidth_bytes_per_s == 0.864e12


@pytest.mark.parametrize("bad", ["h100", "mem_gb=80", "bw_tbs=3", "mem_gb=x,bw_tbs=3", "mem_gb=80,bw_tbs=3,foo=1",
                                 "mem_gb=80,mem_gib=80,bw_tbs=3", "mem_gb=-1,bw_tbs=3", "mem_gb=80,bw_tbs=0"])
def test_bad_gpu_exits_2_with_one_line(bad, tmp_path, capsys):
    assert report_main([str(tmp_path), "--gpu", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and repr(bad) in err[0] and "h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb" in err[0]
    assert not list(tmp_path.iterdir())  # checked before anything is written


def test_bad_mem_util_exits_2(tmp_path, capsys):
    assert report_main([str(tmp_path), "--gpu-mem-util", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-mem-util 1.5" in err[0]


# -- end to end ---------------------------------------------------------------------------------------------
BPT_8B = 131072  # K+V bytes per token of Llama-3.1-8B in bf16: 2 · 32 layers · 8 KV heads · 128 · 2 B
W_8B = 16_060_522_496
H100_NAME = "cuda: NVIDIA H100 80GB HBM3"


def record(i, context, kv_bytes, held_max, read, new_tokens, decode_ms, query_aware, bpt):
    return {"sample_id": f"s{i}", "query_idx": 0, "status": "ok", "error_type": None, "error": None, "score": 1.0,
            "prediction": "p", "answers": ["a"], "ttft_ms": 10.0, "compress_ms": 1.0, "decode_ms_per_token": decode_ms,
            "new_tokens": new_tokens, "kv_bytes": kv_bytes, "kv_bytes_full": context * bpt,
            "kv_bytes_held_max": held_max, "kv_bytes_read_per_token": read, "peak_mem_bytes": 10**9,
            "decode_flops_per_token": 1.0, "context_tokens": context, "kept_tokens": 1.0, "context_reused": False,
            "query_aware": query_aware, "meta": {}}


def write_run(root: Path, model: dict, method, budget, records, conditions, dtype="auto", query_aware=True,
              status="ok"):
    """A run dir as the engine writes it; the summary's numbers are means of the records."""
    h = f"{model['name'].replace('/', '_')}-{method}-{budget}"
    config = {"model": model, "task": {"name": "niah"}, "method": {"name": method}, "budget": budget,
              "query_aware": query_aware, "seed": 0, "dtype": dtype}
    mean = lambda k: sum(r[k] for r in records) / len(records) if records else None
    summary = {"run_id": h, "config_hash": h, "config": config, "model": model["name"], "task": "niah",
               "method": method, "budget": budget, "query_aware": query_aware, "status": status,
               "n": len(records), "n_failed": 0 if records else 1, "score": mean("score"),
               **{k: mean(k) for k in ["kv_bytes", "kv_bytes_full", "kv_bytes_held_max", "kv_bytes_read_per_token",
                                       "context_tokens", "decode_ms_per_token", "ttft_ms", "peak_mem_bytes"]},
               "conditions": conditions, "extra": {}}
    if not records:
        summary.update(n_records=1, error_type="OutOfMemoryError", error="CUDA out of memory")
    d = root / h
    d.mkdir(parents=True)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                     or json.dumps(dict(sample_id="s0", status="failed")) + "\n")
    (d / "summary.json").write_text(json.dumps(summary))


def make_results(root: Path) -> Path:
    llama = {"name": "meta-llama/Llama-3.1-8B-Instruct"}
    cond = {"device": H100_NAME, "model_weight_bytes": W_8B, "model_params": 8_030_261_248}
    # full cache, query-aware: an 8,192-token prompt, 64 new tokens; held = (8,192 + 64) × 128 KiB = 1,032 MiB,
    # read per step on average (8,192 + 32) × 128 KiB = 1,028 MiB
    write_run(root, llama, "full", None, [record(0, 8192, 8192 * BPT_8B, 8256 * BPT_8B, 8224 * BPT_8B, 64, 20.0,
                                                 True, BPT_8B)], cond)
    # snapkv at 1,024 tokens: 128 MiB kept; held max 176 MiB (a layer's whole prefill before its compression);
    # decoding holds 128 + 64 × 128 KiB = 136 MiB; reads (1,024 + 32) × 128 KiB = 132 MiB a step
    write_run(root, llama, "snapkv", 1024, [record(0, 8192, 1024 * BPT_8B, 176 * MIB, 1056 * BPT_8B, 64, 15.0,
                                                   True, BPT_8B)], cond)
    # query-agnostic streaming_llm: its question's length is not recorded -> counted at its held max (176 MiB)
    write_run(root, llama, "streaming_llm", 1024, [record(0, 8192, 1024 * BPT_8B, 176 * MIB, 1056 * BPT_8B, 64,
                                                          15.0, False, BPT_8B)], cond, query_aware=False)
    write_run(root, llama, "h2o", 1024, [], cond, status="failed")
    # a synthetic tiny model, summary without model_weight_bytes: 3,219,776 parameters × 2 B (bfloat16);
    # 256 B per token (2 · 2 layers · 2 KV heads · 16 · 2 B), 1,000-token prompt, 10 new tokens
    write_run(root, {"name": "synthetic", "shape": "tiny"}, "full", None,
              [record(0, 1000, 1000 * 256, 1010 * 256, 1005 * 256, 10, 2.0, True, 256)],
              {"device": "cpu: x86_64"}, dtype="bfloat16")
    # a hub model whose summary predates model_weight_bytes: memory shown, capacity "-"
    write_run(root, {"name": "some/hub-model"}, "full", None,
              [record(0, 1000, 1000 * 256, 1010 * 256, 1005 * 256, 10, 2.0, True, 256)], {"device": H100_NAME})
    return root


def test_report_capacity_tables(tmp_path, capsys):
    root = make_results(tmp_path / "res")
    out = tmp_path / "rep"
    assert report_main([str(root), "--out", str(out), "--no-plots", "--gpu", "mem_gib=80,bw_tbs=3.35,name=round80",
                        "--gpu", "h100-80gb"]) == 0
    err = capsys.readouterr().err
    assert err.count("capacity: model") == 1
    assert "capacity: model some/hub-model: weight bytes unknown" in err
    md = (out / "capacity.md").read_text()
    assert md.count("**Capacity on ") == 6  # 2 GPUs × 3 models
    assert ("**Capacity on round80: 80.00 GiB, 3.35 TB/s, 0.9 of it usable: meta-llama/Llama-3.1-8B-Instruct "
            "(weights 15,316.5 MiB); max sequences from the KV held while decoding**") in md
    # round80: room = 0.9 × 85,899,345,920 − 16,060,522,496 = 61,248,888,832 B
    # full: 61,248,888,832 / 1,082,130,432 (1,032 MiB) = 56.6 -> 56; longest context 61,248,888,832 /
    #   (1,082,130,432 / 8,192 = 132,096 B/token) = 463,669.5 -> 463,669;
    #   B=56: 56 × 3.35e12 / (16,060,522,496 + 56 × 1,077,936,128) = 187.6e12 / 76,424,945,664 = 2,454.7;
    #   B=1: 3.35e12 / 17,138,458,624 = 195.5; measured 1000 / 20 ms = 50.0
    assert ("| full | full | niah | ok | 1024.00 | 1032.00 | 1032.00 | 56 | 463,669 | 2,454.7 | 195.5 | 50.0 | "
            f"{H100_NAME} |") in md
    # snapkv: 61,248,888,832 / 142,606,336 (136 MiB) = 429.5 -> 429; longest: / (184,549,376 / 8,192 = 22,528)
    #   = 2,718,789.5 -> 2,718,789; B=429: 429 × 3.35e12 / (16,060,522,496 + 429 × 138,412,032)
    #   = 1.43715e15 / 75,439,284,224 = 19,050.4; B=1: 3.35e12 / 16,198,934,528 = 206.8; measured 1000/15 = 66.7
    assert ("| snapkv | 1024 | niah | ok | 128.00 | 176.00 | 136.00 | 429 | 2,718,789 | 19,050.4 | 206.8 | 66.7 | "
            f"{H100_NAME} |") in md
    # streaming_llm (query-agnostic): 61,248,888,832 / 184,549,376 (176 MiB held max) = 331.9 -> 331, marked *
    #   B=331: 331 × 3.35e12 / (16,060,522,496 + 331 × 138,412,032) = 1.10885e15 / 61,874,905,088 = 17,920.8
    assert ("| streaming_llm | 1024 | niah | ok | 128.00 | 176.00 | - | 331 * | 2,718,789 | 17,920.8 | 206.8 | 66.7 | "
            f"{H100_NAME} |") in md
    assert "| h2o | 1024 | niah | failed | - | - | - | - | - | - | - | - | " in md
    # h100-80gb (81,559 MiB): room = 0.9 × 85,520,809,984 − 16,060,522,496 = 60,908,206,489.6 B
    #   full: / 1,082,130,432 = 56.3 -> 56; snapkv: / 142,606,336 = 427.1 -> 427, B=427 bound 19,031.4
    assert "| full | full | niah | ok | 1024.00 | 1032.00 | 1032.00 | 56 | 461,090 | 2,454.7 | 195.5 |" in md
    assert "| snapkv | 1024 | niah | ok | 128.00 | 176.00 | 136.00 | 427 | 2,703,666 | 19,031.4 | 206.8 |" in md
    # synthetic tiny on round80: weights 6,439,552 B -> room 77,302,971,776 B; held decoding 1,010 × 256 = 258,560 B
    #   -> 298,974.98 -> 298,974 sequences; longest: / 258.56 B per token = 298,974,983.7 -> 298,974,983;
    #   B=1: 3.35e12 / (6,439,552 + 257,280) = 500,236.5 tok/s
    assert "weights 6.1 MiB" in md
    assert "| full | full | niah | ok | 0.24 | 0.25 | 0.25 | 298,974 | 298,974,983 |" in md
    assert "| 500,236.5 | 500.0 | cpu: x86_64 |" in md
    # the hub model without weights: measured memory and speed, capacity "-"
    assert "| full | full | niah | ok | 0.24 | 0.25 | 0.25 | - | - | - | - | 500.0 | " + H100_NAME + " |" in md
    assert "* counted at KV held max" in md and "linear extrapolation" in md
    # in table.md and the dashboard too
    assert "| snapkv | 1024 | niah | ok | 128.00 | 176.00 | 136.00 | 429 |" in (out / "table.md").read_text()
    html = (out / "index.html").read_text()
    assert "Capacity on round80: 80.00 GiB" in html and "<td>2,718,789</td>" in html


def test_default_gpu_and_mem_util(tmp_path, capsys):
    root = make_results(tmp_path / "res")
    out = tmp_path / "rep"
    assert report_main([str(root), "--out", str(out), "--no-plots", "--gpu-mem-util", "0.5"]) == 0
    md = (out / "capacity.md").read_text()
    assert md.count("**Capacity on h100-80gb: 79.65 GiB, 3.35 TB/s, 0.5 of it usable:") == 3
    # 0.5 × 85,520,809,984 − 16,060,522,496 = 26,699,882,496 B; / 1,082,130,432 = 24.7 -> 24
    assert "| full | full | niah | ok | 1024.00 | 1032.00 | 1032.00 | 24 |" in md
