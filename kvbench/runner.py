"""One run = one (model, task, method, budget, ...) config: samples → engine → scores → records → summary.

- Identity: the run directory is `results/<sweep>/<run-hash>/` (see kvbench/results.py). A complete run
  (a valid summary, and every record it counts on disk) is skipped; an interrupted one, or one whose records
  were cut or damaged, resumes at its next unscored sample (records are fsynced per sample); a
  sample that failed with a retryable error (OOM, a crash) is computed again on resume; `force=true`
  starts the run from scratch.
- Failures: a failing sample (CUDA OOM, a prompt longer than the model's context, a crash in a method or
  a metric) is recorded as failed records and the run goes on; a failing run (model that won't load, a
  task that yields nothing) is recorded as a failed summary and `execute` returns normally, so one run
  never stops a Hydra sweep.
- Determinism: every sample starts from the same seeds (run seed + sample id), so a sample's records do
  not depend on which samples ran before it in this process — a resumed run equals an uninterrupted one.
  Timings excepted, the same config on the same machine gives identical records (greedy decoding;
  on GPU, kernels with atomics may still differ in the last bits).

Fault injection, for tests only: KVBENCH_FAULT="<kind>:<sample_id>[:<key>=<value>]" makes the runner fail
when it reaches that sample (in runs whose config has <key> == <value>, dotted keys e.g. method.name):
kind `oom` raises torch.cuda.OutOfMemoryError, `error` raises RuntimeError (a crash in a method), `kill`
sends SIGKILL to the process itself (a node failure or preemption, mid-run). Several faults: separate
them with ';'.
"""
from __future__ import annotations

import gc
import os
import random
import signal
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import torch

from kvbench.engine import Engine
from kvbench.method import build_method, uses_budget
from kvbench.metrics import run_conditions
from kvbench.models import load_model
from kvbench.results import RunBusy, RunDir, first_line, now, summarize
from kvbench.task import DataError, load_all_tasks

_MODEL_CACHE: dict[tuple, object] = {}  # sweeps with an in-process launcher (basic, joblib workers) reuse the model

FAULT_ENV = "KVBENCH_FAULT"
_FORCED: set[str] = set()  # runs already rerun with force=true by this process


def get_model(mcfg: dict, device: str, dtype: str, seed: int):
    key = (mcfg.get("name"), mcfg.get("path"), mcfg.get("shape"), device, dtype, mcfg.get("max_context"), seed,
           mcfg.get("device_map"))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _MODEL_CACHE[key] = load_model(name=mcfg["name"], path=mcfg.get("path"), shape=mcfg.get("shape"),
                                       device=device, dtype=dtype, seed=seed, max_context=mcfg.get("max_context"),
                                       device_map=mcfg.get("device_map"))
    return _MODEL_CACHE[key]


def take_gpu(cfg: dict) -> dict:
    """With `device=auto` and `gpu_lock` on (the default), claim one free GPU of this host for this process and
    make it the current CUDA device (kvbench/gpus.py); returns what records say of it (gpu_index: as nvidia-smi
    numbers it, gpu_uuid, gpu_name). A model spread over several GPUs (model.device_map) claims none."""
    if str(cfg.get("device", "auto")) != "auto" or not cfg.get("gpu_lock", True) or cfg["model"].get("device_map"):
        return {}
    from kvbench import gpus
    try:
        gpu = gpus.claim_for_job(log=_log)
    except OSError as e:  # the lock dir cannot be written: run as before the claim existed, and say so
        _log(f"no GPU claimed ({gpus.lock_dir()}: {e}); set KVBENCH_GPU_LOCK_DIR or gpu_lock=false")
        return {}
    if gpu is None or not torch.cuda.is_available():
        return {}
    torch.cuda.set_device(gpus.torch_index(gpu))
    n_jobs = torch.cuda.device_count()  # the pool: every GPU this process sees, one job on each
    if n_jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # one job per GPU runs at once: each takes its share of the host's cores (torch's default, every core
        # in every job, oversubscribes the host N times)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
    return {"gpu_index": gpu.index, "gpu_uuid": gpu.uuid, "gpu_name": gpu.name}


def model_size(lm) -> dict:
    """Parameters and their bytes as loaded (capacity planning subtracts them from the card's memory), and
    the devices the model's weights sit on."""
    params = list(lm.model.parameters())
    devices = sorted({str(p.device) for p in params})
    return {"model_params": sum(p.numel() for p in params),
            "model_weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "model_devices": devices}


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
    budgeted = uses_budget(name)
    return build_method(name, budget=cfg.get("budget") if budgeted else None,
                        compression_ratio=cfg.get("compression_ratio") if budgeted else None, **mcfg)


def normalize_config(cfg: dict) -> dict:
    """The config as it identifies the run: the full cache has no budget, so one run serves every budget
    of a sweep (same normalization as cli._hydra_job; the parent uses it to find each job's run dir)."""
    if not uses_budget(cfg.get("method", {}).get("name")) and (cfg.get("budget") is not None
                                                        or cfg.get("compression_ratio") is not None):
        cfg = {**cfg, "budget": None, "compression_ratio": None}
    mod = cfg.get("model")
    if isinstance(mod, dict) and "device_map" in mod and mod["device_map"] is None:
        cfg = {**cfg, "model": {k: v for k, v in mod.items() if k != "device_map"}}  # one device: as before the knob
    m = cfg.get("method")
    if isinstance(m, dict) and any(isinstance(m.get(k), dict) and m[k].get("name") == "plain"
                                   for k in ("storage", "selector")):
        # plain rows read whole are what every run did before formats existed: same identity (config hash)
        cfg = {**cfg, "method": {k: v for k, v in m.items()
                                 if not (k in ("storage", "selector") and isinstance(v, dict) and v.get("name") == "plain")}}
    return cfg


def task_data_version(cfg: dict) -> str | None:
    """A task class may set `data_version` (bump it when its samples or prompts change); part of the run hash."""
    cls = load_all_tasks().get(cfg.get("task", {}).get("name"))
    v = getattr(cls, "data_version", None)
    return None if v is None else str(v)


def run_dir(cfg: dict) -> RunDir:
    return RunDir(Path(cfg.get("results_dir", "results")), cfg.get("sweep", "default"), cfg, task_data_version(cfg))


def failed_records(sample, exc: BaseException) -> list[dict]:
    return [{"sample_id": sample.id, "query_idx": qi, "status": "failed", "error_type": type(exc).__name__,
             "error": (str(exc).splitlines() or [""])[0][:500], "score": None, "meta": {**sample.meta, **q.meta}}
            for qi, q in enumerate(sample.queries)]


def seed_everything(seed: int, sample_id: str = "") -> None:
    s = (int(seed) * 1_000_003 + zlib.crc32(sample_id.encode())) % 2**32
    random.seed(s)
    torch.manual_seed(s)  # CPU and every CUDA device
    try:
        import numpy as np
        np.random.seed(s)
    except ImportError:
        pass


def _cfg_get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def inject_fault(cfg: dict, sample_id: str) -> None:
    """Test-only fault injection (see the module docstring); a no-op unless KVBENCH_FAULT is set."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for fault in filter(None, (f.strip() for f in spec.split(";"))):
        kind, _, rest = fault.partition(":")
        sid, _, cond = rest.partition(":")
        if sid != sample_id:
            continue
        if cond:
            key, _, want = cond.partition("=")
            if str(_cfg_get(cfg, key)) != want:
                continue
        if kind == "oom":
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} at {sample_id})")
        if kind == "error":
            raise RuntimeError(f"injected crash ({FAULT_ENV} at {sample_id})")
        if kind == "kill":
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown fault kind {kind!r}; allowed: oom, error, kill")


def _free_after(e: BaseException) -> None:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def warm_up(engine: Engine, todo: list, seed: int) -> dict:
    """Pay the one-time costs (kernel compilation, graph capture, first allocations) on a shortened copy of
    the first sample that runs (the next one if it fails: too long, OOM), before any timed sample. Its
    records are thrown away; how long it took is reported apart (summary: setup.warmup_ms)."""
    err = None
    for sample in [s for s in todo if s.error is None][:3]:  # never a placeholder for a bad row of the data
        seed_everything(seed, sample.id)
        try:
            return {"warmup_ms": engine.warmup(sample), "warmup_sample": sample.id}
        except Exception as e:
            _free_after(e)
            err = f"{type(e).__name__}: {first_line(e)}"
    _log(f"warm-up failed ({err}): the first timed sample may include one-time costs")
    return {"warmup_ms": None, "warmup_error": err}


PROGRESS_EVERY_S = 30.0  # when stderr is not a terminal: a progress line at most this often (and at the end)


def _progress(it, total, desc):
    """A tqdm bar on a terminal; elsewhere (`make demo | tee log`, CI, SLURM logs) one plain line after the
    first sample, then at most every PROGRESS_EVERY_S seconds, and after the last one."""
    if sys.stderr.isatty():
        try:
            from kvbench.report import progress
            return progress(it, total=total, desc=desc)
        except Exception:
            return it
    return _log_progress(it, total, desc)


def _log_progress(it, total, desc):
    t0 = last = time.perf_counter()
    for i, x in enumerate(it, 1):
        yield x
        now_ = time.perf_counter()
        if i == 1 or i == total or now_ - last >= PROGRESS_EVERY_S:
            last = now_
            left = (now_ - t0) / i * (total - i)
            eta = f", ~{left:.0f} s left" if i < total else ""
            _log(f"{desc}: {i}/{total} samples, {now_ - t0:.0f} s{eta}")


def _log(msg: str) -> None:
    print(f"[kvbench] {msg}", file=sys.stderr, flush=True)


def execute(cfg: dict) -> dict:
    """Run, resume or skip one config; returns its summary (never raises for a failure of the run)."""
    cfg = normalize_config(cfg)
    rd = run_dir(cfg)
    # force=true reruns a run once per process: the full cache appears once per budget of a sweep
    force = bool(cfg.get("force", False)) and rd.hash not in _FORCED
    if force:
        _FORCED.add(rd.hash)
    done = None if force else rd.complete_summary(repair=False, warn=False)  # the locked check says why not
    if done is not None:
        _log(f"skip finished run {rd.hash} ({rd.path})")
        return {**done, "_skipped": True, "_dir": str(rd.path)}
    try:
        rd.lock()
    except RunBusy as e:
        _log(f"skip: {e}")
        return {"run_id": rd.hash, "config_hash": rd.hash, "status": "busy", "_dir": str(rd.path)}
    except OSError as e:
        return _cannot_write(rd, e)
    try:
        return _execute_locked(cfg, rd, force)
    except OSError as e:  # disk full, storage gone read-only: this run fails in one line, the sweep goes on
        return _cannot_write(rd, e)
    finally:
        rd.unlock()


def _cannot_write(rd: RunDir, e: OSError) -> dict:
    """The run's results could not be written. Files are written atomically (summary, config) or a sample
    per line (records: a torn last line is dropped on resume), so nothing half-written is ever read back;
    the same command computes what is missing once there is room."""
    msg = f"cannot write results in {rd.path}: {type(e).__name__}: {first_line(e)}"
    _log(f"run {rd.hash} failed: {msg}")
    return {"run_id": rd.hash, "config_hash": rd.hash, "status": "failed", "error_type": type(e).__name__,
            "error": msg, "run_error": True, "_dir": str(rd.path)}


def _execute_locked(cfg: dict, rd: RunDir, force: bool) -> dict:
    # Another process may have completed the run while we waited for the lock.
    # A summary counts only with the records it summarizes: a finished run whose records were lost resumes.
    done = None if force else rd.complete_summary()
    if done is not None:
        return {**done, "_skipped": True, "_dir": str(rd.path)}
    rd.start(force=force)
    rd.summary_path.unlink(missing_ok=True)  # a stale summary must not mark a half-redone run complete
    rd.job_error_path.unlink(missing_ok=True)  # a launcher's note that its last job was killed
    records = rd.resume_records()
    setup: dict = {}       # one-time costs, measured apart from every recorded timing
    conditions: dict = {}  # the machine the run is timed on (each record carries it)
    t_wait = time.perf_counter()
    conditions.update(take_gpu(cfg))  # device=auto with several jobs at once: this job's own GPU (may wait)
    setup["gpu_wait_ms"] = (time.perf_counter() - t_wait) * 1e3
    started, t0 = now(), time.perf_counter()  # the run starts once it has its GPU
    seed = int(cfg.get("seed", 42))
    try:
        seed_everything(seed)
        method = method_from_cfg(cfg)
        task = build_task(cfg["task"])
        t_load = time.perf_counter()
        lm = get_model(cfg["model"], cfg.get("device", "auto"), cfg.get("dtype", "auto"), seed)
        setup["model_load_ms"] = (time.perf_counter() - t_load) * 1e3  # ~0 when this process already had it
        conditions.update(run_conditions(lm.device))
        conditions.update(model_size(lm))
        if hasattr(method, "prepare"):  # methods that need the model itself: token ids, stored head profiles
            method.prepare(lm)
        engine = Engine(lm, method, query_aware=bool(cfg.get("query_aware", False)),
                        prefill_chunk=int(cfg.get("prefill_chunk", 0)))
        seed_everything(seed)
        samples = list(task.samples(lm.tokenizer, max_context_tokens=lm.max_context))
        if not samples:
            raise ValueError(f"task {cfg['task']['name']} produced no samples with this config")
        # a sample is done when each of its queries has its record (all are written in one write; fewer or
        # more mean the file was cut or damaged): the others are computed again
        n_queries = {s.id: len(s.queries) for s in samples}
        per_sample = Counter(r["sample_id"] for r in records)
        cut = {sid for sid, k in per_sample.items() if sid in n_queries and k != n_queries[sid]}
        if cut:
            _log(f"run {rd.hash}: {len(cut)} sample(s) without one record per query, computed again: "
                 f"{', '.join(sorted(cut)[:5])}")
            records = rd.drop_samples(records, cut)
        done = {r["sample_id"] for r in records}
        if done:
            _log(f"resume run {rd.hash}: {len(done)} of {len(samples)} samples already recorded")
        todo = [s for s in samples if s.id not in done]
        if cfg.get("warmup", True) and todo:
            setup.update(warm_up(engine, todo, seed))
        for sample in _progress(todo, len(todo), f"{cfg['method']['name']}@{cfg.get('budget')}"):
            seed_everything(seed, sample.id)
            try:
                inject_fault(cfg, sample.id)
                if sample.error is not None:  # a bad row of the data (tasks/_data.py): fails alone
                    raise DataError(sample.error)
                recs = engine.run_sample(sample)
                for r, q in zip(recs, sample.queries):
                    pred = task.postprocess(r["prediction"], q, sample)
                    r["score"] = float(task.score(pred, q, sample))
            except Exception as e:  # a bad sample never kills the run (torch.cuda.OutOfMemoryError included)
                _free_after(e)
                _log(f"run {rd.hash}: sample {sample.id} failed: {type(e).__name__}: {first_line(e)}")
                recs = failed_records(sample, e)
            for r in recs:
                r.update(conditions)
            rd.append(recs)
            records.extend(recs)
        by_id = {s.id: i for i, s in enumerate(samples)}  # records in task order, however they were resumed
        records.sort(key=lambda r: (by_id.get(r["sample_id"], len(by_id)), r.get("query_idx", 0)))
        extra = task.aggregate(records)
        summary = summarize(cfg, rd.hash, records, extra, started, time.perf_counter() - t0,
                            setup=setup, conditions=conditions)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the run failed as a whole: record it, let the sweep go on
        _log(f"run {rd.hash} failed: {type(e).__name__}: {first_line(e)}")
        summary = summarize(cfg, rd.hash, records, {}, started, time.perf_counter() - t0, status="failed", error=e,
                            setup=setup, conditions=conditions)
    rd.write_summary(summary)
    if summary.get("note"):
        _log(f"run {rd.hash}: {summary['note']}")
    score = summary.get("score")
    _log(f"run {rd.hash} {summary.get('status')}"
         + (f", score {score * 100:.1f}" if isinstance(score, (int, float)) and score == score else "")
         + f" -> {rd.path}")
    summary["_dir"] = str(rd.path)
    return summary
