"""Issue 16: a whole RULER-NIAH sweep through kvbench's CLI vs the same samples through kvpress's own pipeline.

Target: the sweep (3 tasks x 4K/8K x 5 methods x 20 samples, the embedded SmolLM2-135M-Instruct) runs end to end
at least 2x faster with kvbench than through kvpress's `pipeline("kv-press-text-generation")` on the same GPU.

Steps (each a fresh Python process started by this script, never two at once; this parent imports neither torch
nor kvpress and never touches the GPU):
1. `--framework export` (untimed prep): kvbench.models resolves the embedded model, dequantizing the GGUF once
   into its safetensors cache (so neither timed side pays it); kvbench's own task code (`task=ruler_niah`,
   conf/task/ruler_niah.yaml with --lengths / --samples) builds the samples; written to OUT/samples.jsonl with
   id, subset, length, context, question, answer_prefix, answers, max_new_tokens, kvbench's context/question
   split (kvbench.prompts.PromptBuilder.first_turn, as the engine does with query_aware=false) and the token
   counts of both sides' prompts. Also OUT/meta.json: model dir, device name, versions.
2. `--framework kvbench` (timed: wall of the whole subprocess): ONE
   `python -m kvbench.cli run -m task=ruler_niah task.lengths=[..] task.num_samples=N method=a,b,.. budget=B
   results_dir=OUT/kvbench_results` (the fresh results dir is removed first, else complete runs are skipped).
   Hydra's basic launcher runs the jobs one after the other in that one process (the model loaded once; each
   run also runs kvbench's untimed-in-records warm-up sample, which the wall clock here does count).
   Records (OUT/kvbench_results/default/<hash>/records.jsonl + config.yaml) give samples, failures, scores.
   Loop-only time = sum of the summaries' `wall_s` minus their warm-up (`setup.warmup_ms`) when present.
3. `--framework kvpress` (timed: wall of the whole subprocess, model load included as on kvbench's side): a
   fresh process that imports nothing of kvbench (checked: `kvbench` not in sys.modules at its end), loads the
   dequantized safetensors dir with `AutoModelForCausalLM.from_pretrained(dir, dtype=bf16,
   attn_implementation="sdpa")` (float32 with --device cpu, as kvbench's dtype=auto), builds
   `pipeline("kv-press-text-generation", model, tokenizer)` and calls it per method x sample:
   `pipe(context, question=question, answer_prefix=answer_prefix, press=press, max_new_tokens=..)`, press
   None (full), SnapKVPress(r, window_size=32, kernel_size=7), StreamingLLMPress(r, n_sink=4),
   PyramidKVPress(r, window_size=32, kernel_size=7), AdaKVPress(SnapKVPress(r, 32, 7)), with
   r = max(0, 1 - budget / context_tokens) per sample (context_tokens: the templated context kvpress prefills).
   Predictions go to OUT/kvpress_predictions.<methods>.jsonl; this parent scores them with kvbench's RULER metric
   (RulerNIAH.score: string_match_all after RULER's postprocess).

SHIM (the only change to kvpress's path, in `install_cache_position_shim`): kvpress 0.5.5's press hooks read
`kwargs["cache_position"]` of the attention layer's forward (BasePress.forward_hook -> is_prefilling);
transformers >= 5.3 no longer passes it (kvpress pins transformers<5.3). A forward pre-hook on every
`self_attn` supplies `cache_position = arange(past, past + q_len)` (past: the layer's cache length before the
call) only when the caller passed none. Nothing else of kvpress is replaced: its pipeline, preprocess,
prefill, presses and greedy loop run as shipped.

Prompt differences (both sides print their mean prompt tokens; the export checks the texts):
- Templating: kvpress renders the chat template over `context + "#"*(len(context)+10)` and splits at the
  separator: context part = template head + context; question part = question + template tail +
  answer_prefix. kvbench renders `context + question` and cuts after the context: the same two texts when
  the template copies the user message verbatim (SmolLM2's does); `text_equal` in samples.jsonl says per sample.
- Both tokenize the two parts separately without special tokens (the template holds them): same ids.
- RULER's lengths count the template and tokens_to_generate (128): prompts are <= L - 128 tokens.
- Decoding: both greedy, max_new_tokens 128, stop at EOS. kvbench also stops at the tokenizer's eos_token_id
  and drops stop ids from the text; kvpress stops at generation_config.eos_token_id and decodes with
  skip_special_tokens. kvbench's engine may use its CUDA-graph decode; kvpress runs its Python loop.
- Budget: kvbench's budget=B keeps B tokens per head and layer on average; kvpress's ratio r keeps
  (1 - r) * context_tokens = B tokens per layer (AdaKV/PyramidKV redistribute them): the same KV size.

kvbench's wall also holds what its CLI does per run: building the task's samples (RULER fits each haystack by
tokenizing it several times; once per method run, as the sweep has 5 runs) and one warm-up sample per run;
the kvpress process gets the samples ready-made from the export (its wall: imports, model load, loop).

Run (GPU machine, repo root), in one call:
    PYTHONPATH=$PWD python bench/sweep_vs_kvpress.py --out sweep16 --json sweep16/out.json
or in two (each side's results are kept in --out; a --skip-* call reuses the other side's results of an earlier
call with the same sweep, and the export when it matches):
    PYTHONPATH=$PWD python bench/sweep_vs_kvpress.py --out sweep16 --skip-kvpress
    PYTHONPATH=$PWD python bench/sweep_vs_kvpress.py --out sweep16 --skip-kvbench --json sweep16/out.json
kvpress's side can also run in parts (`--kvpress-methods`: the methods of this call's kvpress process; each part
keeps its own files, OUT/kvpress_*.<methods>.*), when one part would outlast a call's time limit. The report then
joins the parts: predictions and loop times summed, and the wall of ONE kvpress process = the parts' walls summed
less every part's setup (imports, model load) but the first one's, so splitting never costs kvpress anything.
Export first (both --skip-*), then the sides and parts may run at once on different GPUs (CUDA_VISIBLE_DEVICES),
then a report call (both --skip-*) prints the table:
    python bench/sweep_vs_kvpress.py --out S --skip-kvbench --skip-kvpress
    CUDA_VISIBLE_DEVICES=0 python bench/sweep_vs_kvpress.py --out S --skip-kvpress &
    CUDA_VISIBLE_DEVICES=1 python bench/sweep_vs_kvpress.py --out S --skip-kvbench --kvpress-methods full snapkv
    ...
    python bench/sweep_vs_kvpress.py --out S --skip-kvbench --skip-kvpress --json S/out.json
Smoke (CPU):
    PYTHONPATH=$PWD .venv-compat/bin/python bench/sweep_vs_kvpress.py --device cpu --samples 1 --lengths 1024 \\
        --methods full snapkv --kvpress-path /tmp/kvpress_site --out /tmp/sweep16_smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("full", "snapkv", "streaming_llm", "pyramidkv", "adakv")
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# ---------------------------------------------------------------- pure helpers (tests/test_sweep_vs_kvpress.py)
def compression_ratio(budget: int, context_tokens: int) -> float:
    """kvpress's compression_ratio keeping `budget` of `context_tokens` tokens (0 when the context is smaller)."""
    if context_tokens <= 0:
        return 0.0
    return max(0.0, 1.0 - budget / context_tokens)


def samples_per_s(n: int, seconds: float | None) -> float | None:
    return None if not seconds or seconds <= 0 else n / seconds


def speed_ratio(ours: float | None, theirs: float | None) -> float | None:
    """kvbench samples/s over kvpress samples/s (> 1: kvbench faster)."""
    return None if not ours or not theirs else ours / theirs


def read_kvbench_records(results_dir: Path) -> tuple[list[dict], list[dict]]:
    """Every record of every run under results_dir (<sweep>/<hash>/records.jsonl), tagged with its run's
    method name (config.yaml), and the runs' summaries. A torn last line (an interrupted write) is skipped."""
    import yaml
    records, summaries = [], []
    for rec_path in sorted(Path(results_dir).glob("*/*/records.jsonl")):
        run = rec_path.parent
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
        method = ((cfg or {}).get("method") or {}).get("name", "?")
        for line in rec_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            r["_method"] = method
            records.append(r)
        if (run / "summary.json").exists():
            try:
                s = json.loads((run / "summary.json").read_text())
                s["_method"] = method
                summaries.append(s)
            except json.JSONDecodeError:
                pass
    return records, summaries


def normalize_kvbench(records: list[dict]) -> list[dict]:
    """kvbench records -> rows {method, length, subset, ok, score, prompt_tokens}."""
    out = []
    for r in records:
        meta = r.get("meta") or {}
        ok = r.get("status", "ok") == "ok"
        pt = (r.get("context_tokens") or 0) + (r.get("question_tokens") or 0) if ok else None
        out.append(dict(method=r["_method"], length=meta.get("length"), subset=meta.get("subtask"), ok=ok,
                        score=r.get("score") if ok else None, prompt_tokens=pt))
    return out


def summarize(rows: list[dict]) -> dict[tuple, dict]:
    """(method, length) -> samples, failed, accuracy (mean score of ok samples, x100), mean prompt tokens."""
    acc: dict[tuple, dict] = {}
    for r in rows:
        a = acc.setdefault((r["method"], r["length"]), dict(samples=0, failed=0, scores=[], tokens=[]))
        a["samples"] += 1
        if not r["ok"]:
            a["failed"] += 1
            continue
        if r.get("score") is not None:
            a["scores"].append(float(r["score"]))
        if r.get("prompt_tokens") is not None:
            a["tokens"].append(r["prompt_tokens"])
    out = {}
    for k, a in acc.items():
        out[k] = dict(samples=a["samples"], failed=a["failed"],
                      accuracy=100 * sum(a["scores"]) / len(a["scores"]) if a["scores"] else None,
                      prompt_tokens=sum(a["tokens"]) / len(a["tokens"]) if a["tokens"] else None)
    return out


def mean_prompt_tokens(rows: list[dict]) -> float | None:
    t = [r["prompt_tokens"] for r in rows if r.get("ok") and r.get("prompt_tokens") is not None]
    return sum(t) / len(t) if t else None


def _f(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def build_table(per_fw: dict[str, dict], methods: list[str] | None = None) -> str:
    """per_fw: framework -> {rows: [...], wall_s, loop_s}. One line per framework x method x length, then the
    totals per framework (samples/s end to end and loop only) and the kvbench/kvpress ratios."""
    lines = [f"{'framework':<9} {'method':<14} {'length':>6} {'samples':>7} {'failed':>6} {'accuracy':>8} "
             f"{'prompt_tok':>10}"]
    for fw, d in per_fw.items():
        summ = summarize(d["rows"])
        order = methods or sorted({m for m, _ in summ})
        for m in order:
            for L in sorted(l for mm, l in summ if mm == m):
                s = summ[(m, L)]
                lines.append(f"{fw:<9} {m:<14} {L:>6} {s['samples']:>7} {s['failed']:>6} "
                             f"{_f(s['accuracy'], '8.1f'):>8} {_f(s['prompt_tokens'], '10.1f'):>10}")
    if any(d.get("method_s") for d in per_fw.values()):
        lines.append("")
        lines.append(f"{'method':<14} " + " ".join(f"{fw + ' loop s':>16} {fw + ' s/s':>12}" for fw in per_fw)
                     + ("  kvbench/kvpress" if {"kvbench", "kvpress"} <= set(per_fw) else ""))
        for m in methods or sorted({k for d in per_fw.values() for k in d.get("method_s") or {}}):
            cells, rate = [], {}
            for fw, d in per_fw.items():
                sec = (d.get("method_s") or {}).get(m)
                rate[fw] = samples_per_s(sum(r["method"] == m for r in d["rows"]), sec)
                cells.append(f"{_f(sec, '16.1f'):>16} {_f(rate[fw], '12.3f'):>12}")
            ratio = speed_ratio(rate.get("kvbench"), rate.get("kvpress"))
            lines.append(f"{m:<14} " + " ".join(cells) + (f"  {_f(ratio, '.2f')}x" if len(rate) == 2 else ""))
    lines.append("")
    lines.append(f"{'framework':<9} {'samples':>7} {'failed':>6} {'wall_s':>8} {'loop_s':>8} {'samples/s':>9} "
                 f"{'loop samples/s':>14} {'mean prompt tok':>15}")
    tot = totals(per_fw)
    for fw, t in tot.items():
        lines.append(f"{fw:<9} {t['samples']:>7} {t['failed']:>6} {_f(t['wall_s'], '8.1f'):>8} "
                     f"{_f(t['loop_s'], '8.1f'):>8} {_f(t['samples_per_s'], '9.3f'):>9} "
                     f"{_f(t['loop_samples_per_s'], '14.3f'):>14} {_f(t['mean_prompt_tokens'], '15.1f'):>15}"
                     + ("  (an earlier call's)" if per_fw[fw].get("reused") else ""))
    if "kvbench" in tot and "kvpress" in tot:
        r = speed_ratio(tot["kvbench"]["samples_per_s"], tot["kvpress"]["samples_per_s"])
        rl = speed_ratio(tot["kvbench"]["loop_samples_per_s"], tot["kvpress"]["loop_samples_per_s"])
        lines.append(f"kvbench/kvpress samples/s: end to end {_f(r, '.2f')}x   loop only {_f(rl, '.2f')}x   "
                     f"(target: end to end >= 2x)")
    return "\n".join(lines)


def totals(per_fw: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for fw, d in per_fw.items():
        n = len(d["rows"])
        out[fw] = dict(samples=n, failed=sum(not r["ok"] for r in d["rows"]), wall_s=d.get("wall_s"),
                       loop_s=d.get("loop_s"), samples_per_s=samples_per_s(n, d.get("wall_s")),
                       loop_samples_per_s=samples_per_s(n, d.get("loop_s")),
                       mean_prompt_tokens=mean_prompt_tokens(d["rows"]))
    return out


def kvbench_method_s(summaries: list[dict]) -> dict[str, float]:
    """Per method: its run's wall less model load and warm-up (sample generation included)."""
    out = {}
    for s in summaries:
        if s.get("wall_s") is not None:
            setup = s.get("setup") or {}
            out[s["_method"]] = out.get(s["_method"], 0.0) + float(s["wall_s"]) - (
                float(setup.get("warmup_ms") or 0.0) + float(setup.get("model_load_ms") or 0.0)) / 1e3
    return out


def kvbench_loop_s(summaries: list[dict]) -> float | None:
    """Sum over runs of the run's wall (summary `wall_s`: model load to summary) minus its model load and
    warm-up (summary `setup`); it still holds the task's sample generation (RULER's haystack fitting), which
    the kvpress side gets ready-made. None if a run lacks wall_s."""
    total = 0.0
    for s in summaries:
        w = s.get("wall_s")
        if w is None:
            return None
        setup = s.get("setup") or {}
        total += float(w) - (float(setup.get("warmup_ms") or 0.0) + float(setup.get("model_load_ms") or 0.0)) / 1e3
    return total if summaries else None


def kvpress_split(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """The two texts kvpress 0.5.5's KVPressTextGenerationPipeline.preprocess tokenizes (copied from it, so
    the export can compare them with kvbench's without importing kvpress)."""
    if tokenizer.chat_template is None:
        return (getattr(tokenizer, "bos_token", "") or "") + context, question + "\n" + answer_prefix
    separator = "#" * (len(context) + 10)
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                         add_generation_prompt=True, tokenize=False)
    ctx, suffix = text.split(separator)
    return ctx, question + suffix + answer_prefix


# ---------------------------------------------------------------- export (kvbench's task code)
def export_key(args) -> dict:
    """What the exported samples depend on: a later call with the same key reuses them."""
    return dict(samples=int(args.samples), lengths=[int(x) for x in args.lengths], model=args.model)


def run_export(args) -> None:
    import yaml

    from kvbench.cli import conf_dir
    from kvbench.models import embedded_gguf, gguf_to_safetensors, load_tokenizer
    from kvbench.prompts import PromptBuilder
    from kvbench.runner import build_task, seed_everything
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = gguf_to_safetensors(embedded_gguf(args.model))  # dequantized once, before any timing
    tok = load_tokenizer(args.model)
    tcfg = yaml.safe_load((conf_dir() / "task" / "ruler_niah.yaml").read_text())
    tcfg.update(lengths=[int(x) for x in args.lengths], num_samples=int(args.samples))
    task = build_task(tcfg)
    max_ctx = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    seed_everything(int(tcfg.get("seed", 42)))
    pb = PromptBuilder(tok)
    n = 0
    with open(out / "samples.jsonl", "w") as f:
        for s in task.samples(tok, max_context_tokens=max_ctx):
            row = dict(id=s.id, subset=s.meta.get("subtask"), length=s.meta.get("length"), error=s.error)
            if s.error is None:
                q = s.queries[0]
                kb_ctx, kb_q = pb.first_turn(s.context, q.question, q.answer_prefix, s.chat_template)
                kp_ctx, kp_q = kvpress_split(tok, s.context, q.question, q.answer_prefix)
                kb_ids = (pb.encode(kb_ctx, first=True), pb.encode(kb_q))
                kp_ids = (tok.encode(kp_ctx, add_special_tokens=False), tok.encode(kp_q, add_special_tokens=False))
                row.update(context=s.context, question=q.question, answer_prefix=q.answer_prefix, answers=q.answers,
                           max_new_tokens=q.max_new_tokens, metric=q.meta.get("metric"),
                           kvbench_context_text=kb_ctx, kvbench_question_text=kb_q,
                           kvbench_context_tokens=len(kb_ids[0]), kvbench_question_tokens=len(kb_ids[1]),
                           kvpress_context_tokens=len(kp_ids[0]), kvpress_question_tokens=len(kp_ids[1]),
                           text_equal=(kb_ctx, kb_q) == (kp_ctx, kp_q), ids_equal=kb_ids == kp_ids)
            f.write(json.dumps(row) + "\n")
            n += 1
    import torch
    import transformers
    meta = dict(model_dir=str(model_dir), samples=n, export_args=export_key(args), transformers=transformers.__version__, torch=torch.__version__,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", python=sys.version.split()[0])
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"[export] {n} samples -> {out / 'samples.jsonl'}; model dir {model_dir}", flush=True)


# ---------------------------------------------------------------- kvpress (its own process, nothing of kvbench)
SHIM_CALLS = [0]


def install_cache_position_shim(model) -> list:
    """kvpress 0.5.5's hooks read kwargs['cache_position'], which transformers >= 5.3 no longer passes to the
    attention layers: a forward pre-hook on each self_attn supplies arange(past, past + q_len) when absent.
    Returns the hook handles; SHIM_CALLS counts the calls it supplied cache_position to (0: not needed)."""
    import torch

    def pre_hook(module, args, kwargs):
        if kwargs.get("cache_position") is not None:
            return None
        SHIM_CALLS[0] += 1
        hs = kwargs.get("hidden_states", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
        kwargs["cache_position"] = torch.arange(past, past + hs.shape[1], device=hs.device)
        return args, kwargs

    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in base.layers]


def kvpress_press(name: str, ratio: float):
    """The press of each method, as bench/gpu_speed.py builds it (one definition for both benchmarks; importing
    gpu_speed imports torch, not kvbench)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # called once per sample and press
        sys.path.insert(0, here)
    from gpu_speed import kvpress_press as press
    return press(name, ratio)


def run_kvpress(args) -> None:
    t_start = time.perf_counter()
    import torch
    import kvpress  # noqa: F401 - imported first, as its users do (it registers its pipeline, patches attention)
    from importlib.metadata import version
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers import __version__ as tv
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    shims = install_cache_position_shim(model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=dev)
    samples = [json.loads(l) for l in open(args.samples_file) if l.strip()]
    first = next((s for s in samples if not s.get("error")), None)
    if first is not None:  # the export's token count = kvpress's own preprocess (once, before the loop)
        got = pipe.preprocess(first["context"], questions=[first["question"]], answer_prefix=first["answer_prefix"],
                              max_context_length=min(tok.model_max_length, int(1e10)))
        n = (got["context_ids"].shape[1], got["questions_ids"][0].shape[1])
        want = (first["kvpress_context_tokens"], first["kvpress_question_tokens"])
        if n != want:
            print(f"[kvpress] WARNING: pipeline.preprocess gives {n} tokens, the export {want}", flush=True)
    load_s = time.perf_counter() - t_start
    print(f"[kvpress] device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}  torch "
          f"{torch.__version__}  transformers {tv}  kvpress {version('kvpress')}  {dtype}  sdpa  "
          f"cache_position shim on {len(shims)} layers  setup {load_s:.1f} s", flush=True)
    preds = open(args.pred_file, "w")
    t_loop, method_s = time.perf_counter(), {}
    for name in args.methods:
        t_m = time.perf_counter()
        for s in samples:
            row = dict(id=s["id"], method=name, subset=s["subset"], length=s["length"])
            if s.get("error"):
                row.update(status="failed", error=s["error"])
            else:
                try:
                    n_ctx = s["kvpress_context_tokens"]  # the export's copy of preprocess; checked above
                    r = compression_ratio(args.budget, n_ctx)
                    press = kvpress_press(name, r)
                    with torch.no_grad():
                        ans = pipe(s["context"], question=s["question"], answer_prefix=s["answer_prefix"], press=press,
                                   max_new_tokens=s["max_new_tokens"])["answer"]
                    row.update(status="ok", prediction=ans, compression_ratio=None if press is None else r,
                               context_tokens=n_ctx,
                               question_tokens=s["kvpress_question_tokens"])
                except Exception as e:  # noqa: BLE001 - a failing sample is recorded, the others run
                    row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    if args.fail_fast:
                        raise
            preds.write(json.dumps(row) + "\n")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        method_s[name] = time.perf_counter() - t_m
        print(f"[kvpress] {name}: {len(samples)} samples in {method_s[name]:.1f} s", flush=True)
    loop_s = time.perf_counter() - t_loop
    preds.close()
    print(f"[kvpress] cache_position shim supplied it on {SHIM_CALLS[0]} attention calls", flush=True)
    timing = dict(load_s=load_s, loop_s=loop_s, process_s=time.perf_counter() - t_start, shim_calls=SHIM_CALLS[0], method_s=method_s,
                  kvbench_imported="kvbench" in sys.modules, torch=torch.__version__, transformers=tv,
                  kvpress=version("kvpress"), device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    Path(args.timing_file).write_text(json.dumps(timing, indent=1))
    print(f"[kvpress] loop {loop_s:.1f} s; kvbench imported: {timing['kvbench_imported']}", flush=True)


# ---------------------------------------------------------------- parent: orchestration, scoring, table
def score_kvpress(pred_file: Path, samples_file: Path) -> list[dict]:
    """kvpress predictions -> rows, scored with kvbench's RULER-NIAH metric (RulerNIAH.score: RULER's
    postprocess, then string_match_all), exactly as kvbench's runner scores its own records."""
    from kvbench.task import Query, Sample
    from kvbench.tasks.ruler import RulerNIAH
    task = RulerNIAH(lengths=[4096])
    by_id = {s["id"]: s for s in (json.loads(l) for l in open(samples_file) if l.strip())}
    rows = []
    for l in open(pred_file):
        if not l.strip():
            continue
        p = json.loads(l)
        s = by_id[p["id"]]
        ok = p.get("status") == "ok"
        score = None
        if ok:
            q = Query(question=s["question"], answers=s["answers"], max_new_tokens=s["max_new_tokens"],
                      answer_prefix=s["answer_prefix"])
            smp = Sample(id=s["id"], context="", queries=[q], meta={"subtask": s["subset"], "length": s["length"]})
            score = float(task.score(task.postprocess(p["prediction"], q, smp), q, smp))
        rows.append(dict(method=p["method"], length=p["length"], subset=p["subset"], ok=ok, score=score,
                         prompt_tokens=(p.get("context_tokens") or 0) + (p.get("question_tokens") or 0) if ok else None,
                         error=p.get("error")))
    return rows


def side_key(args, methods=None) -> dict:
    """What one side's results depend on (a --skip-* call reuses them only when this matches)."""
    return dict(export_key(args), methods=list(args.methods if methods is None else methods), budget=int(args.budget),
                device=args.device)


def part_tag(methods) -> str:
    """The file tag of one kvpress part: its methods, in the order they ran."""
    return "-".join(methods)


def join_kvpress_parts(parts: list[dict]) -> dict:
    """kvpress parts (each {wall_s, rc, timing: {load_s, loop_s, method_s}}, in the order they ran) -> one
    kvpress process: wall = the parts' walls summed less every part's setup (load_s) but the first one's (as if
    one process had loaded the model once and run every part's loop), loop and per-method seconds summed; rc the
    first nonzero one."""
    if not parts:
        return {}
    wall = sum(float(p["wall_s"]) for p in parts) - sum(float((p.get("timing") or {}).get("load_s") or 0.0)
                                                        for p in parts[1:])
    loops = [(p.get("timing") or {}).get("loop_s") for p in parts]
    method_s: dict[str, float] = {}
    for p in parts:
        for m, sec in ((p.get("timing") or {}).get("method_s") or {}).items():
            method_s[m] = method_s.get(m, 0.0) + float(sec)
    return dict(wall_s=wall, loop_s=None if any(x is None for x in loops) else sum(float(x) for x in loops),
                method_s=method_s, rc=next((p["rc"] for p in parts if p.get("rc")), 0), parts=len(parts))


def load_kvpress_parts(out: Path, args) -> list[dict]:
    """The kvpress parts an earlier call saved in `out` for this sweep (same export, budget and device; methods
    among args.methods; a method's earliest part only), each with its wall, rc, timing and prediction file; in the
    order they started. Missing methods are simply absent from the table."""
    found = sorted((json.loads(p.read_text()) for p in out.glob("kvpress_wall.*.json")),
                   key=lambda d: d.get("started", 0.0))
    parts, seen = [], set()
    for d in found:
        ms = d.get("key", {}).get("methods") or []
        if d.get("key") != side_key(args, ms) or not set(ms) <= set(args.methods) or seen & set(ms):
            continue
        seen |= set(ms)
        tag = part_tag(ms)
        t = out / f"kvpress_timing.{tag}.json"
        d.update(tag=tag, timing=json.loads(t.read_text()) if t.exists() else {},
                 pred=out / f"kvpress_predictions.{tag}.jsonl")
        parts.append(d)
    return parts


def load_side(out: Path, fw: str, args) -> dict | None:
    """The wall time and exit code an earlier call of this script saved for `fw` in `out`, when it ran the same
    sweep (--skip-kvbench / --skip-kvpress then report it, so the two sides can run in two calls)."""
    p = out / f"{fw}_wall.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return d if d.get("key") == side_key(args) else None


def _env(extra_path: str | None = None, drop: tuple[str, ...] = (), add_repo: bool = True) -> dict:
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in drop]
    if extra_path:
        parts.insert(0, extra_path)
    if add_repo and str(REPO) not in parts:
        parts.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def _timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Run cmd, its output teed to the terminal and to log; returns (wall seconds, exit code)."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    return time.perf_counter() - t0, rc


def kvbench_command(args, results_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "kvbench.cli", "run", "-m", "task=ruler_niah",
           f"task.lengths=[{','.join(str(int(x)) for x in args.lengths)}]", f"task.num_samples={args.samples}",
           f"method={','.join(args.methods)}", f"budget={args.budget}", f"results_dir={results_dir}"]
    if args.device != "auto":
        cmd.append(f"device={args.device}")
    return cmd + list(args.kvbench_extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20, help="samples per subset x length")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--out", default="/tmp/sweep_vs_kvpress")
    ap.add_argument("--json", default=None, help="write the table's numbers here")
    ap.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    ap.add_argument("--model", default="smollm2-135m", help="kvbench's embedded model name")
    ap.add_argument("--kvpress-path", default=None, help="prepended to PYTHONPATH of the kvpress process only")
    ap.add_argument("--framework", choices=("kvbench", "kvpress", "export"), default=None,
                    help="internal: run one side in this process")
    ap.add_argument("--skip-kvbench", action="store_true")
    ap.add_argument("--skip-kvpress", action="store_true")
    ap.add_argument("--fail-fast", action="store_true", help="kvpress: stop at the first failing sample")
    ap.add_argument("--kvbench-extra", nargs="*", default=[], help="extra overrides for kvbench's CLI")
    ap.add_argument("--kvpress-methods", nargs="+", default=None, choices=METHODS,
                    help="the methods of this call's kvpress part (default: --methods)")
    # internal (kvpress process)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--samples-file", default=None)
    ap.add_argument("--pred-file", default=None)
    ap.add_argument("--timing-file", default=None)
    args = ap.parse_args()

    if args.framework == "export":
        return run_export(args)
    if args.framework == "kvpress":
        return run_kvpress(args)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--samples", str(args.samples), "--lengths", *map(str, args.lengths), "--model", args.model,
              "--out", str(out), "--device", args.device]
    # 1. untimed prep: dequantize once, export the samples (reused when a previous call exported the same ones)
    prev = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    if prev.get("export_args") == export_key(args) and (out / "samples.jsonl").exists() \
            and Path(prev.get("model_dir", "/nonexistent")).exists():
        export_s = 0.0
        print(f"[export] reusing {out / 'samples.jsonl'}", flush=True)
    else:
        export_s, rc = _timed([sys.executable, str(HERE), "--framework", "export", *common], _env(), out / "export.log")
        if rc:
            sys.exit(f"export failed (rc {rc}); see {out / 'export.log'}")
    meta = json.loads((out / "meta.json").read_text())
    samples = [json.loads(l) for l in open(out / "samples.jsonl") if l.strip()]
    ok = [s for s in samples if not s.get("error")]
    print(f"[export] {len(samples)} samples ({len(samples) - len(ok)} unfit) in {export_s:.1f} s; "
          f"texts equal kvbench/kvpress: {sum(s['text_equal'] for s in ok)}/{len(ok)}, token ids equal: "
          f"{sum(s['ids_equal'] for s in ok)}/{len(ok)}", flush=True)
    if ok:
        kb = sum(s["kvbench_context_tokens"] + s["kvbench_question_tokens"] for s in ok) / len(ok)
        kp = sum(s["kvpress_context_tokens"] + s["kvpress_question_tokens"] for s in ok) / len(ok)
        print(f"[export] mean prompt tokens: kvbench {kb:.1f}  kvpress {kp:.1f}", flush=True)

    per_fw: dict[str, dict] = {}
    # 2. kvbench: ONE CLI sweep, wall of the whole process
    if not args.skip_kvbench:
        results_dir = out / "kvbench_results"
        if results_dir.exists():  # complete runs would be skipped: a fresh dir
            shutil.rmtree(results_dir)
        kvpress_dirs = (args.kvpress_path,) if args.kvpress_path else ()
        wall, rc = _timed(kvbench_command(args, results_dir), _env(drop=kvpress_dirs), out / "kvbench.log")
        records, summaries = read_kvbench_records(results_dir)
        per_fw["kvbench"] = dict(rows=normalize_kvbench(records), wall_s=wall, loop_s=kvbench_loop_s(summaries),
                                 method_s=kvbench_method_s(summaries), rc=rc, command=" ".join(kvbench_command(args, results_dir)))
        (out / "kvbench_wall.json").write_text(json.dumps(dict(wall_s=wall, rc=rc, key=side_key(args))))
        print(f"[kvbench] rc {rc}, {len(records)} records, wall {wall:.1f} s", flush=True)
    elif (prev_side := load_side(out, "kvbench", args)) is not None:
        records, summaries = read_kvbench_records(out / "kvbench_results")
        per_fw["kvbench"] = dict(rows=normalize_kvbench(records), wall_s=prev_side["wall_s"],
                                 loop_s=kvbench_loop_s(summaries), method_s=kvbench_method_s(summaries),
                                 rc=prev_side["rc"], reused=True)
        print(f"[kvbench] skipped: reusing the results of an earlier call in {out}", flush=True)
    # 3. kvpress: its own process (after kvbench's has ended, unless the caller runs the two at once on two GPUs)
    if not args.skip_kvpress:
        ms = list(args.kvpress_methods or args.methods)
        if not set(ms) <= set(args.methods):
            sys.exit(f"--kvpress-methods {ms}: must be among --methods {list(args.methods)}")
        tag = part_tag(ms)
        pred, timing = out / f"kvpress_predictions.{tag}.jsonl", out / f"kvpress_timing.{tag}.json"
        for p in (pred, timing, out / f"kvpress_wall.{tag}.json"):
            p.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE), "--framework", "kvpress", "--model-dir", meta["model_dir"],
               "--samples-file", str(out / "samples.jsonl"), "--pred-file", str(pred), "--timing-file", str(timing),
               "--budget", str(args.budget), "--device", args.device, "--methods", *ms]
        if args.fail_fast:
            cmd.append("--fail-fast")
        # only kvpress's path (and no repo root: the kvpress process must not find kvbench's package by accident)
        env = _env(args.kvpress_path, drop=(str(REPO), "", "."), add_repo=False)
        started = time.time()
        wall, rc = _timed(cmd, env, out / f"kvpress.{tag}.log")
        (out / f"kvpress_wall.{tag}.json").write_text(json.dumps(dict(wall_s=wall, rc=rc, started=started,
                                                                      key=side_key(args, ms))))
        print(f"[kvpress] part {tag}: rc {rc}, wall {wall:.1f} s", flush=True)
    if parts := load_kvpress_parts(out, args):
        rows = [r for p in parts if p["pred"].exists() for r in score_kvpress(p["pred"], out / "samples.jsonl")]
        joined = join_kvpress_parts(parts)
        per_fw["kvpress"] = dict(rows=rows, wall_s=joined["wall_s"], loop_s=joined["loop_s"],
                                 method_s=joined["method_s"], rc=joined["rc"], timing=[p["timing"] for p in parts],
                                 parts=[p["tag"] for p in parts], reused=args.skip_kvpress)
        t = parts[0]["timing"]
        meta.update({k: t[k] for k in ("kvpress", "torch", "transformers") if k in t})
        print(f"[kvpress] {len(parts)} part(s) {[p['tag'] for p in parts]}: {len(rows)} predictions, joined wall "
              f"{joined['wall_s']:.1f} s", flush=True)
    if "kvpress" in per_fw:
        errs = sorted({r["error"] for r in per_fw["kvpress"]["rows"] if r.get("error")})
        for e in errs[:5]:
            print(f"[kvpress] failure: {e}", flush=True)

    header = (f"RULER-NIAH sweep: {len(args.lengths)} lengths {args.lengths} x 3 subsets x {args.samples} samples x "
              f"methods {' '.join(args.methods)}  budget {args.budget}\ndevice {meta.get('device')}  python "
              f"{meta.get('python')}  torch {meta.get('torch')}  transformers {meta.get('transformers')}  kvpress "
              f"{meta.get('kvpress', '-')}  model {args.model} ({meta.get('model_dir')})")
    table = build_table(per_fw, list(args.methods))
    print("\n" + header + "\n" + table, flush=True)
    if args.json:
        tot = totals(per_fw)
        blob = dict(meta=meta, args={k: v for k, v in vars(args).items() if k not in ("framework",)},
                    totals=tot, ratio_end_to_end=speed_ratio(tot.get("kvbench", {}).get("samples_per_s"),
                                                             tot.get("kvpress", {}).get("samples_per_s")),
                    ratio_loop=speed_ratio(tot.get("kvbench", {}).get("loop_samples_per_s"),
                                           tot.get("kvpress", {}).get("loop_samples_per_s")),
                    per_method={fw: {f"{m}@{L}": v for (m, L), v in summarize(d["rows"]).items()}
                                for fw, d in per_fw.items()},
                    rc={fw: d.get("rc") for fw, d in per_fw.items()}, table=table)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(blob, indent=1, default=str))
        print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()
