"""One run = one (model, task, method, budget) config: samples → engine → scores → records → summary.

A failing sample (OOM, too long, a crash in a method) is recorded as failed and the run goes on; a failing
run is recorded as failed and never kills a sweep.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

from kvbench.engine import Engine
from kvbench.method import build_method
from kvbench.models import load_model
from kvbench.results import RunDir, now, summarize
from kvbench.task import load_all_tasks

_MODEL_CACHE: dict[tuple, object] = {}  # sweeps with the basic launcher reuse the loaded model


def get_model(mcfg: dict, device: str, dtype: str, seed: int):
    key = (mcfg.get("name"), mcfg.get("path"), mcfg.get("shape"), device, dtype, mcfg.get("max_context"))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        gc.collect()
        _MODEL_CACHE[key] = load_model(name=mcfg["name"], path=mcfg.get("path"), shape=mcfg.get("shape"),
                                       device=device, dtype=dtype, seed=seed, max_context=mcfg.get("max_context"))
    return _MODEL_CACHE[key]


def build_task(tcfg: dict):
    tasks = load_all_tasks()
    name = tcfg["name"]
    if name not in tasks:
        raise ValueError(f"task={name!r}; allowed: {', '.join(sorted(tasks))}")
    knobs = {k: v for k, v in tcfg.items() if k != "name"}
    return tasks[name](**knobs)


def method_from_cfg(cfg: dict):
    mcfg = dict(cfg["method"])
    name = mcfg.pop("name")
    mcfg.pop("paper", None)
    return build_method(name, budget=cfg.get("budget") if name != "full" else None,
                        compression_ratio=cfg.get("compression_ratio"), **mcfg)


def failed_records(sample, exc: BaseException) -> list[dict]:
    return [{"sample_id": sample.id, "query_idx": qi, "status": "failed", "error_type": type(exc).__name__,
             "error": (str(exc).splitlines() or [""])[0][:500], "score": None, "meta": {**sample.meta, **q.meta}}
            for qi, q in enumerate(sample.queries)]


def _progress(it, total, desc):
    try:
        from kvbench.report import progress
        return progress(it, total=total, desc=desc)
    except Exception:
        return it


def execute(cfg: dict) -> dict:
    """Run (or resume, or skip) one config; returns its summary."""
    rd = RunDir(Path(cfg.get("results_dir", "results")), cfg.get("sweep", "default"), cfg)
    if rd.finished() and not cfg.get("force", False):
        import json
        summ = json.loads(rd.summary_path.read_text())
        if summ.get("status") != "failed":
            print(f"[kvbench] skip finished run {rd.hash} ({rd.path})", file=sys.stderr)
            summ["_skipped"] = True
            return summ
    rd.start(force=bool(cfg.get("force", False)))
    started, t0 = now(), time.perf_counter()
    records = rd.load_records()
    task = None
    try:
        torch.manual_seed(int(cfg.get("seed", 42)))
        method = method_from_cfg(cfg)
        task = build_task(cfg["task"])
        lm = get_model(cfg["model"], cfg.get("device", "auto"), cfg.get("dtype", "auto"), int(cfg.get("seed", 42)))
        engine = Engine(lm, method, query_aware=bool(cfg.get("query_aware", False)),
                        prefill_chunk=int(cfg.get("prefill_chunk", 0)))
        done = {r["sample_id"] for r in records}
        samples = list(task.samples(lm.tokenizer, max_context_tokens=lm.max_context))
        if not samples:
            raise ValueError(f"task {cfg['task']['name']} produced no samples with this config")
        for sample in _progress(samples, len(samples), f"{cfg['method']['name']}@{cfg.get('budget')}"):
            if sample.id in done:
                continue
            try:
                recs = engine.run_sample(sample)
                for r, q in zip(recs, sample.queries):
                    pred = task.postprocess(r["prediction"], q, sample)
                    r["score"] = float(task.score(pred, q, sample))
            except (Exception, torch.cuda.OutOfMemoryError) as e:  # a bad sample never kills the run
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                recs = failed_records(sample, e)
            rd.append(recs)
            records.extend(recs)
        extra = task.aggregate(records)
        summary = summarize(cfg, rd.hash, records, extra, started, time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the run failed as a whole: record it, let the sweep go on
        if isinstance(e, SystemExit):
            raise
        summary = summarize(cfg, rd.hash, records, {}, started, time.perf_counter() - t0, status="failed", error=e)
    rd.write_summary(summary)
    summary["_dir"] = str(rd.path)
    return summary
